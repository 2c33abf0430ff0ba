"""Tests for at_jax.data.sources: Fashion-MNIST from IDX files or tfds, tfds sources, splits."""

import gzip
import os
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

from at_jax.data import pipeline, sources
from at_jax.errors import ConfigError

SYSTEM_DIR = sources.FASHION_MNIST_SYSTEM_DIR
IDX_NAMES = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)


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
  monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "no_system_copy"))
  monkeypatch.setattr(sources, "FASHION_MNIST_TFDS_DATA_DIR", str(tmp_path / "no_tfds_copy"))


# ----------------------------------------------------------------------------
# Fashion-MNIST files.


@pytest.mark.usefixtures("needs_fashion_mnist")
def test_fashion_mnist_from_system_package():
  arrays = sources.load_fashion_mnist()
  for split, n in (("train", 60000), ("test", 10000)):
    images, labels = arrays[split]
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(10))
  assert 0.25 < arrays["train"][0].mean() / 255 < 0.32  # Stats mean: 0.286.


@pytest.mark.usefixtures("needs_fashion_mnist")
@pytest.mark.parametrize("gzipped", [True, False])
def test_fashion_mnist_from_data_dir_copy(tmp_path, no_default_copies, gzipped):
  for name in IDX_NAMES:
    src = os.path.join(SYSTEM_DIR, name + ".gz")
    if gzipped:
      shutil.copy(src, tmp_path / (name + ".gz"))
    else:
      with gzip.open(src, "rb") as f:
        (tmp_path / name).write_bytes(f.read())
  expected = sources.load_fashion_mnist(SYSTEM_DIR)
  got = sources.load_fashion_mnist(str(tmp_path))
  for split in ("train", "test"):
    for x, y in zip(got[split], expected[split]):
      np.testing.assert_array_equal(x, y)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, no_default_copies, no_network):
  with pytest.raises(ConfigError) as e:
    sources.load_fashion_mnist(str(tmp_path))
  assert e.value.field == "data.dir"
  assert "sudo apt-get install dataset-fashion-mnist" in str(e.value)
  assert "data.dir" in str(e.value) and "IDX" in str(e.value)


@pytest.mark.usefixtures("needs_fashion_mnist")
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
    sources.load_fashion_mnist(str(tmp_path))
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
  monkeypatch.setattr(sources, "FASHION_MNIST_TFDS_DATA_DIR", tfds_dir)
  arrays = sources.load_fashion_mnist()
  for split, images in splits.items():
    got_images, got_labels = arrays[split]
    # tfds shuffles when preparing; the label is the example's index.
    assert sorted(got_labels) == list(range(len(images)))
    np.testing.assert_array_equal(got_images, images[got_labels])


@pytest.mark.usefixtures("needs_fashion_mnist")
def test_fashion_mnist_split_slices():
  images, labels = sources.load_fashion_mnist()["train"]
  head = sources.make_source("fashion_mnist", "train[:90%]")
  tail = sources.make_source("fashion_mnist", "train[90%:]")
  assert (len(head), len(tail)) == (54000, 6000)
  np.testing.assert_array_equal(tail[0]["image"][..., 0], images[54000])
  assert len(sources.make_source("fashion_mnist", "train[:10%]")) == 6000
  first = sources.make_source("fashion_mnist", "train[:1000]")
  assert len(first) == 1000 and first[999]["label"] == labels[999]
  test = sources.make_source("fashion_mnist", "test")
  assert len(test) == 10000 and sources.num_examples(test) == 10000
  example = test[5]
  assert example["image"].shape == (28, 28, 1)
  assert example["image"].dtype == np.uint8
  assert isinstance(example["label"], int)
  with pytest.raises(ConfigError):
    sources.make_source("fashion_mnist", "validation")


# ----------------------------------------------------------------------------
# tfds sources.


@pytest.mark.parametrize("name", ["imagenet2012", "no_such_dataset_xyz"])
def test_unprepared_tfds_dataset_fails_fast(tmp_path, no_network, name):
  start = time.monotonic()
  with pytest.raises(ConfigError) as e:
    sources.make_source(name, "train", data_dir=str(tmp_path))
  assert time.monotonic() - start < 10
  assert e.value.field == "data.dir"
  assert str(tmp_path) in str(e.value)
  assert "--file_format=array_record" in str(e.value)
  assert os.listdir(tmp_path) == []  # Nothing downloaded or prepared.


def _prepare_varied_images(data_dir: str) -> list[np.ndarray]:
  """Prepares tfds dataset ``varied_images`` (6 images of different shapes, label i = image i) as
  ArrayRecord in `data_dir`; returns the images."""
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

  VariedImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return images


def test_prepared_tfds_dataset_yields_uint8_hwc(tmp_path, no_network, train_kw):
  images = _prepare_varied_images(str(tmp_path))
  source = sources.make_source("varied_images", "train", data_dir=str(tmp_path))
  assert len(source) == 6
  assert sources.num_classes(source) == 6  # the tfds metadata's ClassLabel, for model.num_classes
  for i in range(6):
    example = source[i]
    assert example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"], images[example["label"]])
  batch = next(pipeline.train_iterator(source, **train_kw))
  assert batch["image"].shape == (8, 16, 16, 3)
  for split, field in (("validation", "data.eval_split"), ("train[", "data.train_split")):
    with pytest.raises(ConfigError) as e:
      sources.make_source("varied_images", split, data_dir=str(tmp_path), field=field)
    assert e.value.field == field


