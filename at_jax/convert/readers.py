"""Reads a checkpoint file: big_vision `.npz` and `.safetensors` into one flat {key: array}, a PyTorch
file into what it holds (a state dict, or a training checkpoint's dict of entries, which
`selection.pick` chooses from). Unreadable files are ConfigErrors naming the file."""

import argparse
import contextlib
import io
import pickle
import re
from typing import Any

import numpy as np

from at_jax import storage
from at_jax.errors import ConfigError

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar")
# What torch.load(weights_only=True) may build besides tensors and plain containers: the argparse
# arguments that training checkpoints record (the reference's, MAE's, DeiT's, DINO's "args"). Building a
# Namespace sets attributes on it and runs no code; every other class or function is still refused.
_ALLOWED_GLOBALS = (argparse.Namespace,)
# torch's messages for a refused global: one not allowlisted, or one of a blocked module (os, posix, ...).
_REFUSED_GLOBAL = re.compile(r"unsupported global:? (?:GLOBAL )?(\S+)", re.IGNORECASE)


def read(path: str) -> Any:
  """The checkpoint's contents: {key: array-like} (torch tensors stay tensors until used), or for a
  PyTorch file whatever dict it holds (see `selection`)."""
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


def _read_torch(path: str, source: str | io.BytesIO) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel  # Only PyTorch files need it.
  except ImportError as e:
    raise ConfigError(
      path,
      "reading PyTorch checkpoints needs torch: pip install torch (the CPU wheel is "
      "enough), or convert the file to .safetensors elsewhere",
    ) from e
  # torch >= 2.5 (requirements-test.txt pins 2.14); older ones refuse the Namespace as any object.
  allow = getattr(torch.serialization, "safe_globals", None)
  try:
    # weights_only: a checkpoint is data; never run the pickled code of an arbitrary file.
    with allow(list(_ALLOWED_GLOBALS)) if allow else contextlib.nullcontext():
      return torch.load(source, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    found = _REFUSED_GLOBAL.search(str(e))
    if found is None:  # Random bytes also fail as "weights only" unpickling errors.
      raise _unreadable(path, e) from e
    raise ConfigError(
      path,
      f"holds a Python object ({found.group(1)}) besides tensors and argparse arguments, which "
      "torch.load(weights_only=True) refuses to unpickle (nothing of it ran); if you trust the "
      "file, save just its state dict: torch.save(torch.load(f, weights_only=False)['model'], "
      "'model.pth')",
    ) from e
  except Exception as e:  # pylint: disable=broad-exception-caught  # RuntimeError, EOFError, ... vary.
    raise _unreadable(path, e) from e
