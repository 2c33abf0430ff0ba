"""Studies of many runs, run in resumable chunks: the generic part (projects/<name>/ hold the studies).

A study is a list of `Job`s, each a folder of the workdir that holds results.json (with the job's wall
time) once it has finished. `run_chunk` runs the unfinished ones in order within a time budget; a finished
job is skipped, an interrupted one resumes from its checkpoint, so a study accumulates over chunks. A
study's committed record of finished jobs (`restore`) lets a fresh machine continue instead of starting
over. `estimator` guesses a job's time from the finished jobs of its kind.
"""

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from at_jax import checkpoint, metrics, storage
from at_jax.experiment.paths import EXPORT_DIR


@dataclasses.dataclass(frozen=True)
class Job:
  """One unit of work: `run()` returns what results.json keeps; `path` is its folder in the workdir."""

  path: str
  run: Callable[[str], dict[str, Any]]
  kind: str  # "teacher", "curve", "student", "ensemble", "analysis": for time estimates
  needs: tuple[str, ...] = ()  # jobs whose exports it reads

  def done_file(self, workdir: str) -> str:
    return os.path.join(workdir, self.path, "results.json")


def read_results(workdir: str, job: Job) -> dict[str, Any] | None:
  path = job.done_file(workdir)
  if not storage.exists(path):
    return None
  with storage.open_file(path) as f:
    return json.load(f)


def restore(workdir: str, jobs: Sequence[Job], recorded: Mapping[str, Any]) -> list[str]:
  """Writes the results of finished jobs recorded in a committed study.json (`recorded`: its "runs")
  into `workdir`, so that a fresh machine continues the study instead of starting over; returns them.
  A teacher is not restored without its export (every student needs its weights: it is trained again,
  deterministically on CPU), nor a run whose export a pending job needs."""
  needed = {path for job in jobs if job.path not in recorded for path in job.needs}
  restored = []
  for job in jobs:
    if job.path not in recorded or read_results(workdir, job) is not None:
      continue
    export = os.path.join(workdir, job.path, EXPORT_DIR)
    if (job.kind == "teacher" or job.path in needed) and not checkpoint.is_export(export):
      continue
    storage.write_atomic(job.done_file(workdir), json.dumps(recorded[job.path], indent=1))
    restored.append(job.path)
  return restored


def copy_export(source: str, destination: str) -> bool:
  """Copies a finished params export (a teacher's: committed beside a study's record, so a fresh machine
  need not train it again) to `destination` where none is; whether it did. An export is finished once
  its model_config.json is written (storage.copy_tree writes it last)."""
  if checkpoint.is_export(source) and not checkpoint.is_export(destination):
    storage.copy_tree(source, destination)
    return True
  return False


def run_chunk(
  workdir: str, jobs: Sequence[Job], minutes: float, estimate: Callable[[Job], float]
) -> list[str]:
  """Runs the unfinished `jobs` in order while the next one's `estimate` (seconds) fits in `minutes`;
  returns the paths run. A job's results.json, with its wall time, is written when it finishes."""
  start, ran = time.time(), []
  pending = [job for job in jobs if read_results(workdir, job) is None]
  for i, job in enumerate(pending, 1):
    left = minutes * 60 - (time.time() - start)
    if estimate(job) > left:
      metrics.say(
        f"== chunk budget: {left / 60:.0f} min left, {job.path} needs ~{estimate(job) / 60:.0f}; stopping =="
      )
      break
    metrics.say(
      f"== [{i}/{len(pending)}] {job.path} ({(time.time() - start) / 60:.1f} min into the chunk) =="
    )
    began = time.time()
    results = job.run(os.path.join(workdir, job.path))
    results["wall_s"] = time.time() - began
    storage.write_atomic(job.done_file(workdir), json.dumps(results, indent=1))
    ran.append(job.path)
  return ran


def estimator(
  workdir: str, jobs: Sequence[Job], first_guess: Mapping[str, float]
) -> Callable[[Job], float]:
  """Seconds for a job: the median wall time of finished jobs of its kind and group (the first part of
  its path), else `first_guess[kind]`."""
  key = lambda job: (job.kind, job.path.split("/")[0])
  measured: dict[tuple[str, str], list[float]] = {}
  for job in jobs:
    found = read_results(workdir, job)
    if found is not None and "wall_s" in found:
      measured.setdefault(key(job), []).append(found["wall_s"])
  return lambda job: statistics.median(measured.get(key(job)) or [first_guess[job.kind]])


def train(config_fn: Callable[[], ml_collections.ConfigDict]) -> Callable[[str], dict[str, Any]]:
  """A job's `run`: trains `config_fn()` in its folder (resuming), returns the evaluations."""

  def run(run_dir: str) -> dict[str, Any]:
    from at_jax.experiment import loop  # pylint: disable=import-outside-toplevel

    return dict(loop.train_and_evaluate(config_fn(), run_dir))

  return run


# ----------------------------------------------------------------------------
# Verdicts over seeds.

NOISE_SE = 2.0  # a difference counts only beyond 2 standard errors (over seeds) of the difference


Estimate = tuple[float, float, int]  # (mean, standard error, seeds)


def mean_se(summary: Mapping[str, Any], group: str, setting: str) -> Estimate:
  """The group's mean last-evaluation top-1 of `setting`, its standard error over seeds (the
  summary's std is numpy's population std: the sample SE is std / sqrt(n - 1)) and the seed count."""
  row = summary.get(group, {}).get(setting, {}).get("top1")
  if row is None:
    return float("nan"), float("nan"), 0
  mean, std, n = row
  return mean, (std / np.sqrt(n - 1) if n > 1 else float("nan")), n


def beats(a: Estimate, b: Estimate) -> tuple[str, str]:
  """("yes" | "no" | "within noise" | "n/a" | "1 seed", the numbers) for "a is above b". One seed
  has no noise estimate, so it gets no verdict; a missing setting gets "n/a"."""
  (ma, sa, na), (mb, sb, nb) = a, b
  if not na or not nb:
    return "n/a", "not run yet"
  if min(na, nb) < 2:
    return "1 seed", f"{ma:.2f} vs {mb:.2f}"
  noise = NOISE_SE * float(np.hypot(sa, sb))
  numbers = f"{ma:.2f} vs {mb:.2f} (noise {noise:.2f})"
  return ("yes" if ma - mb > noise else "no" if mb - ma > noise else "within noise"), numbers
