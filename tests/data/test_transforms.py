"""Tests for at_jax.data.transforms: crop, flip, RandAugment and erasing in order; the eval view;
normalisation; the range checks of their config fields."""

import numpy as np
import pytest
from PIL import Image

from at_jax.data import pipeline, sources, transforms
from at_jax.errors import ConfigError


@pytest.mark.usefixtures("needs_fashion_mnist")
@pytest.mark.parametrize("normalization", ["imagenet", "fashion_mnist", "unit"])
def test_train_batches_on_fashion_mnist(normalization):
  source = sources.make_source("fashion_mnist", "train")
  batch = next(
    pipeline.train_iterator(
      source, global_batch_size=32, image_size=28, seed=0, normalization=normalization
    )
  )
  assert batch["image"].shape == (32, 28, 28, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  # Gray is replicated to RGB, then normalised per channel.
  mean, std = map(np.array, transforms.NORMALIZATIONS[normalization])
  pixels = batch["image"] * std + mean
  assert pixels.min() >= -1e-3 and pixels.max() <= 1 + 1e-3
  if normalization == "unit":
    assert batch["image"].min() >= -1 - 1e-6
    np.testing.assert_allclose(batch["image"][..., 0], batch["image"][..., 2])


def test_train_augments_with_crop_and_flip(indexed_source, train_kw):
  source = indexed_source(1, size=32)
  batch = next(
    pipeline.train_iterator(source, **{**train_kw, "global_batch_size": 16, "image_size": 32})
  )
  images = batch["image"]
  assert np.all(batch["label"] == 0)
  # The same example, augmented 16 ways: all different.
  assert len({x.tobytes() for x in images}) == 16
  # Without crop range or flip, every copy is the image itself.
  plain = next(
    pipeline.train_iterator(
      source,
      **{**train_kw, "global_batch_size": 4, "image_size": 32},
      rrc_scale=(1.0, 1.0),
      rrc_ratio=(1.0, 1.0),
      hflip=False,
    )
  )
  mean, std = map(np.array, transforms.NORMALIZATIONS["imagenet"])
  pixels = (plain["image"] * std + mean) * 255
  for x in pixels:
    np.testing.assert_allclose(x, source.images[0], atol=1e-3)


def test_train_randaugment_sees_the_flipped_crop(
  indexed_source, take, assert_batches_equal, train_kw
):
  # With ops never applied, RandAugment (flip first, then PIL) must give the
  # pixels of the plain path (which flips the floats), from the same draws.
  source = indexed_source(12, size=20)
  plain = take(pipeline.train_iterator(source, **train_kw), 2)
  noop = take(pipeline.train_iterator(source, **train_kw, randaugment="rand-p0"), 2)
  assert_batches_equal(plain, noop)


@pytest.mark.usefixtures("needs_fashion_mnist")
def test_train_recipe_on_fashion_mnist(recipe):
  source = sources.make_source("fashion_mnist", "train[:64]")
  kw = dict(
    global_batch_size=32, image_size=28, seed=0, normalization="fashion_mnist", num_threads=0
  )
  plain = next(pipeline.train_iterator(source, **kw))
  batch = next(pipeline.train_iterator(source, **kw, **recipe))
  assert batch["image"].shape == (32, 28, 28, 3)
  assert batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"], plain["label"])
  changed = [not np.array_equal(x, y) for x, y in zip(batch["image"], plain["image"])]
  # RandAugment leaves ~1/4 of images alone, erasing ~3/4 of those.
  assert 16 <= sum(changed) < 32
  # Geometric fill is the normalisation mean's colour: 0 after normalising;
  # erasing is standard normal noise, so values leave the pixel range.
  mean, std = map(np.array, transforms.NORMALIZATIONS["fashion_mnist"])
  assert (batch["image"] * std + mean).min() < -0.5


def test_train_random_erase_one_always_erases(indexed_source, train_kw):
  source = indexed_source(8, size=16)
  kw = {**train_kw, "rrc_scale": (1.0, 1.0), "rrc_ratio": (1.0, 1.0), "hflip": False}
  plain = next(pipeline.train_iterator(source, **kw))
  erased = next(pipeline.train_iterator(source, **kw, random_erase=1.0))
  for x, y in zip(plain["image"], erased["image"]):
    differs = np.any(x != y, axis=-1)
    rows, cols = np.nonzero(differs.any(1))[0], np.nonzero(differs.any(0))[0]
    assert differs[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()


@pytest.mark.parametrize("channels", [1, 3])
def test_eval_crop_pct_one_keeps_pixels(channels):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, 12, 12, channels), dtype=np.uint8)
  source = sources.ArraySource(images, np.zeros(3))
  batch = next(
    pipeline.eval_iterator(
      source, global_batch_size=3, image_size=12, crop_pct=1.0, normalization="imagenet"
    )
  )
  mean, std = map(np.array, transforms.NORMALIZATIONS["imagenet"])
  pixels = (batch["image"] * std + mean) * 255
  np.testing.assert_allclose(pixels, np.broadcast_to(images, pixels.shape), atol=1e-3)


