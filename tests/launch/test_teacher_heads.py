"""launch/teacher_heads.py as a researcher runs it: the committed 12-layer, 8-head teacher of the
cross-shape study read by the demo's student (6 layers, 4 heads, layers 0-3 distilled, layer_map uniform)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from at_jax.transfer import pairing
from tests.conftest import subprocess_env

# Real processes (`pytest -m 'not slow'` skips them), as the rest of tests/launch.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER = "--config.teacher.init=projects/cross_shape/results/teacher"


def _teacher_heads(workdir: str, *overrides: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch", "teacher_heads.py"), f"--workdir={workdir}"]
    + [TEACHER, "--config.transfer.head_map=pick", "--num_images=64", *overrides],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_prints_each_read_layers_heads_and_the_picks_that_follow_from_them(tmp_path):
  done = _teacher_heads(str(tmp_path), "--config.transfer.layer_map=uniform")
  assert done.returncode == 0, done.stderr[-2000:]
  tables = [
    line.split() for line in done.stdout.splitlines() if re.match(r"\s+\d+\s+\d\.\d{3}", line)
  ]
  rows = [row for row in tables if len(row) == 11]  # entropy: layer, 8 heads, sharpest, flattest
  masses = np.array([[float(v) for v in row[1:]] for row in tables if len(row) == 9])
  assert masses.shape == (8, 8) and np.all((masses > 0) & (masses < 1))  # own token, then prefix
  assert [int(row[0]) for row in rows] == [1, 3, 5, 7]  # student layer i reads teacher layer 2i + 1
  entropy = np.array([[float(v) for v in row[1:9]] for row in rows])
  assert np.all((entropy > 0) & (entropy < np.log(17)))  # 17 tokens: below uniform's ln 17
  for row, layer_entropy in zip(rows, entropy, strict=True):
    # Ties would make the order ambiguous; the printed 3 decimals of these heads differ.
    assert row[9] == ",".join(map(str, sorted(np.argsort(layer_entropy)[:4])))
    assert row[10] == ",".join(map(str, sorted(np.argsort(-layer_entropy)[:4])))
  for name, column in (("sharpest", 9), ("flattest", 10)):
    pick = ";".join(row[column] for row in rows)
    assert f"{name}: --config.transfer.head_map=pick --config.transfer.head_pick='{pick}'" in (
      done.stdout
    )
    assert len(pairing.parse_head_pick(pick, "pick", 4, 4, 8)) == 4  # what the run will accept


def test_a_bad_layer_map_is_a_config_error_naming_the_field(tmp_path):
  done = _teacher_heads(str(tmp_path), "--config.transfer.layer_map=sideways")
  assert done.returncode == 2 and "transfer.layer_map" in done.stderr, done.stderr[-2000:]
