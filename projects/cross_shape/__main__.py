"""Runs the cross-shape study in resumable chunks (README.md), then writes its report.

python -m projects.cross_shape --minutes=100     # one chunk; repeat until it says done
python -m projects.cross_shape --report_only     # tables and plots of what is done
"""

import json
import os
import statistics

from absl import app, flags

from at_jax import metrics, storage
from at_jax.experiment import study
from projects.cross_shape import plan, report

flags.DEFINE_string("workdir", "workdir/cross_shape", "Where the runs go (a folder, or gs://...).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Where results go.")
flags.DEFINE_float("minutes", 100.0, "This chunk's time budget: no job starts that would not fit.")
flags.DEFINE_list("only", [], "Run only the jobs whose path starts with one of these.")
flags.DEFINE_bool("report_only", False, "Only write the report of the finished jobs.")
flags.DEFINE_bool("list", False, "Only list the jobs, and which are done.")
FLAGS = flags.FLAGS
FIRST_GUESS = {"teacher": 1800.0, "student": 240.0}  # seconds on 2 cores, until one has finished


def _estimate(workdir: str, jobs: list[study.Job]):
  """A job's seconds: the median of finished jobs of its kind and group, else FIRST_GUESS."""
  measured: dict[tuple[str, str], list[float]] = {}
  for job in jobs:
    found = study.read_results(workdir, job)
    if found is not None:
      measured.setdefault((job.kind, job.path.split("/")[0]), []).append(found["wall_s"])
  key = lambda job: (job.kind, job.path.split("/")[0])
  return lambda job: statistics.median(measured.get(key(job)) or [FIRST_GUESS[job.kind]])


def main(argv: list[str]) -> None:
  del argv
  workdir = storage.absolute(FLAGS.workdir)
  jobs = plan.build_jobs(workdir)
  recorded = os.path.join(FLAGS.out, "results.json")
  if storage.exists(recorded):  # a fresh machine continues from the committed record and teacher
    with storage.open_file(recorded) as f:
      runs = json.load(f)["runs"]
    report.restore_teacher(FLAGS.out, workdir)
    study.restore(workdir, jobs, runs)
  if FLAGS.list:
    for job in jobs:
      print(("done  " if study.read_results(workdir, job) else "      ") + job.path)
    return
  chosen = [job for job in jobs if not FLAGS.only or job.path.startswith(tuple(FLAGS.only))]
  if not FLAGS.report_only:
    study.run_chunk(workdir, chosen, FLAGS.minutes, _estimate(workdir, jobs))
  print(report.write(workdir, jobs, FLAGS.out), flush=True)
  left = sum(study.read_results(workdir, job) is None for job in jobs)
  metrics.say(f"{left} jobs left" + ("" if left else ": the study is done"))


if __name__ == "__main__":
  app.run(main)
