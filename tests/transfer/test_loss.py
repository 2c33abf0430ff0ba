"""The distillation loss: its minimum, the paper's reduction, stability, no teacher gradient, q/k/v MSE, and
the in-block loss against the reference formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.models import vit
from at_jax.ops import attn_ce
from at_jax.transfer import loss, spec, targets
from tests.transfer.conftest import S, build_model, resolve_distill, teacher_targets_and_out


def test_distill_loss_is_teacher_entropy_when_student_equals_teacher(setup):
  student, teacher, sp, tp, images = setup
  transfer = resolve_distill(student, teacher, layers="first:3")
  teacher_targets, t_out = teacher_targets_and_out(teacher, tp, images, transfer)
  _, s_out = student.apply({"params": tp}, images, train=False)  # the student *is* the teacher
  value = loss.distill_loss(s_out, teacher_targets, transfer)
  p = jax.nn.softmax(t_out["attn_logits"][:3], -1)
  entropy = -jnp.sum(p * jnp.log(p), -1)  # [3, B, H, N]
  np.testing.assert_allclose(value, 3.0 * entropy.mean(axis=(1, 2, 3)).sum(), rtol=1e-5)
  # It is the minimum: any other student attention costs more, and the gradient there is ~0.
  noise = jax.random.normal(jax.random.key(7), s_out["attn_logits"].shape)
  other = {"attn_logits": s_out["attn_logits"] + noise}
  assert loss.distill_loss(other, teacher_targets, transfer) > value + 0.1
  g = jax.grad(lambda o: loss.distill_loss({"attn_logits": o}, teacher_targets, transfer))(
    s_out["attn_logits"]
  )
  assert float(jnp.abs(g).max()) < 1e-6


def test_distill_loss_reduction_matches_paper_formula(setup):
  """sum over layers of mean over (batch, heads, queries) of -sum_j p_t log p_s, times the weight."""
  student, teacher, sp, tp, images = setup
  transfer = resolve_distill(student, teacher, layers="1,3", weight=2.5)
  teacher_targets, t_out = teacher_targets_and_out(teacher, tp, images, transfer)
  _, s_out = student.apply({"params": sp}, images, train=False)
  expected = 0.0
  for layer in (1, 3):
    pt = np.asarray(jax.nn.softmax(t_out["attn_logits"][layer], -1), np.float64)
    ls = np.asarray(jax.nn.log_softmax(s_out["attn_logits"][layer], -1), np.float64)
    expected += np.mean(-(pt * ls).sum(-1))
  np.testing.assert_allclose(
    loss.distill_loss(s_out, teacher_targets, transfer), 2.5 * expected, rtol=1e-5
  )
  # A head subset averages over the selected heads only.
  one_head = resolve_distill(student, teacher, layers="1", heads="0", weight=1.0)
  pt = np.asarray(jax.nn.softmax(t_out["attn_logits"][1][:, 0], -1), np.float64)
  ls = np.asarray(jax.nn.log_softmax(s_out["attn_logits"][1][:, 0], -1), np.float64)
  np.testing.assert_allclose(
    loss.distill_loss(s_out, targets.teacher_targets(t_out, one_head), one_head),
    np.mean(-(pt * ls).sum(-1)),
    rtol=1e-5,
  )


def test_distill_loss_stable_for_extreme_logits():
  transfer = spec.Transfer("distill", "attn", (0,), (0,), 1.0, "jointly", 1, 1)
  teacher_logits = jnp.array([[[[[1e4, -1e4, 0.0]]]]])
  student_logits = jnp.array([[[[[-1e4, 1e4, 0.0]]]]])
  value = loss.distill_loss(
    {"attn_logits": student_logits}, {"attn_logits": teacher_logits}, transfer
  )
  assert np.isfinite(value) and float(value) == pytest.approx(2e4, rel=1e-6)


def test_teacher_gets_no_gradient(setup):
  student, teacher, sp, tp, images = setup
  transfer = resolve_distill(student, teacher)

  def distill(sp_, tp_):
    teacher_targets = targets.run_teacher(teacher, tp_, images, transfer)
    _, s_out = student.apply({"params": sp_}, images, train=False)
    return loss.distill_loss(s_out, teacher_targets, transfer)

  gs, gt = jax.grad(distill, argnums=(0, 1))(sp, tp)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(gt))
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(gs))


@pytest.mark.parametrize("what", ["q", "k", "v"])
def test_distill_qkv_variants(setup, what):
  """Distill: MSE, zero when student == teacher, positive otherwise, as the direct formula."""
  student, teacher, sp, tp, images = setup
  cfg = {"mode": "copy", "what": what, "layers": "first:2"}
  copy = spec.resolve(cfg, student, teacher, S)
  teacher_targets, t_out = teacher_targets_and_out(teacher, tp, images, copy)
  transfer = resolve_distill(student, teacher, what=what, layers="first:2", weight=1.0)
  _, same = student.apply({"params": tp}, images, train=False, want_qkv=True)
  assert float(loss.distill_loss(same, teacher_targets, transfer)) == pytest.approx(0.0, abs=1e-10)
  _, other = student.apply({"params": sp}, images, train=False, want_qkv=True)
  expected = (
    np.mean((np.asarray(other[what][:2]) - np.asarray(t_out[what][:2])) ** 2, axis=(1, 2, 4))
    .mean(1)
    .sum()
  )
  np.testing.assert_allclose(
    loss.distill_loss(other, teacher_targets, transfer), expected, rtol=1e-5
  )


def test_loss_block_reaches_the_streamed_loss(setup, monkeypatch):
  """`transfer.loss_block` is the tile size of every selected layer's loss, through `attn_target`."""
  student, teacher, sp, tp, images = setup
  transfer = resolve_distill(student, teacher, layers="0,2", loss_impl="blockwise", loss_block=16)
  teacher_targets, _ = teacher_targets_and_out(teacher, tp, images, transfer)
  seen, real = [], attn_ce.attention_ce

  def spy(*args, **kw):
    seen.append((kw["block_q"], kw["block_k"]))
    return real(*args, **kw)

  monkeypatch.setattr(attn_ce, "attention_ce", spy)
  target = targets.attn_target(teacher_targets, transfer)
  student.apply({"params": sp}, images, train=False, attn_target=target)
  assert seen == [(16, 16)] * 2


