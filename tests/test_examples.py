"""The examples run as their docstrings say (`python examples/<name>.py`, from the repo root, in a fresh
process on one CPU device) and print what they promise."""

import math
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env

# A real process, the whole example (`pytest -m 'not slow'` skips it).
pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_own_flax_model_example_distils_attention():
  result = subprocess.run(
    [sys.executable, "examples/own_flax_model.py"],
    cwd=ROOT,
    env=subprocess_env(JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = re.findall(r"step +(\d+) +ce ([-\d.naif]+) +distill ([-\d.naif]+)", result.stdout)
  assert len(rows) >= 2, result.stdout
  ce = [float(r[1]) for r in rows]
  distill = [float(r[2]) for r in rows]
  assert all(math.isfinite(x) for x in ce + distill), result.stdout
  # Trained on one batch, both terms fall; the attention loss towards its floor (3 x the teacher's
  # entropy per layer), so by less.
  assert distill[-1] < distill[0] and ce[-1] < ce[0], result.stdout
