"""Gradient accumulation (optim.accum_steps): k micro-batches, one optimizer step, equal to the big-batch
step where nothing random differs; randomness per micro-batch; start-up checks; the memory estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from at_jax import sharding
from at_jax.errors import ConfigError
from at_jax.experiment import build, memory, teachers, validation
from at_jax.models import mae as mae_model
from at_jax.models import vit
from at_jax.training import classify
from at_jax.training import mae as mae_steps
from at_jax.training import state as train_state
from at_jax.transfer import spec as transfer_spec
from tests.training.steps import S, assert_params_close, build_step

B = 32  # micro-batches of 16 and 8 still split over the 8 emulated devices


def _batches(steps=2, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      "image": rng.normal(size=(B, S, S, 3)).astype(np.float32),
      "label": rng.integers(0, 10, B).astype(np.int32),
    }
    for _ in range(steps)
  ]


def _run(mode, accum_steps, devices, fsdp=1, *, mix=None, **kw):
  """Steps over `_batches()` with `accum_steps`; returns (per-step metrics, final params)."""
  student, teacher, t, schedule, tx, tp = build_step(mode, **kw)
  mesh = sharding.make_mesh(-1, fsdp, devices)
  state, shardings = train_state.create_sharded_state(
    lambda r: classify.init_state(student, tx, r, S), jax.random.key(0), mesh
  )
  step = classify.make_train_step(
    student,
    teacher,
    tx,
    t,
    schedule=schedule,
    label_smoothing=0.1,
    ema_decay=0.9,
    mix=mix,
    accum_steps=accum_steps,
  )
  t_shardings = sharding.tree_shardings(mesh, tp)
  train, _ = train_state.jit_steps(
    step, classify.make_eval_step(student, teacher, t), mesh, shardings, t_shardings
  )
  tp = jax.device_put(tp, t_shardings)
  logged = []
  for b in _batches():
    state, m = train(state, sharding.global_batch(b, mesh), tp)
    logged.append({k: float(v) for k, v in m.items()})
  assert int(state.step) == len(logged)  # one optimizer step per batch, whatever accum_steps
  return logged, jax.device_get(state.params)


@pytest.mark.parametrize("mode", ["none", "distill"])
def test_accumulated_step_equals_the_big_batch_step(mode):
  """No drop path, no mixing: k = 2 and 4 micro-batches (on the (4, 2) mesh) give the k = 1 step."""
  big, big_params = _run(mode, 1, jax.devices()[:1])
  for k in (2, 4):
    acc, acc_params = _run(mode, k, jax.devices(), 2)
    for a, b in zip(big, acc):
      assert a.keys() == b.keys()
      for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=2e-5, atol=1e-6, err_msg=f"{k}: {name}")
    assert_params_close(big_params, acc_params)
  assert (big[0]["distill_loss"] > 0) == (mode == "distill")
  assert big[1]["loss"] != big[0]["loss"]


def test_random_accumulated_step_is_the_same_on_one_device_and_the_mesh():
  """Drop path and per-group mixing drawn per micro-batch, from keys that know nothing of the mesh."""
  mix = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, group_size=4)
  kw = dict(drop_path=0.2, mix=mix)
  one, one_params = _run("distill", 2, jax.devices()[:1], **kw)
  meshed, mesh_params = _run("distill", 2, jax.devices(), 2, **kw)
  for a, b in zip(one, meshed):
    for name in a:
      np.testing.assert_allclose(b[name], a[name], rtol=2e-5, atol=1e-6, err_msg=name)
  assert_params_close(one_params, mesh_params)
  # Control: the draws do depend on the split, so the equality above is not vacuous.
  big, _ = _run("distill", 1, jax.devices()[:1], **kw)
  assert abs(big[0]["loss"] - one[0]["loss"]) > 1e-4


def test_micro_batches_are_interleaved_whole_units():
  batch = {"x": jnp.arange(16), "y": jnp.arange(16) * 10}
  micro = train_state.micro_batches(batch, 2, unit=4)
  np.testing.assert_array_equal(
    micro["x"], [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
  )
  np.testing.assert_array_equal(micro["y"], 10 * micro["x"])
  np.testing.assert_array_equal(
    train_state.micro_batches(batch, 4)["x"][1], [1, 5, 9, 13]
  )  # unit 1: every 4th example


def test_each_micro_batch_gets_its_own_key_and_the_means_come_back():
  """grad_fn sees micro-batch m with fold_in(rng, m); grads and metrics are the micro-batches' means."""
  rng = jax.random.key(5)
  batch = {"x": jnp.arange(12.0)}

  def grad_fn(params, micro, key):
    draw = jax.random.uniform(key)
    return {"w": params["w"] * micro["x"].sum()}, {"draw": draw, "mean_x": micro["x"].mean()}

  grads, metrics = jax.jit(lambda p, b: train_state.accumulate_gradients(grad_fn, p, b, rng, 3))(
    {"w": jnp.float32(2.0)}, batch
  )
  draws = [float(jax.random.uniform(jax.random.fold_in(rng, m))) for m in range(3)]
  np.testing.assert_allclose(metrics["draw"], np.mean(draws), rtol=1e-6)
  assert len(set(draws)) == 3
  np.testing.assert_allclose(metrics["mean_x"], 5.5, rtol=1e-6)
  np.testing.assert_allclose(grads["w"], 2.0 * 66 / 3, rtol=1e-6)
  # accum_steps 1 is grad_fn itself, with the step's own key (runs without accumulation draw as before).
  _, once = train_state.accumulate_gradients(grad_fn, {"w": jnp.float32(2.0)}, batch, rng, 1)
  assert float(once["draw"]) == float(jax.random.uniform(rng))


