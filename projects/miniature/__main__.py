"""The paper's findings in miniature on Fashion-MNIST and MNIST digits, in resumable chunks.

  python -m projects.miniature --workdir=workdir/study --minutes=110   # one chunk; repeat until it says done
  python -m projects.miniature --workdir=workdir/study --report_only   # tables and plots of what is done

The plan (`projects.miniature.plan`): two MAE teachers pre-trained without labels, one scratch learning
curve that fixes the student schedule, then the main, low-label and shift groups' students under the
headline settings (scratch, fine-tune, copy, distill, feature distillation; `--seeds`), their ensembles,
and the ablations (`--ablation_seeds`). A chunk runs the unfinished jobs in order while the next one fits
in `--minutes` (estimated from finished jobs of its kind), then writes study.json (with a log of the
chunks), study_results.md, plots and the teachers' exports (~1.3 MB each) to `--out`. Commit `--out` after
each chunk: on a fresh machine the committed study.json and teachers restore the finished jobs. A study.json
of other options (model, data size, epochs) is refused, not mixed in.
"""

import dataclasses
import json
import os
import time

from absl import app, flags

from at_jax import metrics, storage
from at_jax.experiment import studies
from launch import cli  # the launchers' quiet logging (orbax INFO lines buried the progress)
from projects.miniature import plan as study
from projects.miniature import report as study_report

flags.DEFINE_string("workdir", "workdir/study", "Where the runs go (a folder, or gs://...).")
flags.DEFINE_string(
  "out",
  os.path.join(os.path.dirname(__file__), "results"),
  "Where study.json, the report and plots go.",
)
flags.DEFINE_float("minutes", 110.0, "This chunk's time budget: no job starts that would not fit.")
flags.DEFINE_integer("seeds", 3, "Seeds of each headline setting.")
flags.DEFINE_integer("ablation_seeds", 2, "Seeds of each ablation.")
flags.DEFINE_integer(
  "train_examples", 10000, "Labelled Fashion-MNIST training images of the main group."
)
flags.DEFINE_float("teacher_epochs", 20.0, "MAE pre-training epochs of each teacher.")
flags.DEFINE_integer(
  "curve_epochs", 40, "Longest scratch learning curve (one evaluation per epoch)."
)
flags.DEFINE_float(
  "plateau_within", 1.0, "Students train until the curve comes within this many points of its best."
)
flags.DEFINE_string("variant", "Mini/7", "The teachers' and students' ViT (model.variant).")
flags.DEFINE_bool("report_only", False, "Only write the report of the finished jobs.")
flags.DEFINE_list(
  "only", [], "Run only the jobs whose path starts with one of these (e.g. teachers,curve)."
)
flags.DEFINE_bool("list", False, "Only list the jobs, and which are done.")
FLAGS = flags.FLAGS

# Seconds a job of each kind takes before any has finished (2 CPU cores; replaced by measurements).
FIRST_GUESS = {"teacher": 1200, "curve": 900, "student": 600, "ensemble": 60, "analysis": 120}


def main(argv):
  del argv
  workdir = storage.absolute(FLAGS.workdir)
  options = study.Options(
    seeds=FLAGS.seeds,
    ablation_seeds=FLAGS.ablation_seeds,
    train_examples=FLAGS.train_examples,
    teacher_epochs=FLAGS.teacher_epochs,
    curve_epochs=FLAGS.curve_epochs,
    plateau_within=FLAGS.plateau_within,
    variant=FLAGS.variant,
  )
  jobs = study.build_jobs(options, workdir)
  committed = os.path.join(FLAGS.out, "study.json")
  if storage.exists(committed):  # a fresh machine continues from the committed record
    with storage.open_file(committed) as f:
      record = json.load(f)
    try:
      study.check_plan(record.get("plan"), options, committed)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    copied = study.copy_teachers(FLAGS.out, workdir)
    restored = studies.restore(workdir, jobs, record["runs"])
    if copied or restored:
      metrics.say(
        f"From {FLAGS.out}: teacher exports {copied or 'none'}; {len(restored)} finished jobs"
      )
  if FLAGS.list:
    for job in jobs:
      print(("done  " if studies.read_results(workdir, job) else "      ") + job.path)
    return
  started = time.time()
  chosen = [job for job in jobs if not FLAGS.only or job.path.startswith(tuple(FLAGS.only))]
  if FLAGS.only and not chosen:
    raise app.UsageError(f"--only={','.join(FLAGS.only)} matches no job (see --list)")
  ran = (
    []
    if FLAGS.report_only
    else studies.run_chunk(
      workdir, chosen, FLAGS.minutes, studies.estimator(workdir, jobs, FIRST_GUESS)
    )
  )
  left = sum(studies.read_results(workdir, job) is None for job in jobs)
  chunk = dict(
    started=time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
    minutes=round((time.time() - started) / 60, 1),
    jobs=ran,
    jobs_left=left,
  )
  study.copy_teachers(workdir, FLAGS.out)  # committed with study.json: no session trains them again
  logged = None if FLAGS.report_only else chunk  # a re-rendered report is not a chunk of work
  text = study_report.write(workdir, jobs, FLAGS.out, logged, plan=dataclasses.asdict(options))
  print(text, flush=True)
  metrics.say(
    f"{len(ran)} jobs run in {chunk['minutes']} min; {left} left"
    + ("" if left else ": the study is done")
  )


if __name__ == "__main__":
  cli.run(main)
