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
    ConfigError: (field `field`) `split` does not parse; `bounds` raises it for bounds beyond the
      split's size or a selection of no example.
  """
  m = re.fullmatch(r"(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?", split.strip())
  if m is None:
    raise ConfigError(
      field,
      f"cannot parse split {split!r}; expected e.g. 'train', 'train[:90%]' or 'test[:1000]'.",
    )

  def bounds(n: int) -> slice:
    # Out-of-range bounds are refused, as tfds refuses them, not clamped as a Python slice would be.
    def bound(text: str | None) -> int | None:
      if text is None:
        return None
      if text.endswith("%"):
        if not -100 <= int(text[:-1]) <= 100:
          raise ConfigError(field, f"{split!r}: {text} is not within -100%..100%")
        percent = int(text[:-1])
        examples = round(abs(percent) * n / 100)  # Closest example, like tfds.
        # From the end counted before the sign: tfds's round(-10% of 3) is 0, which as a slice start
        # would select the whole split instead of its (empty) last 10%.
        return n - examples if text.startswith("-") else examples
      if not -n <= int(text) <= n:
        raise ConfigError(field, f"{split!r}: {text} is beyond the {n} examples of {m[1]!r}")
      return int(text)

    selected = slice(bound(m[2]), bound(m[3]))
    if not range(n)[selected]:
      raise ConfigError(field, f"{split!r} selects none of the {n} examples of {m[1]!r}")
    return selected

  return m[1], bounds