def test_mae_step_accumulates_with_a_mask_key_per_micro_batch():
  module = mae_model.MAE(
    encoder={"variant": "Pico/4", "depth": 1},
    decoder_width=16,
    decoder_depth=1,
    decoder_heads=2,
    decoder_mlp_dim=32,
  )
  tx = optax.sgd(0.1)
  schedule = lambda step: 0.1
  images = _batches(1)[0]["image"]
  state = mae_steps.init_mae_state(module, tx, jax.random.key(0), S)
  step = jax.jit(
    mae_steps.make_mae_train_step(module, tx, schedule=schedule, ema_decay=0.9, accum_steps=2)
  )
  new, logged = step(state, {"image": jnp.asarray(images)}, None)
  rng = jax.random.fold_in(state.rng, state.step)
  micro = train_state.micro_batches({"image": jnp.asarray(images)}, 2)["image"]
  losses = [
    module.apply(
      {"params": state.params}, micro[m], train=True, mask_rng=jax.random.fold_in(rng, m)
    )[0]
    for m in range(2)
  ]
  np.testing.assert_allclose(logged["loss"], np.mean(losses), rtol=1e-5)
  assert int(new.step) == 1 and np.isfinite(float(logged["grad_norm"]))


@pytest.mark.parametrize(
  "args",
  [
    (0, 32, 8, 1),  # not >= 1
    (1.5, 32, 8, 1),
    (3, 32, 1, 1),  # 32 does not split into 3
    (8, 32, 8, 1),  # micro-batches of 4 on 8 devices
    (2, 32, 1, 32),  # micro-batches of 16 hold no whole group of 32
  ],
)
def test_check_accum_steps_names_the_field(args):
  with pytest.raises(ConfigError) as e:
    train_state.check_accum_steps(*args)
  assert e.value.field == "optim.accum_steps"


@pytest.mark.parametrize(
  "overrides,field",
  [
    ({"optim.accum_steps": 0}, "optim.accum_steps"),
    ({"optim.accum_steps": 4}, "optim.accum_steps"),  # 16 / 4 = 4 examples on 8 devices
    ({"data.mix_group_size": -1}, "data.mix_group_size"),
    ({"data.mix_group_size": 32}, "data.mix_group_size"),  # more than the batch of 16
    ({"optim.accum_steps": 2, "data.mix_group_size": 16}, "data.mix_group_size"),  # micro 8
  ],
)
def test_start_up_validation_names_the_field(tiny_config, tmp_path, overrides, field):
  config = tiny_config()
  for dotted, value in overrides.items():
    group, name = dotted.split(".")
    config[group][name] = value
  with pytest.raises(ConfigError) as e:
    validation.validate(config, str(tmp_path))
  assert e.value.field == field, str(e.value)


def test_memory_estimate_counts_one_micro_batch(tiny_config, tmp_path):
  """Activations of B / k examples per device, plus the grads' running sum (params-sized)."""

  def estimate(accum_steps):
    config = tiny_config()
    config.data.batch_size = 64
    config.optim.accum_steps = accum_steps
    model = vit.build(teachers.model_config(config, str(tmp_path)))
    spec = transfer_spec.resolve({"mode": "none"}, model, None, config.data.image_size)
    mesh = sharding.make_mesh(4, 2)
    lr, total = build.schedule(config, 320)
    task = build.task(config, model, None, spec, lr, total)
    tx = build.optimizer(config, task, lr, model.depth)
    return memory.estimate(config, mesh, model, spec, build.init_fn(task, tx), None)

  one, four = estimate(1), estimate(4)
  assert "grad_accum" not in one and four["grad_accum"] == one["params"]
  assert four["activations"] * 4 == one["activations"]  # 8 vs 2 examples per device
  for name in ("params", "optimizer", "ema"):
    assert four[name] == one[name]


@pytest.mark.parametrize(
  "variant,teacher_fields,expected",
  [
    ("Pico/7", {}, 0),  # the student's own shape: its maps are counted in the activations
    ("Pico/7", {"depth": 4, "num_heads": 4}, 2 * 4 * 4 * 17**2),  # 2 mapped layers, 4 heads
    ("Pico/4", {}, 2 * 4 * 2 * 17**2),  # the patch-7 teacher's 17 tokens, resampled to 50
  ],
)
def test_memory_estimate_counts_a_teacher_of_another_shapes_maps(
  tiny_config, tmp_path, variant, teacher_fields, expected
):
  """Maps mixed or resampled from the teacher's own heads and tokens: those maps come on top."""
  config = tiny_config(mode="distill", layers="all", layer_map="uniform", head_map="group")
  config.model.variant = variant
  student = vit.build(teachers.model_config(config, str(tmp_path)))
  teacher = vit.build({"variant": "Pico/7", "num_classes": 0, **teacher_fields})
  spec = transfer_spec.resolve(config.transfer, student, teacher, config.data.image_size)
  mesh = sharding.make_mesh(4, 2)
  lr, total = build.schedule(config, 320)
  task = build.task(config, student, teacher, spec, lr, total)
  tx = build.optimizer(config, task, lr, student.depth)
  found = memory.estimate(config, mesh, student, spec, build.init_fn(task, tx), None)
  examples = config.data.batch_size // mesh.size
  assert found.get("teacher_maps", 0) == examples * expected
