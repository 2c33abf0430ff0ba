"""Unreadable records (corrupt images, failed augmentations): replaced or left out, warned, counted.

Training replaces an example that raises by the next one of its epoch's permutation that does not
(`first_readable`), evaluation leaves it out; both print the first few (`SkipWarnings`) and flag the
rest ``skipped``, so that the loop can count them.
"""

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from at_jax.errors import ConfigError

# A record that cannot be decoded or augmented is skipped; this many in a row
# mean that the data, not a record, is broken, and stop the run.
MAX_CONSECUTIVE_FAILURES = 100
# Per iterator, the first failures are printed with their example index and
# error; later ones are only flagged and counted.
MAX_SKIP_WARNINGS = 5


class SkipWarnings:
  """Prints the first `MAX_SKIP_WARNINGS` unreadable examples, thread-safe, each by its file where the
  source has one (an image folder) and by its index otherwise."""

  def __init__(self, source: Any = None):
    self._count = 0
    self._lock = threading.Lock()
    self._files = getattr(source, "files", None)  # an image folder's FileList

  def name(self, index: int) -> str:
    if self._files is not None:
      return os.path.join(self._files.root, self._files.paths[index])
    return f"example {index} of the source"

  def __call__(self, index: int, error: Exception, action: str) -> None:
    with self._lock:
      self._count += 1
      count = self._count
    if count <= MAX_SKIP_WARNINGS:
      last = "; further ones are only counted" if count == MAX_SKIP_WARNINGS else ""
      print(
        f"WARNING: {self.name(index)} is unreadable "
        f"({type(error).__name__}: {error}); {action}{last}",
        flush=True,
      )


def first_readable(
  prepare: Callable[[int, int], dict[str, np.ndarray]],
  order: np.ndarray,
  i: int,
  g: int,
  warn: SkipWarnings,
) -> dict[str, np.ndarray]:
  """``prepare(order[i], g)``, or if that raises, that of the next example of `order` that does not.

  Flags the result ``skipped`` if it stands in for an unreadable example; stops the run after
  `MAX_CONSECUTIVE_FAILURES` failures in a row (ConfigError ``data.name``).
  """
  n = len(order)
  attempts = min(n, MAX_CONSECUTIVE_FAILURES)
  for attempt in range(attempts):
    index = int(order[(i + attempt) % n])
    try:
      out = prepare(index, g)
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Decoders and augmentations raise many types for a bad record.
      warn(index, e, "replaced by the next example of the shuffled order")
      error = e
      continue
    out["skipped"] = np.bool_(attempt > 0)
    return out
  raise ConfigError(
    "data.name",
    f"{attempts} examples in a row could not "
    f"be read or augmented (the last: {type(error).__name__}"
    f": {error}); the data or its pipeline is broken, not a "
    "record.",
  ) from error
