"""The sharded train step: 1 device == (4, 2) mesh, precomputed == jointly, shared drop-path masks, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from at_jax import sharding
from at_jax.data import mixup
from at_jax.models import encoder, vit
from at_jax.training import classify as train_step
from at_jax.training import state as train_state
from at_jax.transfer import loss, spec, targets
from tests.training.steps import B, S, assert_params_close, build_step

STEPS = 3


def _batches(with_targets=None):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    b = {
      "image": rng.normal(size=(B, S, S, 3)).astype(np.float32),
      "label": rng.integers(0, 10, B).astype(np.int32),
      "mask": np.ones(B, bool),
    }
    if with_targets is not None:
      b.update(with_targets(b))
    out.append(b)
  return out


def _run(mode, devices, fsdp, batches, **kw):
  """STEPS sharded steps + one eval; returns (losses, params, eval sums, state)."""
  student, teacher, t, schedule, tx, tp = build_step(mode, **kw)
  mesh = sharding.make_mesh(-1, fsdp, devices)
  state, shardings = train_state.create_sharded_state(
    lambda r: train_step.init_state(student, tx, r, S), jax.random.key(0), mesh
  )
  t_shardings = sharding.tree_shardings(mesh, tp)
  step = train_step.make_train_step(
    student, teacher, tx, t, schedule=schedule, label_smoothing=0.1, ema_decay=0.9
  )
  train, evaluate = train_state.jit_steps(
    step, train_step.make_eval_step(student, teacher, t), mesh, shardings, t_shardings
  )
  tp = jax.device_put(tp, t_shardings)
  losses = []
  for b in batches:
    b = {k: v for k, v in b.items() if k != "mask"}
    state, m = train(state, sharding.global_batch(b, mesh), tp)
    losses.append({k: float(v) for k, v in m.items()})
  sums = evaluate(state.params, state.ema_params, sharding.global_batch(batches[0], mesh), tp)
  return losses, jax.device_get(state.params), jax.device_get(sums), state


@pytest.mark.parametrize(
  "mode,kw",
  [
    ("distill", {"drop_path": 0.2}),
    ("copy", {}),
    ("none", {"drop_path": 0.2}),
    ("distill", {"what": "q"}),
    ("distill", {"loss_impl": "blockwise"}),
    ("distill", {"loss_impl": "pallas"}),
  ],
)
def test_one_device_equals_eight_device_mesh(mode, kw):
  batches = _batches()
  l1, p1, e1, _ = _run(mode, jax.devices()[:1], 1, batches, **kw)
  l8, p8, e8, state8 = _run(mode, jax.devices(), 2, batches, **kw)
  assert state8.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"][
    "kernel"
  ].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  for a, b in zip(l1, l8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert_params_close(p1, p8)
  assert e1 == e8
  if mode == "distill":
    assert all(x["distill_loss"] > 0 for x in l1)
  else:
    assert all(x["distill_loss"] == 0 for x in l1)
  assert l1[-1]["loss"] != l1[0]["loss"]  # it trains


@pytest.mark.parametrize("what", ["attn", "k"])
def test_precomputed_equals_jointly(what):
  student, teacher, t, *_, tp = build_step("distill", what=what, layers="0,1")

  def stored_targets(b):  # what launch/precompute would store: example-major [B, S, ...]
    _, out = teacher.apply({"params": tp}, b["image"], train=False, want_qkv=True)
    return {
      f"teacher_{k}": np.asarray(jnp.swapaxes(v, 0, 1))
      for k, v in targets.teacher_targets(out, t).items()
    }

  batches = _batches(stored_targets)
  joint, pj, *_ = _run("distill", jax.devices(), 2, batches, what=what, layers="0,1")
  pre, pp, *_ = _run(
    "distill", jax.devices(), 2, batches, what=what, layers="0,1", source="precomputed"
  )
  for a, b in zip(joint, pre):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
  assert_params_close(pj, pp)


def _sharp_params(model, seed=3, sharpened=("query", "key")):
  """Fresh params with the `sharpened` kernels scaled by 10: random init's attention is near-uniform
  and barely sensitive to its inputs; sharpened, a wrong teacher target shows in the gradient (and,
  with value and out too, the attention moves the predictions)."""
  params = model.init(jax.random.key(seed), jnp.zeros((1, S, S, 3)), train=False)["params"]
  kernels = {(name, "kernel") for name in sharpened}
  return jax.tree_util.tree_map_with_path(
    lambda p, x: 10 * x if tuple(getattr(k, "key", "") for k in p[-2:]) in kernels else x,
    params,
  )


def test_teacher_and_student_share_drop_path_masks():
  """With student == teacher and drop path on, the distill term is at its minimum (zero gradient)
  only if the teacher ran with the student's masks."""
  # Depth 4: masks of layers 1-2 change the inputs of later layers' attention (layer 0 has rate 0).
  student, teacher, t, *_ = build_step("distill", drop_path=0.5, layers="all", depth=4)
  tp = _sharp_params(student)
  batch = {k: jnp.asarray(v) for k, v in _batches()[0].items()}
  loss_fn = train_step.make_loss_fn(student, teacher, t, label_smoothing=0.0)
  distill = lambda p: loss_fn(p, batch, tp, jax.random.key(11))[1]["distill_loss"]
  g = jax.grad(distill)(tp)
  shared_max = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g))
  # Control: a teacher run without the student's masks is a different target; the gradient is not ~0.
  masks = encoder.sample_drop_masks(jax.random.key(11), B, student.depth, 0.5)

  def unshared(p):
    _, t_out = teacher.apply({"params": tp}, batch["image"], train=False, want_qkv=True)
    _, s_out = student.apply({"params": p}, batch["image"], train=True, drop_masks=masks)
    return loss.distill_loss(s_out, targets.teacher_targets(t_out, t), t)

  unshared_max = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(jax.grad(unshared)(tp)))
  assert unshared_max > 1e-2 and shared_max < 1e-4 * unshared_max, (shared_max, unshared_max)


