"""Attention agreement and attention-map figures."""

import jax
import numpy as np
import pytest

from at_jax.evaluate import attention as evaluate
from at_jax.models import vit


def test_agreement_identical_and_different():
  logits = jax.random.normal(jax.random.key(0), (3, 2, 2, 5, 5)) * 3
  same = evaluate.attention_agreement(logits, logits)
  np.testing.assert_allclose(same["cross_entropy"], same["teacher_entropy"], rtol=1e-5)
  np.testing.assert_allclose(same["jsd"], 0.0, atol=1e-6)
  other = evaluate.attention_agreement(logits, -logits)
  assert np.all(other["jsd"] > 0.05) and np.all(other["jsd"] <= np.log(2) + 1e-6)
  assert np.all(other["cross_entropy"] > other["teacher_entropy"])
  # JSD against a numpy reference for one layer.
  p = np.asarray(jax.nn.softmax(logits[0], -1), np.float64)
  q = np.asarray(jax.nn.softmax(-logits[0], -1), np.float64)
  m = (p + q) / 2
  ref = 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)
  assert other["jsd"][0] == pytest.approx(ref.mean(), rel=1e-4)


def test_head_statistics_against_numpy():
  """[L, H] entropy, mass on the query's own token and on the prefix (cls and a register) against
  numpy; scaled weights give peaked maps, which rank the heads apart."""
  model = vit.build({"variant": "Pico/7", "num_classes": 10, "num_registers": 1})
  images = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  params = jax.tree.map(
    lambda x: 3 * x, model.init(jax.random.key(1), images, train=False)["params"]
  )
  got = evaluate.head_statistics(model, params, images)
  _, out = model.apply({"params": params}, images, train=False)
  logits = np.asarray(out["attn_logits"], np.float64)  # [L, B, H, N, N]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = {
    "entropy": -(p * np.log(p)).sum(-1),
    "self": np.diagonal(p, axis1=-2, axis2=-1),
    "prefix": p[..., :2].sum(-1),  # cls and the register
  }
  assert set(got) == set(want) == set(evaluate.HEAD_STATISTICS)
  for key, per_query in want.items():
    assert got[key].shape == (model.depth, model.num_heads)
    np.testing.assert_allclose(got[key], per_query.mean(axis=(1, 3)), rtol=1e-5, err_msg=key)
  assert np.all(got["entropy"] < np.log(18)) and np.ptp(got["entropy"]) > 0.01


def test_query_maps_and_figure(tmp_path):
  model = vit.build({"variant": "Pico/7", "num_classes": 10, "num_registers": 2})
  images = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  params = model.init(jax.random.key(1), images, train=False)["params"]
  _, out = model.apply({"params": params}, images, train=False)
  maps = evaluate.query_maps(out["attn_logits"], num_prefix=model.num_prefix)
  assert maps.shape == (2, 2, 4, 4) and np.all(maps >= 0)
  assert np.all(maps.sum((-1, -2)) <= 1 + 1e-6)  # prefix tokens take the rest of the mass
  agreement = evaluate.compare_attention(
    {"a": (model, params), "b": (model, params)}, np.asarray(images), str(tmp_path / "maps.png")
  )
  np.testing.assert_allclose(agreement["b"]["jsd"], 0, atol=1e-6)
  png = (tmp_path / "maps.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert "layer" in evaluate.format_agreement(agreement, "a")


def test_models_of_other_depths_and_heads_compare_on_what_they_share(tmp_path):
  """A feature-distilled student may be shallower and have other heads than its teacher."""
  images = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  deep = vit.build({"variant": "Pico/7", "num_classes": 10, "depth": 3, "num_heads": 4})
  shallow = vit.build({"variant": "Pico/7", "num_classes": 10})  # depth 2, 2 heads
  params = {m: m.init(jax.random.key(1), images, train=False)["params"] for m in (deep, shallow)}
  agreement = evaluate.compare_attention(
    {"teacher": (deep, params[deep]), "student": (shallow, params[shallow])},
    np.asarray(images),
    str(tmp_path / "maps.png"),
  )
  assert agreement["student"]["jsd"].shape == (2,)
  # The layers both have, each model's maps averaged over its own heads (in probability, not logits).
  _, out = deep.apply({"params": params[deep]}, images, train=False)
  logits = np.asarray(out["attn_logits"], np.float64)
  a, b = evaluate._comparable(logits, logits[:2, :, :2])  # pylint: disable=protected-access
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  assert a.shape == (2, 2, 1, 17, 17) and b.shape == a.shape
  np.testing.assert_allclose(np.exp(a), probs[:2].mean(2, keepdims=True), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
    np.exp(b), probs[:2, :, :2].mean(2, keepdims=True), rtol=1e-4, atol=1e-7
  )
  assert (tmp_path / "maps.png").stat().st_size > 5000


@pytest.mark.parametrize(
  "teacher_fields,transfer",
  [
    (dict(depth=4, num_heads=4), dict(layer_map="uniform", head_map="group")),
    (dict(patch_size=14), dict(prefix="drop")),  # a 2x2 teacher grid onto the student's 4x4
  ],
)
def test_each_student_layer_is_compared_with_the_maps_it_was_taught(
  tmp_path, teacher_fields, transfer
):
  """The attention report of a teacher of another shape: student layer i against the teacher layer the
  layer map pairs with it, its heads grouped and tokens resampled as in training, by hand."""
  from at_jax.transfer import grids, pairing, spec  # pylint: disable=import-outside-toplevel

  images = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  teacher = vit.build({"variant": "Pico/7", "num_classes": 0, **teacher_fields})
  student = vit.build({"variant": "Pico/7", "num_classes": 10})  # depth 2, 2 heads, 17 tokens
  sharp = lambda params: jax.tree_util.tree_map_with_path(  # random init attends near uniformly
    lambda path, x: 4 * x if "query" in str(path) or "key" in str(path) else x, params
  )
  tp = sharp(teacher.init(jax.random.key(1), images, train=False)["params"])
  sp = sharp(student.init(jax.random.key(2), images, train=False)["params"])
  t = spec.resolve({"mode": "distill", **transfer}, student, teacher, 28)
  found = evaluate.compare_with_teacher(
    student, sp, teacher, tp, np.asarray(images), t, str(tmp_path / "maps.png")
  )
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  _, s_out = student.apply({"params": sp}, images, train=False)
  p_t = np.asarray(jax.nn.softmax(t_out["attn_logits"], -1), np.float64)[list(t.teacher_layers)]
  mix = pairing.head_mixing(t.head_map, 2, teacher.num_heads)
  if mix is not None:
    p_t = np.einsum("st,lbtqk->lbsqk", mix, p_t)
  skip = t.student_prefix
  if t.token_map:
    q, k = grids.token_weights(*t.token_map)
    p_t = np.einsum("sq,lbhqk,tk->lbhst", q, p_t, k)
    p_t /= p_t.sum(-1, keepdims=True)
  own = np.asarray(s_out["attn_logits"])[..., skip:, skip:]
  expected = evaluate.attention_agreement(np.log(p_t), own)
  np.testing.assert_allclose(found["jsd"], expected["jsd"], rtol=1e-4, atol=1e-6)
  assert (
    list(found["teacher_layer"])
    == list(t.teacher_layers)
    == ([1, 3] if mix is not None else [0, 1])
  )
  assert "teacher_layer" in evaluate.format_agreement({"student": found}, "teacher")
  assert np.all(found["jsd"] > 1e-3)  # sharpened maps that differ: a comparison that can fail
  assert (tmp_path / "maps.png").stat().st_size > 5000
