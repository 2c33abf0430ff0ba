"""`transfer.target_temperature`: the taught maps are softmax(teacher logits / T) on every path (maps
or q and k, in the blocks or stacked, direct, blockwise or Pallas, fixed or learned head mixes, copy,
stored targets), checked against numpy formulas of the definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.errors import ConfigError
from at_jax.transfer import loss, spec, targets
from tests.transfer.conftest import build_model, resolve_distill, teacher_targets_and_out


def _peaked(params):
  """Weights whose maps are peaked (entropy ~2.4 nats of 2.8 over 17 keys): random ones attend almost
  uniformly, where every temperature gives nearly the same loss."""
  return jax.tree.map(lambda x: 3 * x, params)


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _expected_loss(
  teacher_logits, student_logits, temperature: float, weight: float = 3.0
) -> float:
  """weight * sum over layers of the mean over batch, heads and queries of
  -sum_k softmax(t / T)_k log_softmax(s)_k, in float64."""
  p = _softmax(np.asarray(teacher_logits, np.float64) / temperature)
  s = np.asarray(student_logits, np.float64)
  log_q = s - s.max(-1, keepdims=True)
  log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
  return weight * float(-(p * log_q).sum(-1).mean((1, 2, 3)).sum())


@pytest.mark.parametrize("impl", ["direct", "blockwise", "pallas"])
def test_the_loss_reads_tempered_maps_on_every_path(setup, impl):
  """From q and k in the blocks (q / T), from stacked logits and from stored logits: one loss, the
  definition's; T = 1 gives another value (the test could fail)."""
  student, teacher, sp, tp, images = setup
  layers, sp, tp = np.asarray([1, 3]), _peaked(sp), _peaked(tp)
  _, s_out = student.apply({"params": sp}, images, train=False)
  for temperature in (0.5, 2.0):
    t = resolve_distill(
      student, teacher, layers="1,3", loss_impl=impl, target_temperature=temperature
    )
    handed, t_out = teacher_targets_and_out(teacher, tp, images, t)
    assert set(handed) == {"q", "k"}
    want = _expected_loss(t_out["attn_logits"][layers], s_out["attn_logits"][layers], temperature)
    target = targets.attn_target(handed, t)
    _, out = student.apply({"params": sp}, images, train=False, attn_target=target)
    np.testing.assert_allclose(loss.distill_loss(out, handed, t), want, rtol=1e-5)
    np.testing.assert_allclose(loss.distill_loss(s_out, handed, t), want, rtol=1e-5)
    stored = {"teacher_attn_logits": jnp.swapaxes(t_out["attn_logits"][layers], 0, 1)}
    from_store = targets.precomputed_targets(stored, t)
    np.testing.assert_allclose(loss.distill_loss(s_out, from_store, t), want, rtol=1e-5)
    plain = _expected_loss(t_out["attn_logits"][layers], s_out["attn_logits"][layers], 1.0)
    assert abs(plain - want) > 100 * 1e-5 * abs(want)  # far outside the tolerance above


def test_mixed_maps_are_tempered_after_mixing():
  """head_map "group": each student head's map is (its group's mean map)^(1/T), renormalised; a learned
  mix at its start (zeros: the mean) is the tempered mean map, as head_map "mean" at T is."""
  student, teacher = build_model(), build_model(depth=8, num_heads=4)
  images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  tp = _peaked(teacher.init(jax.random.key(4), images, train=False)["params"])
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  t_probs = _softmax(np.asarray(t_out["attn_logits"][np.asarray([1, 3, 5, 7])], np.float64))
  temperature = 2.0
  sharpen = lambda p: _softmax(np.log(p) / temperature)
  for head_map, mix in (
    ("group", [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]),
    ("mean", [[0.25] * 4] * 2),
  ):
    t = resolve_distill(
      student,
      teacher,
      layer_map="uniform",
      head_map=head_map,
      target_temperature=temperature,
    )
    got = jax.nn.softmax(targets.run_teacher(teacher, tp, images, t)["attn_logits"], -1)
    want = sharpen(np.einsum("st,SBtqk->SBsqk", np.asarray(mix), t_probs))
    np.testing.assert_allclose(got, want, atol=1e-5)
  learned = resolve_distill(
    student, teacher, layer_map="uniform", head_map="learned", target_temperature=temperature
  )
  handed = targets.run_teacher(teacher, tp, images, learned)
  zeros = jnp.zeros((4, student.num_heads, teacher.num_heads))
  got = targets.learned_mix(handed, zeros, learned)["attn_probs"]
  np.testing.assert_allclose(got, want, atol=1e-5)  # the mean's, tempered


def test_copy_attends_with_tempered_maps(setup):
  """Copy replaces the student's maps by softmax(teacher logits / T): the override holds logits / T."""
  student, teacher, _, tp, images = setup
  t = spec.resolve({"mode": "copy", "target_temperature": 0.25}, student, teacher, 16)
  override = targets.copy_override(targets.run_teacher(teacher, tp, images, t), t)
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  np.testing.assert_allclose(override["logits"], t_out["attn_logits"] / 0.25, rtol=1e-6)


@pytest.mark.parametrize(
  "cfg",
  [
    {"target_temperature": 0},
    {"target_temperature": -1.0},
    {"target_temperature": float("inf")},
    {"target_temperature": "2"},
    {"target_temperature": True},
    {"target_temperature": 2.0, "what": "q"},
  ],
)
def test_a_bad_temperature_names_its_field(setup, cfg):
  student, teacher, *_ = setup
  with pytest.raises(ConfigError) as e:
    resolve_distill(student, teacher, **cfg)
  assert e.value.field == "transfer.target_temperature", e.value
  assert resolve_distill(student, teacher, what="q", target_temperature=1).target_temperature == 1.0