def test_a_tfds_dataset_in_a_bucket_reads_as_on_disk(tmp_path, gcs_bucket):
  """ArrayRecord's own C++ GCS client reads the records (it honours CLOUD_STORAGE_EMULATOR_ENDPOINT);
  tfds reads the dataset's metadata through epath."""
  import fsspec  # pylint: disable=import-outside-toplevel

  _prepare_varied_images(str(tmp_path / "tfds"))
  remote = f"{gcs_bucket[0]}/tfds"
  fsspec.filesystem("gs").put(str(tmp_path / "tfds"), remote, recursive=True)
  local = sources.make_source("varied_images", "train[1:5]", data_dir=str(tmp_path / "tfds"))
  in_bucket = sources.make_source("varied_images", "train[1:5]", data_dir=remote)
  assert len(in_bucket) == len(local) == 4
  for i in range(4):
    np.testing.assert_array_equal(in_bucket[i]["image"], local[i]["image"])
    assert in_bucket[i]["label"] == local[i]["label"]
  with pytest.raises(ConfigError, match="prepared in gs://") as e:
    sources.make_source("varied_images", "train", data_dir=f"{gcs_bucket[0]}/no_tfds")
  assert e.value.field == "data.dir"


# ----------------------------------------------------------------------------
# data.dir and the split fields.


def _write_idx(path, array: np.ndarray, magic: int) -> None:
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_system_copy(tmp_path, monkeypatch):
  """A tiny Fashion-MNIST (6 train, 2 test images) as the system copy; returns its arrays."""
  directory = tmp_path / "system_copy"
  directory.mkdir()
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n, (images_name, labels_name) in (
    ("train", 6, IDX_NAMES[:2]),
    ("test", 2, IDX_NAMES[2:]),
  ):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    _write_idx(directory / images_name, images, 0x00000803)
    _write_idx(directory / labels_name, labels, 0x00000801)
    arrays[split] = (images, labels)
  monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", str(directory))
  monkeypatch.setattr(sources, "FASHION_MNIST_TFDS_DATA_DIR", str(tmp_path / "no_tfds_copy"))
  return arrays


@pytest.mark.parametrize("data_dir", [None, ""])
def test_empty_data_dir_uses_the_system_copy(fake_system_copy, data_dir):
  got = sources.load_fashion_mnist(data_dir)
  for split, (images, labels) in fake_system_copy.items():
    np.testing.assert_array_equal(got[split][0], images)
    np.testing.assert_array_equal(got[split][1], labels)
  assert len(sources.make_source("fashion_mnist", "train", data_dir)) == 6
  assert len(sources.make_source("fashion_mnist", "test[:50%]", data_dir)) == 1


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_data_dir_without_data_names_data_dir(tmp_path, fake_system_copy, no_network, where):
  # A system copy exists, but an explicit data.dir never falls back to it.
  directory = tmp_path / where
  if where == "empty":
    directory.mkdir()
  for load in (
    lambda: sources.load_fashion_mnist(str(directory)),
    lambda: sources.make_source("fashion_mnist", "train", str(directory)),
  ):
    with pytest.raises(ConfigError) as e:
      load()
    assert e.value.field == "data.dir"
    assert str(directory) in str(e.value) and "IDX" in str(e.value)


def test_fashion_mnist_missing_everywhere_says_how_to_install(no_default_copies, no_network):
  with pytest.raises(ConfigError) as e:
    sources.load_fashion_mnist()
  assert e.value.field == "data.dir"
  assert "sudo apt-get install dataset-fashion-mnist" in str(e.value)


@pytest.mark.parametrize(
  "split",
  [
    "validation",
    "train[:",
    "train[1:2:3]",
    "train test",
    # Refused as tfds refuses them, not clamped: beyond the split, past 100%, selecting nothing.
    "train[:99999999]",
    "train[:150%]",
    "train[5:2]",
  ],
)
@pytest.mark.parametrize("field", ["data.train_split", "data.eval_split"])
def test_bad_split_names_its_field(fake_system_copy, split, field):
  with pytest.raises(ConfigError) as e:
    sources.make_source("fashion_mnist", split, field=field)
  assert e.value.field == field
  assert repr(split) in str(e.value)


def test_a_negative_percent_counts_from_the_end_even_when_it_rounds_to_no_example():
  # tfds rounds -10% of 3 examples to 0, and a slice from 0 is the whole split, not its last 10%.
  _, bounds = sources.parse_split("train[-10%:]")
  with pytest.raises(ConfigError, match="selects none of the 3 examples"):
    bounds(3)
  assert range(3)[sources.parse_split("train[:-10%]")[1](3)] == range(3)
  assert range(1000)[sources.parse_split("train[-10%:]")[1](1000)] == range(900, 1000)
  assert range(1000)[sources.parse_split("train[-100%:-50%]")[1](1000)] == range(0, 500)


def test_eval_labels_of_a_dataset_with_its_own_are_refused(fake_system_copy):
  with pytest.raises(ConfigError, match="carries its own labels") as e:
    sources.make_source("fashion_mnist", "test", field="data.eval_split", labels="/x/labels.csv")
  assert e.value.field == "data.eval_labels"


def test_bad_split_names_the_train_split_by_default(fake_system_copy):
  with pytest.raises(ConfigError) as e:
    sources.make_source("fashion_mnist", "validation")
  assert e.value.field == "data.train_split"
  with pytest.raises(ConfigError) as e:
    sources.parse_split("train[")
  assert e.value.field == "data.train_split"
