"""at_jax.convert.readers: every file type is read; damaged, pickled-object, missing and unknown files
are ConfigErrors naming the file; torch is needed only for PyTorch files."""

import argparse
import pathlib
import sys

import jax
import numpy as np
import pytest
import torch

from at_jax.convert.load import load_checkpoint
from at_jax.errors import ConfigError


@pytest.mark.parametrize("name", ["a.pth", "a.safetensors", "a.npz"])
@pytest.mark.parametrize("damage", ["truncated", "random_bytes"])
def test_damaged_file(name, damage, good_file):
  path = good_file(name)
  with open(path, "rb") as f:
    content = f.read()
  content = (
    content[: len(content) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096)
  )
  with open(path, "wb") as f:
    f.write(content)
  with pytest.raises(ConfigError, match=r"cannot read .*truncated or not a checkpoint") as e:
    load_checkpoint(path, num_heads=2)
  assert e.value.field == path


def test_argparse_args_are_read_other_objects_refused(
  tmp_path, make_vit, state_dict_of, assert_same
):
  # DINO's full checkpoints: {"student", "teacher", "args": argparse.Namespace, ...}, DDP- and
  # MultiCropWrapper-prefixed. The Namespace is the one object weights-only loading is allowed to build.
  teacher, student = (
    make_vit(0, embed_dim=128, num_heads=2),
    make_vit(1, embed_dim=128, num_heads=2),
  )
  path = str(tmp_path / "dino_full.pth")
  wrapped = lambda m: {f"module.backbone.{k}": v for k, v in state_dict_of(m).items()}
  torch.save(
    {
      "args": argparse.Namespace(arch="vit_small"),
      "teacher": wrapped(teacher),
      "student": wrapped(student),
      "epoch": 100,
    },
    path,
  )
  images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  for name, model in (("teacher", teacher), ("student", student)):
    config, params = load_checkpoint(f"{path}#{name}", num_heads=2)
    assert_same(config, params, model, images)
  with pytest.raises(ConfigError, match=r"no state dict found.*FILE#ENTRY.*args, teacher, student"):
    load_checkpoint(path, num_heads=2)  # two models: say which
  torch.save({"args": pathlib.PurePosixPath("/runs/dino"), "model": wrapped(teacher)}, path)
  with pytest.raises(
    ConfigError, match=r"holds a Python object \(pathlib.PurePosixPath\).*save just its state"
  ) as e:
    load_checkpoint(path, num_heads=2)
  assert e.value.field == path


def test_missing_and_unknown_files_are_named(tmp_path):
  missing = str(tmp_path / "nope.pth")
  with pytest.raises(ConfigError, match="no such file") as e:
    load_checkpoint(missing)
  assert e.value.field == missing
  lightning = str(tmp_path / "model.ckpt")
  open(lightning, "wb").close()
  with pytest.raises(
    ConfigError, match=r"unknown checkpoint type; expected a file ending in .npz"
  ) as e:
    load_checkpoint(lightning)
  assert e.value.field == lightning


def test_torch_only_needed_for_pytorch_files(
  monkeypatch, make_vit, state_dict_of, write_state_dict
):
  model = make_vit(embed_dim=128, num_heads=2, num_classes=10)
  pth = write_state_dict(state_dict_of(model), "a.pth")
  st = write_state_dict(state_dict_of(model), "a.safetensors")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  with pytest.raises(ConfigError, match="pip install torch") as e:
    load_checkpoint(pth, num_heads=2)
  assert e.value.field == pth
  config, _ = load_checkpoint(st, num_heads=2)
  assert config["width"] == 128


@pytest.mark.parametrize("name", ["a.pth", "a.safetensors"])
def test_a_checkpoint_file_in_a_bucket_converts_as_on_disk(name, good_file, gcs_bucket):
  import fsspec  # pylint: disable=import-outside-toplevel

  local = good_file(name)
  remote = f"{gcs_bucket[0]}/checkpoints/{name}"
  fsspec.filesystem("gs").put(local, remote)
  (config_a, a), (config_b, b) = (load_checkpoint(p, num_heads=2) for p in (local, remote))
  assert config_a == config_b
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ConfigError, match="no such file"):
    load_checkpoint(f"{gcs_bucket[0]}/checkpoints/missing.pth", num_heads=2)
