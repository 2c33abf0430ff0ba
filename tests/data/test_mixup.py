"""Tests for at_jax.data.mixup: Mixup / CutMix of the global batch, against timm (installed for tests
only): its mixup targets and cutmix boxes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from timm.data import mixup as timm_mixup

from at_jax import sharding
from at_jax.data import mixup
from at_jax.errors import ConfigError

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
      ours = mixup.mixup_target(jnp.asarray(labels), 10, lam, smoothing)
      theirs = timm_mixup.mixup_target(torch.tensor(labels), 10, lam, smoothing)
      np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6)
      np.testing.assert_allclose(ours.sum(-1), 1, atol=1e-6)


def test_mixup_batch_matches_timm_for_its_lam(monkeypatch):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 5])
  mixed, soft = mixup.mix_batch(
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
    *ours, lam_ours = mixup.cutmix_box(jnp.float32(lam), cy, cx, int(height), int(width))
    assert [int(v) for v in ours] == [int(v) for v in box]
    np.testing.assert_allclose(lam_ours, lam_timm, atol=1e-6)


def test_cutmix_pastes_a_rectangle_weighted_by_its_area(erased_box):
  images, labels = _two_images()
  pasted = 0
  for seed in range(30):
    mixed, soft = mixup.mix_batch(
      jax.random.key(seed),
      images,
      labels,
      2,
      mixup_alpha=0.0,
      cutmix_alpha=1.0,
      label_smoothing=0.0,
    )
    box = erased_box(np.asarray(images[0]), np.asarray(mixed[0]))
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
    mixed, soft = mixup.mix_batch(key, images, labels, 2, **MIX)
    is_cutmix = jnp.all((mixed == 0) | (mixed == 1))
    return soft[0].sum(), soft[0, 0], is_cutmix

  totals, own, is_cutmix = map(np.asarray, draw(jax.random.split(jax.random.key(0), 4000)))
  np.testing.assert_allclose(totals, 1, atol=1e-6)
  assert abs(is_cutmix.mean() - 0.5) < 0.04
  lam = (own[~is_cutmix] - 0.05) / 0.9  # Undo the smoothing (C = 2).
  # Beta(0.8, 0.8): mean 1/2, variance 0.8^2 / (1.6^2 * 2.6) = 0.0962.
  assert abs(lam.mean() - 0.5) < 0.02
  assert abs(lam.var() - 0.0962) < 0.01


@pytest.mark.parametrize("switch_prob", [0.9, 0.2])
def test_switch_prob_is_the_probability_of_cutmix(switch_prob):
  """CutMix is chosen with probability `switch_prob`, not 1 - switch_prob: at the recipe's 0.5 the two
  read alike, so draw at asymmetric values. CutMix copies pixels (weights exactly 0/1); Mixup's
  Beta(0.8, 0.8) lam blends them (lam exactly 0 or 1 has probability 0)."""
  images, labels = _two_images(8)
  mix = {**MIX, "switch_prob": switch_prob}

  @jax.jit
  @jax.vmap
  def is_cutmix(key):
    mixed, _ = mixup.mix_batch(key, images, labels, 2, **mix)
    return jnp.all((mixed == 0) | (mixed == 1))

  fraction = float(np.mean(is_cutmix(jax.random.split(jax.random.key(1), 2000))))
  # Binomial(2000, p): sd <= 0.009; 0.035 is > 3.8 sd, and the inverted switch is >= 0.6 away.
  assert abs(fraction - switch_prob) < 0.035, fraction


def test_mix_batch_jits_and_matches_eager():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 12, 12, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 8))
  fn = functools.partial(mixup.mix_batch, num_classes=5, **MIX)
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
  fn = jax.jit(functools.partial(mixup.mix_batch, num_classes=10, **MIX))
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
  mixed, soft = mixup.mix_batch(
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
  mixed, soft = mixup.mix_batch(jax.random.key(0), images, labels, 2, **MIX, prob=0.0)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_allclose(soft, [[0.95, 0.05], [0.05, 0.95]], atol=1e-6)


def test_mix_batch_keeps_bfloat16():
  images, labels = _two_images()
  mixed, _ = mixup.mix_batch(jax.random.key(0), images.astype(jnp.bfloat16), labels, 2, **MIX)
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
    mixup.mix_batch(jax.random.key(0), images, labels, 2, **{**MIX, **kw})
  assert e.value.field == field


@pytest.mark.parametrize(
  "kw, field",
  [
    (
      dict(mixup_alpha=-1.0, cutmix_alpha=0.0),
      "data.mixup",
    ),  # Mixing off: no mix_batch in the step.
    (dict(mixup_alpha=-1.0, cutmix_alpha=1.0), "data.mixup"),
    (dict(mixup_alpha=0.0, cutmix_alpha=-0.5), "data.cutmix"),
    (dict(switch_prob=1.5), "data.mixup_switch_prob"),
    (dict(switch_prob=-0.5), "data.mixup_switch_prob"),
    (dict(prob=-0.1), "data.mixup_prob"),
    (dict(prob=2.0), "data.mixup_prob"),
    (dict(label_smoothing=-0.1), "optim.label_smoothing"),
    (dict(num_classes=0), "model.num_classes"),
  ],
)
def test_check_mix_args_names_the_field(kw, field):
  args = {"num_classes": 10, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, **kw}
  with pytest.raises(ConfigError) as e:
    mixup.check_mix_args(**args)
  assert e.value.field == field
  # mix_batch checks its own arguments the same way, even when they turn mixing off.
  images, labels = _two_images()
  num_classes = args.pop("num_classes")
  with pytest.raises(ConfigError) as e:
    mixup.mix_batch(jax.random.key(0), images, labels, num_classes, **args)
  assert e.value.field == field


def test_check_mix_args_accepts_the_recipe_and_off():
  mixup.check_mix_args(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)
  mixup.check_mix_args(num_classes=2, mixup_alpha=0.0, cutmix_alpha=0.0)


# ----------------------------------------------------------------------------
# Per-group draws (data.mix_group_size): the reference's timm Mixup in each process.


def _batch(n, size=8, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32)
  return images, jnp.asarray(rng.integers(0, classes, n))


def test_each_group_is_mix_batch_of_that_group_with_its_key():
  images, labels = _batch(24)
  key = jax.random.key(7)
  mixed, soft = jax.jit(functools.partial(mixup.mix_groups, num_classes=10, group_size=6, **MIX))(
    key, images, labels
  )
  assert mixed.shape == images.shape and soft.shape == (24, 10)
  for j in range(4):
    rows = slice(6 * j, 6 * j + 6)
    alone = mixup.mix_batch(
      jax.random.fold_in(key, j), images[rows], labels[rows], 10, **MIX
    )  # pairs i with 5 - i inside the group
    np.testing.assert_allclose(mixed[rows], alone[0], atol=1e-6)
    np.testing.assert_allclose(soft[rows], alone[1], atol=1e-6)


def test_group_size_zero_is_one_draw_for_the_batch():
  images, labels = _batch(8)
  key = jax.random.key(3)
  ours = mixup.mix_groups(key, images, labels, 10, group_size=0, **MIX)
  whole = mixup.mix_batch(key, images, labels, 10, **MIX)
  for a, b in zip(ours, whole):
    np.testing.assert_array_equal(a, b)


def test_groups_draw_independently():
  """64 groups of 2 (example 0 all zeros, 1 all ones): each its own lam and mixup-vs-cutmix switch."""
  two, two_labels = _two_images(8)
  images, labels = jnp.tile(two, (64, 1, 1, 1)), jnp.tile(two_labels, 64)
  mixed, soft = mixup.mix_groups(jax.random.key(0), images, labels, 2, group_size=2, **MIX)
  own = np.asarray(soft[0::2, 0])  # each group's first example: the weight of its own label
  is_cutmix = np.asarray(jnp.all((mixed[0::2] == 0) | (mixed[0::2] == 1), axis=(1, 2, 3)))
  assert 10 < is_cutmix.sum() < 54  # both kinds of draw, switched per group (p = 0.5)
  # Mixup's lam is continuous: every mixup group has its own (CutMix's come in 64 box areas).
  assert len(np.unique(own[~is_cutmix])) == (~is_cutmix).sum()
  assert len(np.unique(own[is_cutmix])) > 5
  # Within a group the partner's label weight mirrors the example's own (pairing i with g-1-i).
  np.testing.assert_allclose(soft[1::2, 1], own, atol=1e-6)


@pytest.mark.parametrize(
  "group_size", [4, 8]
)  # 4 per device: groups within a device, or across two
def test_mix_groups_on_a_4x2_mesh_equals_one_device(group_size):
  images, labels = _batch(32, seed=2)
  key = jax.random.key(11)
  fn = functools.partial(mixup.mix_groups, num_classes=10, group_size=group_size, **MIX)
  one = jax.jit(fn)(
    key, jax.device_put(images, jax.devices()[0]), jax.device_put(labels, jax.devices()[0])
  )
  mesh = sharding.make_mesh(4, 2)
  batch = sharding.batch_sharding(mesh)
  meshed = jax.jit(sharding.on_mesh(fn, mesh), out_shardings=(batch, batch))(
    key, jax.device_put(images, batch), jax.device_put(labels, batch)
  )
  for a, b in zip(one, meshed):  # the same draws; XLA may fuse the blend differently (float noise)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert meshed[0].sharding.is_equivalent_to(batch, 4)


@pytest.mark.parametrize("group_size", [-2, 1, 3, 2.5, True])
def test_a_bad_group_size_names_the_field(group_size):
  with pytest.raises(ConfigError) as e:
    mixup.check_group_size(group_size, 20)
  assert e.value.field == "data.mix_group_size"
  images, labels = _batch(20)
  with pytest.raises(ConfigError) as e:
    mixup.mix_groups(jax.random.key(0), images, labels, 10, group_size=group_size, **MIX)
  assert e.value.field == "data.mix_group_size"


def test_an_odd_group_size_that_divides_the_batch_is_refused():
  with pytest.raises(ConfigError, match="is odd") as e:
    mixup.check_group_size(3, 21)
  assert e.value.field == "data.mix_group_size"


def test_check_group_size_accepts_divisors_and_zero():
  for group_size in (0, 2, 4, 10, 20):
    mixup.check_group_size(group_size, 20)
