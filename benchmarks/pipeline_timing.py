"""Timing machinery shared by benchmarks/input_pipeline.py's jobs: pulling batches for a wall-clock window
and reading the CPU time spent (this process's threads, or child processes' /proc/<pid>/stat), grain's
worker threads, ours' train and eval iterators timed, per-stage CPU time of one thread, and the settings
and recipe line every table names."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

SETTINGS = {"crop+flip": "crop+flip", "full": "full recipe"}
SETTING_NAMES = {**SETTINGS, "eval": "eval view"}  # photos: the eval view too
_GRAIN_THREAD_PREFIX = "grain-prefetch"  # grain's ThreadPoolExecutor names its workers so
RRC_RATIO = (3 / 4, 4 / 3)  # train_iterator's and timm's default aspect-ratio range
LONG_SOURCE = 10**8  # examples of a source cycled so that no timed pass runs out


def grain_threads() -> int:
  return sum(t.name.startswith(_GRAIN_THREAD_PREFIX) for t in threading.enumerate())


def wait_for_grain_threads(timeout: float = 30.0) -> None:
  """Waits until a closed iterator's workers finish their last examples, so that their CPU time does not
  fall into the next measurement and the next thread count sees only its own workers."""
  deadline = time.monotonic() + timeout
  while grain_threads() and time.monotonic() < deadline:
    time.sleep(0.05)


def timed(
  it: Iterator[Any],
  *,
  batch: int,
  seconds: float,
  warmup: int,
  cpu: Callable[[], float] = time.process_time,
) -> dict[str, float]:
  """Pulls `warmup` untimed batches (threads or workers starting, buffers filling), then batches for
  `seconds` of wall time; returns images/s, CPU-ms/img and CPU cores busy over that window.

  `cpu`: cumulative CPU seconds of everything that works for `it` (default: this process, all threads).
  """
  for _ in range(warmup):
    next(it)
  wall0, cpu0 = time.perf_counter(), cpu()
  batches = 0
  while True:
    next(it)
    batches += 1
    wall = time.perf_counter() - wall0
    if wall >= seconds:
      break
  used = cpu() - cpu0
  images = batches * batch
  return {
    "img_s": images / wall,
    "cpu_ms": 1000 * used / images,
    "busy": used / wall,
    "batches": batches,
  }


def time_grain(it: Any, *, batch: int, seconds: float, warmup: int) -> dict[str, float]:
  """`timed` of a grain iterator, with the worker threads that ran; closes it and waits for them.
  process_time counts every thread of the process: grain's workers and this thread's batching."""
  try:
    r = timed(it, batch=batch, seconds=seconds, warmup=warmup)
    r["threads"] = grain_threads()
  finally:
    it.close()
    wait_for_grain_threads()
  return r


def measure(
  source: Any,
  data_cfg: Any,
  *,
  image_size: int,
  batch: int,
  full: bool,
  num_threads: int,
  seconds: float,
  warmup: int,
  jpeg_downscale: bool = True,
) -> dict[str, float]:
  """Pulls batches from a fresh train_iterator for `seconds`; returns images/s, CPU-ms/img and threads."""
  from at_jax.data import pipeline

  it = pipeline.train_iterator(
    source,
    global_batch_size=batch,
    image_size=image_size,
    seed=0,
    normalization=data_cfg.normalization,
    rrc_scale=tuple(data_cfg.rrc_scale),
    hflip=data_cfg.hflip,
    randaugment=data_cfg.randaugment if full else "",
    random_erase=data_cfg.random_erase if full else 0.0,
    crop_pct=data_cfg.crop_pct,
    jpeg_downscale=jpeg_downscale,
    num_threads=num_threads,
  )
  return time_grain(it, batch=batch, seconds=seconds, warmup=warmup)


def available_cpus() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def process_cpu_seconds(pids: list[int]) -> float:
  """utime + stime of the processes `pids` (Linux /proc/<pid>/stat), in seconds.

  DataLoader workers are child processes, whose CPU time this process's process_time does not include,
  and RUSAGE_CHILDREN only counts them once joined (warm-up included): reading their stat at both ends
  of the timed window counts exactly the window. A process that has exited counts 0.
  """
  tick = os.sysconf("SC_CLK_TCK")
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
      continue
    total += int(fields[11]) + int(fields[12])  # utime, stime: stat(5) fields 14 and 15
  return total / tick


class Cycle:
  """A source repeated to `length` examples: an eval pass (finite) long enough to time."""

  def __init__(self, source: Any, length: int = LONG_SOURCE):
    self.source, self.length = source, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[index % len(self.source)]


def measure_ours_eval(
  source: Any,
  data_cfg: Any,
  *,
  image_size: int,
  batch: int,
  num_threads: int,
  seconds: float,
  warmup: int,
  jpeg_downscale: bool,
) -> dict[str, float]:
  """`measure` for `pipeline.eval_iterator` (the eval view) over `source` cycled."""
  from at_jax.data import pipeline

  it = pipeline.eval_iterator(
    Cycle(source),
    global_batch_size=batch,
    image_size=image_size,
    crop_pct=data_cfg.crop_pct,
    normalization=data_cfg.normalization,
    num_threads=num_threads,
    jpeg_downscale=jpeg_downscale,
  )
  return time_grain(it, batch=batch, seconds=seconds, warmup=warmup)


class StageTimer:
  """CPU seconds of this thread per named stage, summed over calls.

  time.thread_time counts only this thread's CPU: on a host shared with other jobs the profile is not
  inflated by waiting for a core (it still is by sharing caches).
  """

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)

  @contextlib.contextmanager
  def __call__(self, stage: str) -> Iterator[None]:
    start = time.thread_time()
    try:
      yield
    finally:
      self.seconds[stage] += time.thread_time() - start


def print_recipe(recipe: Any, name: str) -> None:
  """The line saying which augmentation is timed: `recipe`, the data config of configs/`name`.py."""
  print(
    f"recipe (configs/{name}.py): crop+flip = random-resized crop scale {tuple(recipe.rrc_scale)}, "
    f"bicubic, hflip {recipe.hflip}, normalize {recipe.normalization}; full recipe = crop+flip + "
    f"RandAugment {recipe.randaugment!r} + random erasing {recipe.random_erase}. Mixup {recipe.mixup} / "
    f"cutmix {recipe.cutmix} run inside the jitted train step on the device: not host work, not timed."
  )
