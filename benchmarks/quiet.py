"""Waiting for a quiet host before timing: timings on a host shared with other jobs vary several-fold;
waiting for idle CPUs before each repetition and keeping the minimum over repetitions recovers the
uncontended time (benchmarks/step.py, input_pipeline.py, torch_reference.py)."""

import os
import time


def cpu_busy(interval: float = 0.25) -> float:
  """Fraction of all CPUs' time spent busy over `interval` seconds (while this process sleeps)."""

  def sample():
    with open("/proc/stat") as f:
      values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)  # idle + iowait, total

  idle0, total0 = sample()
  time.sleep(interval)
  idle1, total1 = sample()
  return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait: float, threshold: float = 0.1) -> bool:
  """Waits (up to `max_wait` s) until other processes leave the CPUs idle; returns whether they did.

  Two threads on one core's SMT siblings still run slower than one, so CPU-ms per image varies too.
  """
  if max_wait <= 0 or not os.path.exists("/proc/stat"):
    return False
  deadline = time.monotonic() + max_wait
  while time.monotonic() < deadline:
    if cpu_busy() < threshold:
      return True
    time.sleep(0.5)
  return False
