"""Tests for at_jax.augment: RandAugment, random erasing, Mixup/CutMix.

timm (installed for tests only) is the reference: its op functions, level
functions, RandAugment parser, mixup targets and cutmix boxes.
"""

import functools
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import mixup as timm_mixup

from at_jax.data import pipeline as data
from at_jax.data import randaugment as augment
from at_jax.errors import ConfigError

requires_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(data.FASHION_MNIST_SYSTEM_DIR),
  reason="needs `sudo apt-get install dataset-fashion-mnist`",
)
FILL = (124, 116, 104)
BICUBIC = Image.Resampling.BICUBIC


@functools.cache
def _fashion_image(size: int, tinted: bool = False) -> Image.Image:
  """Training image 0 as RGB, resized; tinted: channels differ (for Color)."""
  gray = data.load_fashion_mnist()["train"][0][0]
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
  "spec", ["rand-m9-mstd0.5-inc1", "rand", "rand-n3-m5-p1.0-mmax12-inc0", "rand-inc1-mstd101-m7"]
)
def test_parse_randaugment_matches_timm(spec):
  ours = augment.parse_randaugment(spec)
  theirs = timm_aa.rand_augment_transform(spec, {})
  op = theirs.ops[0]
  assert ours.num_ops == theirs.num_layers
  assert ours.magnitude == op.magnitude and ours.prob == op.prob
  assert ours.magnitude_std == op.hparams.get("magnitude_std", 0)
  assert ours.magnitude_max == (op.hparams.get("magnitude_max") or 10)
  names = augment.INCREASING_OPS if ours.increasing else augment.DEFAULT_OPS
  assert list(names) == [o.name for o in theirs.ops]


def test_parse_the_papers_string():
  spec = augment.parse_randaugment("rand-m9-mstd0.5-inc1")
  assert spec == augment.RandAugmentSpec(
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
    augment.parse_randaugment(spec)
  assert e.value.field == "data.randaugment"
  assert "rand-m9-mstd0.5-inc1" in str(e.value)  # Shows a valid example.


# ----------------------------------------------------------------------------
# RandAugment ops.


@requires_fashion_mnist
@pytest.mark.parametrize("size", [32, 64])
def test_every_op_gives_a_valid_image(size):
  image = _fashion_image(size)
  rng = np.random.default_rng(0)
  for name, op in augment.OPS.items():
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


@requires_fashion_mnist
@pytest.mark.parametrize("name", sorted(augment.OPS))
def test_op_matches_timm(name):
  op = augment.OPS[name]
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
  degrees = [augment.OPS["Rotate"].level(9.0, rng)[0] for _ in range(200)]
  assert set(np.round(np.abs(degrees), 9)) == {27.0}
  assert 60 < sum(d < 0 for d in degrees) < 140


@requires_fashion_mnist
def test_rand_augment_is_deterministic_in_rng():
  ra = augment.RandAugment("rand-m9-mstd0.5-inc1")
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
  never = augment.RandAugment("rand-p0")
  always = augment.RandAugment("rand-m9-p1.0-n1-inc1")
  unchanged = 0
  for seed in range(40):
    rng = np.random.default_rng(seed)
    assert never(image, rng).tobytes() == image.tobytes()
    unchanged += always(image, rng).tobytes() == image.tobytes()
  assert unchanged <= 4  # Only a rare no-op (e.g. autocontrast at full range).


def test_rand_augment_rejects_bad_interpolation():
  with pytest.raises(ConfigError) as e:
    augment.RandAugment("rand-m9", interpolation="nearest")
  assert e.value.field == "data.interpolation"


# ----------------------------------------------------------------------------
# Random erasing.


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


def test_random_erase_changes_one_rectangle_within_area_bounds():
  image = np.full((40, 48, 3), 7.0, np.float32)  # Noise never equals 7.
  fractions = []
  for seed in range(300):
    out = augment.random_erase(image, np.random.default_rng(seed), prob=1.0)
    assert out.shape == image.shape and out.dtype == np.float32
    box = _erased_box(image, out)
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
    augment.random_erase(image, np.random.default_rng(s), prob=0.25) is not image
    for s in range(2000)
  ]
  assert abs(np.mean(erased) - 0.25) < 0.035  # ~3.6 binomial std.
  assert augment.random_erase(image, np.random.default_rng(0), prob=0.0) is image