def test_teacher_sees_the_mixed_batch():
  """Mixup/CutMix happen before the teacher runs: with student == teacher the distill term is minimal."""
  student, teacher, t, *_ = build_step("distill", layers="all")
  tp = _sharp_params(student)
  batch = {k: jnp.asarray(v) for k, v in _batches()[0].items()}
  mix = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)
  loss_fn = train_step.make_loss_fn(student, teacher, t, label_smoothing=0.1, mix=mix)
  for seed in range(3):
    _, aux = loss_fn(tp, batch, tp, jax.random.key(seed))
    assert aux["labels"].shape == (B, 10) and np.allclose(aux["labels"].sum(-1), 1.0)
    g = jax.grad(lambda p, s=seed: loss_fn(p, batch, tp, jax.random.key(s))[1]["distill_loss"])(tp)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) < 1e-5


def test_ema_and_metrics():
  batches = _batches()
  losses, params, _, state = _run("none", jax.devices(), 2, batches[:1])
  student, _, _, schedule, tx, _ = build_step("none")
  init = train_step.init_state(student, tx, jax.random.key(0), S)
  ema = jax.device_get(state.ema_params)
  jax.tree.map(
    lambda e, p0, p1: np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-5, atol=1e-7),
    ema,
    jax.device_get(init.params),
    params,
  )
  assert int(state.step) == 1
  assert losses[0]["lr"] == 0.0  # warmup starts at 0
  assert 0 <= losses[0]["train_acc"] <= 1 and losses[0]["grad_norm"] > 0


