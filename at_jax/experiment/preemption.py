"""Preemption: one SIGTERM handler per process, and one rule for when a run stops.

SIGTERM is how Cloud TPU, Kubernetes and Slurm announce preemption. A launch script calls `install` at
start-up, before `jax.distributed.initialize` (whose own preemption notifier it switches off, so that
there is one mechanism, not two handlers replacing each other). Then:

- Outside the training loop (a teacher loading or converting, compiling, the first batch being built)
  a SIGTERM ends the process at once with exit code 143, saving nothing: nothing of this run is worth
  saving yet, and orbax's saves are atomic, so none can be torn. A watcher thread acts on it, woken
  through `signal.set_wakeup_fd`, so the exit is prompt even while the main thread sits in a C call that
  releases the GIL (XLA compiling, a blocking read): Python runs signal handlers only between the main
  thread's bytecodes. (A C call that holds the GIL still delays it: the watcher needs the GIL.)
- Inside the loop (`training`) it is a request the loop acts on at a step boundary, through
  `Training.stop_at(step)`: one process stops at its next step; several processes agree, so that a
  SIGTERM reaching any one of them makes all save the same step and exit with 143.

Without `install` (a colab, a test calling the loop), `training` sets a SIGTERM flag for the loop's
duration only and restores the previous handler after.
"""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import jax

# jax is imported here but not initialised: `install` runs before any backend or distributed start-up.
# 128 + SIGTERM, what schedulers expect from a job that honoured the signal.
PREEMPTED_EXIT_CODE = 143
# Processes wait this long at a step's barrier for the others (a dead process fails the run after it).
BARRIER_TIMEOUT_MS = 30 * 60 * 1000


_before_exit: list[
  Callable[[], None]
] = []  # what an early exit does first (release a workdir's lock)


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
        for fn in _before_exit:
          with contextlib.suppress(Exception):  # the exit must happen
            fn()
        # Without Python's teardown: XLA's compiler threads may still run, and a normal interpreter
        # exit under them is what made Ctrl-C during the first compile end in a segmentation fault.
        os._exit(128 + signum)


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
    from jax._src import distributed  # pylint: disable=import-outside-toplevel  # no public KV API

    client = distributed.global_state.client
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
