"""Input pipeline without TensorFlow: grain over random-access sources.

Sources are anything with ``__len__`` and ``__getitem__(i) -> {"image": uint8
[H, W, C], "label": int}``: in-memory arrays (Fashion-MNIST read from its IDX
files, or any arrays via `ArraySource`) or a tfds ArrayRecord data source
(e.g. ``imagenet2012`` prepared by ``tfds build``).

Training order and augmentation are pure functions of ``(seed, position in the
stream of examples)``, so the iterator's step is its whole state: resuming at
``start_step=k`` reproduces a run that never stopped, whatever the number of
processes or threads. An example that cannot be decoded or augmented (a
corrupt record) is replaced by the next one of the permutation that can, and
flagged ``skipped``; the replacement is a pure function of the same inputs.

Teacher targets written by `at_jax.precompute` (a zarr array per key, one
chunk per example) are read per example by `TeacherTargets` and join the
training batches under a fixed view: the eval preprocessing the teacher saw.
"""

import functools
import gzip
import io
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np
import tensorstore as ts
from PIL import Image

from at_jax.data import randaugment as augment
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
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims.
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim.

# (mean, std) per RGB channel of pixels scaled to [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  # What MAE / torchvision-pretrained teachers were trained with.
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
  "unit": ((0.5,) * 3, (0.5,) * 3),  # Maps [0, 1] to [-1, 1].
}


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
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      raw = f.read()
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
      if os.path.isfile(p)
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
    records = [_to_example(r) for r in builder.as_data_source(split=split)]
    images = np.stack([r["image"][..., 0] for r in records])
    labels = np.array([r["label"] for r in records], np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    out[split] = (images, labels)
  return out


def load_fashion_mnist(data_dir: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads Fashion-MNIST from IDX files (gzipped or not), without downloading.

  Looks in `data_dir` (config.data.dir) if given, then in
  `FASHION_MNIST_SYSTEM_DIR`, then for a tfds-prepared copy on disk.

  Args:
    data_dir: a folder holding the four IDX files, or None.

  Returns:
    ``{"train": (images uint8 [60000, 28, 28], labels int32 [60000]),
    "test": (images uint8 [10000, 28, 28], labels int32 [10000])}``; the
    arrays are shared between callers and read-only.

  Raises:
    ConfigError: no copy found (field ``data.dir``), or a file is corrupt
      (field: its path).
  """
  searched = [d for d in (data_dir, FASHION_MNIST_SYSTEM_DIR) if d]
  for directory in searched:
    paths = _find_idx_files(os.path.abspath(directory))
    if paths is not None:
      return _decode_idx_files(paths)
  # Never downloads: only a copy tfds already prepared on disk is used.
  if _tfds_fashion_mnist_builder(FASHION_MNIST_TFDS_DATA_DIR) is not None:
    return _read_tfds_fashion_mnist(FASHION_MNIST_TFDS_DATA_DIR)
  names = ", ".join(n for pair in _FASHION_MNIST_FILES.values() for n in pair)
  raise ConfigError(
    "data.dir",
    f"Fashion-MNIST not found in {searched} (nor prepared by tfds). Install "
    "it with `sudo apt-get install dataset-fashion-mnist`, or set data.dir "
    f"to a folder holding the four IDX files ({names}, each optionally "
    ".gz).",
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

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


def _parse_split(split: str) -> tuple[str, Callable[[int], slice]]:
  """Parses a tfds-style split like ``train[:10%]`` or ``test[100:200]``.

  Args:
    split: ``name``, or ``name[from:to]`` with each bound an int or a percent
      (negative counts from the end, like Python slices).

  Returns:
    (name, bounds): `bounds` maps the split's size n to a `slice` of it.
  """
  m = re.fullmatch(r"(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?", split.strip())
  if m is None:
    raise ConfigError(
      "data.split",
      f"cannot parse split {split!r}; expected e.g. 'train', 'train[:90%]' or 'test[:1000]'.",
    )

  def bounds(n: int) -> slice:
    def bound(text: str | None) -> int | None:
      if text is None or not text.endswith("%"):
        return None if text is None else int(text)
      return round(int(text[:-1]) * n / 100)  # Closest example, like tfds.

    return slice(bound(m[2]), bound(m[3]))

  return m[1], bounds


def _fashion_mnist_source(split: str, data_dir: str | None) -> ArraySource:
  name, bounds = _parse_split(split)
  arrays = load_fashion_mnist(data_dir)
  if name not in arrays:
    raise ConfigError("data.split", f"Fashion-MNIST has splits {sorted(arrays)}, not {split!r}.")
  images, labels = arrays[name]
  s = bounds(len(images))
  return ArraySource(images[s], labels[s])


def _to_example(record: dict[str, Any]) -> dict[str, Any]:
  """Normalises a tfds record to ``{"image": uint8 [H, W, C], "label": int}``.

  Depending on the tfds version and decoders, images arrive decoded (numpy)
  or as encoded bytes; grayscale may lack the channel axis.
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
  """A tfds data source that yields examples in our format."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _to_example(self._source[index])


def make_source(name: str, split: str, data_dir: str | None = None) -> Source:
  """Returns a random-access source for split `split` of dataset `name`.

  Args:
    name: ``"fashion_mnist"`` (IDX files, see `load_fashion_mnist`) or a tfds
      dataset name prepared as ArrayRecord, e.g. ``"imagenet2012"``.
    split: e.g. ``"train"``, ``"test"``, ``"train[:90%]"``, ``"train[-5000:]"``.
    data_dir: config.data.dir: the IDX folder for Fashion-MNIST, the tfds data
      dir otherwise (None: tfds' default).

  Returns:
    A source of ``{"image": uint8 [H, W, C], "label": int}``.

  Raises:
    ConfigError: the data is not on disk; says how to get it. Checked without
      reading any example and without downloading.
  """
  if name == "fashion_mnist":
    return _fashion_mnist_source(split, data_dir)

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
  return _TfdsSource(source)


def num_examples(source: Source) -> int:
  return len(source)


# ----------------------------------------------------------------------------
# Teacher targets stored by at_jax.precompute.

# <workdir>/teacher_targets, unless config.transfer.targets_dir names a folder.
TARGETS_DIR = "teacher_targets"
TARGETS_METADATA = "metadata.json"
# The one view of each image that targets are computed on and trained with.
TARGETS_VIEW = (
  "shorter side resized to round(image_size / crop_pct), bicubic; centre image_size crop"
)
# Metadata fields a run must agree with, and the config field to fix if not.
TARGET_FIELDS = {
  "what": "transfer.what",
  "image_size": "data.image_size",
  "crop_pct": "data.crop_pct",
  "normalization": "data.normalization",
  "dataset": "data.name",
  "split": "data.train_split",
  "num_examples": "data.train_split",
  "num_heads": "model.num_heads",
  "tokens": "model.patch_size",
  "head_dim": "model.width",
}
_PRECOMPUTE = "run `python launch/precompute.py` with the same --config, overrides and --workdir"


def targets_dir(configured: str, workdir: str) -> str:
  """`config.transfer.targets_dir`, or <workdir>/teacher_targets if empty."""
  return configured or os.path.join(workdir, TARGETS_DIR)


def targets_array_spec(directory: str, key: str) -> dict[str, Any]:
  """The tensorstore spec of the zarr array holding `teacher_<key>`."""
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(directory, key)}}


def read_targets_metadata(directory: str) -> dict[str, Any] | None:
  """The metadata of a targets folder, or None if it has none yet."""
  path = os.path.join(directory, TARGETS_METADATA)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(
      "transfer.targets_dir", f"unreadable {path} ({e}); delete {directory} and {_PRECOMPUTE}."
    ) from e


class TeacherTargets:
  """Stored teacher targets as a random-access source, by example index.

  ``targets[i]`` is ``{"teacher_<key>": bfloat16 [S, ...]}`` for example i
  of the training source: ``teacher_attn_logits`` [S, H, N, N], or
  ``teacher_q`` and ``teacher_k`` [S, N, H, Dh], or ``teacher_<q|k|v>``, for
  the S requested layers (a subset of the stored ones, in their order). An
  example that precompute skipped as unreadable has none: reading it raises.
  Thread-safe: grain threads read concurrently.

  Attributes:
    directory: the targets folder.
    metadata: its metadata.json (see `at_jax.precompute`).
  """

  def __init__(self, directory: str, layers: Sequence[int] | None = None):
    """Opens the arrays.

    Args:
      directory: where `at_jax.precompute` wrote.
      layers: the layers to read (default: all stored ones).

    Raises:
      ConfigError: no targets there, an unfinished precompute, or layers
        that were not stored.
    """
    self.directory = directory
    metadata = read_targets_metadata(directory)
    if metadata is None:
      raise ConfigError(
        "transfer.targets_dir",
        f"no teacher targets in {directory} (no {TARGETS_METADATA}); {_PRECOMPUTE} first.",
      )
    if not metadata["complete"]:
      done, n = metadata["done_examples"], metadata["num_examples"]
      raise ConfigError(
        "transfer.targets_dir",
        f"the precompute in "
        f"{directory} stopped after {done} of {n} examples; "
        f"{_PRECOMPUTE} again to finish it (it resumes).",
      )
    self.metadata = metadata
    stored = list(metadata["layers"])
    layers = stored if layers is None else [int(i) for i in layers]
    missing = sorted(set(layers) - set(stored))
    if missing:
      raise ConfigError(
        "transfer.layers",
        f"layers {missing} are not in the "
        f"teacher targets in {directory}, which hold layers "
        f"{stored}; select among those, or {_PRECOMPUTE}.",
      )
    # Reading all stored layers is one plain read; a subset is an index array.
    self._rows = slice(None) if layers == stored else [stored.index(i) for i in layers]
    # An example precompute could not read has no chunk: reading it raises
    # (and the iterator skips the example) instead of returning zeros.
    self._arrays = {
      key: ts.open(
        {**targets_array_spec(directory, key), "fill_missing_data_reads": False}, open=True
      ).result()
      for key in metadata["keys"]
    }

  def __len__(self) -> int:
    return self.metadata["num_examples"]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    reads = {key: array[int(index)][self._rows].read() for key, array in self._arrays.items()}
    return {f"teacher_{key}": read.result() for key, read in reads.items()}

  def check(self, **expected: Any) -> None:
    """Raises ConfigError naming the field if a `TARGET_FIELDS` value differs.

    Args:
      **expected: metadata field -> this run's value, e.g. image_size=224.
    """
    for name, value in expected.items():
      stored = self.metadata[name]
      if stored != value:
        raise ConfigError(
          TARGET_FIELDS[name],
          f"the teacher targets in "
          f"{self.directory} were computed with {name}="
          f"{stored!r}, this run has {value!r}; use their "
          f"setting, or {_PRECOMPUTE} into another "
          "transfer.targets_dir.",
        )


# ----------------------------------------------------------------------------
# Augmentation and preprocessing of one example.


def _normalization(name: str) -> tuple[np.ndarray, np.ndarray]:
  if name not in NORMALIZATIONS:
    raise ConfigError(
      "data.normalization", f"unknown {name!r}; valid names are {sorted(NORMALIZATIONS)}."
    )
  mean, std = NORMALIZATIONS[name]
  return np.array(mean, np.float32), np.array(std, np.float32)


def _to_pil(image: np.ndarray) -> Image.Image:
  """uint8 [H, W, 1 or 3] -> a PIL image in mode L or RGB."""
  if image.shape[-1] == 1:
    return Image.fromarray(image[..., 0], "L")
  if image.shape[-1] == 3:
    return Image.fromarray(image, "RGB")
  raise ConfigError("data.name", f"images must have 1 or 3 channels, got shape {image.shape}.")


def _finish(pil: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """PIL image of size S x S -> float32 [S, S, 3] = (pixels / 255 - mean) / std.

  A lookup in a [256, 3] table of pixels * scale - offset: 2-5x faster than
  the arithmetic on [S, S, 3] arrays (whose innermost axis has length 3),
  with the same float32 values.
  """
  table = np.arange(256, dtype=np.float32)[:, None] * (1 / (255 * std)) - (mean / std)
  x = np.asarray(pil)
  if x.ndim == 2:  # Models always take RGB: the table's rows replicate gray.
    return np.take(table, x, axis=0)
  out = np.empty(x.shape, np.float32)
  for c in range(3):
    np.take(table[:, c], x[..., c], out=out[..., c])
  return out


def _random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params: returns (top, left, h, w)."""
  area = height * width
  log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(np.sqrt(target_area * aspect)))
    h = int(round(np.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centre crop whose aspect ratio is within `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _train_example(
  example: dict[str, Any],
  rng: np.random.Generator,
  *,
  image_size: int,
  scale: tuple[float, float],
  ratio: tuple[float, float],
  hflip: bool,
  mean: np.ndarray,
  std: np.ndarray,
  randaugment: augment.RandAugment | None = None,
  random_erase: float = 0.0,
) -> dict[str, np.ndarray]:
  """Augments one example in timm's order.

  Random-resized-crop with bicubic resize, flip, RandAugment (if given),
  normalise, random erasing (if `random_erase` > 0). Every random draw comes
  from `rng`, in that order.
  """
  image = example["image"]
  top, left, h, w = _random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  # One PIL call crops (box) and resizes: no intermediate copy.
  pil = _to_pil(image).resize(
    (image_size, image_size), Image.BICUBIC, box=(left, top, left + w, top + h)
  )
  flip = hflip and rng.random() < 0.5
  if randaugment is not None:
    # RandAugment sees the flipped image, as in timm. (Otherwise flipping the
    # floats below is cheaper and gives the same pixels.)
    if flip:
      pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      flip = False
    pil = randaugment(pil, rng)
  x = _finish(pil, mean, std)
  if flip:
    x = x[:, ::-1]
  x = np.ascontiguousarray(x)
  if random_erase > 0:
    x = augment.random_erase(x, rng, prob=random_erase)
  return {"image": x, "label": np.int32(example["label"])}


def _eval_example(
  example: dict[str, Any], *, image_size: int, resize_to: int, mean: np.ndarray, std: np.ndarray
) -> dict[str, np.ndarray]:
  """Resizes the shorter side to `resize_to`, centre-crops `image_size`."""
  pil = _to_pil(example["image"])
  w, h = pil.size
  # torchvision Resize(int): the longer side keeps the aspect ratio, floored.
  if h <= w:
    new_h, new_w = resize_to, int(resize_to * w / h)
  else:
    new_h, new_w = int(resize_to * h / w), resize_to
  if (new_w, new_h) != (w, h):
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
  top = int(round((new_h - image_size) / 2))
  left = int(round((new_w - image_size) / 2))
  pil = pil.crop((left, top, left + image_size, top + image_size))
  return {"image": _finish(pil, mean, std), "label": np.int32(example["label"]), "mask": np.True_}


# ----------------------------------------------------------------------------
# Iterators.


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ConfigError("process_index", f"{process_index} is not in [0, {process_count}).")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(
      "data.batch_size",
      f"{global_batch_size} must be a positive multiple of the process count {process_count}.",
    )
  return global_batch_size // process_count


def _stream_position(j: int, b: int, global_batch_size: int, process_index: int) -> int:
  """Position in the global stream of this process's j-th example.

  Global step s is stream positions [s*B, (s+1)*B); process p owns the
  contiguous slice [p*b, (p+1)*b) of it.
  """
  step, k = divmod(j, b)
  return step * global_batch_size + process_index * b + k


def _check_image_size(image_size: int) -> None:
  if image_size <= 0:
    raise ConfigError("data.image_size", f"must be positive, got {image_size}.")


def _resize_to(image_size: int, crop_pct: float) -> int:
  """The shorter side before the eval view's centre `image_size` crop."""
  if not 0 < crop_pct <= 1:
    raise ConfigError("data.crop_pct", f"must be in (0, 1], got {crop_pct}.")
  return round(image_size / crop_pct)


# A record that cannot be decoded or augmented is skipped; this many in a row
# mean that the data, not a record, is broken, and stop the run.
MAX_CONSECUTIVE_FAILURES = 100
# Per iterator, the first failures are printed with their example index and
# error; later ones are only flagged and counted.
MAX_SKIP_WARNINGS = 5


class _SkipWarnings:
  """Prints the first `MAX_SKIP_WARNINGS` unreadable examples, thread-safe."""

  def __init__(self):
    self._count = 0
    self._lock = threading.Lock()

  def __call__(self, index: int, error: Exception, action: str) -> None:
    with self._lock:
      self._count += 1
      count = self._count
    if count <= MAX_SKIP_WARNINGS:
      last = "; further ones are only counted" if count == MAX_SKIP_WARNINGS else ""
      print(
        f"WARNING: example {index} of the source is unreadable "
        f"({type(error).__name__}: {error}); {action}{last}",
        flush=True,
      )


def train_iterator(
  source: Source,
  *,
  global_batch_size: int,
  image_size: int,
  seed: int,
  start_step: int = 0,
  normalization: str,
  rrc_scale: tuple[float, float] = (0.08, 1.0),
  rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
  hflip: bool = True,
  randaugment: str = "",
  random_erase: float = 0.0,
  fixed_view: bool = False,
  crop_pct: float = 0.875,
  targets: TeacherTargets | None = None,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite, exactly resumable iterator of augmented training batches.

  Epoch e visits the source in a permutation derived from (seed, e); epochs
  are concatenated into one stream, global step s is its positions
  [s*B, (s+1)*B), and this process gets the slice [p*b, (p+1)*b) of that
  (b = B / process_count). An example's augmentation is derived from (seed,
  its stream position). So the output depends only on (seed, step): not on
  process_count, num_threads, or whether the run was resumed.

  An example that fails to decode or augment (any exception: a corrupt
  record) is replaced by the next example of the permutation that works,
  augmented with the same draws, and flagged in ``skipped``; the first few
  failures are printed with the example's index.

  Args:
    source: random-access source, see `make_source`.
    global_batch_size: B, the batch size summed over processes.
    image_size: S, output height and width.
    seed: non-negative; fixes order and augmentation.
    start_step: the first global step to yield (the checkpointed step).
    normalization: a key of `NORMALIZATIONS`.
    rrc_scale: random-resized-crop area range, as a fraction of the image.
    rrc_ratio: random-resized-crop aspect ratio (w / h) range.
    hflip: whether to flip horizontally with probability 1/2.
    randaugment: a timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``
      (see `augment.parse_randaugment`), applied after crop and flip; ""
      for none. Geometric ops fill with the normalisation mean's colour.
    random_erase: probability of timm's random erasing (pixel mode, one
      rectangle) after normalisation; 0 for none.
    fixed_view: every example is the eval view (shorter side resized to
      round(S / crop_pct), centre S x S crop, as `eval_iterator`) instead of
      a random-resized crop and flip, which `rrc_*` and `hflip` then no
      longer ask for: the pixels `at_jax.precompute` ran the teacher on.
      RandAugment and random erasing must be off.
    crop_pct: the fixed view's crop fraction.
    targets: stored teacher targets; each example gets its ``teacher_<key>``
      arrays, read by its index in `source`. Needs `fixed_view`, and the
      view and example count they were computed with.
    process_index: p, this process.
    process_count: number of processes sharing each global batch.
    num_threads: grain threads decoding and augmenting examples.

  Yields:
    ``{"image": float32 [b, S, S, 3], "label": int32 [b], "skipped": bool
    [b]}`` (``skipped``: the example stands in for an unreadable one), and
    with `targets` each ``teacher_<key>``: bfloat16 [b, layers, ...].
  """
  b = _local_batch_size(global_batch_size, process_index, process_count)
  mean, std = _normalization(normalization)
  _check_image_size(image_size)
  if seed < 0:
    raise ConfigError("seed", f"must be non-negative, got {seed}.")
  if not (0 < rrc_scale[0] <= rrc_scale[1] <= 1 and 0 < rrc_ratio[0] <= rrc_ratio[1]):
    raise ConfigError(
      "data.rrc_scale",
      f"scale {rrc_scale} must satisfy 0 < lo <= hi <= 1 and ratio {rrc_ratio} 0 < lo <= hi.",
    )
  if not 0 <= random_erase <= 1:
    raise ConfigError("data.random_erase", f"must be a probability in [0, 1], got {random_erase}.")
  rand_augment = None
  if randaugment:
    # timm's fill: the mean pixel, e.g. (124, 116, 104) for ImageNet.
    fill = tuple(min(255, round(255 * m)) for m in NORMALIZATIONS[normalization][0])
    rand_augment = augment.RandAugment(randaugment, fill=fill)
  n = len(source)
  if n == 0:
    raise ConfigError("data.split", "the training source is empty.")
  resize_to = _resize_to(image_size, crop_pct)
  if fixed_view and (randaugment or random_erase):
    # The fixed view exists to match stored teacher targets pixel for pixel.
    raise ConfigError(
      "data.randaugment" if randaugment else "data.random_erase",
      "must be off with the fixed view (precomputed teacher targets describe unaugmented pixels).",
    )
  if targets is not None:
    if not fixed_view:
      raise ConfigError(
        "fixed_view",
        "stored teacher targets describe the fixed view's pixels; pass fixed_view=True.",
      )
    targets.check(
      image_size=image_size, crop_pct=crop_pct, normalization=normalization, num_examples=n
    )

  # Threads ask for neighbouring epochs around epoch boundaries; 2 suffice.
  @functools.lru_cache(maxsize=2)
  def permutation(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, epoch]).permutation(n)

  def prepare(index: int, g: int) -> dict[str, np.ndarray]:
    example = source[index]
    if fixed_view:
      out = _eval_example(example, image_size=image_size, resize_to=resize_to, mean=mean, std=std)
      del out["mask"]
    else:
      # A fresh generator per attempt: a replacement gets the draws the
      # failed example would have had, whatever the failure consumed.
      rng = np.random.default_rng([seed, 1, g])  # Stream 1: augmentation.
      out = _train_example(
        example,
        rng,
        image_size=image_size,
        scale=rrc_scale,
        ratio=rrc_ratio,
        hflip=hflip,
        mean=mean,
        std=std,
        randaugment=rand_augment,
        random_erase=random_erase,
      )
    if targets is not None:
      out.update(targets[index])
    return out

  warn = _SkipWarnings()

  def example_at(j: int) -> dict[str, np.ndarray]:
    g = _stream_position(j, b, global_batch_size, process_index)
    epoch, i = divmod(g, n)
    order = permutation(epoch)
    attempts = min(n, MAX_CONSECUTIVE_FAILURES)
    for attempt in range(attempts):
      index = int(order[(i + attempt) % n])
      try:
        out = prepare(index, g)
      except Exception as e:  # pylint: disable=broad-exception-caught
        # Decoders and augmentations raise many types for a bad record.
        warn(index, e, "replaced by the next example of the shuffled order")
        error = e
        continue
      out["skipped"] = np.bool_(attempt > 0)
      return out
    raise ConfigError(
      "data.name",
      f"{attempts} examples in a row could not "
      f"be read or augmented (the last: {type(error).__name__}"
      f": {error}); the data or its pipeline is broken, not a "
      "record.",
    ) from error

  ds = grain.MapDataset.range(start_step * b, sys.maxsize).map(example_at)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * b))
  return iter(ds.batch(b, drop_remainder=True))


def eval_iterator(
  source: Source,
  *,
  global_batch_size: int,
  image_size: int,
  crop_pct: float = 0.875,
  normalization: str,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
  start_batch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over `source`, padded to whole global batches.

  Global batch s holds examples [s*B, (s+1)*B) (past the end: padding with
  mask False); this process gets the slice [p*b, (p+1)*b). Summing over
  ``mask`` across processes counts every readable example exactly once; an
  example that fails to decode (a corrupt record) has mask False and
  ``skipped`` True, and the first few are printed with their index.

  Args:
    source: random-access source, see `make_source`.
    global_batch_size: B, the batch size summed over processes.
    image_size: S, output height and width.
    crop_pct: the shorter side is resized to round(S / crop_pct) before the
      centre S x S crop.
    normalization: a key of `NORMALIZATIONS`.
    process_index: p, this process.
    process_count: number of processes sharing each global batch.
    num_threads: grain threads decoding and preprocessing examples.
    start_batch: the first global batch to yield (resuming a pass).

  Yields:
    ``{"image": float32 [b, S, S, 3], "label": int32 [b], "mask": bool [b],
    "skipped": bool [b]}`` for global batches start_batch ..
    ceil(len(source) / B) - 1.
  """
  b = _local_batch_size(global_batch_size, process_index, process_count)
  mean, std = _normalization(normalization)
  _check_image_size(image_size)
  resize_to = _resize_to(image_size, crop_pct)
  n = len(source)
  num_batches = -(-n // global_batch_size)
  padding = {
    "image": np.zeros((image_size, image_size, 3), np.float32),
    "label": np.int32(0),
    "mask": np.False_,
    "skipped": np.False_,
  }
  warn = _SkipWarnings()

  def example_at(j: int) -> dict[str, np.ndarray]:
    g = _stream_position(j, b, global_batch_size, process_index)
    if g >= n:
      return padding
    try:
      out = _eval_example(source[g], image_size=image_size, resize_to=resize_to, mean=mean, std=std)
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Decoders raise many types for a bad record.
      warn(g, e, "left out (mask False)")
      return {**padding, "skipped": np.True_}
    return {**out, "skipped": np.False_}

  ds = grain.MapDataset.range(start_batch * b, num_batches * b).map(example_at)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * b))
  return iter(ds.batch(b))
