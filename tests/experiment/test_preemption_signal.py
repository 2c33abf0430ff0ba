"""The process-wide SIGTERM handler (at_jax.experiment.preemption.install), on real processes: outside
the training loop a SIGTERM ends the process at once with 143, even while its main thread is blocked
inside a C call; inside `training` it waits for the loop."""

import subprocess
import sys
import time

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


def _run(phase: str) -> tuple[int, str, str, float]:
  proc = subprocess.Popen(
    [sys.executable, "-c", SCRIPT, phase],
    env=subprocess_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline() == "ready\n"
  sent = time.monotonic()
  proc.terminate()  # SIGTERM
  out, err = proc.communicate(timeout=60)
  return proc.returncode, out, err, time.monotonic() - sent


def test_sigterm_outside_the_loop_exits_with_143_at_once():
  code, _, err, seconds = _run("start-up")
  assert code == 143 and "before the training loop" in err, err
  assert seconds < 10


def test_sigterm_inside_the_loop_waits_for_the_step_boundary():
  code, out, err, _ = _run("loop")
  assert code == 7 and "stopped by the loop" in out, err
