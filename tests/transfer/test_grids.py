"""A teacher of another token grid: the resampling weights by hand, mass kept, prefix tokens, the exact
identity for equal grids, the loss against numpy, and the errors."""

import jax
import numpy as np
import pytest

from at_jax.errors import ConfigError
from at_jax.transfer import grids, loss, spec, targets
from tests.transfer.conftest import build_model, resolve_distill


def test_axis_weights_by_hand():
  q, k = grids.axis_weights(4, 2)  # shrinking: each teacher cell lies in one student cell
  np.testing.assert_allclose(q, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  np.testing.assert_allclose(k, [[1, 1, 0, 0], [0, 0, 1, 1]])
  q, k = grids.axis_weights(3, 2)  # cells [0, 1/3, 2/3, 1] against [0, 1/2, 1]
  np.testing.assert_allclose(q, [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
  np.testing.assert_allclose(k, [[1, 0.5, 0], [0, 0.5, 1]])  # each teacher cell's mass, split
  q, k = grids.axis_weights(2, 4)  # growing: bilinear at the centres 0, 0.25, 0.75, 1 (clamped)
  np.testing.assert_allclose(q, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  np.testing.assert_allclose(k, q / 2)
  q, k = grids.axis_weights(5, 5)
  np.testing.assert_array_equal(q, np.eye(5))
  np.testing.assert_array_equal(k, np.eye(5))


def _maps(shape, seed=0):
  logits = jax.random.normal(jax.random.key(seed), shape) * 3
  return logits, np.asarray(jax.nn.softmax(logits, -1), np.float64)


def test_shrinking_keeps_each_rows_mass_and_equal_grids_are_exact():
  logits, probs = _maps((2, 3, 36, 36))  # a 6x6 grid, no prefix
  q, k = grids.token_weights(False, 0, 6, False, 3)
  resampled = np.einsum("sq,bhqk,tk->bhst", q, probs, k)
  np.testing.assert_allclose(resampled.sum(-1), 1.0, rtol=1e-6)  # before any renormalisation
  out = np.exp(np.asarray(grids.resample_logits(logits, (q, k)), np.float64))
  np.testing.assert_allclose(out, resampled, rtol=1e-5, atol=1e-7)
  same = grids.token_weights(True, 0, 6, True, 6)
  np.testing.assert_allclose(
    grids.resample_logits(*_maps((2, 3, 37, 37))[:1], same),
    jax.nn.log_softmax(_maps((2, 3, 37, 37))[0], -1),
    atol=1e-6,
  )


def test_prefix_tokens_keep_cls_and_drop_registers():
  """Teacher [cls, 2 registers, 2x2 patches] -> student [cls, 1x1 patch]: the cls row and column are the
  teacher's, the register columns' mass is dropped, every row renormalised: by hand in numpy."""
  logits, p = _maps((1, 1, 7, 7))
  weights = grids.token_weights(True, 2, 2, True, 1)
  out = np.exp(np.asarray(grids.resample_logits(logits, weights), np.float64))[0, 0]
  p = p[0, 0]
  rows = np.stack([p[0], p[3:].mean(0)])  # the cls row; the 4 patch rows averaged into one
  cols = np.stack(
    [rows[:, 0], rows[:, 3:].sum(1)], 1
  )  # cls column; the patches' mass; no registers
  np.testing.assert_allclose(out, cols / cols.sum(1, keepdims=True), rtol=1e-5)


@pytest.fixture(scope="module")
def grid_pair():
  """A patch-4 student (4x4 grid on 16 px) and a patch-8 teacher (2x2 grid), params and images."""
  student, teacher = build_model(), build_model(patch_size=8)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  sp = student.init(jax.random.key(1), images, train=False)["params"]
  tp = teacher.init(jax.random.key(2), images, train=False)["params"]
  return student, teacher, sp, tp, images


def test_the_loss_from_a_coarser_teacher_equals_numpy(grid_pair):
  student, teacher, sp, tp, images = grid_pair
  t = resolve_distill(student, teacher, layers="1,3")
  assert t.token_map == (1, 0, 2, 1, 4) and t.target_keys == ("attn_logits",)
  handed = targets.run_teacher(teacher, tp, images, t)
  _, s_out = student.apply(
    {"params": sp}, images, train=False, attn_target=targets.attn_target(handed, t)
  )
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  q, k = grids.token_weights(*t.token_map)
  expected = 0.0
  for layer in t.layers:
    p_t = np.asarray(jax.nn.softmax(t_out["attn_logits"][layer], -1), np.float64)
    p = np.einsum("sq,bhqk,tk->bhst", q, p_t, k)
    p /= p.sum(-1, keepdims=True)
    log_q = np.asarray(jax.nn.log_softmax(s_out["attn_logits"][layer], -1), np.float64)
    expected += np.mean(-(p * log_q).sum(-1))
  np.testing.assert_allclose(loss.distill_loss(s_out, handed, t), 3.0 * expected, rtol=2e-5)


def _patch_only_loss(t_logits, s_logits, q, k, t_prefix, s_prefix):
  """numpy: the teacher's patch rows over patch keys, resampled by (q, k) and renormalised, against the
  student's patch rows over patch keys, renormalised; mean over batch, heads and queries."""
  p_t = np.asarray(jax.nn.softmax(t_logits, -1), np.float64)[..., t_prefix:, t_prefix:]
  p = np.einsum("sq,bhqk,tk->bhst", q, p_t, k)
  p /= p.sum(-1, keepdims=True)
  s = np.asarray(s_logits, np.float64)[..., s_prefix:, s_prefix:]
  log_q = s - np.log(np.exp(s).sum(-1, keepdims=True))
  return np.mean(-(p * log_q).sum(-1))


@pytest.mark.parametrize("same_grid", [False, True])
def test_prefix_drop_scores_patch_tokens_only_as_numpy(grid_pair, same_grid):
  """transfer.prefix=drop (HASTE): the cls row and column leave both maps (and the student's register,
  which 'keep' refuses), each renormalised over patch keys; through the student's blocks and the reference
  path alike, from a coarser teacher and from one of the student's own grid."""
  student, teacher, sp, tp, images = grid_pair
  student = build_model(num_registers=1)
  sp = student.init(jax.random.key(1), images, train=False)["params"]
  if same_grid:
    teacher = build_model()  # cls + 16 patches, no register
    tp = teacher.init(jax.random.key(3), images, train=False)["params"]
  t = resolve_distill(student, teacher, layers="0,1", prefix="drop")
  assert (t.token_map[3], t.student_prefix, t.target_keys) == (0, 2, ("attn_logits",))
  handed = targets.run_teacher(teacher, tp, images, t)
  _, s_out = student.apply(
    {"params": sp}, images, train=False, attn_target=targets.attn_target(handed, t)
  )
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  q, k = grids.token_weights(*t.token_map)
  expected = sum(
    _patch_only_loss(t_out["attn_logits"][i], s_out["attn_logits"][i], q[:, 1:], k[:, 1:], 1, 2)
    for i in t.layers
  )
  np.testing.assert_allclose(loss.distill_loss(s_out, handed, t), 3.0 * expected, rtol=2e-5)
  reference = {"attn_logits": s_out["attn_logits"]}  # no per-layer "attn_ce": the stacked maps
  np.testing.assert_allclose(loss.distill_loss(reference, handed, t), 3.0 * expected, rtol=2e-5)


def test_grid_errors_name_the_field(grid_pair):
  student, teacher, *_ = grid_pair
  for cfg, field in (
    ({"what": "q"}, "teacher.init"),
    ({"loss_impl": "blockwise"}, "transfer.loss_impl"),
    ({"prefix": "both"}, "transfer.prefix"),
    ({"prefix": "drop", "what": "q"}, "transfer.prefix"),
    ({"prefix": "drop", "mode": "copy"}, "transfer.prefix"),
    ({"prefix": "drop", "loss_impl": "blockwise"}, "transfer.loss_impl"),
  ):
    with pytest.raises(ConfigError) as e:
      resolve_distill(student, teacher, **cfg)
    assert e.value.field == field, (cfg, str(e.value))
  with pytest.raises(ConfigError) as e:
    resolve_distill(build_model(num_registers=1), teacher)
  assert e.value.field == "transfer.prefix"
  with pytest.raises(ConfigError) as e:  # stored targets are the teacher on data.image_size images
    spec.resolve(
      {"mode": "distill", "source": "precomputed"}, student, teacher, 16, teacher_image_size=32
    )
  assert e.value.field == "teacher.image_size"
  with pytest.raises(ConfigError) as e:
    resolve_distill(student, build_model(patch_size=8, class_token=False, pool="gap"))
  assert e.value.field == "model.class_token"
  # A student without cls from a teacher with one: the teacher's cls row and column are dropped.
  t = resolve_distill(build_model(class_token=False, pool="gap"), teacher)
  assert t.token_map == (1, 0, 2, 0, 4)


def test_teacher_image_size_gives_the_teacher_the_students_grid(grid_pair):
  """The patch-8 teacher sees the 16 px images at 32 px: a 4x4 grid, the student's. No resampling of
  maps (q and k stream as for equal shapes); the teacher's targets are its own on the resized images."""
  student, teacher, sp, tp, images = grid_pair
  t = spec.resolve({"mode": "distill"}, student, teacher, 16, teacher_image_size=32)
  assert (t.token_map, t.teacher_image_size, t.target_keys) == ((), 32, ("q", "k"))
  big = jax.image.resize(images, (2, 32, 32, 3), "bilinear")
  big_teacher = build_model(patch_size=8)  # its position table sized for 32 px
  big_tp = big_teacher.init(jax.random.key(2), big, train=False)["params"]
  handed = targets.run_teacher(big_teacher, big_tp, images, t)
  _, out = big_teacher.apply({"params": big_tp}, big, train=False, want_qkv=True)
  np.testing.assert_allclose(handed["q"], out["q"][np.asarray(t.layers)], rtol=1e-6)
  own = spec.resolve({"mode": "distill"}, student, teacher, 16, teacher_image_size=16)
  assert own.teacher_image_size == 0 and own.token_map  # the student's size: maps resampled
  with pytest.raises(ConfigError) as e:
    spec.resolve({"mode": "distill"}, student, teacher, 16, teacher_image_size=36)  # patch 8 ∤ 36
  assert e.value.field == "teacher.image_size"
