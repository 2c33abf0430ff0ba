"""Tests for at_jax.data.randaugment, against timm (installed for tests only): its op functions,
level functions and RandAugment parser."""

import functools
import random

import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment as timm_aa

from at_jax.data import randaugment, sources
from at_jax.errors import ConfigError

FILL = (124, 116, 104)
BICUBIC = Image.Resampling.BICUBIC


@functools.cache
def _fashion_image(size: int, tinted: bool = False) -> Image.Image:
  """Training image 0 as RGB, resized; tinted: channels differ (for Color)."""
  gray = sources.load_fashion_mnist()["train"][0][0]
  rgb = (
    np.stack([gray, gray * 0.7, 255 - gray], -1) if tinted else (np.repeat(gray[..., None], 3, -1))
  )
  return Image.fromarray(rgb.astype(np.uint8)).resize((size, size), BICUBIC)


class _FixedSign:
  """A stand-in generator whose `random()` fixes the op's sign draw."""

  def __init__(self, value: float):
    self.value = value

  def random(self) -> float:
    return self.value


# ----------------------------------------------------------------------------
# RandAugment strings.


@pytest.mark.parametrize(
  "spec",
  [
    "rand-m9-mstd0.5-inc1",
    "rand",
    "rand-n3-m5-p1.0-mmax12-inc0",
    "rand-inc1-mstd101-m7",
    "rand-m9-mmax0",  # timm reads 0 as its default bound, 10
  ],
)
def test_parse_randaugment_matches_timm(spec):
  ours = randaugment.parse_randaugment(spec)
  theirs = timm_aa.rand_augment_transform(spec, {})
  op = theirs.ops[0]
  assert ours.num_ops == theirs.num_layers
  assert ours.magnitude == op.magnitude and ours.prob == op.prob
  assert ours.magnitude_std == op.hparams.get("magnitude_std", 0)
  assert ours.magnitude_max == (op.hparams.get("magnitude_max") or 10) > 0
  names = randaugment.INCREASING_OPS if ours.increasing else randaugment.DEFAULT_OPS
  assert list(names) == [o.name for o in theirs.ops]


def test_parse_the_papers_string():
  spec = randaugment.parse_randaugment("rand-m9-mstd0.5-inc1")
  assert spec == randaugment.RandAugmentSpec(
    magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5, magnitude_max=10, increasing=True
  )


@pytest.mark.parametrize(
  "spec",
  [
    "",
    "m9-rand",
    "augmix-m9",
    "rand-m9x",
    "rand-x9",
    "rand-m9.5",
    "rand-m",
    "rand-inc2",
    "rand-p1.5",
    "rand-n0",
    "rand-m9-m8",
    "rand-tweights",
    "rand--m9",
    "rand-m-1",
  ],
)
def test_parse_randaugment_rejects_bad_strings(spec):
  with pytest.raises(ConfigError) as e:
    randaugment.parse_randaugment(spec)
  assert e.value.field == "data.randaugment"
  assert "rand-m9-mstd0.5-inc1" in str(e.value)  # Shows a valid example.


# ----------------------------------------------------------------------------
# RandAugment ops.


@pytest.mark.usefixtures("needs_fashion_mnist")
@pytest.mark.parametrize("size", [32, 64])
def test_every_op_gives_a_valid_image(size):
  image = _fashion_image(size)
  rng = np.random.default_rng(0)
  for name, op in randaugment.OPS.items():
    for magnitude in (0.0, 5.0, 9.0, 10.0):
      args = op.level(magnitude, rng)
      if op.geometric:
        args += (FILL, BICUBIC)
      out = np.asarray(op.apply(image, *args))
      assert out.shape == (size, size, 3) and out.dtype == np.uint8, name


def _timm_level(name: str, magnitude: float, sign: float) -> tuple:
  """timm's level args, with its random sign draw fixed by `sign`."""
  level = timm_aa.LEVEL_TO_ARG[name]
  if level is None:
    return ()
  state = random.random
  random.random = lambda: sign
  try:
    return level(magnitude, dict(timm_aa._HPARAMS_DEFAULT))
  finally:
    random.random = state