def test_apply_gradients_ema_closed_form():
  """EMA_t = d * EMA_{t-1} + (1 - d) * params_t, over two steps of SGD(1.0) with d = 0.9 (asymmetric:
  the inverted update (1 - d) * EMA + d * params differs). test_ema_and_metrics steps at lr 0."""
  p0 = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
  g1 = {"w": jnp.array([0.5, 1.0]), "b": jnp.array(-2.0)}
  g2 = {"w": jnp.array([-1.0, 0.25]), "b": jnp.array(4.0)}
  tx, d = optax.sgd(1.0), 0.9
  state = train_state.new_state(p0, tx, jax.random.key(0))
  s1 = train_state.apply_gradients(state, g1, tx, d)
  s2 = train_state.apply_gradients(s1, g2, tx, d)
  sub = lambda a, b: jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), a, b)
  p1, p2 = sub(p0, g1), sub(sub(p0, g1), g2)
  ema1 = jax.tree.map(lambda e, p: d * np.asarray(e) + (1 - d) * p, p0, p1)
  ema2 = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema1, p2)
  for got, want in ((s1.params, p1), (s2.params, p2), (s1.ema_params, ema1), (s2.ema_params, ema2)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  assert (int(s1.step), int(s2.step)) == (1, 2)
  # e.g. b: 0.9 * 3 + 0.1 * 5 = 3.2, the inverted update gives 0.1 * 3 + 0.9 * 5 = 4.8.
  np.testing.assert_allclose(s1.ema_params["b"], 3.2, rtol=1e-6)


def test_mixed_targets_are_smoothed_once():
  """With mixup/CutMix on, label smoothing is folded into the mixed targets (timm: smoothed one-hots,
  mixed with lam); the loss must not smooth them again. The recipe: mixup 0.8, cutmix 1.0, s = 0.1."""
  student, teacher, t, *_ = build_step("none")
  params = _sharp_params(student, sharpened=())
  # The head's init (std 0.02) gives near-uniform softmax, where any target has CE ~ log 10: sharpen it.
  params["head"] = jax.tree.map(lambda x: 100 * x, params["head"])
  batch = {k: jnp.asarray(v) for k, v in _batches()[0].items()}
  mix = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)
  s, key = 0.1, jax.random.key(7)
  loss_fn = train_step.make_loss_fn(student, teacher, t, label_smoothing=s, mix=mix)
  total, aux = loss_fn(params, batch, None, key)
  # The loss fn's split: (drop, model, mix). Unsmoothed mixed one-hots, then smoothed once (linear, so
  # equal to timm's lam * smooth(y) + (1 - lam) * smooth(y_flipped)).
  rng_mix = jax.random.split(key, 3)[2]
  images, hard_mix = mixup.mix_groups(
    rng_mix, batch["image"], batch["label"], 10, label_smoothing=0.0, **mix
  )
  expected = hard_mix * (1 - s) + s / 10
  logits, _ = student.apply({"params": params}, images, train=True, rngs={"dropout": key})
  np.testing.assert_allclose(aux["logits"], logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["labels"], expected, atol=1e-6)
  want = optax.softmax_cross_entropy(logits, expected).mean()
  np.testing.assert_allclose(aux["ce_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  # Control: twice-smoothed targets give a clearly different loss, so the check above can fail.
  twice = optax.softmax_cross_entropy(logits, optax.smooth_labels(expected, s)).mean()
  assert abs(float(twice) - float(want)) > 1e-2 * float(want), (twice, want)


def test_cross_entropy_label_smoothing_and_soft_labels():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  hard = train_step.cross_entropy(logits, jnp.array([0]), 0.0)
  np.testing.assert_allclose(hard, -jax.nn.log_softmax(logits)[0, 0], rtol=1e-6)
  smooth = train_step.cross_entropy(logits, jnp.array([0]), 0.3)
  target = np.array([0.8, 0.1, 0.1])
  np.testing.assert_allclose(smooth, -(target * jax.nn.log_softmax(logits)[0]).sum(), rtol=1e-6)
  soft = train_step.cross_entropy(logits, jnp.array([[0.8, 0.1, 0.1]]), 0.0)
  np.testing.assert_allclose(soft, smooth, rtol=1e-6)


def test_copy_eval_runs_teacher():
  """Copy-mode evaluation overrides with the teacher's maps; distill-mode evaluation does not. The
  labels are the copied student's predictions, so only the evaluation that copies scores 100%."""
  student, teacher, t_copy, *_ = build_step("copy", layers="all")
  t_distill = spec.resolve({"mode": "distill"}, student, teacher, S)
  tp, sp = _sharp_params(teacher), _sharp_params(student, 4, ("query", "key", "value", "out"))
  images = jnp.asarray(_batches()[0]["image"])
  _, out = teacher.apply({"params": tp}, images, train=False)
  override = {"logits": out["attn_logits"], "mask": jnp.ones((2, 2), bool)}
  copied = student.apply({"params": sp}, images, train=False, override=override)[0].argmax(-1)
  own = student.apply({"params": sp}, images, train=False)[0].argmax(-1)
  assert bool(jnp.any(copied != own))  # the teacher's maps change predictions: the test can fail
  batch = {"image": images, "label": copied, "mask": jnp.ones(B, bool)}
  for t, hits in ((t_copy, B), (t_distill, int(jnp.sum(own == copied)))):
    sums = train_step.make_eval_step(student, teacher, t)(sp, sp, batch, tp)
    assert (float(sums["top1"]), float(sums["count"])) == (100 * hits, B)


def test_copy_eval_of_averaged_maps_leaves_padding_out():
  """average="images" copies the maps averaged over the batch's real images: padding (mask False, zero
  images as the eval iterator pads) added to the batch changes no real example's prediction."""
  student, teacher, *_ = build_step("copy", layers="all")
  t = spec.resolve({"mode": "copy", "average": "images"}, student, teacher, S)
  tp, sp = _sharp_params(teacher), _sharp_params(student, 4, ("query", "key", "value", "out"))
  n, pads = 48, 16
  images = jnp.asarray(np.random.default_rng(1).normal(size=(n + pads, S, S, 3)), jnp.float32)
  images = images.at[n:].set(0.0)
  copied = targets.copy_override(targets.run_teacher(teacher, tp, images[:n], t), t)
  labels = student.apply({"params": sp}, images[:n], train=False, override=copied)[0].argmax(-1)
  evaluate = train_step.make_eval_step(student, teacher, t)
  real = {"image": images[:n], "label": labels, "mask": jnp.ones(n, bool)}
  padded = {
    "image": images,
    "label": jnp.concatenate([labels, jnp.zeros(pads, labels.dtype)]),
    "mask": jnp.arange(n + pads) < n,
  }
  for batch in (real, padded):
    sums = evaluate(sp, sp, batch, tp)
    assert (float(sums["top1"]), float(sums["count"])) == (100 * n, n)


@pytest.mark.parametrize("scan", [False, True])
def test_teacher_cut_after_its_last_transferred_layer_gives_the_same_loss(scan):
  """`train.setup` cuts the teacher after the last distilled layer (`vit.truncate`); with shared drop-path
  masks the cut teacher takes its layers' masks, and the step's losses and gradients do not change."""
  depth = 4
  student = vit.build(
    {"variant": "Pico/4", "num_classes": 10, "drop_path": 0.5, "depth": depth, "scan": scan}
  )
  teacher = vit.build({"variant": "Pico/4", "num_classes": 10, "depth": depth, "scan": scan})
  t = spec.resolve({"mode": "distill", "layers": "first:2"}, student, teacher, S)
  images = jnp.zeros((1, S, S, 3))
  sp = student.init(jax.random.key(0), images, train=False)["params"]
  tp = teacher.init(jax.random.key(9), images, train=False)["params"]
  short, short_tp = vit.truncate(teacher, tp, max(t.layers) + 1)
  assert short.depth == 2
  batch = {k: jnp.asarray(v) for k, v in _batches()[0].items()}
  results = []
  for model, params in ((teacher, tp), (short, short_tp)):
    loss_fn = train_step.make_loss_fn(student, model, t, label_smoothing=0.0)
    results.append(jax.value_and_grad(loss_fn, has_aux=True)(sp, batch, params, jax.random.key(11)))
  (full_loss, full_aux), full_grads = results[0]
  (cut_loss, cut_aux), cut_grads = results[1]
  assert float(full_aux["distill_loss"]) > 0
  np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), cut_grads, full_grads
  )
