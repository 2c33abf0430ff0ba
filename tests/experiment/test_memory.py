"""The start-up memory estimate (experiment/memory.py) against XLA's own count of the compiled step
(memory_analysis: arguments + outputs - donated + temporaries, per device), on the (4, 2) mesh of 8
emulated devices: the band scale.md states, across modes, remat policies and losses."""

import jax
import numpy as np
import pytest

from at_jax import checkpoint, sharding
from at_jax.experiment import memory, runs, stream, validation
from at_jax.models import vit
from at_jax.training import state as train_state


@pytest.fixture(scope="module")
def mini_teacher(tmp_path_factory) -> str:
  """A random Mini/4 params export (no training: only shapes matter here)."""
  path = str(tmp_path_factory.mktemp("teacher") / "params")
  fields = vit.model_fields(vit.build({"variant": "Mini/4", "num_classes": 0}))
  images = np.zeros((1, 28, 28, 3), np.float32)
  params = vit.build(fields).init(jax.random.key(0), images, train=False)["params"]
  checkpoint.save_params(path, jax.device_get(params), fields)
  return path


def _estimate_and_compiled(config, workdir) -> tuple[dict[str, int], int]:
  run = runs.setup(config, workdir)
  estimate = memory.estimate(
    config, run.mesh, run.model, run.transfer, run.init_fn, run.teacher_params
  )
  abstract = jax.eval_shape(run.init_fn, jax.random.key(0))
  shardings = sharding.tree_shardings(run.mesh, abstract)
  teacher = run.teacher_params
  teacher_shardings = None if teacher is None else jax.tree.map(lambda a: a.sharding, teacher)
  train, _ = train_state.jit_steps(run.step_fn, run.eval_fn, run.mesh, shardings, teacher_shardings)
  batch = next(stream.train_batches(run, 0))
  batch.pop("skipped")
  compiled = train.lower(abstract, sharding.global_batch(batch, run.mesh), teacher).compile()
  m = compiled.memory_analysis()
  used = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return estimate, used + m.temp_size_in_bytes


@pytest.mark.parametrize(
  "mode,remat,scan,loss_impl",
  [
    ("none", "none", False, "direct"),
    ("copy", "none", False, "direct"),  # the estimate's highest: copy skips the student's own maps
    ("distill", "none", False, "blockwise"),  # its lowest
    ("distill", "full", True, "direct"),
  ],
)
def test_the_compiled_step_needs_what_the_estimate_says_within_its_band(
  tiny_config, mini_teacher, tmp_path, mode, remat, scan, loss_impl
):
  c = tiny_config(steps=4, mode=mode, layers="all", loss_impl=loss_impl)
  c.model.update(dict(variant="Mini/4", remat_policy=remat, scan=scan))  # 50 tokens: maps matter
  c.data.batch_size = 64
  c.teacher.init = "" if mode == "none" else mini_teacher
  estimate, compiled = _estimate_and_compiled(c, str(tmp_path))
  assert estimate["grads"] == estimate["params"]
  assert 0.55 < sum(estimate.values()) / compiled < 1.25, (estimate, compiled)


def test_remat_without_scan_is_counted_as_none_on_a_cpu(tiny_config, mini_teacher, tmp_path):
  """XLA:CPU keeps an unrolled loop's recomputed layers: counting remat there would pass configs
  that need several times the estimate."""
  lines = {}
  for remat in ("none", "full"):
    c = tiny_config(steps=4, mode="none")
    c.model.update(dict(variant="Mini/4", remat_policy=remat))
    lines[remat] = validation.validate(c, str(tmp_path / remat)).memory
  assert lines["none"] == lines["full"]
