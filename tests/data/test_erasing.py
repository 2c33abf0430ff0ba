"""Tests for at_jax.data.erasing: timm's random erasing of one normalised image."""

import numpy as np
import pytest

from at_jax.data import erasing
from at_jax.errors import ConfigError

# ----------------------------------------------------------------------------
# Random erasing.


def test_random_erase_changes_one_rectangle_within_area_bounds(erased_box):
  image = np.full((40, 48, 3), 7.0, np.float32)  # Noise never equals 7.
  fractions = []
  for seed in range(300):
    out = erasing.random_erase(image, np.random.default_rng(seed), prob=1.0)
    assert out.shape == image.shape and out.dtype == np.float32
    box = erased_box(image, out)
    assert box is not None  # Some of the 10 tries always fit here.
    top, bottom, left, right = box
    assert bottom - top < 40 and right - left < 48
    fractions.append((bottom - top) * (right - left) / (40 * 48))
    erased = out[top:bottom, left:right]
    assert abs(erased.mean()) < 0.5 and 0.6 < erased.std() < 1.4
  # Target area in [0.02, 1/3]; h and w are rounded, so allow a little.
  assert min(fractions) > 0.015 and max(fractions) < 0.36
  # Large boxes get rejected more, so the mean is below the uniform's 0.177.
  assert 0.11 < np.mean(fractions) < 0.19
  assert np.all(image == 7.0)  # The input is untouched.


def test_random_erase_respects_prob():
  image = np.zeros((16, 16, 3), np.float32)
  erased = [
    erasing.random_erase(image, np.random.default_rng(s), prob=0.25) is not image
    for s in range(2000)
  ]
  assert abs(np.mean(erased) - 0.25) < 0.035  # ~3.6 binomial std.
  assert erasing.random_erase(image, np.random.default_rng(0), prob=0.0) is image


@pytest.mark.parametrize("mode", ["rand", "const"])
def test_random_erase_other_modes(mode, erased_box):
  image = np.full((20, 20, 3), 5.0, np.float32)
  out = erasing.random_erase(image, np.random.default_rng(1), prob=1.0, mode=mode)
  top, bottom, left, right = erased_box(image, out)
  colours = np.unique(out[top:bottom, left:right].reshape(-1, 3), axis=0)
  assert len(colours) == 1  # One colour per rectangle.
  if mode == "const":
    np.testing.assert_array_equal(colours, 0)


@pytest.mark.parametrize("prob", [-0.1, 1.5])
def test_random_erase_prob_out_of_range_names_the_field(prob):
  with pytest.raises(ConfigError) as e:
    erasing.check_random_erase(prob)
  assert e.value.field == "data.random_erase"
  with pytest.raises(ConfigError) as e:
    erasing.random_erase(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), prob=prob)
  assert e.value.field == "data.random_erase"
  for ok in (0.0, 0.25, 1.0):
    erasing.check_random_erase(ok)


def test_random_erase_boxes_reach_the_bottom_and_right_edges(erased_box):
  """top and left are uniform over every fitting position, the last (box flush with the edge) too."""
  image = np.full((10, 12, 3), 5.0, np.float32)
  bottoms, rights = set(), set()
  for seed in range(200):
    out = erasing.random_erase(image, np.random.default_rng(seed), prob=1.0, mode="const")
    top, bottom, left, right = erased_box(image, out)
    bottoms.add(int(bottom))
    rights.add(int(right))
  assert max(bottoms) == 10 and max(rights) == 12
