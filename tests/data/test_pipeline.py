"""Tests for at_jax.data: sources, and exact, resumable, sharded iterators."""

import gzip
import io
import os
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

from at_jax.data import pipeline as data
from at_jax.errors import ConfigError

SYSTEM_DIR = data.FASHION_MNIST_SYSTEM_DIR
IDX_NAMES = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)
requires_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(SYSTEM_DIR), reason="needs `sudo apt-get install dataset-fashion-mnist`"
)


def _indexed_source(n: int, size: int = 8) -> data.ArraySource:
  """n distinct random RGB images whose label is the example's index."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return data.ArraySource(images, np.arange(n))


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


TRAIN_KW = dict(global_batch_size=8, image_size=16, seed=3, normalization="imagenet")
# The paper's per-example recipe on top of crop and flip.
RECIPE = dict(randaugment="rand-m9-mstd0.5-inc1", random_erase=0.25)
with_and_without_recipe = pytest.mark.parametrize("aug", [{}, RECIPE], ids=["crop_flip", "recipe"])


@pytest.fixture
def no_network(monkeypatch):
  """Makes any attempt to open a connection fail loudly."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_default_copies(tmp_path, monkeypatch):
  """Points the system and tfds fallbacks at empty folders."""
  monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "no_system_copy"))
  monkeypatch.setattr(data, "FASHION_MNIST_TFDS_DATA_DIR", str(tmp_path / "no_tfds_copy"))


# ----------------------------------------------------------------------------
# Fashion-MNIST files.


@requires_fashion_mnist
def test_fashion_mnist_from_system_package():
  arrays = data.load_fashion_mnist()
  for split, n in (("train", 60000), ("test", 10000)):
    images, labels = arrays[split]
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(10))
  assert 0.25 < arrays["train"][0].mean() / 255 < 0.32  # Stats mean: 0.286.


@requires_fashion_mnist
@pytest.mark.parametrize("gzipped", [True, False])
def test_fashion_mnist_from_data_dir_copy(tmp_path, no_default_copies, gzipped):
  for name in IDX_NAMES:
    src = os.path.join(SYSTEM_DIR, name + ".gz")
    if gzipped:
      shutil.copy(src, tmp_path / (name + ".gz"))
    else:
      with gzip.open(src, "rb") as f:
        (tmp_path / name).write_bytes(f.read())
  expected = data.load_fashion_mnist(SYSTEM_DIR)
  got = data.load_fashion_mnist(str(tmp_path))
  for split in ("train", "test"):
    for x, y in zip(got[split], expected[split]):
      np.testing.assert_array_equal(x, y)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, no_default_copies, no_network):
  with pytest.raises(ConfigError) as e:
    data.load_fashion_mnist(str(tmp_path))
  assert e.value.field == "data.dir"
  assert "sudo apt-get install dataset-fashion-mnist" in str(e.value)
  assert "data.dir" in str(e.value) and "IDX" in str(e.value)


@requires_fashion_mnist
@pytest.mark.parametrize("gzipped", [True, False])
def test_truncated_idx_file_names_the_file(tmp_path, no_default_copies, gzipped):
  for name in IDX_NAMES:
    shutil.copy(os.path.join(SYSTEM_DIR, name + ".gz"), tmp_path / (name + ".gz"))
  bad = tmp_path / "train-images-idx3-ubyte.gz"
  raw = bad.read_bytes()
  if gzipped:
    bad.write_bytes(raw[: len(raw) // 2])
  else:
    bad.unlink()
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(gzip.decompress(raw)[:-100])
  with pytest.raises(ConfigError) as e:
    data.load_fashion_mnist(str(tmp_path))
  assert e.value.field == str(bad)


def test_fashion_mnist_from_prepared_tfds_copy(
  tmp_path, no_default_copies, monkeypatch, no_network
):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  splits = {
    "train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
    "test": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
  }

  # A stand-in with fashion_mnist's name, version and features, prepared in
  # the array_record format (needs no TensorFlow when given PIL images).
  with tfds.core.registered.skip_registration():

    class FashionMnist(tfds.core.GeneratorBasedBuilder):
      # No checksums file to look up; tfds' lookup for a class defined in a
      # package needs importlib_resources, which is not installed.
      code_path = None
      VERSION = tfds.core.Version("3.0.1")

      def _info(self):
        return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
            {
              "image": tfds.features.Image(shape=(28, 28, 1)),
              "label": tfds.features.ClassLabel(num_classes=10),
            }
          ),
        )

      def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in splits}

      def _generate_examples(self, split):
        for i, image in enumerate(splits[split]):
          yield i, {"image": Image.fromarray(image), "label": i}

  tfds_dir = str(tmp_path / "tfds")
  FashionMnist(data_dir=tfds_dir, file_format="array_record").download_and_prepare()
  monkeypatch.setattr(data, "FASHION_MNIST_TFDS_DATA_DIR", tfds_dir)
  arrays = data.load_fashion_mnist()
  for split, images in splits.items():
    got_images, got_labels = arrays[split]
    # tfds shuffles when preparing; the label is the example's index.
    assert sorted(got_labels) == list(range(len(images)))
    np.testing.assert_array_equal(got_images, images[got_labels])


