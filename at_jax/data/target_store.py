"""The stored teacher targets' format, in one place: where they live, their metadata, their arrays.

`at_jax.experiment.precompute` decides what to store and writes it with `write_metadata`,
`open_arrays` and `write_rows`; a training run reads it per example with `TeacherTargets`. Layout of a
targets folder (`targets_dir`):

  metadata.json   what was computed from what, the layout (format, shard_examples) and the progress
                  (done_examples, complete)
  <key>/          one zarr v3 array per stored key (tensorstore), bfloat16, [num_examples, ...]: one
                  chunk per example (an example precompute could not read has none), `shard_examples`
                  chunks per object (zarr3's sharding codec; the shard's index of chunk offsets at its end)

Why shards: in a bucket every object is a request to write and a name to list or delete, and an ImageNet
store of one object per example and key is millions of them. A shard is written whole, by one process in
one request (its examples are one process's rows of one batch, see `shard_examples`), and a read of one
example is a ranged read of its chunk: two requests while the shard's index is not cached, one after.
Stores of format 1 (zarr v2, one object per example) still read.
"""

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from at_jax import storage
from at_jax.errors import ConfigError

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
  "fingerprint": "data.dir",  # an image folder's files (`sources.fingerprint`)
  "jpeg_downscale": "data.jpeg_downscale",
  "num_heads": "model.num_heads",
  "tokens": "model.patch_size",
  "head_dim": "model.width",
}
# Fields that stores written before them lack, and that are then not compared.
OPTIONAL_FIELDS = ("fingerprint", "jpeg_downscale")
_PRECOMPUTE = "run `python launch/precompute.py` with the same --config, overrides and --workdir"


def targets_dir(configured: str, workdir: str) -> str:
  """`config.transfer.targets_dir`, or <workdir>/teacher_targets if empty."""
  return configured or os.path.join(workdir, TARGETS_DIR)


# The layout written today (metadata "format"): 2 = zarr v3, sharded; 1 = zarr v2, an object per example.
FORMAT = 2
# At most this many bytes per shard object of one key.
SHARD_BYTES = 256 << 20
# Cache of shard indices (and recently read chunks) per open store: one request per example read.
_READ_CACHE_BYTES = 64 << 20


def shard_examples(local_batch_size: int, example_bytes: int) -> int:
  """Examples per shard: the largest divisor of the per-process batch whose shard stays within
  `SHARD_BYTES`. Process p writes examples [s*G + p*b, s*G + (p+1)*b) of batch s (`pipeline.
  stream_position`), so a divisor of b puts each shard in one process's rows of one batch: one writer,
  one request, no read-modify-write of a shard that another process writes too."""
  cap = max(1, SHARD_BYTES // max(1, example_bytes))
  return max(d for d in range(1, local_batch_size + 1) if local_batch_size % d == 0 and d <= cap)


def new_layout(shapes: Mapping[str, Sequence[int]], local_batch_size: int) -> dict[str, int]:
  """The layout metadata of a new store of bfloat16 `shapes` per example, written in per-process
  batches of `local_batch_size`."""
  example_bytes = max(2 * int(np.prod(shape)) for shape in shapes.values())
  return {"format": FORMAT, "shard_examples": shard_examples(local_batch_size, example_bytes)}


def targets_array_spec(directory: str, key: str, layout: int = FORMAT) -> dict[str, Any]:
  """The tensorstore spec of the zarr array holding `teacher_<key>` in a store of format `layout`."""
  path = os.path.join(directory, key)
  driver = "zarr3" if layout >= 2 else "zarr"
  if path.startswith("gs://"):  # tensorstore's own GCS client
    bucket, _, inside = path.removeprefix("gs://").partition("/")
    return {"driver": driver, "kvstore": {"driver": "gcs", "bucket": bucket, "path": inside}}
  return {"driver": driver, "kvstore": {"driver": "file", "path": path}}


def example_bytes(metadata: Mapping[str, Any], layers: Sequence[int] | None = None) -> int:
  """Bytes of one example's targets as a batch carries them: every key, bfloat16, of the stored layers
  `layers` (default: all; each key's first axis is the stored layers, as `TeacherTargets` reads)."""
  return sum(
    2 * math.prod(shape[1:]) * (len(layers) if layers is not None else shape[0])
    for shape in (metadata["shapes"][key] for key in metadata["keys"])
  )


def read_targets_metadata(directory: str) -> dict[str, Any] | None:
  """The metadata of a targets folder, or None if it has none yet."""
  path = os.path.join(directory, TARGETS_METADATA)
  if not storage.isfile(path):
    return None
  try:
    with storage.open_file(path) as f:
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
    metadata: its metadata.json (see `at_jax.experiment.precompute`).
  """

  def __init__(self, directory: str, layers: Sequence[int] | None = None):
    """Opens the arrays.

    Args:
      directory: where `at_jax.experiment.precompute` wrote.
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
    spec = {
      "fill_missing_data_reads": False,
      "context": {"cache_pool": {"total_bytes_limit": _READ_CACHE_BYTES}},
    }
    layout = metadata.get("format", 1)
    self._arrays = {
      key: ts.open({**targets_array_spec(directory, key, layout), **spec}, open=True).result()
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
      if name in OPTIONAL_FIELDS and name not in self.metadata:
        continue  # written before the field existed
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
# Writing (at_jax.experiment.precompute).


def write_metadata(directory: str, metadata: Mapping[str, Any]) -> None:
  """Writes `metadata` to <directory>/metadata.json atomically (a reader never sees half a file, a kill
  never leaves one)."""
  path = os.path.join(directory, TARGETS_METADATA)
  storage.write_atomic(path, json.dumps(dict(metadata), indent=1))


def open_arrays(
  directory: str, metadata: Mapping[str, Any], create: bool
) -> dict[str, ts.TensorStore]:
  """The zarr array of each of ``metadata["keys"]``, for writing.

  Args:
    directory: the targets folder.
    metadata: its metadata (keys, shapes per example, num_examples, format, shard_examples).
    create: create the arrays (replacing any there): bfloat16, a chunk per example, sharded by
      ``metadata["shard_examples"]``; else open them.
  """
  arrays = {}
  for key in metadata["keys"]:
    # A row equal to the fill value (all zeros) is stored too: a missing chunk means a skipped example
    # to the reader. Not saved with the array, so set on every open for writing.
    spec = {
      **targets_array_spec(directory, key, metadata["format"]),
      "store_data_equal_to_fill_value": True,
    }
    if create:
      shape = metadata["shapes"][key]
      arrays[key] = ts.open(
        spec,
        create=True,
        delete_existing=True,
        dtype=ts.bfloat16,
        shape=[metadata["num_examples"], *shape],
        chunk_layout=ts.ChunkLayout(
          read_chunk_shape=[1, *shape], write_chunk_shape=[metadata["shard_examples"], *shape]
        ),
      ).result()
    else:
      arrays[key] = ts.open(spec, open=True).result()
  return arrays


def write_rows(
  array: ts.TensorStore, indices: Sequence[int], rows: Sequence[np.ndarray]
) -> ts.Future:
  """Starts writing examples `indices`' targets `rows` in one transaction: each shard they touch is
  written once, whole; wait on the result."""
  transaction = ts.Transaction()
  staged = array.with_transaction(transaction)
  for i, row in zip(indices, rows):
    staged[int(i)].write(row).result()  # staged in memory: returns at once
  return transaction.commit_async()
