"""On-disk formats written before the layout change (#12) still read: a train checkpoint restores and
evaluates as it did, a params export computes what it did, stored teacher targets read and validate.

tests/fixtures/legacy/ was written by the code at commit 9acf3c8 (its README has the script).
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from at_jax import checkpoint
from at_jax.data import target_store
from at_jax.experiment import loop, validation
from at_jax.models import vit
from tests.conftest import shrunk_demo

LEGACY = pathlib.Path(__file__).parent / "fixtures" / "legacy"


def _config(mode="none", **transfer):
  """The config the fixtures were written with (the demo shrunk: Pico/7, 64 training images)."""
  c = shrunk_demo(steps=4, mode=mode, **transfer)
  c.data.update(dict(eval_batch_size=40, train_split="train[:64]", eval_split="test[:40]"))
  c.ckpt.update(dict(every_steps=4, keep=1))
  return c


@pytest.fixture(scope="module")
def expected():
  return json.loads((LEGACY / "expected.json").read_text()), np.load(LEGACY / "expected.npz")


def test_an_old_checkpoint_restores_and_evaluates_as_it_did(tmp_path, expected):
  workdir = tmp_path / "run"
  shutil.copytree(LEGACY / "run", workdir)  # restoring must not touch the committed fixture
  assert loop.evaluate_checkpoint(_config(), str(workdir)) == expected[0]["evals"]


def test_an_old_params_export_computes_what_it_did(expected):
  model_config, params = checkpoint.load_params(str(LEGACY / "run" / "params"))
  logits, out = vit.build(model_config).apply(
    {"params": params}, expected[1]["images"], train=False
  )
  np.testing.assert_allclose(logits, expected[1]["logits"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["attn_logits"], expected[1]["attn_logits"], rtol=1e-5, atol=1e-6)


def test_old_stored_targets_read_and_validate(tmp_path, expected):
  directory = str(LEGACY / "teacher_targets")
  stored = target_store.TeacherTargets(directory, [0])
  np.testing.assert_array_equal(
    np.asarray(stored[0]["teacher_attn_logits"], np.float32), expected[1]["target_0"]
  )
  np.testing.assert_array_equal(
    np.asarray(stored[63]["teacher_attn_logits"], np.float32), expected[1]["target_63"]
  )
  config = _config("distill", source="precomputed", targets_dir=directory)
  config.teacher.init = str(LEGACY / "run" / "params")
  validation.validate(config, str(tmp_path))  # metadata.json agrees with this config