@pytest.mark.parametrize("mode", ["rand", "const"])
def test_random_erase_other_modes(mode):
  image = np.full((20, 20, 3), 5.0, np.float32)
  out = augment.random_erase(image, np.random.default_rng(1), prob=1.0, mode=mode)
  top, bottom, left, right = _erased_box(image, out)
  colours = np.unique(out[top:bottom, left:right].reshape(-1, 3), axis=0)
  assert len(colours) == 1  # One colour per rectangle.
  if mode == "const":
    np.testing.assert_array_equal(colours, 0)


# ----------------------------------------------------------------------------
# Mixup / CutMix.

MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)


def _two_images(size=16):
  """Example 0 all zeros, example 1 all ones, labels 0 and 1."""
  images = jnp.stack([jnp.zeros((size, size, 3)), jnp.ones((size, size, 3))])
  return images, jnp.array([0, 1])


def test_mixup_target_matches_timm():
  labels = np.random.default_rng(0).integers(0, 10, 8)
  for lam in (1.0, 0.73, 0.5, 0.1):
    for smoothing in (0.0, 0.1):
      ours = augment.mixup_target(jnp.asarray(labels), 10, lam, smoothing)
      theirs = timm_mixup.mixup_target(torch.tensor(labels), 10, lam, smoothing)
      np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6)
      np.testing.assert_allclose(ours.sum(-1), 1, atol=1e-6)


def test_mixup_batch_matches_timm_for_its_lam(monkeypatch):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 5])
  mixed, soft = augment.mix_batch(
    jax.random.key(3),
    jnp.asarray(images),
    jnp.asarray(labels),
    10,
    mixup_alpha=0.8,
    cutmix_alpha=0.0,
    switch_prob=0.5,
    label_smoothing=0.1,
  )
  # Own label's weight: lam * 0.91 + (1 - lam) * 0.01.
  lam = (float(soft[0, 0]) - 0.01) / 0.9
  monkeypatch.setattr(np.random, "beta", lambda a, b: lam)
  mix = timm_mixup.Mixup(
    mixup_alpha=0.8, cutmix_alpha=0.0, mode="batch", label_smoothing=0.1, num_classes=10
  )
  x, y = mix(torch.tensor(images).permute(0, 3, 1, 2), torch.tensor(labels))
  np.testing.assert_allclose(mixed, x.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  np.testing.assert_allclose(soft, y.numpy(), atol=1e-6)


def test_cutmix_box_matches_timm(monkeypatch):
  rng = np.random.default_rng(0)
  for _ in range(200):
    height, width = rng.integers(4, 40, 2)
    lam = rng.uniform()
    cy, cx = rng.integers(height), rng.integers(width)
    centers = iter([cy, cx])
    monkeypatch.setattr(np.random, "randint", lambda lo, hi, size=None: next(centers))
    box, lam_timm = timm_mixup.cutmix_bbox_and_lam((1, 3, height, width), lam, correct_lam=True)
    *ours, lam_ours = augment.cutmix_box(jnp.float32(lam), cy, cx, int(height), int(width))
    assert [int(v) for v in ours] == [int(v) for v in box]
    np.testing.assert_allclose(lam_ours, lam_timm, atol=1e-6)


def test_cutmix_pastes_a_rectangle_weighted_by_its_area():
  images, labels = _two_images()
  pasted = 0
  for seed in range(30):
    mixed, soft = augment.mix_batch(
      jax.random.key(seed),
      images,
      labels,
      2,
      mixup_alpha=0.0,
      cutmix_alpha=1.0,
      label_smoothing=0.0,
    )
    box = _erased_box(np.asarray(images[0]), np.asarray(mixed[0]))
    if box is None:  # The box can be empty (lam near 1).
      np.testing.assert_allclose(soft[0], [1, 0])
      continue
    pasted += 1
    assert set(np.unique(mixed)) <= {0.0, 1.0}  # Copied, not blended.
    np.testing.assert_array_equal(mixed[1], 1 - mixed[0])  # Same box.
    fraction = float(mixed[0].mean())
    np.testing.assert_allclose(soft[0], [1 - fraction, fraction], atol=1e-6)
    np.testing.assert_allclose(soft[1], [fraction, 1 - fraction], atol=1e-6)
  assert pasted >= 25


def test_mix_batch_lam_and_switch_statistics():
  images, labels = _two_images(8)

  @jax.jit
  @jax.vmap
  def draw(key):
    mixed, soft = augment.mix_batch(key, images, labels, 2, **MIX)
    is_cutmix = jnp.all((mixed == 0) | (mixed == 1))
    return soft[0].sum(), soft[0, 0], is_cutmix

  totals, own, is_cutmix = map(np.asarray, draw(jax.random.split(jax.random.key(0), 4000)))
  np.testing.assert_allclose(totals, 1, atol=1e-6)
  assert abs(is_cutmix.mean() - 0.5) < 0.04
  lam = (own[~is_cutmix] - 0.05) / 0.9  # Undo the smoothing (C = 2).
  # Beta(0.8, 0.8): mean 1/2, variance 0.8^2 / (1.6^2 * 2.6) = 0.0962.
  assert abs(lam.mean() - 0.5) < 0.02
  assert abs(lam.var() - 0.0962) < 0.01


def test_mix_batch_jits_and_matches_eager():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 12, 12, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 8))
  fn = functools.partial(augment.mix_batch, num_classes=5, **MIX)
  for seed in range(2):
    key = jax.random.key(seed)
    eager, jitted = fn(key, images, labels), jax.jit(fn)(key, images, labels)
    for a, b in zip(eager, jitted):
      np.testing.assert_allclose(a, b, atol=1e-6)
    assert jitted[1].shape == (8, 5)