def _distill_grads(student, sp, images, teacher_targets, transfer, via_encoder):
  """(loss, grads) of the distill term computed inside the encoder or by the reference formula."""

  def distill(p):
    target = targets.attn_target(teacher_targets, transfer) if via_encoder else None
    _, out = student.apply({"params": p}, images, train=False, attn_target=target)
    return loss.distill_loss(out, teacher_targets, transfer)

  return jax.value_and_grad(distill)(sp)


@pytest.mark.parametrize(
  "impl,scan",
  [
    ("direct", False),
    ("direct", True),
    ("blockwise", False),
    ("blockwise", True),
    ("pallas", False),
  ],
)
def test_in_encoder_loss_equals_reference(setup, impl, scan):
  """Layer-by-layer loss inside the blocks (from the teacher's q and k, or its stored maps) equals the
  reference formula on stacked maps, in value and in the student's gradients, loop or scan."""
  student, teacher, sp, tp, images = setup
  transfer = resolve_distill(student, teacher, layers="0,2,3", heads="1", loss_impl=impl)
  teacher_targets, t_out = teacher_targets_and_out(teacher, tp, images, transfer)
  assert set(teacher_targets) == {"q", "k"}
  if scan:
    student, sp = build_model(scan=True), vit.loop_to_scan(sp)
  ref, g_ref = _distill_grads(student, sp, images, teacher_targets, transfer, via_encoder=False)
  got, g = _distill_grads(student, sp, images, teacher_targets, transfer, via_encoder=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)
  if impl == "direct":  # stored maps give the same loss
    maps = {"attn_logits": t_out["attn_logits"][np.asarray(transfer.layers)]}
    np.testing.assert_allclose(
      _distill_grads(student, sp, images, maps, transfer, via_encoder=True)[0], ref, rtol=1e-5
    )