@requires_fashion_mnist
def test_fashion_mnist_split_slices():
  images, labels = data.load_fashion_mnist()["train"]
  head = data.make_source("fashion_mnist", "train[:90%]")
  tail = data.make_source("fashion_mnist", "train[90%:]")
  assert (len(head), len(tail)) == (54000, 6000)
  np.testing.assert_array_equal(tail[0]["image"][..., 0], images[54000])
  assert len(data.make_source("fashion_mnist", "train[:10%]")) == 6000
  first = data.make_source("fashion_mnist", "train[:1000]")
  assert len(first) == 1000 and first[999]["label"] == labels[999]
  test = data.make_source("fashion_mnist", "test")
  assert len(test) == 10000 and data.num_examples(test) == 10000
  example = test[5]
  assert example["image"].shape == (28, 28, 1)
  assert example["image"].dtype == np.uint8
  assert isinstance(example["label"], int)
  with pytest.raises(ConfigError):
    data.make_source("fashion_mnist", "validation")


# ----------------------------------------------------------------------------
# tfds sources.


@pytest.mark.parametrize("name", ["imagenet2012", "no_such_dataset_xyz"])
def test_unprepared_tfds_dataset_fails_fast(tmp_path, no_network, name):
  start = time.monotonic()
  with pytest.raises(ConfigError) as e:
    data.make_source(name, "train", data_dir=str(tmp_path))
  assert time.monotonic() - start < 10
  assert e.value.field == "data.dir"
  assert str(tmp_path) in str(e.value)
  assert "--file_format=array_record" in str(e.value)
  assert os.listdir(tmp_path) == []  # Nothing downloaded or prepared.


def test_prepared_tfds_dataset_yields_uint8_hwc(tmp_path, no_network):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (10 + i, 14 - i, 3), dtype=np.uint8) for i in range(6)]

  with tfds.core.registered.skip_registration():

    class VariedImages(tfds.core.GeneratorBasedBuilder):
      # No checksums file to look up; tfds' lookup for a class defined in a
      # package needs importlib_resources, which is not installed.
      code_path = None
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
            {
              "image": tfds.features.Image(shape=(None, None, 3)),
              "label": tfds.features.ClassLabel(num_classes=6),
            }
          ),
        )

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i, image in enumerate(images):
          yield i, {"image": Image.fromarray(image), "label": i}

  VariedImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = data.make_source("varied_images", "train", data_dir=str(tmp_path))
  assert len(source) == 6
  for i in range(6):
    example = source[i]
    assert example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"], images[example["label"]])
  batch = next(data.train_iterator(source, **TRAIN_KW))
  assert batch["image"].shape == (8, 16, 16, 3)


# ----------------------------------------------------------------------------
# Train iterator.


