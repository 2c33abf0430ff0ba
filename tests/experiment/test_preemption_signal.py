"""The process-wide SIGTERM handler (at_jax.experiment.preemption.install), on real processes: outside
the training loop a SIGTERM ends the process at once with 143, even while its main thread is blocked
inside a C call; inside `training` it waits for the loop."""

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import subprocess_env

SCRIPT = """
import os, sys
from at_jax.experiment import preemption
preemption.install()
r, w = os.pipe()
if sys.argv[1] == "loop":
  with preemption.training() as t:
    print("ready", flush=True)
    while not t.stop_at(0):
      pass
  print("stopped by the loop", flush=True)
  sys.exit(7)
print("ready", flush=True)
os.read(r, 1)  # blocks in C for ever: only the watcher thread can end the process
"""


def _run(phase: str, sig: int = signal.SIGTERM) -> tuple[int, str, str, float]:
  proc = subprocess.Popen(
    [sys.executable, "-c", SCRIPT, phase],
    env=subprocess_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline() == "ready\n"
  sent = time.monotonic()
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=60)
  return proc.returncode, out, err, time.monotonic() - sent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_outside_the_loop_exits_at_once(sig):
  """SIGINT (Ctrl-C) as SIGTERM: no KeyboardInterrupt wherever the main thread is, no interpreter
  teardown under running compiler threads (which ended in a segmentation fault)."""
  code, _, err, seconds = _run("start-up", sig)
  assert code == 128 + sig and "outside the training loop" in err, err
  assert seconds < 10


def test_a_signal_inside_the_loop_waits_for_the_step_boundary():
  for sig in (signal.SIGTERM, signal.SIGINT):
    code, out, err, _ = _run("loop", sig)
    assert code == 7 and "stopped by the loop" in out, err
