"""Transfer modes: selection parsing, copy gradients, distill loss minimum, Q/K/V variants, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.errors import ConfigError
from at_jax.models import vit
from at_jax.transfer import spec as transfer

B, S = 2, 16


def _model(**kw):
  return vit.build({"variant": "Pico/4", "num_classes": 10, "depth": 4, **kw})


@pytest.fixture(scope="module")
def setup():
  student, teacher = _model(), _model()
  images = jax.random.normal(jax.random.key(0), (B, S, S, 3))
  sp = student.init(jax.random.key(1), images, train=False)["params"]
  tp = teacher.init(jax.random.key(2), images, train=False)["params"]
  return student, teacher, sp, tp, images


def _resolve(student, teacher, **cfg):
  return transfer.resolve({"mode": "distill", **cfg}, student, teacher, S)


@pytest.mark.parametrize(
  "spec,expected",
  [
    ("all", (0, 1, 2, 3, 4, 5)),
    ("first:2", (0, 1)),
    ("last:2", (4, 5)),
    ("end_layer:-2", (0, 1, 2, 3)),
    ("end_layer:0", (0, 1, 2, 3, 4, 5)),
    ("0,3,5", (0, 3, 5)),
    ([5, 1], (1, 5)),
    ("-1", (5,)),
    ((2,), (2,)),
  ],
)
def test_parse_selection(spec, expected):
  assert transfer.parse_selection(spec, 6, "transfer.layers") == expected


@pytest.mark.parametrize(
  "spec,match",
  [
    ("first:0", "count must be"),
    ("last:7", "count must be"),
    ("6", "out of range"),
    ("end_layer:-6", "end_layer"),
    ("end_layer:1", "end_layer"),
    ("top:3", "use 'all'"),
    ("1,1", "repeated"),
    ([], "selects nothing"),
    ("first:x", "integer"),
  ],
)
def test_parse_selection_errors(spec, match):
  with pytest.raises(ConfigError, match=match) as e:
    transfer.parse_selection(spec, 6, "transfer.layers")
  assert e.value.field == "transfer.layers"


def test_resolve_errors(setup):
  student, teacher, *_ = setup
  cases = [
    ({"mode": "attend"}, "transfer.mode"),
    ({"what": "qk"}, "transfer.what"),
    ({"source": "disk"}, "transfer.source"),
    ({"heads": "4"}, "transfer.heads"),
    ({"layers": "last:5"}, "transfer.layers"),
    ({"weight": 0.0}, "transfer.weight"),
    ({"mode": "copy", "source": "precomputed"}, "transfer.source"),
    ({"loss_impl": "flash"}, "transfer.loss_impl"),
    ({"loss_impl": "blockwise", "what": "q"}, "transfer.loss_impl"),
    ({"loss_impl": "blockwise", "average": "images"}, "transfer.loss_impl"),
    ({"mode": "copy", "loss_impl": "pallas"}, "transfer.loss_impl"),
  ]
  for cfg, field in cases:
    with pytest.raises(ConfigError) as e:
      _resolve(student, teacher, **cfg)
    assert e.value.field == field, cfg
  with pytest.raises(ConfigError, match="heads") as e:
    _resolve(student, _model(num_heads=4))
  assert e.value.field == "teacher.init"
  with pytest.raises(ConfigError, match="tokens") as e:
    _resolve(student, _model(patch_size=8))
  with pytest.raises(ConfigError, match="does not exist in the teacher"):
    _resolve(student, _model(depth=2), layers="last:1")
  with pytest.raises(ConfigError, match="drop-path") as e:
    _resolve(_model(drop_path=0.1), _model(depth=5))
  assert e.value.field == "model.drop_path"
  with pytest.raises(ConfigError, match="widths"):
    _resolve(student, _model(width=64), what="q")


def test_masks(setup):
  student, teacher, *_ = setup
  t = _resolve(student, teacher, layers="1,3", heads="1")
  np.testing.assert_array_equal(t.head_mask(), [[False, True], [False, True]])
  np.testing.assert_array_equal(t.layer_head_mask(), [[0, 0], [0, 1], [0, 0], [0, 1]])


def _teacher_targets(teacher, tp, images, t):
  _, out = teacher.apply({"params": tp}, images, train=False, want_qkv=True)
  return transfer.teacher_targets(out, t), out


def _copy_grads(student, sp, images, targets, t):
  def loss(p):
    logits, _ = student.apply(
      {"params": p}, images, train=False, override=transfer.copy_override(targets, t)
    )
    return jnp.sum(logits**2)

  return jax.grad(loss)(sp)


@pytest.mark.parametrize("heads", ["all", "1"])
def test_copy_attn_gives_zero_qk_gradient_in_copied_layers(setup, heads):
  student, teacher, sp, tp, images = setup
  t = transfer.resolve({"mode": "copy", "layers": "0,2", "heads": heads}, student, teacher, S)
  targets, _ = _teacher_targets(teacher, tp, images, t)
  grads = _copy_grads(student, sp, images, targets, t)
  for i in range(4):
    attn = grads["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"]
    for name in ("query", "key"):
      kernel = np.asarray(attn[name]["kernel"])  # [D, H, Dh]
      if i in (0, 2):
        if heads == "all":
          assert np.all(kernel == 0), (i, name)
        else:  # only head 1 is copied: head 0 still learns its own attention
          assert np.all(kernel[:, 1] == 0) and np.any(kernel[:, 0] != 0), (i, name)
      else:
        assert np.any(kernel != 0), (i, name)
    assert np.any(np.asarray(attn["value"]["kernel"]) != 0)  # V, out, MLP still learn


def test_copy_uses_teacher_maps(setup):
  """Copying every layer makes the student's attention output independent of its own q/k params."""
  student, teacher, sp, tp, images = setup
  t = transfer.resolve({"mode": "copy"}, student, teacher, S)
  targets, _ = _teacher_targets(teacher, tp, images, t)
  override = transfer.copy_override(targets, t)
  a, _ = student.apply({"params": sp}, images, train=False, override=override)
  scrambled = jax.tree_util.tree_map_with_path(
    lambda p, x: x * 3.0 if any(getattr(k, "key", "") in ("query", "key") for k in p) else x, sp
  )
  b, _ = student.apply({"params": scrambled}, images, train=False, override=override)
  c, _ = student.apply({"params": scrambled}, images, train=False)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(a, c)


