"""Preemption: one SIGTERM/SIGINT handler per process, and one rule for when a run stops, in every phase.

SIGTERM is how Cloud TPU, Kubernetes and Slurm announce preemption; SIGINT (Ctrl-C) is treated alike. A
launch script calls `install` at start-up, before `jax.distributed.initialize` (whose own preemption
notifier it switches off, so that there is one mechanism, not two handlers replacing each other), and
`watch_peers` after it. Then:

- Outside the training loop (a teacher loading or converting, compiling, the first batch being built)
  a signal ends the process at once with 128 + its number (143, 130), saving nothing: nothing of this
  run is worth saving yet, and orbax's saves are atomic, so none can be torn. A watcher thread acts on
  it, woken through `signal.set_wakeup_fd`, so the exit is prompt even while the main thread sits in a
  C call that releases the GIL (XLA compiling, a blocking read): Python runs signal handlers only
  between the main thread's bytecodes. It exits through `os._exit` (after `before_exit` callbacks such
  as the workdir lock's release): an interpreter teardown under XLA's compiler threads segfaulted. In a
  multi-process job it first writes the stop into the coordination service, and `watch_peers` ends the
  other processes within seconds rather than at their next collective's timeout.
- Inside the loop and until the run's final save, evaluation and export are done (`training`) it is a
  request the loop acts on at a step boundary, through `Training.stop_at(step)`: one process stops at
  its next step; several processes agree, so that a signal reaching any one of them makes all save the
  same step and exit with 143. A signal after the last step lets the final work finish first.

Without `install` (a colab, a test calling the loop), `training` sets a SIGTERM flag for the loop's
duration only and restores the previous handler after.
"""

import atexit
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

# jax is imported here but not initialised: `install` runs before any backend or distributed start-up.
# 128 + SIGTERM, what schedulers expect from a job that honoured the signal.
PREEMPTED_EXIT_CODE = 143
# Processes wait this long at a step's barrier for the others (a dead process fails the run after it).
BARRIER_TIMEOUT_MS = 30 * 60 * 1000


# What an early exit does first (release a workdir's lock).
_before_exit: list[Callable[[], None]] = []


def before_exit(fn: Callable[[], None]) -> None:
  """Runs `fn` before a SIGTERM or SIGINT outside the training loop ends the process."""
  _before_exit.append(fn)


def cancel_before_exit(fn: Callable[[], None]) -> None:
  if fn in _before_exit:
    _before_exit.remove(fn)


class Preempted(Exception):
  """Raised after a SIGTERM / preemption notice once the state is checkpointed; relaunch to resume."""


class _Signal:
  """The process's SIGTERM: a flag, and whether a training loop is there to act on it."""

  def __init__(self):
    self.requested = threading.Event()
    self.in_loop = False
    self.lock = threading.Lock()  # `in_loop` changes and the watcher's decision do not interleave

  def arrived(self, signum: int) -> None:
    with self.lock:
      self.requested.set()
      if not self.in_loop:
        name = signal.Signals(signum).name
        print(
          f"{name} outside the training loop: exiting with {128 + signum} (nothing of this run to "
          "save yet; its last checkpoint, if any, stands)",
          file=sys.stderr,
          flush=True,
        )
        _announce_early_stop(name)
        _exit(128 + signum)


def _exit(code: int) -> None:
  for fn in _before_exit:
    with contextlib.suppress(Exception):  # the exit must happen
      fn()
  # Without Python's teardown: XLA's compiler threads may still run, and a normal interpreter exit
  # under them is what made Ctrl-C during the first compile end in a segmentation fault.
  os._exit(code)


# A multi-process job's early stop, in jax's coordination service: the process a signal stopped
# outside the loop writes it; the others' `watch_peers` threads read it and stop too.
EARLY_STOP_KEY = "at_jax/early_stop"
PEER_POLL_S = 1.0


