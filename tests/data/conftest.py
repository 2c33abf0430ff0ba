"""Fixtures shared by the tests of at_jax.data: small sources, iterator settings, batch comparisons."""

import os

import numpy as np
import pytest

from at_jax.data import sources

# The iterators' settings most tests share.
TRAIN_KW = dict(global_batch_size=8, image_size=16, seed=3, normalization="imagenet")
# The paper's per-example recipe on top of crop and flip.
RECIPE = dict(randaugment="rand-m9-mstd0.5-inc1", random_erase=0.25)


def _indexed_source(n: int, size: int = 8) -> sources.ArraySource:
  """n distinct random RGB images whose label is the example's index."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return sources.ArraySource(images, np.arange(n))


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _erased_box(before: np.ndarray, after: np.ndarray):
  """The box (top, bottom, left, right) where they differ; checks it's full."""
  differs = np.any(before != after, axis=-1)
  if not differs.any():
    return None
  rows, cols = np.nonzero(differs.any(1))[0], np.nonzero(differs.any(0))[0]
  top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  assert differs[top:bottom, left:right].all()  # One solid rectangle.
  assert differs.sum() == (bottom - top) * (right - left)
  return top, bottom, left, right


@pytest.fixture
def needs_fashion_mnist():
  """Skips the test unless Debian's dataset-fashion-mnist is installed."""
  if not os.path.isdir(sources.FASHION_MNIST_SYSTEM_DIR):
    pytest.skip("needs `sudo apt-get install dataset-fashion-mnist`")


@pytest.fixture
def indexed_source():
  """`indexed_source(n, size=8)`: n distinct random RGB images whose label is the example's index."""
  return _indexed_source


@pytest.fixture
def train_kw():
  """The train iterator's settings most tests share (batch 8, size 16, seed 3, imagenet)."""
  return dict(TRAIN_KW)


@pytest.fixture
def recipe():
  """The paper's per-example recipe on top of crop and flip (RandAugment, random erasing)."""
  return dict(RECIPE)


@pytest.fixture(params=[{}, RECIPE], ids=["crop_flip", "recipe"])
def aug(request):
  """Runs the test without and with the paper's per-example recipe."""
  return dict(request.param)


@pytest.fixture
def take():
  """`take(iterator, k)`: its next k items."""
  return _take


@pytest.fixture
def assert_batches_equal():
  """`assert_batches_equal(a, b)`: two lists of batches hold the same keys and arrays."""
  return _assert_batches_equal


@pytest.fixture
def erased_box():
  """`erased_box(before, after)`: the one full rectangle where they differ (or None)."""
  return _erased_box