def test_distill_loss_is_teacher_entropy_when_student_equals_teacher(setup):
  student, teacher, sp, tp, images = setup
  t = _resolve(student, teacher, layers="first:3")
  targets, t_out = _teacher_targets(teacher, tp, images, t)
  _, s_out = student.apply({"params": tp}, images, train=False)  # the student *is* the teacher
  loss = transfer.distill_loss(s_out, targets, t)
  p = jax.nn.softmax(t_out["attn_logits"][:3], -1)
  entropy = -jnp.sum(p * jnp.log(p), -1)  # [3, B, H, N]
  np.testing.assert_allclose(loss, 3.0 * entropy.mean(axis=(1, 2, 3)).sum(), rtol=1e-5)
  # It is the minimum: any other student attention costs more, and the gradient there is ~0.
  noise = jax.random.normal(jax.random.key(7), s_out["attn_logits"].shape)
  other = {"attn_logits": s_out["attn_logits"] + noise}
  assert transfer.distill_loss(other, targets, t) > loss + 0.1
  g = jax.grad(lambda o: transfer.distill_loss({"attn_logits": o}, targets, t))(
    s_out["attn_logits"]
  )
  assert float(jnp.abs(g).max()) < 1e-6


def test_distill_loss_reduction_matches_paper_formula(setup):
  """sum over layers of mean over (batch, heads, queries) of -sum_j p_t log p_s, times the weight."""
  student, teacher, sp, tp, images = setup
  t = _resolve(student, teacher, layers="1,3", weight=2.5)
  targets, t_out = _teacher_targets(teacher, tp, images, t)
  _, s_out = student.apply({"params": sp}, images, train=False)
  expected = 0.0
  for layer in (1, 3):
    pt = np.asarray(jax.nn.softmax(t_out["attn_logits"][layer], -1), np.float64)
    ls = np.asarray(jax.nn.log_softmax(s_out["attn_logits"][layer], -1), np.float64)
    expected += np.mean(-(pt * ls).sum(-1))
  np.testing.assert_allclose(transfer.distill_loss(s_out, targets, t), 2.5 * expected, rtol=1e-5)
  # A head subset averages over the selected heads only.
  t1 = _resolve(student, teacher, layers="1", heads="0", weight=1.0)
  pt = np.asarray(jax.nn.softmax(t_out["attn_logits"][1][:, 0], -1), np.float64)
  ls = np.asarray(jax.nn.log_softmax(s_out["attn_logits"][1][:, 0], -1), np.float64)
  np.testing.assert_allclose(
    transfer.distill_loss(s_out, transfer.teacher_targets(t_out, t1), t1),
    np.mean(-(pt * ls).sum(-1)),
    rtol=1e-5,
  )