@requires_fashion_mnist
@pytest.mark.parametrize("normalization", ["imagenet", "fashion_mnist", "unit"])
def test_train_batches_on_fashion_mnist(normalization):
  source = data.make_source("fashion_mnist", "train")
  batch = next(
    data.train_iterator(
      source, global_batch_size=32, image_size=28, seed=0, normalization=normalization
    )
  )
  assert batch["image"].shape == (32, 28, 28, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  # Gray is replicated to RGB, then normalised per channel.
  mean, std = map(np.array, data.NORMALIZATIONS[normalization])
  pixels = batch["image"] * std + mean
  assert pixels.min() >= -1e-3 and pixels.max() <= 1 + 1e-3
  if normalization == "unit":
    assert batch["image"].min() >= -1 - 1e-6
    np.testing.assert_allclose(batch["image"][..., 0], batch["image"][..., 2])


@with_and_without_recipe
def test_train_is_deterministic_in_seed(aug):
  source = _indexed_source(40)
  a = _take(data.train_iterator(source, **TRAIN_KW, **aug), 3)
  b = _take(data.train_iterator(source, **TRAIN_KW, **aug, num_threads=0), 3)
  _assert_batches_equal(a, b)
  c = next(data.train_iterator(source, **{**TRAIN_KW, "seed": 4}, **aug))
  assert not np.array_equal(a[0]["label"], c["label"])
  assert not np.array_equal(a[0]["image"], c["image"])


@with_and_without_recipe
def test_train_resumes_exactly_at_start_step(aug):
  source = _indexed_source(20)  # Resume crosses epoch boundaries.
  fresh = _take(data.train_iterator(source, **TRAIN_KW, **aug), 7)
  resumed = _take(data.train_iterator(source, **TRAIN_KW, **aug, start_step=4), 3)
  _assert_batches_equal(fresh[4:], resumed)


@with_and_without_recipe
def test_train_process_slices_concatenate_to_global_batch(aug):
  source = _indexed_source(30)
  whole = _take(data.train_iterator(source, **TRAIN_KW, **aug), 5)
  parts = [
    _take(
      data.train_iterator(
        source, **TRAIN_KW, **aug, process_index=p, process_count=2, num_threads=p
      ),
      5,
    )
    for p in range(2)
  ]
  for step, batch in enumerate(whole):
    for key in batch:
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, batch[key])
  assert parts[0][0]["image"].shape == (4, 16, 16, 3)


def test_train_visits_every_example_once_per_epoch():
  source = _indexed_source(50)
  kw = {**TRAIN_KW, "global_batch_size": 10}
  labels = [b["label"] for b in _take(data.train_iterator(source, **kw), 10)]
  epoch1, epoch2 = np.concatenate(labels[:5]), np.concatenate(labels[5:])
  assert sorted(epoch1) == list(range(50))
  assert sorted(epoch2) == list(range(50))
  assert not np.array_equal(epoch1, epoch2)
  assert not np.array_equal(epoch1, np.arange(50))  # Actually shuffled.


def test_train_augments_with_crop_and_flip():
  source = _indexed_source(1, size=32)
  batch = next(
    data.train_iterator(source, **{**TRAIN_KW, "global_batch_size": 16, "image_size": 32})
  )
  images = batch["image"]
  assert np.all(batch["label"] == 0)
  # The same example, augmented 16 ways: all different.
  assert len({x.tobytes() for x in images}) == 16
  # Without crop range or flip, every copy is the image itself.
  plain = next(
    data.train_iterator(
      source,
      **{**TRAIN_KW, "global_batch_size": 4, "image_size": 32},
      rrc_scale=(1.0, 1.0),
      rrc_ratio=(1.0, 1.0),
      hflip=False,
    )
  )
  mean, std = map(np.array, data.NORMALIZATIONS["imagenet"])
  pixels = (plain["image"] * std + mean) * 255
  for x in pixels:
    np.testing.assert_allclose(x, source.images[0], atol=1e-3)


def test_train_randaugment_sees_the_flipped_crop():
  # With ops never applied, RandAugment (flip first, then PIL) must give the
  # pixels of the plain path (which flips the floats), from the same draws.
  source = _indexed_source(12, size=20)
  plain = _take(data.train_iterator(source, **TRAIN_KW), 2)
  noop = _take(data.train_iterator(source, **TRAIN_KW, randaugment="rand-p0"), 2)
  _assert_batches_equal(plain, noop)


@requires_fashion_mnist
def test_train_recipe_on_fashion_mnist():
  source = data.make_source("fashion_mnist", "train[:64]")
  kw = dict(
    global_batch_size=32, image_size=28, seed=0, normalization="fashion_mnist", num_threads=0
  )
  plain = next(data.train_iterator(source, **kw))
  batch = next(data.train_iterator(source, **kw, **RECIPE))
  assert batch["image"].shape == (32, 28, 28, 3)
  assert batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"], plain["label"])
  changed = [not np.array_equal(x, y) for x, y in zip(batch["image"], plain["image"])]
  # RandAugment leaves ~1/4 of images alone, erasing ~3/4 of those.
  assert 16 <= sum(changed) < 32
  # Geometric fill is the normalisation mean's colour: 0 after normalising;
  # erasing is standard normal noise, so values leave the pixel range.
  mean, std = map(np.array, data.NORMALIZATIONS["fashion_mnist"])
  assert (batch["image"] * std + mean).min() < -0.5


