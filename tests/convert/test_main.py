"""`python -m at_jax.convert SRC DST` (at_jax.convert.__main__): writes an export that loads back, prints
its config; a bad file exits 2 with the error and no traceback."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from at_jax import checkpoint
from at_jax.convert import __main__ as cli
from at_jax.convert.load import load_checkpoint

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "at_jax.convert", *args],
    cwd=_REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _assert_export_is(dst: str, config: dict, params: dict) -> None:
  loaded_config, loaded = checkpoint.load_params(dst)
  assert loaded_config == config
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_main_writes_an_export_that_loads_back(tmp_path, good_file, capsys):
  src = good_file("a.safetensors")
  dst = str(tmp_path / "export")
  assert cli.main([src, dst, "--num_heads", "2", "--image_size", "48", "--resample"]) == 0
  config, params = load_checkpoint(src, num_heads=2, image_size=48, resample_posemb=True)
  assert json.loads(capsys.readouterr().out) == config
  _assert_export_is(dst, config, params)


def test_main_bad_file_returns_2(tmp_path, capsys):
  src = str(tmp_path / "bad.safetensors")
  with open(src, "wb") as f:
    f.write(b"not a checkpoint at all")
  assert cli.main([src, str(tmp_path / "export")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and src in err
  assert "cannot read the file (truncated or not a checkpoint)" in err
  assert not os.path.exists(tmp_path / "export")


@pytest.mark.slow
def test_cli_writes_an_export_that_loads_back(tmp_path, good_file):
  src = good_file("a.safetensors")
  dst = str(tmp_path / "export")
  result = _cli(src, dst, "--num_heads", "2", "--image_size", "48", "--resample")
  assert result.returncode == 0, result.stderr
  config, params = load_checkpoint(src, num_heads=2, image_size=48, resample_posemb=True)
  assert json.loads(result.stdout) == config
  _assert_export_is(dst, config, params)


@pytest.mark.slow
def test_cli_bad_file_exits_2_without_traceback(tmp_path):
  src = str(tmp_path / "bad.safetensors")
  with open(src, "wb") as f:
    f.write(b"not a checkpoint at all")
  result = _cli(src, str(tmp_path / "export"))
  assert result.returncode == 2
  assert "cannot read the file (truncated or not a checkpoint)" in result.stderr
  assert src in result.stderr and "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "export")