def test_distill_loss_stable_for_extreme_logits():
  t = transfer.Transfer("distill", "attn", (0,), (0,), 1.0, "jointly", 1, 1)
  teacher = jnp.array([[[[[1e4, -1e4, 0.0]]]]])
  student = jnp.array([[[[[-1e4, 1e4, 0.0]]]]])
  loss = transfer.distill_loss({"attn_logits": student}, {"attn_logits": teacher}, t)
  assert np.isfinite(loss) and float(loss) == pytest.approx(2e4, rel=1e-6)


def test_teacher_gets_no_gradient(setup):
  student, teacher, sp, tp, images = setup
  t = _resolve(student, teacher)

  def loss(sp_, tp_):
    _, t_out = teacher.apply({"params": tp_}, images, train=False, want_qkv=transfer.needs_qkv(t))
    _, s_out = student.apply({"params": sp_}, images, train=False)
    return transfer.distill_loss(s_out, transfer.teacher_targets(t_out, t), t)

  gs, gt = jax.grad(loss, argnums=(0, 1))(sp, tp)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(gt))
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(gs))


@pytest.mark.parametrize("what", ["q", "k", "v"])
def test_qkv_variants(setup, what):
  student, teacher, sp, tp, images = setup
  name = {"q": "query", "k": "key", "v": "value"}[what]
  # Copy: the student's own projection for `what` gets zero gradient in copied layers.
  t = transfer.resolve({"mode": "copy", "what": what, "layers": "first:2"}, student, teacher, S)
  targets, t_out = _teacher_targets(teacher, tp, images, t)
  assert targets[what].shape == (2, B, (S // 4) ** 2 + 1, 2, 16)
  grads = _copy_grads(student, sp, images, targets, t)
  for i in range(4):
    g = np.asarray(
      grads["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"][name]["kernel"]
    )
    assert np.all(g == 0) == (i < 2), (what, i)
  # Copying the teacher's q/k/v makes the student use it: with q,k,v all copied its maps equal the teacher's.
  # Distill: MSE, zero when student == teacher, positive otherwise, as the direct formula.
  td = _resolve(student, teacher, what=what, layers="first:2", weight=1.0)
  _, same = student.apply({"params": tp}, images, train=False, want_qkv=True)
  assert float(transfer.distill_loss(same, targets, td)) == pytest.approx(0.0, abs=1e-10)
  _, other = student.apply({"params": sp}, images, train=False, want_qkv=True)
  expected = (
    np.mean((np.asarray(other[what][:2]) - np.asarray(t_out[what][:2])) ** 2, axis=(1, 2, 4))
    .mean(1)
    .sum()
  )
  np.testing.assert_allclose(transfer.distill_loss(other, targets, td), expected, rtol=1e-5)


def test_copy_q_and_k_reproduces_teacher_maps(setup):
  student, teacher, sp, tp, images = setup
  _, t_out = teacher.apply({"params": tp}, images, train=False, want_qkv=True)
  mask = jnp.ones((4, 2), bool)
  # Copying q in every layer while the student's k differs: logits are q_teacher . k_student.
  _, s_out = student.apply(
    {"params": sp}, images, train=False, want_qkv=True, override={"q": t_out["q"], "mask": mask}
  )
  expected = jnp.einsum("lbqhd,lbkhd->lbhqk", t_out["q"], s_out["k"]) / 4.0
  np.testing.assert_allclose(s_out["attn_logits"], expected, rtol=1e-4, atol=1e-4)


def test_precomputed_targets_layout(setup):
  student, teacher, sp, tp, images = setup
  t = _resolve(student, teacher, layers="1,2", source="precomputed")
  targets, t_out = _teacher_targets(teacher, tp, images, t)
  assert set(targets) == {"q", "k"}  # distilled maps travel as q and k
  batch = {
    f"teacher_{k}": jnp.swapaxes(v, 0, 1) for k, v in targets.items()
  }  # stored example-major
  for k, v in transfer.precomputed_targets(batch, t).items():
    np.testing.assert_array_equal(v, targets[k])
  stored_maps = {"teacher_attn_logits": jnp.swapaxes(t_out["attn_logits"][1:3], 0, 1)}
  np.testing.assert_array_equal(
    transfer.precomputed_targets(stored_maps, t)["attn_logits"], t_out["attn_logits"][1:3]
  )
  with pytest.raises(ConfigError, match=r"teacher_attn_logits or teacher_q\+teacher_k"):
    transfer.precomputed_targets({}, t)


def test_selected_description():
  assert transfer.selected((0, 1, 2, 3)) == "0-3"
  assert transfer.selected((0, 2, 5)) == "0,2,5"
  assert transfer.selected((4,)) == "4"


def test_average_over_images_control(setup):
  student, teacher, sp, tp, images = setup
  t = _resolve(student, teacher, layers="0,1", average="images")
  _, out = teacher.apply({"params": tp}, images, train=False)
  targets = transfer.teacher_targets(out, t)["attn_logits"]
  mean_map = jax.nn.softmax(out["attn_logits"][:2], -1).mean(axis=1)
  np.testing.assert_allclose(jax.nn.softmax(targets[:, 0], -1), mean_map, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(targets[:, 0], targets[:, 1])  # every image gets the same maps
  with pytest.raises(ConfigError) as e:
    _resolve(student, teacher, average="queries")
  assert e.value.field == "transfer.average"


def _distill_grads(student, sp, images, targets, t, via_encoder):
  """(loss, grads) of the distill term computed inside the encoder or by the reference formula."""

  def loss(p):
    target = transfer.attn_target(targets, t) if via_encoder else None
    _, out = student.apply({"params": p}, images, train=False, attn_target=target)
    return transfer.distill_loss(out, targets, t)

  return jax.value_and_grad(loss)(sp)


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
  t = _resolve(student, teacher, layers="0,2,3", heads="1", loss_impl=impl)
  targets, t_out = _teacher_targets(teacher, tp, images, t)
  assert set(targets) == {"q", "k"}
  if scan:
    student, sp = _model(scan=True), vit.loop_to_scan(sp)
  ref, g_ref = _distill_grads(student, sp, images, targets, t, via_encoder=False)
  got, g = _distill_grads(student, sp, images, targets, t, via_encoder=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)
  if impl == "direct":  # stored maps give the same loss
    maps = {"attn_logits": t_out["attn_logits"][np.asarray(t.layers)]}
    np.testing.assert_allclose(
      _distill_grads(student, sp, images, maps, t, via_encoder=True)[0], ref, rtol=1e-5
    )
