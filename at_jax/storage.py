"""Paths that are local files or bucket objects (``gs://bucket/...``), through one small API.

Everything here goes through etils' `epath` (what orbax uses), whose ``gs://`` backend is gcsfs: local
paths behave as with `os`, bucket paths as objects. Orbax and tensorstore speak ``gs://`` themselves; this
module serves the plain files around them (model_config.json, metrics.jsonl, results.json, figures).
Two things differ in a bucket and are handled here: an object is written whole (so a write is atomic
by itself, and "appending" rewrites it), and a writer that appends in place (TensorBoard event files,
`jax.profiler` traces) writes to a local folder that `LocalMirror` uploads.
"""

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import IO, Any

import fsspec
from etils import epath

from at_jax.errors import ConfigError

# gcsfs caches folder listings per process: a file another process (or this one) removed or wrote would
# still be listed, or not. Checkpoint and export checks must see the bucket as it is.
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False


def is_remote(path: str) -> bool:
  """Whether `path` is a URL (``gs://``, ``s3://``, ...) rather than a local path."""
  return "://" in path


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (`os.path.abspath` would mangle ``gs://``)."""
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  return epath.Path(path).is_file()


def makedirs(path: str) -> None:
  """Creates the folder (a bucket has no folders: nothing to do there)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  return sorted(p.name for p in epath.Path(path).iterdir())


def scandir(path: str) -> list[tuple[str, bool]]:
  """(name, is a folder) of the entries of the folder `path`, sorted; one listing in a bucket."""
  if not is_remote(path):
    with os.scandir(path) as entries:  # is_dir follows symlinks, like torchvision's walk
      return sorted((e.name, e.is_dir()) for e in entries)
  fs = fsspec.filesystem(path.split("://", 1)[0])
  infos = fs.ls(path, detail=True)
  return sorted(
    (info["name"].rstrip("/").rsplit("/", 1)[-1], info["type"] == "directory") for info in infos
  )


def copy_tree(source: str, destination: str) -> None:
  """Copies the folder `source` (its files and subfolders) to `destination`, between disk and bucket
  either way. Subfolders go before files, so that a marker file at the top (an export's
  model_config.json) lands last and an interrupted copy is not taken for a whole one."""
  for name, is_folder in sorted(scandir(source), key=lambda entry: not entry[1]):
    src, dst = os.path.join(source, name), os.path.join(destination, name)
    if is_folder:
      copy_tree(src, dst)
    else:
      with open_file(src, "rb") as f:
        write_atomic(dst, f.read())


def mtime_ns(path: str) -> int | None:
  """A local file's or folder's mtime; None for a missing path and in a bucket (folders have none)."""
  if is_remote(path):
    return None
  try:
    return os.stat(path).st_mtime_ns
  except OSError:
    return None


def newest_mtime_ns(folder: str) -> int | None:
  """The newest mtime of a local folder and the entries in it (a folder rewritten in place keeps its own
  mtime; its files do not); None in a bucket."""
  if is_remote(folder):
    return None
  paths = [folder] + [os.path.join(folder, name) for name in listdir(folder)]
  return max((t for t in map(mtime_ns, paths) if t is not None), default=None)


def open_file(path: str, mode: str = "r") -> IO[Any]:
  return epath.Path(path).open(mode)


def remove(path: str) -> None:
  epath.Path(path).unlink(missing_ok=True)


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes `content` so that a reader never sees half of it: an object upload is atomic by itself; a
  local file is written beside and renamed."""
  mode = "wb" if isinstance(content, bytes) else "w"
  if is_remote(path):
    with open_file(path, mode) as f:
      f.write(content)
    return
  folder = os.path.dirname(path) or "."
  makedirs(folder)
  # A temporary file of its own per writer: two writers of one path (two runs sharing a file-list
  # cache) must not truncate each other's file before its rename.
  # (Named, not mkstemp's: its 0600 mode would outlive the rename; this one gets the umask's.)
  temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
  try:
    with open(temporary, mode.replace("w", "x")) as f:
      f.write(content)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):  # not created, or already renamed: nothing to undo
      os.unlink(temporary)
    raise


def create_exclusive(path: str, content: str) -> bool:
  """Writes `content` to `path` only if nothing is there; returns whether it did. Of several writers
  racing for one path exactly one succeeds: on disk through O_EXCL, in a bucket through an upload
  conditional on no object being there (GCS's ifGenerationMatch=0). Raises OSError if `path` cannot be
  written at all (a folder that cannot be made, no permission)."""
  if is_remote(path):
    fs = fsspec.filesystem(path.split("://", 1)[0])
    try:
      fs.pipe_file(path, content.encode(), mode="create")
    except FileExistsError:
      return False
    return True
  makedirs(os.path.dirname(path) or ".")
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(content)
  return True


def check_bucket(path: str, field: str) -> None:
  """ConfigError `field` if `path` is in a bucket that does not exist or cannot be reached.

  Local paths pass (they are created as needed).
  """
  if not is_remote(path):
    return
  scheme, rest = path.split("://", 1)
  bucket = f"{scheme}://{rest.split('/', 1)[0]}"
  try:
    reachable = epath.Path(bucket).exists()
  except Exception as e:  # pylint: disable=broad-exception-caught  # auth, network, unknown scheme
    raise ConfigError(field, f"{path}: cannot reach {bucket} ({type(e).__name__}: {e})") from e
  if not reachable:
    raise ConfigError(field, f"{path}: the bucket {bucket} does not exist; create it first.")


class LocalMirror:
  """A local folder for a writer that appends in place, uploaded to `remote` by `sync`.

  For a local `remote` it is `remote` itself (nothing to upload). Files are uploaded whole when their
  size changed since the last sync (appending writers only grow files).
  """

  def __init__(self, remote: str):
    self.remote = remote
    self.local = tempfile.mkdtemp(prefix="at_jax_mirror_") if is_remote(remote) else remote
    self._sizes: dict[str, int] = {}

  def sync(self) -> None:
    if not is_remote(self.remote):
      return
    for folder, _, names in os.walk(self.local):
      for name in names:
        local = os.path.join(folder, name)
        size = os.path.getsize(local)
        if self._sizes.get(local) == size:
          continue
        relative = os.path.relpath(local, self.local)
        with open(local, "rb") as src, open_file(f"{self.remote}/{relative}", "wb") as dst:
          shutil.copyfileobj(src, dst)
        self._sizes[local] = size

  def close(self) -> None:
    self.sync()
    if is_remote(self.remote):
      shutil.rmtree(self.local, ignore_errors=True)
