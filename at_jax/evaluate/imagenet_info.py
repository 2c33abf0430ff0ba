"""ImageNet's class lists and ReaL labels, read from the files timm's package ships (`timm/data/_info/`).

Nothing is typed in by hand: the 1000 WordNet ids in label order (`imagenet_synsets.txt`, sorted, the same
order as tfds' `imagenet2012` labels), the 200-class subsets of ImageNet-A and -R (`imagenet_{a,r}_indices.txt`
with `imagenet_{a,r}_synsets.txt`, checked against each other), and the ReaL labels
(`imagenet_real_labels.json`: one list of class indices per validation image, in the order of the file
names `ILSVRC2012_val_00000001.JPEG` ..., as timm's `data/real_labels.py` and tfds' `imagenet2012_real`
read it; an empty list marks an image ReaL's raters found no valid label for).

The files are found without importing timm (which imports torch): only its package data is needed, so
``pip install --no-deps timm`` is enough.
"""

import functools
import importlib.util
import json
import os

import numpy as np

from at_jax.errors import ConfigError

NUM_CLASSES = 1000
SUBSETS = ("imagenet_a", "imagenet_r")
_INSTALL = "pip install --no-deps timm (only its data files are read; torch is not needed)"


def info_dir() -> str:
  """The folder `timm/data/_info` of the installed timm package.

  Raises:
    ConfigError: (field ``timm``) timm is not installed, or lacks the folder.
  """
  spec = importlib.util.find_spec("timm")  # a top-level package: found, not imported
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(
      "timm", f"the ImageNet class lists and ReaL labels come from timm: {_INSTALL}"
    )
  path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "_info")
  if not os.path.isdir(path):
    raise ConfigError("timm", f"{path} is missing; reinstall timm: {_INSTALL}")
  return path


def _read_words(name: str) -> list[str]:
  path = os.path.join(info_dir(), name)
  try:
    with open(path) as f:
      return f.read().split()
  except OSError as e:
    raise ConfigError(
      path, f"cannot read timm's class list ({e}); reinstall timm: {_INSTALL}"
    ) from e


@functools.cache
def synsets() -> tuple[str, ...]:
  """The 1000 ImageNet-1k WordNet ids; label i is synsets()[i]."""
  words = tuple(_read_words("imagenet_synsets.txt"))
  if len(words) != NUM_CLASSES or list(words) != sorted(words):
    raise ConfigError(
      "timm", f"imagenet_synsets.txt should list 1000 sorted WordNet ids ({_INSTALL})"
    )
  return words


@functools.cache
def subset_indices(subset: str) -> np.ndarray:
  """int32 [200]: the ImageNet-1k labels of the classes of ImageNet-A or -R, ascending.

  Args:
    subset: "imagenet_a" or "imagenet_r".

  Raises:
    ConfigError: the indices and the subset's WordNet ids disagree (a damaged timm install).
  """
  if subset not in SUBSETS:
    raise ValueError(f"no 200-class subset {subset!r}; one of {SUBSETS}")
  indices = np.array([int(w) for w in _read_words(f"{subset}_indices.txt")], np.int32)
  wnids = _read_words(f"{subset}_synsets.txt")
  if [synsets()[i] for i in indices] != wnids or np.any(np.diff(indices) <= 0):
    raise ConfigError(
      "timm", f"{subset}_indices.txt and {subset}_synsets.txt disagree ({_INSTALL})"
    )
  indices.flags.writeable = False
  return indices


def read_real_labels(path: str) -> tuple[tuple[int, ...], ...]:
  """ReaL labels in `imagenet_real_labels.json`'s format: a JSON list, entry n the labels (ImageNet-1k
  indices) of validation image n + 1 (``ILSVRC2012_val_<n + 1, 8 digits>.JPEG``).

  Raises:
    ConfigError: (field: the file) unreadable, or not a list of lists of ints in [0, 1000).
  """
  try:
    with open(path) as f:
      entries = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(path, f"cannot read the ReaL labels: {e}") from e
  ok = isinstance(entries, list) and all(
    isinstance(e, list)
    and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < NUM_CLASSES for i in e)
    for e in entries
  )
  if not ok:
    raise ConfigError(path, "ReaL labels are a JSON list of lists of class indices in [0, 1000).")
  return tuple(tuple(e) for e in entries)


@functools.cache
def real_labels() -> tuple[tuple[int, ...], ...]:
  """timm's copy of the ReaL labels (50,000 entries), `read_real_labels`."""
  return read_real_labels(os.path.join(info_dir(), "imagenet_real_labels.json"))