def test_eval_resizes_shorter_side_then_centre_crops():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (2, 40, 64, 3), dtype=np.uint8)
  source = sources.ArraySource(images, np.arange(2))
  batch = next(
    pipeline.eval_iterator(
      source, global_batch_size=2, image_size=28, crop_pct=0.875, normalization="unit"
    )
  )
  assert batch["image"].shape == (2, 28, 28, 3)
  # Shorter side 40 -> round(28 / 0.875) = 32, longer 64 -> 51; crop 28.
  expected = np.asarray(
    Image.fromarray(images[1]).resize((51, 32), Image.BICUBIC).crop((12, 2, 40, 30)), np.float32
  )
  np.testing.assert_allclose((batch["image"][1] + 1) / 2 * 255, expected, atol=1e-3)


# ----------------------------------------------------------------------------
# Normalisation.


def test_normalizations():
  assert transforms.NORMALIZATIONS["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert transforms.NORMALIZATIONS["unit"] == ((0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("make", ["train", "eval"])
def test_unknown_normalization_names_the_field(make, indexed_source):
  source = indexed_source(4)
  with pytest.raises(ConfigError) as e:
    if make == "train":
      pipeline.train_iterator(
        source, global_batch_size=2, image_size=8, seed=0, normalization="imagenet21k"
      )
    else:
      pipeline.eval_iterator(source, global_batch_size=2, image_size=8, normalization="imagenet21k")
  assert e.value.field == "data.normalization"
  assert "imagenet" in str(e.value) and "unit" in str(e.value)


# ----------------------------------------------------------------------------
# The checks and building blocks, directly.


def test_mean_std():
  mean, std = transforms.mean_std("imagenet")
  assert mean.dtype == std.dtype == np.float32
  np.testing.assert_array_equal(mean, np.float32(transforms.NORMALIZATIONS["imagenet"][0]))
  np.testing.assert_array_equal(std, np.float32(transforms.NORMALIZATIONS["imagenet"][1]))
  with pytest.raises(ConfigError) as e:
    transforms.mean_std("imagenet21k")
  assert e.value.field == "data.normalization"


def test_eval_shorter_side_and_its_crop_pct():
  assert transforms.eval_shorter_side(224, 0.875) == 256
  assert transforms.eval_shorter_side(28, 1.0) == 28
  for crop_pct in (0.0, -0.5, 1.01):
    with pytest.raises(ConfigError) as e:
      transforms.eval_shorter_side(224, crop_pct)
    assert e.value.field == "data.crop_pct"


def test_check_image_size_and_crop():
  transforms.check_image_size(1)
  transforms.check_crop((0.08, 1.0), (3 / 4, 4 / 3))
  with pytest.raises(ConfigError) as e:
    transforms.check_image_size(0)
  assert e.value.field == "data.image_size"
  for scale, ratio in (((0.0, 1.0), (1, 1)), ((0.5, 1.1), (1, 1)), ((0.5, 1.0), (2, 1))):
    with pytest.raises(ConfigError) as e:
      transforms.check_crop(scale, ratio)
    assert e.value.field == "data.rrc_scale"


def test_make_randaugment_fills_with_the_mean_colour():
  assert transforms.make_randaugment("", "imagenet") is None
  assert transforms.make_randaugment("rand-m9", "imagenet").fill == (124, 116, 104)
  with pytest.raises(ConfigError) as e:
    transforms.make_randaugment("rand-x9", "imagenet")
  assert e.value.field == "data.randaugment"
  with pytest.raises(ConfigError) as e:
    transforms.make_randaugment("rand-m9", "imagenet21k")
  assert e.value.field == "data.normalization"


def test_fixed_view_is_the_eval_view(indexed_source):
  source = indexed_source(3, size=20)
  view = dict(image_size=16, crop_pct=0.875, normalization="imagenet")
  evaluate = transforms.eval_preprocessor(**view)
  fixed = transforms.train_preprocessor(
    **view,
    seed=0,
    fixed_view=True,
    randaugment="",
    random_erase=0.0,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip=True,
  )
  for i in range(3):
    want, got = evaluate(source[i]), fixed(source[i], i)
    assert want["mask"] and "mask" not in got
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["label"] == want["label"] == i


def _augment(seed: int, **kw):
  """train_preprocessor with crop and flip only (scale, ratio and hflip overridable)."""
  crop = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, **kw)
  return transforms.train_preprocessor(
    seed=seed,
    image_size=8,
    normalization="unit",
    crop_pct=0.875,
    fixed_view=False,
    randaugment="",
    random_erase=0.0,
    **crop,
  )


