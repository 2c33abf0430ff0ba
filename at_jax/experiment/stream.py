"""A run's training data stream: its batches, and the position saved with each checkpoint.

The stream is a pure function of (seed, batch size, split, step) (`pipeline.train_iterator`), so a
checkpoint's position is enough to resume it exactly, and a relaunch on another stream is refused.
"""

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from at_jax import metrics
from at_jax.data import options, pipeline, sources, target_store
from at_jax.errors import ConfigError
from at_jax.experiment.runs import Run


def train_batches(run: Run, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  """The batches of steps `start_step + 1, ...`; with precomputed targets, in the fixed view they were
  computed on, carrying them up to the last distilling step (`transfer.until`: the label-only steps
  after it get the same images, without their targets read)."""
  d = run.config.data
  stop = run.task.switch_step if run.label_step_fn else None  # the last step that reads targets
  precomputed = run.transfer.active and run.transfer.source == "precomputed"
  targets = _targets(run, stop, start_step) if precomputed else None

  def from_step(step: int, read_targets: bool) -> Iterator[dict[str, np.ndarray]]:
    return pipeline.train_iterator(
      run.train_source,
      global_batch_size=d.batch_size,
      **options.eval_view(d),
      seed=run.config.seed,
      start_step=step,
      rrc_scale=tuple(d.rrc_scale),
      hflip=d.hflip,
      randaugment=d.randaugment,
      random_erase=d.random_erase,
      fixed_view=targets is not None,  # kept after a switch: the label-only steps see those images
      targets=targets if read_targets else None,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_threads=d.num_threads,
    )

  if targets is None or stop is None:
    return from_step(start_step, True)
  if start_step >= stop:
    return from_step(start_step, False)
  return itertools.chain(
    itertools.islice(from_step(start_step, True), stop - start_step),
    _later(lambda: from_step(stop, False)),
  )


def _later(make: Callable[[], Iterator[dict[str, np.ndarray]]]) -> Iterator[dict[str, np.ndarray]]:
  """`make()`'s batches, built when the first is asked for (a second reader opens at the switch)."""
  yield from make()


def _targets(run: Run, stop: int | None, start_step: int) -> target_store.TeacherTargets:
  """The run's stored targets, said in one line (which steps read them)."""
  directory = target_store.targets_dir(run.config.transfer.targets_dir, run.workdir)
  targets = target_store.TeacherTargets(directory, run.transfer.teacher_layers)
  metrics.say(
    f"Teacher targets: {', '.join(targets.metadata['keys'])} from {directory} (teacher "
    f"{targets.metadata['teacher']}); training on their fixed view ({target_store.TARGETS_VIEW}), "
    "which replaces random-resized crop and flip"
    + (f"; read for steps 1-{stop}, the distilling ones" if stop is not None else "")
    + (
      "; none from here: the run resumes after them"
      if stop is not None and start_step >= stop
      else ""
    )
    + ("; the teacher ran without the student's drop-path masks" if run.model.drop_path > 0 else "")
  )
  return targets


def position(run: Run, step: int, skipped_examples: int = 0) -> dict[str, Any]:
  """The stream's position, saved with each checkpoint: the stream is a pure function of these, and
  after `step` steps it stands at example `step * batch_size` of it. `skipped_examples`: how many of those
  examples stood in for unreadable records (all processes), so the logged count continues on resume."""
  d = run.config.data
  return {
    "step": step,
    "examples_seen": step * d.batch_size,
    "skipped_examples": skipped_examples,
    "seed": run.config.seed,
    "data.batch_size": d.batch_size,
    "data.name": d.name,
    "data.train_split": d.train_split,
    "num_examples": len(run.train_source),
    "fingerprint": sources.fingerprint(run.train_source),
  }


def check_position(run: Run, saved: Mapping[str, Any]) -> None:
  """Refuses to resume on a data stream other than the checkpoint's: it would replay or skip examples."""
  now = position(run, int(saved.get("step", 0)))
  # An image folder's fingerprint before its count: an edited folder is the cause, not the split.
  fields = {"fingerprint": "data.dir", "num_examples": "data.train_split"}
  for key in ("seed", "data.batch_size", "data.name", "data.train_split", *fields):
    if key in saved and saved[key] != now[key]:
      what = " (count:hash of the image folder's files: they changed)" * (key == "fingerprint")
      raise ConfigError(
        fields.get(key, key),
        f"the checkpoint in {run.workdir}/checkpoints was written with {key}="
        f"{saved[key]!r}, this run has {now[key]!r}{what}: resuming would not continue its data "
        "stream. Restore the setting or use a new --workdir",
      )
