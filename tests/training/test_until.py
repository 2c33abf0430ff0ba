"""transfer.until: a distillation that stops part-way. Its task carries a second train step, for the
steps after the switch, on labels alone: on the 8-device mesh it never reads the teacher and equals a
scratch step; bad values name the field. (The loop's switch and resume across it:
tests/experiment/test_loop.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import sharding
from at_jax.errors import ConfigError
from at_jax.training import classify as train_step
from at_jax.training import state as train_state
from at_jax.training import tasks
from at_jax.transfer import spec
from tests.training.steps import B, S, assert_params_close, build_step


def _task(student, teacher, t, schedule, switch_step):
  return tasks.classify_task(
    student,
    teacher,
    t,
    image_size=S,
    schedule=schedule,
    label_smoothing=0.1,
    ema_decay=0.9,
    switch_step=switch_step,
  )


def test_the_step_after_the_switch_trains_on_labels_alone_without_the_teacher():
  student, teacher, t, schedule, tx, tp = build_step("distill", drop_path=0.2)
  assert _task(student, teacher, t, schedule, 0).make_label_step is None  # until 1: one step
  task = _task(student, teacher, t, schedule, 2)
  scratch = _task(student, None, spec.Transfer(), schedule, 0)
  mesh = sharding.make_mesh(-1, 2, jax.devices())
  state, shardings = train_state.create_sharded_state(
    lambda r: train_step.init_state(student, tx, r, S), jax.random.key(0), mesh
  )
  t_shardings = sharding.tree_shardings(mesh, tp)
  jit = lambda fn: train_state.jit_steps(fn, task.make_steps(tx)[1], mesh, shardings, t_shardings)[
    0
  ]
  after, reference = jit(task.make_label_step(tx)), jit(scratch.make_steps(tx)[0])
  unreadable = jax.device_put(jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tp), t_shardings)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(B, S, S, 3)).astype(np.float32),
    "label": rng.integers(0, 10, B).astype(np.int32),
  }
  batch = sharding.global_batch(batch, mesh)
  theirs = jax.tree.map(lambda x: x.copy(), state)  # the steps donate their state
  ours, got = after(state, batch, unreadable)  # a teacher read would turn the step to NaN
  theirs, want = reference(theirs, batch, tp)
  assert float(got["distill_loss"]) == 0 and np.isfinite(float(got["loss"]))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
  assert_params_close(jax.device_get(ours.params), jax.device_get(theirs.params))


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