def test_augmentation_depends_on_the_seed(indexed_source):
  """Same example, same stream position, other seed: other crops (the seed feeds the generator)."""
  example = indexed_source(1, size=32)[0]
  a, b = _augment(3), _augment(4)
  assert not np.array_equal(a(example, 0)["image"], b(example, 0)["image"])
  np.testing.assert_array_equal(a(example, 0)["image"], _augment(3)(example, 0)["image"])


def test_random_resized_crop_box_draws_within_scale_and_log_uniform_ratio():
  """torchvision's get_params: area uniform in scale (its upper bound reached), ratio log-uniform."""
  size, scale, ratio = 300, (0.1, 0.5), (3 / 4, 4 / 3)
  rng = np.random.default_rng(0)
  areas, log_ratios = [], []
  for _ in range(500):
    top, left, h, w = transforms.random_resized_crop_box(size, size, rng, scale, ratio)
    assert 0 <= top <= size - h and 0 <= left <= size - w
    areas.append(h * w / size**2)
    log_ratios.append(np.log(w / h))
  areas, log_ratios = np.array(areas), np.array(log_ratios)
  # h and w are rounded (>= 94 px here): a little slack.
  assert areas.min() >= scale[0] - 0.01 and areas.max() <= scale[1] + 0.01
  assert np.all(np.abs(log_ratios) <= np.log(ratio[1]) + 0.02)
  assert abs(log_ratios.mean()) < 0.02  # log-uniform: symmetric about w == h
  assert areas.max() > scale[1] - 0.02  # the upper bound is drawn too
  assert abs(areas.mean() - np.mean(scale)) < 0.02


def test_hflip_flips_half_the_examples(indexed_source):
  """With the crop the whole image, an output is the image or its mirror: mirrors ~1/2 of draws."""
  image = indexed_source(1, size=8)[0]["image"]
  mean, std = transforms.mean_std("unit")
  flips = 0
  for seed in range(400):
    out = transforms.train_example(
      {"image": image, "label": 0},
      np.random.default_rng(seed),
      image_size=8,
      scale=(1.0, 1.0),
      ratio=(1.0, 1.0),
      hflip=True,
      mean=mean,
      std=std,
    )
    pixels = np.round((out["image"] * std + mean) * 255)
    flipped = np.array_equal(pixels, image[:, ::-1])
    assert flipped or np.array_equal(pixels, image)
    flips += flipped
  assert abs(flips / 400 - 0.5) < 0.08


@pytest.mark.parametrize("hw, resize_to", [((20, 30), 11), ((30, 20), 10), ((25, 19), 12)])
def test_eval_centre_crop_matches_torchvisions_resize_and_centre_crop(hw, resize_to):
  """An odd margin (3 or 7 px, new_h - S) is split as CenterCrop does: round(), not floor."""
  from torchvision import transforms as tv  # pylint: disable=import-outside-toplevel

  image = np.random.default_rng(5).integers(0, 256, (*hw, 3), dtype=np.uint8)
  unit = dict(mean=np.zeros(3, np.float32), std=np.full(3, 1 / 255, np.float32))
  ours = transforms.eval_example(
    {"image": image, "label": 0}, image_size=8, resize_to=resize_to, **unit
  )["image"]
  reference = tv.Compose([tv.Resize(resize_to, tv.InterpolationMode.BICUBIC), tv.CenterCrop(8)])
  theirs = np.asarray(reference(Image.fromarray(image)), np.float32)
  # One resize of the crop's box resamples what resize-then-crop does: at most 1 level apart.
  assert np.abs(ours - theirs).max() <= 1
