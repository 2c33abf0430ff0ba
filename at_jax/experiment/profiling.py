"""``--config.profile="START:STOP"``: a `jax.profiler` trace of train steps START .. STOP-1.

The trace goes to <workdir>/tensorboard/plugins/profile/<time>/, where TensorBoard's profile plugin
(`pip install tensorboard-plugin-profile`; `tensorboard --logdir <workdir>/tensorboard`) opens it next to
the run's scalars. Every process traces its own host. Skip the first steps: they include compiling.
"""

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import jax

from at_jax import storage
from at_jax.errors import ConfigError
from at_jax.metrics import TENSORBOARD_DIR


def parse_window(window: str) -> tuple[int, int] | None:
  """ "START:STOP" -> (START, STOP) with 1 <= START < STOP; "" -> None. A window that ends after the
  run's last step traces until the loop ends.

  Raises:
    ConfigError: (field ``profile``) anything else.
  """
  if not window:
    return None
  m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", window)
  if m is None or not 1 <= int(m[1]) < int(m[2]):
    raise ConfigError("profile", f"{window!r}: expected 'START:STOP' steps, 1 <= START < STOP.")
  return int(m[1]), int(m[2])


class StepTrace:
  """Starts the trace before step START, stops it after step STOP-1 has run on the devices."""

  def __init__(self, window: tuple[int, int] | None, workdir: str):
    self._window = window
    self._directory = os.path.join(workdir, TENSORBOARD_DIR)
    self._mirror: storage.LocalMirror | None = None  # made when the trace starts

  def before(self, step: int) -> None:
    if self._window and step == self._window[0]:
      # The profiler writes files in place: in a bucket, locally first, then uploaded at `stop`.
      self._mirror = storage.LocalMirror(self._directory)
      jax.profiler.start_trace(self._mirror.local)

  def after(self, step: int, state: Any) -> None:
    if self._mirror is not None and step == self._window[1] - 1:
      self.stop(state)

  def stop(self, state: Any) -> None:
    if self._mirror is not None:
      # The trace holds the window's device work, not just its dispatch.
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self._mirror.close()
      self._mirror = None
      print(f"profile of steps {self._window[0]}..{self._window[1] - 1} in {self._directory}")


@contextlib.contextmanager
def step_trace(window: str, workdir: str) -> Iterator[StepTrace]:
  """A `StepTrace` of `window` (`parse_window`) that is stopped however the loop ends."""
  trace = StepTrace(parse_window(window), workdir)
  try:
    yield trace
  finally:
    trace.stop(None)