@pytest.mark.usefixtures("needs_fashion_mnist")
@pytest.mark.parametrize("name", sorted(randaugment.OPS))
def test_op_matches_timm(name):
  op = randaugment.OPS[name]
  for tinted in (False, True):
    image = _fashion_image(64, tinted)
    for magnitude in (0.0, 2.5, 5.0, 8.6, 9.0, 9.7, 10.0):
      for sign in (0.25, 0.75):
        args = op.level(magnitude, _FixedSign(sign))
        expected_args = _timm_level(name, magnitude, sign)
        np.testing.assert_allclose(args, expected_args, rtol=0, atol=1e-12)
        # PIL >= 11 refuses to posterize to 0 bits (timm would crash at
        # magnitude 10); ours keeps older PIL's answer, an all-black image.
        if name.startswith("Posterize") and args[0] == 0:
          assert not np.asarray(op.apply(image, *args)).any()
          continue
        ours = op.apply(image, *(args + ((FILL, BICUBIC) if op.geometric else ())))
        theirs = timm_aa.NAME_TO_OP[name](image, *expected_args, fillcolor=FILL, resample=BICUBIC)
        # Same PIL primitives, so equal to the last bit.
        np.testing.assert_array_equal(
          np.asarray(ours), np.asarray(theirs), err_msg=f"{name} m={magnitude}"
        )


def test_signed_ops_draw_both_signs():
  rng = np.random.default_rng(0)
  degrees = [randaugment.OPS["Rotate"].level(9.0, rng)[0] for _ in range(200)]
  assert set(np.round(np.abs(degrees), 9)) == {27.0}
  assert 60 < sum(d < 0 for d in degrees) < 140


@pytest.mark.usefixtures("needs_fashion_mnist")
def test_rand_augment_is_deterministic_in_rng():
  ra = randaugment.RandAugment("rand-m9-mstd0.5-inc1")
  gray = Image.fromarray(np.asarray(_fashion_image(32))[..., 0], "L")

  def run(seed):
    return np.asarray(ra(gray, np.random.default_rng(seed)))

  outs = [run(seed) for seed in range(12)]
  for seed in range(12):
    np.testing.assert_array_equal(run(seed), outs[seed])
  assert outs[0].shape == (32, 32, 3) and outs[0].dtype == np.uint8
  # With 2 ops at p=0.5, a quarter of images are unchanged; most differ.
  assert len({o.tobytes() for o in outs}) >= 6


def test_rand_augment_applies_ops_with_prob():
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
  never = randaugment.RandAugment("rand-p0")
  always = randaugment.RandAugment("rand-m9-p1.0-n1-inc1")
  unchanged = 0
  for seed in range(40):
    rng = np.random.default_rng(seed)
    assert never(image, rng).tobytes() == image.tobytes()
    unchanged += always(image, rng).tobytes() == image.tobytes()
  assert unchanged <= 4  # Only a rare no-op (e.g. autocontrast at full range).


def test_rand_augment_rejects_bad_interpolation():
  with pytest.raises(ConfigError) as e:
    randaugment.RandAugment("rand-m9", interpolation="nearest")
  assert e.value.field == "data.interpolation"


def test_check_randaugment():
  randaugment.check_randaugment("")  # off
  randaugment.check_randaugment("rand-m9-mstd0.5-inc1")
  with pytest.raises(ConfigError) as e:
    randaugment.check_randaugment("rand-m9-bogus")
  assert e.value.field == "data.randaugment"


@pytest.mark.parametrize("name", ["Rotate", "TranslateXRel"])
def test_rand_augment_fills_with_its_fill(name):
  """Geometric ops fill what they uncover with the RandAugment's own `fill`, not a fixed grey."""
  ra = randaugment.RandAugment("rand-n1-m9-p1.0", fill=(1, 2, 3))
  ra.names = (name,)  # only this op is drawn
  image = Image.new("RGB", (32, 32), (200, 200, 200))
  for seed in range(4):
    out = np.asarray(ra(image, np.random.default_rng(seed)))
    # Rotating by 27 degrees uncovers every corner; translating by 0.405 * 32 px, a left or right edge.
    corners = out[[16, 16, 0], [0, -1, 0]] if name == "TranslateXRel" else out[[0, -1], [0, -1]]
    assert any(tuple(c) == (1, 2, 3) for c in corners), corners
    assert tuple(out[16, 16]) == (200, 200, 200)
