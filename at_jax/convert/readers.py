"""Reads a checkpoint file into one flat {key: array}: big_vision `.npz`, `.safetensors`, or a PyTorch
file (whose state dict may sit under a wrapper key such as "model"). Unreadable files are ConfigErrors
naming the file."""

import io
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from at_jax import storage
from at_jax.convert import keymap
from at_jax.errors import ConfigError

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar")
# Checkpoints that nest the state dict; the first one present wins (so the raw weights over the EMA).
_WRAPPERS = ("model", "state_dict", "model_ema", "state_dict_ema")


def read(path: str) -> dict[str, Any]:
  """{key: array-like} of the checkpoint's tensors (torch tensors stay tensors until used)."""
  if not storage.isfile(path):
    raise ConfigError(path, "no such file")
  name = path.lower()
  if not name.endswith((".npz", ".safetensors", *_TORCH_SUFFIXES)):
    raise ConfigError(
      path,
      "unknown checkpoint type; expected a file ending in "
      f"{', '.join(('.npz', '.safetensors') + _TORCH_SUFFIXES)}",
    )
  # A bucket object is read once into memory (the readers take file objects or bytes); a local file is
  # read by path (safetensors maps it).
  source: str | io.BytesIO = path
  if storage.is_remote(path):
    with storage.open_file(path, "rb") as f:
      source = io.BytesIO(f.read())
  if name.endswith(".npz"):
    return _read_npz(path, source)
  if name.endswith(".safetensors"):
    return _read_safetensors(path, source)
  if name.endswith(_TORCH_SUFFIXES):
    return _read_torch(path, source)
  raise ConfigError(
    path,
    "unknown checkpoint type; expected a file ending in "
    f"{', '.join(('.npz', '.safetensors') + _TORCH_SUFFIXES)}",
  )


def _unreadable(path: str, error: Exception) -> ConfigError:
  return ConfigError(
    path,
    f"cannot read the file (truncated or not a checkpoint): {type(error).__name__}: "
    f"{str(error)[:200]}",
  )


def _read_npz(path: str, source: str | io.BytesIO) -> dict[str, Any]:
  try:
    # Reads every member now, so that a truncated archive fails here and not halfway through conversion.
    with np.load(source, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except Exception as e:  # pylint: disable=broad-exception-caught  # zipfile/zlib/numpy errors vary.
    raise _unreadable(path, e) from e


def _read_safetensors(path: str, source: str | io.BytesIO) -> dict[str, Any]:
  try:
    from safetensors.numpy import load, load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(
      path, "reading .safetensors needs the safetensors package: pip install safetensors"
    ) from e
  try:
    return load_file(source) if isinstance(source, str) else load(source.getvalue())
  except Exception as e:  # pylint: disable=broad-exception-caught  # SafetensorError, OSError, ...
    raise _unreadable(path, e) from e


def _read_torch(path: str, source: str | io.BytesIO) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=import-outside-toplevel  # Only PyTorch files need it.
  except ImportError as e:
    raise ConfigError(
      path,
      "reading PyTorch checkpoints needs torch: pip install torch (the CPU wheel is "
      "enough), or convert the file to .safetensors elsewhere",
    ) from e
  try:
    # weights_only: a checkpoint is data; never run the pickled code of an arbitrary file.
    obj = torch.load(source, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if found is None:  # Random bytes also fail as "weights only" unpickling errors.
      raise _unreadable(path, e) from e
    raise ConfigError(
      path,
      f"holds a Python object ({found.group(1)}) besides tensors, which torch.load("
      "weights_only=True) refuses to unpickle; if you trust the file, save just its state "
      "dict: torch.save(torch.load(f, weights_only=False)['model'], 'model.pth')",
    ) from e
  except Exception as e:  # pylint: disable=broad-exception-caught  # RuntimeError, EOFError, ... vary.
    raise _unreadable(path, e) from e
  return _pick_state_dict(obj, path)


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _pick_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
  if _is_state_dict(obj):
    return obj
  if isinstance(obj, Mapping):
    for key in _WRAPPERS:
      if _is_state_dict(obj.get(key)):
        return obj[key]
  top = keymap.listed(list(obj)) if isinstance(obj, Mapping) else type(obj).__name__
  raise ConfigError(
    path,
    f"no state dict found: expected a dict of tensors, or one under any of {_WRAPPERS}; "
    f"found {top}",
  )
