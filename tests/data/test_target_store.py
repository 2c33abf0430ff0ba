"""Tests for at_jax.data.target_store: the stored teacher targets' folder, metadata and arrays, written
with its primitives and read back per example."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from at_jax.data import target_store
from at_jax.errors import ConfigError

N = 5  # examples
SHAPES = {"q": [2, 3, 4], "k": [2, 3, 4]}  # [S, N, H, Dh] per example
METADATA = dict(
  keys=["q", "k"],
  shapes=SHAPES,
  layers=[0, 3],
  image_size=16,
  crop_pct=1.0,
  normalization="unit",
  num_examples=N,
  done_examples=N,
  complete=True,
  format=target_store.FORMAT,
  shard_examples=2,
)


def _rows(seed: int) -> dict[str, np.ndarray]:
  """Example `seed`'s targets, bfloat16 as stored."""
  rng = np.random.default_rng(seed)
  return {key: rng.normal(size=shape).astype(ml_dtypes.bfloat16) for key, shape in SHAPES.items()}


def _write(directory: str, metadata=METADATA, written=range(N)) -> None:
  os.makedirs(directory, exist_ok=True)
  arrays = target_store.open_arrays(directory, metadata, create=True)
  pending = [
    target_store.write_rows(arrays[key], list(written), [_rows(i)[key] for i in written])
    for key in SHAPES
  ]
  for w in pending:
    w.result()
  target_store.write_metadata(directory, metadata)


def test_targets_dir():
  assert target_store.targets_dir("", "/work") == os.path.join("/work", "teacher_targets")
  assert target_store.targets_dir("/elsewhere", "/work") == "/elsewhere"


def test_metadata_round_trips_atomically(tmp_path):
  directory = str(tmp_path)
  assert target_store.read_targets_metadata(directory) is None
  target_store.write_metadata(directory, METADATA)
  assert target_store.read_targets_metadata(directory) == METADATA
  assert os.listdir(directory) == [target_store.TARGETS_METADATA]  # No .tmp left behind.
  (tmp_path / target_store.TARGETS_METADATA).write_text("{not json")
  with pytest.raises(ConfigError) as e:
    target_store.read_targets_metadata(directory)
  assert e.value.field == "transfer.targets_dir"


def test_written_rows_read_back_per_example(tmp_path):
  directory = str(tmp_path)
  _write(directory, written=[0, 1, 2, 4])  # Example 3 unreadable: never written.
  targets = target_store.TeacherTargets(directory)
  assert len(targets) == N and targets.metadata == METADATA
  for i in (0, 1, 2, 4):
    got = targets[i]
    assert sorted(got) == ["teacher_k", "teacher_q"]
    for key, row in _rows(i).items():
      assert got[f"teacher_{key}"].dtype == ml_dtypes.bfloat16
      np.testing.assert_array_equal(got[f"teacher_{key}"], row)
  with pytest.raises(Exception):  # noqa: B017  # tensorstore's error for a chunk never written
    targets[3]
  last = target_store.TeacherTargets(directory, layers=[3])
  np.testing.assert_array_equal(last[1]["teacher_q"], _rows(1)["q"][1:])
  # Reopened for writing (a resumed precompute), the rows are still there.
  arrays = target_store.open_arrays(directory, METADATA, create=False)
  np.testing.assert_array_equal(arrays["k"][2].read().result(), _rows(2)["k"])


def test_an_all_zero_row_is_stored_not_taken_for_a_skipped_example(tmp_path):
  """zarr leaves out chunks equal to the fill value unless told: an all-zero row would then read as
  never written (an unreadable example)."""
  directory = str(tmp_path)
  metadata = {**METADATA, "num_examples": 2, "done_examples": 2, "shard_examples": 1}
  arrays = target_store.open_arrays(directory, metadata, create=True)
  zeros = {key: np.zeros(shape, ml_dtypes.bfloat16) for key, shape in SHAPES.items()}
  for key in SHAPES:
    target_store.write_rows(arrays[key], [0, 1], [zeros[key], _rows(1)[key]]).result()
  target_store.write_metadata(directory, metadata)
  targets = target_store.TeacherTargets(directory)
  np.testing.assert_array_equal(targets[0]["teacher_q"], zeros["q"])
  np.testing.assert_array_equal(targets[1]["teacher_k"], _rows(1)["k"])


def test_teacher_targets_name_what_to_fix(tmp_path):
  with pytest.raises(ConfigError) as e:
    target_store.TeacherTargets(str(tmp_path))
  assert e.value.field == "transfer.targets_dir"
  assert "launch/precompute.py" in str(e.value)
  unfinished = str(tmp_path / "unfinished")
  _write(unfinished, {**METADATA, "done_examples": 2, "complete": False})
  with pytest.raises(ConfigError, match="stopped after 2 of 5") as e:
    target_store.TeacherTargets(unfinished)
  assert e.value.field == "transfer.targets_dir"
  done = str(tmp_path / "done")
  _write(done)
  with pytest.raises(ConfigError) as e:
    target_store.TeacherTargets(done, layers=[0, 5])
  assert e.value.field == "transfer.layers"
  targets = target_store.TeacherTargets(done)
  targets.check(image_size=16, crop_pct=1.0, normalization="unit", num_examples=N)
  for name, value in (("image_size", 32), ("crop_pct", 0.875), ("num_examples", N + 1)):
    with pytest.raises(ConfigError) as e:
      targets.check(**{name: value})
    assert e.value.field == target_store.TARGET_FIELDS[name]


def test_stored_format_is_a_chunk_per_example_sharded(tmp_path):
  """zarr v3: a chunk per example, `shard_examples` of them per object; a shard with no examples
  written has no object."""
  directory = str(tmp_path)
  _write(directory, written=[0, 1, 4])
  with open(os.path.join(directory, "q", "zarr.json")) as f:
    zarr = json.load(f)
  assert zarr["shape"] == [N, *SHAPES["q"]] and zarr["data_type"] == "bfloat16"
  assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [2, *SHAPES["q"]]
  (codec,) = zarr["codecs"]
  assert codec["name"] == "sharding_indexed"
  assert codec["configuration"]["chunk_shape"] == [1, *SHAPES["q"]]
  shards = sorted(os.listdir(os.path.join(directory, "q", "c")))
  assert shards == ["0", "2"]  # examples 0-1 and 4; none of 2-3 was written
  targets = target_store.TeacherTargets(directory)
  np.testing.assert_array_equal(targets[4]["teacher_k"], _rows(4)["k"])
  with pytest.raises(ValueError, match="missing"):
    targets[3]


def test_a_shard_is_one_processs_rows_of_one_batch():
  # Divisors of the per-process batch, as big as SHARD_BYTES allows.
  assert target_store.shard_examples(32, 1000) == 32
  assert target_store.shard_examples(24, target_store.SHARD_BYTES // 10) == 8
  assert target_store.shard_examples(7, target_store.SHARD_BYTES) == 1
  assert target_store.shard_examples(7, 10 * target_store.SHARD_BYTES) == 1


def test_example_bytes_counts_the_layers_a_batch_carries():
  """What the memory estimate charges per example: bfloat16, every key, only the layers read."""
  metadata = {"keys": ["q", "k"], "shapes": {"q": [3, 5, 2, 4], "k": [3, 5, 2, 4]}}
  assert target_store.example_bytes(metadata) == 2 * 2 * 3 * 5 * 2 * 4
  assert target_store.example_bytes(metadata, [2]) == 2 * 2 * 1 * 5 * 2 * 4
