"""Preemption: SIGTERM becomes a flag the loop polls between steps, and the exception that ends the run once the state is saved."""

import signal
import threading


class Preempted(Exception):
  """Raised after a SIGTERM / preemption notice once the state is checkpointed; relaunch to resume."""


class _SigtermFlag:
  """Turns SIGTERM (how Cloud TPU, Kubernetes and Slurm announce preemption) into a flag the loop polls
  at step boundaries, so the save happens between steps, never inside one."""

  def __init__(self):
    self.raised = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
