"""tfds-style split strings, ``name`` or ``name[from:to]``, for every source."""

import re
from collections.abc import Callable

from at_jax.errors import ConfigError


def parse_split(split: str, field: str = "data.train_split") -> tuple[str, Callable[[int], slice]]:
  """Parses a tfds-style split like ``train[:10%]`` or ``test[100:200]``.

  Args:
    split: ``name``, or ``name[from:to]`` with each bound an int or a percent
      (negative counts from the end, like Python slices).
    field: the config field `split` came from, named in the error.

  Returns:
    (name, bounds): `bounds` maps the split's size n to a `slice` of it.

  Raises:
    ConfigError: (field `field`) `split` does not parse.
  """
  m = re.fullmatch(r"(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?", split.strip())
  if m is None:
    raise ConfigError(
      field,
      f"cannot parse split {split!r}; expected e.g. 'train', 'train[:90%]' or 'test[:1000]'.",
    )

  def bounds(n: int) -> slice:
    def bound(text: str | None) -> int | None:
      if text is None or not text.endswith("%"):
        return None if text is None else int(text)
      return round(int(text[:-1]) * n / 100)  # Closest example, like tfds.

    return slice(bound(m[2]), bound(m[3]))

  return m[1], bounds
