"""Runs the cross-shape study in resumable chunks (README.md), then writes its report.

python -m projects.cross_shape --minutes=100     # one chunk; repeat until it says done
python -m projects.cross_shape --report_only     # tables and plots of what is done
"""

import json
import os

from absl import flags

from at_jax import metrics, storage
from at_jax.experiment import studies
from launch import cli  # the launchers' quiet logging (orbax INFO lines buried the progress)
from projects.cross_shape import plan, report

flags.DEFINE_string("workdir", "workdir/cross_shape", "Where the runs go (a folder, or gs://...).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Where results go.")
flags.DEFINE_float("minutes", 100.0, "This chunk's time budget: no job starts that would not fit.")
flags.DEFINE_list("only", [], "Run only the jobs whose path starts with one of these.")
flags.DEFINE_bool("report_only", False, "Only write the report of the finished jobs.")
flags.DEFINE_bool("list", False, "Only list the jobs, and which are done.")
FLAGS = flags.FLAGS
FIRST_GUESS = {"teacher": 1800.0, "student": 240.0}  # seconds on 2 cores, until one has finished


def main(argv: list[str]) -> None:
  del argv
  workdir = storage.absolute(FLAGS.workdir)
  jobs = plan.build_jobs(workdir)
  recorded = os.path.join(FLAGS.out, "results.json")
  if storage.exists(recorded):  # a fresh machine continues from the committed record and teacher
    with storage.open_file(recorded) as f:
      runs = json.load(f)["runs"]
    report.restore_teacher(FLAGS.out, workdir)
    studies.restore(workdir, jobs, runs)
  if FLAGS.list:
    for job in jobs:
      print(("done  " if studies.read_results(workdir, job) else "      ") + job.path)
    return
  chosen = [job for job in jobs if not FLAGS.only or job.path.startswith(tuple(FLAGS.only))]
  if not FLAGS.report_only:
    studies.run_chunk(workdir, chosen, FLAGS.minutes, studies.estimator(workdir, jobs, FIRST_GUESS))
  print(report.write(workdir, jobs, FLAGS.out), flush=True)
  left = sum(studies.read_results(workdir, job) is None for job in jobs)
  metrics.say(f"{left} jobs left" + ("" if left else ": the study is done"))


if __name__ == "__main__":
  cli.run(main)
