"""transfer.until: a distillation that stops part-way, in one program (`lax.cond`): up to the switch its
steps are the distilling step's, after it the label-only step's, on the 8-device mesh; the teacher is
not read after the switch; bad values name the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import sharding
from at_jax.errors import ConfigError
from at_jax.training import classify as train_step
from at_jax.training import state as train_state
from at_jax.transfer import spec
from tests.training.steps import B, S, assert_params_close, build_step

SWITCH, STEPS = 2, 4


def _batch(step: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(step)
  return {
    "image": rng.normal(size=(B, S, S, 3)).astype(np.float32),
    "label": rng.integers(0, 10, B).astype(np.int32),
  }


def test_steps_distil_until_the_switch_then_train_on_labels_alone():
  student, teacher, t, schedule, tx, tp = build_step("distill", drop_path=0.2)
  mesh = sharding.make_mesh(-1, 2, jax.devices())
  state, shardings = train_state.create_sharded_state(
    lambda r: train_step.init_state(student, tx, r, S), jax.random.key(0), mesh
  )
  t_shardings = sharding.tree_shardings(mesh, tp)
  evaluate = train_step.make_eval_step(student, None, spec.Transfer())

  def jitted(model_teacher, transfer, **kw):
    step = train_step.make_train_step(
      student,
      model_teacher,
      tx,
      transfer,
      schedule=schedule,
      label_smoothing=0.1,
      ema_decay=0.9,
      **kw,
    )
    return train_state.jit_steps(step, evaluate, mesh, shardings, t_shardings)[0]

  stopping = jitted(teacher, t, distill_steps=SWITCH)
  distilling, labels_only = jitted(teacher, t), jitted(None, spec.Transfer())
  tp = jax.device_put(tp, t_shardings)
  unreadable = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tp)  # a teacher read would show
  ours, theirs = state, jax.tree.map(lambda x: x.copy(), state)  # the steps donate their state
  for i in range(STEPS):
    batch = sharding.global_batch(_batch(i), mesh)
    ours, got = stopping(ours, batch, tp if i < SWITCH else unreadable)
    theirs, want = (distilling if i < SWITCH else labels_only)(theirs, batch, tp)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=f"step {i}: {k}")
    assert (float(got["distill_loss"]) > 0) == (i < SWITCH)
  assert_params_close(jax.device_get(ours.params), jax.device_get(theirs.params))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(ours.params)))


@pytest.mark.parametrize(
  "mode,until,says",
  [
    ("distill", 0, r"\(0, 1\]"),
    ("distill", 1.5, r"\(0, 1\]"),
    ("distill", "half", r"\(0, 1\]"),
    ("copy", 0.5, "only distill stops"),
  ],
)
def test_a_bad_until_names_the_field(mode, until, says):
  student, teacher, *_ = build_step("none")
  cfg = {"mode": mode, "layers": "first:1", "until": until}
  with pytest.raises(ConfigError, match=says) as e:
    spec.resolve(cfg, student, teacher, S)
  assert e.value.field == "transfer.until"
  half = spec.resolve({**cfg, "mode": "distill", "until": 0.5}, student, teacher, S)
  assert half.until == 0.5 and "for the first 50% of steps" in spec.describe(half)
  assert (half.distill_steps(7), spec.Transfer().distill_steps(7)) == (4, 0)  # ceil; 0: every step
