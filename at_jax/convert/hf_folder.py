"""Hugging Face `transformers` folders: finding one, its config.json and its weights.

Three layouts: a folder written by `save_pretrained` (config.json beside `model.safetensors`, sharded
`model.safetensors.index.json` + shards, or the older `pytorch_model.bin` / `.bin.index.json`), a hub
cache snapshot (`.../models--org--name/snapshots/<hash>/`, files linked into `blobs/`), and the root of
a cached repo (`models--org--name`), whose `refs/main` names the snapshot. Our own params exports are
folders too; they hold `model_config.json` and are never taken for one of these.
"""

import json
import os
from typing import Any

from at_jax import storage
from at_jax.convert import keymap, readers
from at_jax.errors import ConfigError

CONFIG_FILE = "config.json"
# The marker of our params export (at_jax.checkpoint.save_params): such a folder is not a HF folder.
_EXPORT_MARKER = "model_config.json"
# (one file, its sharded index), in the order transformers prefers them: safetensors first.
_WEIGHTS = (
  ("model.safetensors", "model.safetensors.index.json"),
  ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def is_hf_folder(path: str) -> bool:
  """Whether `path` is a HF model folder, hub-cache snapshot or cached repo root (not our export)."""
  if not storage.isdir(path) or storage.exists(os.path.join(path, _EXPORT_MARKER)):
    return False
  return storage.isfile(os.path.join(path, CONFIG_FILE)) or (
    storage.isdir(os.path.join(path, "snapshots")) and storage.isdir(os.path.join(path, "refs"))
  )


def resolve(path: str) -> str:
  """The folder holding config.json: `path` itself, or for a cached repo root the snapshot that
  `refs/main` names (or its only snapshot when there is no refs/main)."""
  if storage.isfile(os.path.join(path, CONFIG_FILE)):
    return path
  snapshots = os.path.join(path, "snapshots")
  ref = os.path.join(path, "refs", "main")
  if storage.isfile(ref):
    with storage.open_file(ref) as f:
      revision = f.read().strip()
    snapshot = os.path.join(snapshots, revision)
    if not storage.isfile(os.path.join(snapshot, CONFIG_FILE)):
      raise ConfigError(
        path,
        f"refs/main names snapshot {revision!r}, but snapshots/{revision} has no {CONFIG_FILE}",
      )
    return snapshot
  names = [name for name, is_folder in storage.scandir(snapshots) if is_folder]
  if len(names) != 1:
    raise ConfigError(
      path,
      f"a hub cache folder without refs/main and with {len(names)} snapshots ({', '.join(names)}); "
      "pass the snapshot folder itself (snapshots/<hash>)",
    )
  return resolve(os.path.join(snapshots, names[0]))


def read_config(folder: str) -> dict[str, Any]:
  """The folder's config.json, which must name its `model_type`."""
  path = os.path.join(folder, CONFIG_FILE)
  try:
    with storage.open_file(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(path, f"unreadable ({type(e).__name__}: {e})") from e
  if not isinstance(config, dict) or "model_type" not in config:
    raise ConfigError(path, "not a transformers config: no 'model_type'")
  return config


def read_weights(folder: str) -> dict[str, Any]:
  """Every tensor of the folder's weights, one flat {key: array or torch tensor}, shards merged."""
  for single, index in _WEIGHTS:
    if storage.isfile(os.path.join(folder, single)):
      return _state_dict(os.path.join(folder, single))
    if storage.isfile(os.path.join(folder, index)):
      return _sharded(folder, index)
  raise ConfigError(
    folder,
    "no weights: expected one of "
    + ", ".join(name for pair in _WEIGHTS for name in pair)
    + f" beside {CONFIG_FILE}",
  )


def mtime_ns(path: str) -> int | None:
  """The newest modification time of the folder's config and weight files (None in a bucket): a
  folder rewritten in place by save_pretrained keeps its own mtime, its files do not."""
  return storage.newest_mtime_ns(resolve(path))


def _state_dict(path: str) -> dict[str, Any]:
  """One weights file as a flat {key: tensor}; a `.bin` is read with torch.load(weights_only=True)."""
  contents = readers.read(path)
  nested = (
    [k for k, v in contents.items() if isinstance(v, dict)] if isinstance(contents, dict) else []
  )
  if not isinstance(contents, dict) or nested:
    raise ConfigError(
      path,
      "not a flat state dict as save_pretrained writes"
      + (f": {keymap.listed(nested)} hold dicts" if nested else ""),
    )
  return contents


def _sharded(folder: str, index: str) -> dict[str, Any]:
  """The shards an index's `weight_map` names, merged; checks every listed key is in its shard."""
  index_path = os.path.join(folder, index)
  try:
    with storage.open_file(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(index_path, f"unreadable shard index ({type(e).__name__}: {e})") from e
  flat: dict[str, Any] = {}
  for shard in sorted(set(weight_map.values())):
    flat.update(_state_dict(os.path.join(folder, shard)))
  missing = sorted(set(weight_map) - set(flat))
  if missing:
    raise ConfigError(index_path, f"keys listed but in no shard: {keymap.listed(missing)}")
  return flat