def test_train_random_erase_one_always_erases():
  source = _indexed_source(8, size=16)
  kw = {**TRAIN_KW, "rrc_scale": (1.0, 1.0), "rrc_ratio": (1.0, 1.0), "hflip": False}
  plain = next(data.train_iterator(source, **kw))
  erased = next(data.train_iterator(source, **kw, random_erase=1.0))
  for x, y in zip(plain["image"], erased["image"]):
    differs = np.any(x != y, axis=-1)
    rows, cols = np.nonzero(differs.any(1))[0], np.nonzero(differs.any(0))[0]
    assert differs[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()


@pytest.mark.parametrize(
  "aug, field",
  [
    (dict(randaugment="rand-m9-bogus"), "data.randaugment"),
    (dict(randaugment="augmix-m5"), "data.randaugment"),
    (dict(random_erase=1.5), "data.random_erase"),
    (dict(random_erase=-0.1), "data.random_erase"),
  ],
)
def test_train_rejects_bad_augmentation(aug, field):
  with pytest.raises(ConfigError) as e:
    data.train_iterator(_indexed_source(10), **TRAIN_KW, **aug)
  assert e.value.field == field


def test_train_rejects_bad_batch_size():
  with pytest.raises(ConfigError) as e:
    data.train_iterator(
      _indexed_source(10), **{**TRAIN_KW, "global_batch_size": 9}, process_count=2
    )
  assert e.value.field == "data.batch_size"


# ----------------------------------------------------------------------------
# Eval iterator.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(process_count):
  source = _indexed_source(23)
  per_process = [
    list(
      data.eval_iterator(
        source,
        global_batch_size=8,
        image_size=8,
        normalization="unit",
        process_index=p,
        process_count=process_count,
      )
    )
    for p in range(process_count)
  ]
  b = 8 // process_count
  seen = []
  for step in range(3):  # ceil(23 / 8) global batches.
    for p in range(process_count):
      batch = per_process[p][step]
      assert batch["image"].shape == (b, 8, 8, 3)
      assert batch["mask"].dtype == np.bool_
      seen += list(batch["label"][batch["mask"]])
  assert all(len(batches) == 3 for batches in per_process)
  assert seen == list(range(23))  # In order, each once.
  masks = np.concatenate([per_process[p][2]["mask"] for p in range(process_count)])
  np.testing.assert_array_equal(masks, np.arange(8) < 23 - 16)


@pytest.mark.parametrize("channels", [1, 3])
def test_eval_crop_pct_one_keeps_pixels(channels):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, 12, 12, channels), dtype=np.uint8)
  source = data.ArraySource(images, np.zeros(3))
  batch = next(
    data.eval_iterator(
      source, global_batch_size=3, image_size=12, crop_pct=1.0, normalization="imagenet"
    )
  )
  mean, std = map(np.array, data.NORMALIZATIONS["imagenet"])
  pixels = (batch["image"] * std + mean) * 255
  np.testing.assert_allclose(pixels, np.broadcast_to(images, pixels.shape), atol=1e-3)