def test_mix_batch_on_a_sharded_batch_equals_unsharded():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16))
  fn = jax.jit(functools.partial(augment.mix_batch, num_classes=10, **MIX))
  key = jax.random.key(5)
  whole = fn(key, images, labels)
  sharded = fn(
    key,
    jax.device_put(images, NamedSharding(mesh, P("data"))),
    jax.device_put(labels, NamedSharding(mesh, P("data"))),
  )
  for a, b in zip(whole, sharded):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_both_alphas_zero_is_identity_with_smoothed_labels():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 3)))
  labels = jnp.array([3, 0, 1, 3])
  mixed, soft = augment.mix_batch(
    jax.random.key(0),
    images,
    labels,
    4,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    switch_prob=0.5,
    label_smoothing=0.2,
  )
  assert mixed is images
  expected = np.full((4, 4), 0.05)
  expected[np.arange(4), labels] = 0.85
  np.testing.assert_allclose(soft, expected, atol=1e-6)


def test_mix_batch_prob_zero_leaves_images_alone():
  images, labels = _two_images()
  mixed, soft = augment.mix_batch(jax.random.key(0), images, labels, 2, **MIX, prob=0.0)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_allclose(soft, [[0.95, 0.05], [0.05, 0.95]], atol=1e-6)


def test_mix_batch_keeps_bfloat16():
  images, labels = _two_images()
  mixed, _ = augment.mix_batch(jax.random.key(0), images.astype(jnp.bfloat16), labels, 2, **MIX)
  assert mixed.dtype == jnp.bfloat16


@pytest.mark.parametrize(
  "kw, field",
  [
    (dict(mixup_alpha=-1.0), "data.mixup"),
    (dict(cutmix_alpha=-0.5), "data.cutmix"),
    (dict(switch_prob=1.5), "data.mixup_switch_prob"),
    (dict(prob=-0.1), "data.mixup_prob"),
    (dict(label_smoothing=1.0), "optim.label_smoothing"),
  ],
)
def test_mix_batch_names_the_bad_field(kw, field):
  images, labels = _two_images()
  with pytest.raises(ConfigError) as e:
    augment.mix_batch(jax.random.key(0), images, labels, 2, **{**MIX, **kw})
  assert e.value.field == field