def coordination_client() -> tuple[Any, int]:
  """(jax's coordination-service client, this process's index); the client is None outside a
  multi-process job. jax has no public key-value API; this is the one place that reaches for it."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel

  return distributed.global_state.client, distributed.global_state.process_id


def _announce_early_stop(name: str) -> None:
  client, process = coordination_client()
  # A multi-process job; a second announcement finds the key set, and is moot.
  if client is not None:
    with contextlib.suppress(Exception):
      client.key_value_set(EARLY_STOP_KEY, f"process {process} ({socket.gethostname()}) got {name}")


def watch_peers() -> None:
  """In a multi-process job (after `jax.distributed.initialize`): ends this process with 143 within
  `PEER_POLL_S` of another one stopping outside the training loop, which the job cannot go on without:
  otherwise this one would wait at its next collective until a timeout. A thread polls the coordination
  service with a call that returns at once (never a blocking get, whose wait would hold the GIL), and
  is stopped before jax's own exit handler shuts the service down."""
  client, process = coordination_client()
  if client is None:
    return
  halt = threading.Event()

  def poll() -> None:
    while not halt.wait(PEER_POLL_S):
      try:
        who = client.key_value_try_get(EARLY_STOP_KEY)
      except Exception:  # pylint: disable=broad-exception-caught  # not set (NOT_FOUND)
        continue
      print(
        f"{who} outside the training loop: process {process} stops too, with 143",
        file=sys.stderr,
        flush=True,
      )
      if process == 0:  # it hosts the service: the others read the key before it goes
        time.sleep(2 * PEER_POLL_S)
      _exit(PREEMPTED_EXIT_CODE)

  thread = threading.Thread(target=poll, name="at_jax-peers", daemon=True)
  thread.start()

  def stop_polling() -> None:
    halt.set()
    thread.join(timeout=5)

  atexit.register(stop_polling)  # after jax's handler at import, so it runs first


_installed: _Signal | None = None


def install() -> None:
  """The process-wide handler of a launch script (see the module docstring); call it in the main
  thread, before `jax.distributed.initialize`."""
  global _installed
  if _installed is not None:
    return
  jax.config.update("jax_enable_preemption_service", False)
  state = _Signal()
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  # The Python-level handlers do nothing: the C-level one has already written the signal number to
  # the wakeup fd, which the watcher reads at once. SIGINT (Ctrl-C) follows the same policy as SIGTERM
  # rather than raising KeyboardInterrupt wherever the main thread happens to be.
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda signum, frame: None)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

  def watch() -> None:
    while True:
      for signum in os.read(read_fd, 64):
        if signum in (signal.SIGTERM, signal.SIGINT):
          state.arrived(signum)

  threading.Thread(target=watch, name="at_jax-sigterm", daemon=True).start()
  _installed = state


class Training:
  """The loop's view of SIGTERM: `stop_at(step)` after each step says whether to save and stop there."""

  _loops = 0  # counts loops in this process (a teacher's, then a student's): names their barriers

  def __init__(self, requested: threading.Event):
    self._requested = requested
    Training._loops += 1
    self._name = f"at_jax/loop{Training._loops}"
    self._reported = False

  @property
  def requested(self) -> bool:
    """Whether a SIGTERM (or SIGINT) reached this process during the phase."""
    return self._requested.is_set()

  def stop_at(self, step: int) -> bool:
    """Whether every process stops after `step`. Single process: whether SIGTERM came. Several: each
    process first records the step of its own SIGTERM (if one came) and meets the others at a barrier
    for `step`; after it, all read the same records, and stop if one is at `step` or before. A record
    written after the barrier names a later step, so no process decides on a record another lacks.
    Costs two small RPCs to the coordinator per step; the hosts move in step, the devices stay queued."""
    if jax.process_count() == 1:
      return self._requested.is_set()
    client, _ = coordination_client()
    if self._requested.is_set() and not self._reported:
      client.key_value_set(f"{self._name}/sigterm/{jax.process_index()}", str(step))
      self._reported = True
    client.wait_at_barrier(f"{self._name}/step{step}", BARRIER_TIMEOUT_MS)
    return any(
      int(value) <= step for _, value in client.key_value_dir_get(f"{self._name}/sigterm/")
    )


@contextlib.contextmanager
def training() -> Iterator[Training]:
  """The training loop's phase: SIGTERM waits for `Training.stop_at` instead of ending the process."""
  if _installed is not None:
    with _installed.lock:
      _installed.in_loop = True
    try:
      yield Training(_installed.requested)
    finally:
      with _installed.lock:
        _installed.in_loop = False
    return
  requested = threading.Event()
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
  try:
    yield Training(requested)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