def test_eval_resizes_shorter_side_then_centre_crops():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (2, 40, 64, 3), dtype=np.uint8)
  source = data.ArraySource(images, np.arange(2))
  batch = next(
    data.eval_iterator(
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
  assert data.NORMALIZATIONS["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert data.NORMALIZATIONS["unit"] == ((0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("make", ["train", "eval"])
def test_unknown_normalization_names_the_field(make):
  source = _indexed_source(4)
  with pytest.raises(ConfigError) as e:
    if make == "train":
      data.train_iterator(
        source, global_batch_size=2, image_size=8, seed=0, normalization="imagenet21k"
      )
    else:
      data.eval_iterator(source, global_batch_size=2, image_size=8, normalization="imagenet21k")
  assert e.value.field == "data.normalization"
  assert "imagenet" in str(e.value) and "unit" in str(e.value)


# ----------------------------------------------------------------------------
# Unreadable records: skipped, counted, deterministic.


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "PNG")
  return buffer.getvalue()


class _DamagedSource:
  """Records of encoded image bytes, decoded on access as a tfds source does.

  `bad` maps an index to its damage: "garbage" (not an image), "truncated"
  (half a PNG: the header reads, the pixels don't), "channels" (decodes to 2
  channels, which fails in preprocessing). The label is the index.
  """

  def __init__(self, n: int, bad: dict[int, str], size: int = 12):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    self.bad = bad

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    damage = self.bad.get(index)
    if damage == "channels":
      return {"image": self.images[index][..., :2], "label": index}
    encoded = _png(self.images[index])
    if damage == "garbage":
      encoded = b"\x00not an image"
    elif damage == "truncated":
      encoded = encoded[: len(encoded) // 2]
    # pylint: disable-next=protected-access
    return data._to_example({"image": encoded, "label": index})


BAD = {3: "garbage", 7: "truncated", 12: "channels"}


@with_and_without_recipe
def test_train_skips_unreadable_records(aug, capsys):
  source = _DamagedSource(20, BAD)
  batches = _take(data.train_iterator(source, **TRAIN_KW, **aug), 5)
  labels = np.concatenate([b["label"] for b in batches])  # 40: two epochs
  skipped = np.concatenate([b["skipped"] for b in batches])
  assert all(b["image"].shape == (8, 16, 16, 3) for b in batches)
  assert not set(BAD) & set(labels)
  # Each bad record is met once per epoch and replaced once.
  assert skipped.dtype == np.bool_ and skipped.sum() == 2 * len(BAD)
  assert sorted(set(labels[:20])) == sorted(set(range(20)) - set(BAD))
  out = capsys.readouterr().out
  assert "WARNING: example 3 of the source is unreadable" in out
  assert 0 < out.count("WARNING: example") <= data.MAX_SKIP_WARNINGS
  # Still a pure function of (seed, step): threads, resume and process
  # slices give the same batches, flags included.
  _assert_batches_equal(
    batches, _take(data.train_iterator(source, **TRAIN_KW, **aug, num_threads=0), 5)
  )
  _assert_batches_equal(
    batches[2:], _take(data.train_iterator(source, **TRAIN_KW, **aug, start_step=2), 3)
  )
  parts = [
    _take(data.train_iterator(source, **TRAIN_KW, **aug, process_index=p, process_count=2), 5)
    for p in range(2)
  ]
  for step, batch in enumerate(batches):
    for key in batch:
      np.testing.assert_array_equal(
        np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key]
      )


def test_train_stops_when_no_record_is_readable():
  source = _DamagedSource(5, dict.fromkeys(range(5), "garbage"))
  with pytest.raises(ConfigError, match="5 examples in a row") as e:
    next(data.train_iterator(source, **TRAIN_KW, num_threads=0))
  assert e.value.field == "data.name"


def test_eval_leaves_out_unreadable_records(capsys):
  source = _DamagedSource(20, BAD)
  batches = list(
    data.eval_iterator(source, global_batch_size=8, image_size=8, normalization="unit")
  )
  mask = np.concatenate([b["mask"] for b in batches])
  skipped = np.concatenate([b["skipped"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert list(labels[mask]) == [i for i in range(20) if i not in BAD]
  assert list(np.nonzero(skipped)[0]) == sorted(BAD)
  assert not mask[20:].any() and not skipped[20:].any()  # padding
  assert "example 7 of the source is unreadable" in capsys.readouterr().out


def test_train_and_evaluate_counts_skipped_examples(tmp_path, monkeypatch, capsys):
  from at_jax import metrics
  from at_jax.experiment import loop as train
  from configs import demo  # pylint: disable=g-import-not-at-top

  bad_train = {1: "garbage", 2: "truncated", 40: "garbage"}
  bad_eval = {5: "garbage"}

  def make_source(name, split, data_dir=None):
    del name, data_dir
    if split.startswith("train"):
      return _DamagedSource(64, bad_train, size=28)
    return _DamagedSource(40, bad_eval, size=28)

  monkeypatch.setattr(data, "make_source", make_source)
  c = demo.get_config()
  c.unlock()
  c.model.variant = "Pico/7"
  c.data.update(dict(batch_size=16, eval_batch_size=40, num_threads=0))
  c.schedule.update(dict(steps=4, log_every_steps=2))
  c.transfer.mode = "none"
  c.teacher.pretrain = None
  evals = train.train_and_evaluate(c, str(tmp_path))  # runs through
  assert 0 <= evals["top1"] <= 100
  lines = [x for x in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/loss" in x]
  # 4 steps of 16: one epoch, which meets each bad record once.
  assert lines[-1]["step"] == 4
  assert lines[-1]["train/skipped_examples"] == len(bad_train)
  assert lines[0]["train/skipped_examples"] <= len(bad_train)
  assert "of the source is unreadable" in capsys.readouterr().out
