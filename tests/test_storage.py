"""at_jax.storage, metrics, exports and start-up checks against a real GCS emulator on loopback (the
`gcs_bucket` fixture), and the same calls on local disk."""

import os
import threading

import jax
import numpy as np
import pytest

from at_jax import checkpoint, metrics, storage


@pytest.fixture(params=["local", "bucket"])
def root(request, tmp_path, gcs_bucket):
  if request.param == "local":
    return str(tmp_path)
  # Object names without [ ]: gcsfs reads those as glob patterns.
  return f"{gcs_bucket[0]}/{request.node.originalname}"


def test_files_round_trip(root):
  path = f"{root}/a/b.json"
  assert not storage.exists(path)
  storage.write_atomic(path, '{"x": 1}')
  storage.write_atomic(f"{root}/a/c.bin", b"\x00\x01")
  assert storage.isfile(path) and storage.isdir(f"{root}/a") and storage.exists(path)
  assert storage.listdir(f"{root}/a") == ["b.json", "c.bin"]
  with storage.open_file(path) as f:
    assert f.read() == '{"x": 1}'
  storage.remove(path)
  assert not storage.exists(path)
  assert storage.absolute("gs://b/x") == "gs://b/x" and os.path.isabs(storage.absolute("x"))


def test_a_folder_rewritten_in_place_is_newer(root):
  """newest_mtime_ns: a file rewritten inside a folder makes the folder newer, though the folder's own
  mtime stays (what tells a cached teacher export from its rewrite); None in a bucket."""
  folder = f"{root}/export"
  storage.write_atomic(f"{folder}/config.json", "{}")
  storage.write_atomic(f"{folder}/params.msgpack", b"\x00")
  before = storage.newest_mtime_ns(folder)
  if storage.is_remote(root):
    assert before is None
    return
  own = storage.mtime_ns(folder)
  os.utime(
    f"{folder}/params.msgpack", ns=(before + 10**9, before + 10**9)
  )  # rewritten a second later
  assert storage.mtime_ns(folder) == own and storage.newest_mtime_ns(folder) == before + 10**9


def test_metrics_resume_appending_and_tensorboard_is_uploaded(root):
  writer = metrics.MetricWriter(root, enabled=True)
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.5})
  writer.close()
  resumed = metrics.MetricWriter(root, enabled=True)  # a relaunch continues the same file
  resumed.write(3, {"loss": 1.0})
  assert [x["step"] for x in metrics.read_jsonl(f"{root}/{metrics.METRICS_FILE}")] == [1, 2, 3]
  events = storage.listdir(f"{root}/{metrics.TENSORBOARD_DIR}")
  assert len(events) == 2 and all(name.startswith("events.out.tfevents") for name in events)
  resumed.close()


def test_params_export_round_trip(root):
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
  checkpoint.save_params(f"{root}/params", params, {"variant": "Pico/7"})
  config, loaded = checkpoint.load_params(f"{root}/params")
  assert config == {"variant": "Pico/7"}
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_two_writers_of_one_local_path_never_tear_it(tmp_path):
  """Each writer renames its own temporary file into place: a reader sees one writer's whole content,
  never a file the other truncated; nothing is left behind, and the file has the umask's mode."""
  path = str(tmp_path / "list.json")
  size = 1 << 20
  storage.write_atomic(path, "a" * size)
  errors, torn = [], []

  def write(char: str) -> None:
    try:
      for _ in range(20):
        storage.write_atomic(path, char * size)
    except Exception as e:  # pylint: disable=broad-exception-caught
      errors.append(e)

  writers = [threading.Thread(target=write, args=(c,)) for c in "ab"]
  for w in writers:
    w.start()
  while any(w.is_alive() for w in writers):
    with open(path) as f:
      text = f.read()
    if len(text) != size or len(set(text)) != 1:
      torn.append(len(text))
  for w in writers:
    w.join()
  assert errors == [] and torn == []
  assert os.listdir(tmp_path) == ["list.json"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
