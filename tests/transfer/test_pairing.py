"""A teacher of another depth or head count: the layer and head maps against hand-computed references,
their errors, the loss through every path against numpy, and today's loss through the new paths when
the shapes agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.errors import ConfigError
from at_jax.models import vit
from at_jax.transfer import loss, pairing, spec, targets
from tests.transfer.conftest import build_model, resolve_distill


def test_head_mixing_by_hand():
  # 8 teacher heads into 4: pairs; 3 into 2: [0, 1] and [2]; 2 into 4: each teacher head twice, in order.
  np.testing.assert_array_equal(
    pairing.head_mixing("group", 4, 8), np.kron(np.eye(4), [[0.5, 0.5]])
  )
  np.testing.assert_array_equal(pairing.head_mixing("group", 2, 3), [[0.5, 0.5, 0], [0, 0, 1]])
  np.testing.assert_array_equal(
    pairing.head_mixing("group", 4, 2), [[1, 0], [1, 0], [0, 1], [0, 1]]
  )
  np.testing.assert_array_equal(pairing.head_mixing("group", 3, 3), np.eye(3))  # identity case
  np.testing.assert_allclose(pairing.head_mixing("mean", 2, 4), np.full((2, 4), 0.25))
  for student, teacher in ((4, 8), (2, 3), (4, 2), (5, 16), (16, 12)):
    for name in ("group", "mean", "merge"):
      if name == "merge" and teacher < student:
        continue
      mix = pairing.head_mixing(name, student, teacher)
      np.testing.assert_allclose(mix.sum(1), 1.0, rtol=1e-6)  # maps stay distributions
  assert pairing.head_mixing("first", 2, 4) is None and pairing.head_mixing("same", 2, 2) is None
  # SHD's merges: 9 -> 5 -> 3 in two rounds of adjacent pairs, the odd head carried; 4 -> 3 merges one pair.
  merged = pairing.head_mixing("merge", 3, 9)
  np.testing.assert_allclose(
    merged,
    [
      [0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0.25, 0.25, 0.25, 0.25, 0],
      [0, 0, 0, 0, 0, 0, 0, 0, 1],
    ],
  )
  np.testing.assert_allclose(
    pairing.head_mixing("merge", 3, 4), [[0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
  )
  np.testing.assert_array_equal(pairing.head_mixing("merge", 4, 4), np.eye(4))


def test_layer_maps_by_hand():
  assert pairing.teacher_layers_for("uniform", tuple(range(6)), 6, 12) == (1, 3, 5, 7, 9, 11)
  assert pairing.teacher_layers_for("uniform", (0, 1, 2, 3), 4, 6) == (1, 2, 4, 5)
  assert pairing.teacher_layers_for("uniform", tuple(range(6)), 6, 6) == tuple(range(6))
  # ceil((i + 1) * 3 / 8) - 1: the last teacher layer of each student layer's span.
  assert pairing.teacher_layers_for("uniform", tuple(range(8)), 8, 3) == (0, 0, 1, 1, 1, 2, 2, 2)
  assert pairing.teacher_layers_for("last", (4, 5), 6, 12) == (10, 11)
  assert pairing.teacher_layers_for("same", (0, 2), 6, 12) == (0, 2)


STUDENT = dict()  # Pico/4 at depth 4: 2 heads
TEACHER = dict(depth=8, num_heads=4)


@pytest.fixture(scope="module")
def shapes():
  """A student (depth 4, 2 heads) and a teacher of twice its depth and heads, with params and images."""
  student, teacher = build_model(**STUDENT), build_model(**TEACHER)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  sp = student.init(jax.random.key(1), images, train=False)["params"]
  tp = teacher.init(jax.random.key(2), images, train=False)["params"]
  return student, teacher, sp, tp, images


def test_resolved_pairs_and_errors(shapes):
  student, teacher, *_ = shapes
  t = resolve_distill(student, teacher, layer_map="uniform", head_map="group")
  assert (t.layers, t.teacher_layers, t.teacher_depth, t.teacher_heads) == (
    (0, 1, 2, 3),
    (1, 3, 5, 7),
    8,
    4,
  )
  assert t.target_keys == ("attn_logits",)  # averaged maps: not expressible through q and k
  t = resolve_distill(student, teacher, layer_map="2:6,3:7", head_map="first")
  assert (t.layers, t.teacher_layers, t.heads, t.target_keys) == (
    (2, 3),
    (6, 7),
    (0, 1),
    ("q", "k"),
  )
  t = resolve_distill(student, teacher, layers="last:2", layer_map="last", head_map="mean")
  assert t.teacher_layers == (6, 7)
  # A negative student index counts from the end and keeps its own teacher layer, in any order.
  for pairs in ("-1:7,0:1", "0:1,-1:7", [(3, 7), (0, 1)]):
    t = resolve_distill(student, teacher, layer_map=pairs, head_map="first")
    assert (t.layers, t.teacher_layers) == ((0, 3), (1, 7)), pairs
  cases = [
    ({}, "transfer.head_map"),  # 'same' with 4 vs 2 heads
    ({"head_map": "group", "loss_impl": "blockwise"}, "transfer.loss_impl"),
    ({"head_map": "group", "what": "q"}, "transfer.head_map"),
    ({"head_map": "first", "layer_map": "0:9"}, "transfer.layer_map"),  # no teacher layer 9
    ({"head_map": "first", "layer_map": "0:1", "layers": "first:1"}, "transfer.layers"),
    ({"head_map": "first", "layer_map": "0-1"}, "transfer.layer_map"),
    ({"head_map": "first", "layer_map": "deepest"}, "transfer.layer_map"),
    ({"head_map": "sum"}, "transfer.head_map"),
    ({"head_map": "merge", "loss_impl": "pallas"}, "transfer.loss_impl"),
  ]
  for cfg, field in cases:
    with pytest.raises(ConfigError) as e:
      resolve_distill(student, teacher, **cfg)
    assert e.value.field == field, (cfg, str(e.value))
  bigger_student = build_model(depth=12)
  with pytest.raises(ConfigError, match="'uniform' or 'last'") as e:
    resolve_distill(bigger_student, teacher, head_map="first")  # 'same' layers: 9..11 do not exist
  assert e.value.field == "transfer.layers"
  with pytest.raises(ConfigError, match="fewer than") as e:
    resolve_distill(build_model(num_heads=4), build_model(num_heads=2), head_map="merge")
  assert e.value.field == "transfer.head_map"
  with pytest.raises(ConfigError, match="first 2 heads only") as e:
    resolve_distill(build_model(num_heads=4), build_model(num_heads=2), head_map="first", heads="3")
  assert e.value.field == "transfer.heads"


def _self_attending(params, gain=10.0):
  """Params whose every layer's key projection is its query projection times `gain`: each token attends
  mostly to itself, in the student and the teacher alike. At random init the maps are near uniform and
  the two models' unrelated, so the loss barely depends on how sharp the teacher's maps are: a teacher
  q.k scaled by the student's head dim (16**-0.5, not 8**-0.5) moved it by 1e-7; here by ~17%."""
  blocks = {}
  for name, block in params["Transformer"].items():
    attn = dict(block["MultiHeadDotProductAttention_0"])
    attn["query"] = jax.tree.map(lambda x: gain * x, attn["query"])
    attn["key"] = attn["query"]
    blocks[name] = {**block, "MultiHeadDotProductAttention_0": attn}
  return {**params, "Transformer": blocks}


def _assert_the_teacher_scale_shows(t_logits_LBHNN, s_logits_LBHNN, pairs, mix, expected, rtol):
  """Control: the reference with the teacher's q.k scaled by the student's head dim (16**-0.5, not the
  teacher's 8**-0.5) is far outside `rtol`, so a block using that scale would fail the test."""
  wrong = np.asarray(t_logits_LBHNN, np.float64) * (8 / 16) ** 0.5
  wrong_loss = _reference_loss(wrong, s_logits_LBHNN, pairs, mix)
  assert abs(wrong_loss - expected) > 100 * rtol * abs(expected), (wrong_loss, expected)


def _reference_loss(t_logits_LBHNN, s_logits_LBHNN, pairs, mix, weight=3.0):
  """numpy: weight * sum over (student, teacher) layer pairs of the mean over batch, heads and queries
  of -sum_j p_j log q_j, p the teacher maps mixed by `mix` [H_s, H_t] (or picked: a one-hot mix), or by
  one mix per pair (a list)."""
  total = 0.0
  mixes = mix if isinstance(mix, list) else [mix] * len(pairs)
  for (s_layer, t_layer), mix in zip(pairs, mixes, strict=True):
    t = np.asarray(t_logits_LBHNN[t_layer], np.float64)
    p_t = np.exp(t - t.max(-1, keepdims=True))
    p_t /= p_t.sum(-1, keepdims=True)
    p = np.einsum("st,btqk->bsqk", mix, p_t)
    s = np.asarray(s_logits_LBHNN[s_layer], np.float64)
    log_q = s - s.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    total += np.mean(-(p * log_q).sum(-1))
  return weight * total


@pytest.mark.parametrize(
  "head_map,layer_map,loss_impl",
  [
    ("group", "uniform", "direct"),
    ("mean", "last", "direct"),
    ("merge", "uniform", "direct"),
    ("first", "uniform", "direct"),
    ("first", "1:0,3:7", "blockwise"),
  ],
)
def test_cross_shape_loss_equals_the_numpy_reference(shapes, head_map, layer_map, loss_impl):
  """Through the step's path (teacher targets, the student's in-block loss) and the stacked-maps path,
  with self-attending (peaked) maps where the teacher's logit scale (its own head dim) shows."""
  student, teacher, sp, tp, images = shapes
  sp, tp = _self_attending(sp), _self_attending(tp)
  t = resolve_distill(student, teacher, head_map=head_map, layer_map=layer_map, loss_impl=loss_impl)
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  handed = targets.run_teacher(*vit.truncate(teacher, tp, t.teacher_depth), images, t)
  _, s_out = student.apply(
    {"params": sp}, images, train=False, attn_target=targets.attn_target(handed, t)
  )
  mix = t.head_mixing()
  if mix is None:  # "first": student head h reads teacher head h
    mix = np.eye(student.num_heads, teacher.num_heads)
  pairs = list(zip(t.layers, t.teacher_layers))
  expected = _reference_loss(t_out["attn_logits"], s_out["attn_logits"], pairs, mix)
  np.testing.assert_allclose(loss.distill_loss(s_out, handed, t), expected, rtol=2e-5)
  _assert_the_teacher_scale_shows(
    t_out["attn_logits"], s_out["attn_logits"], pairs, mix, expected, 2e-5
  )
  if loss_impl == "direct":  # the reference formula's path: the student's stacked maps
    stacked = {"attn_logits": s_out["attn_logits"]}
    np.testing.assert_allclose(loss.distill_loss(stacked, handed, t), expected, rtol=2e-5)


@pytest.mark.parametrize("loss_impl", ["direct", "blockwise", "pallas"])
def test_picked_heads_equal_the_numpy_reference(shapes, loss_impl):
  """head_map "pick": student head h of selected layer s reads teacher head head_pick[s][h] (any heads,
  repeats too), from the maps or streamed from q and k; one group serves every layer. Self-attending
  (peaked) maps, so that the teacher's logit scale shows."""
  student, teacher, sp, tp, images = shapes
  sp, tp = _self_attending(sp), _self_attending(tp)
  pick = "3,1;0,2;2,2;1,0"
  t = resolve_distill(
    student, teacher, layer_map="uniform", head_map="pick", head_pick=pick, loss_impl=loss_impl
  )
  assert t.head_pick == ((3, 1), (0, 2), (2, 2), (1, 0)) and t.target_keys == ("q", "k")
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  handed = targets.run_teacher(teacher, tp, images, t)
  _, s_out = student.apply(
    {"params": sp}, images, train=False, attn_target=targets.attn_target(handed, t)
  )
  mixes = [np.eye(teacher.num_heads)[list(group)] for group in t.head_pick]
  pairs = list(zip(t.layers, t.teacher_layers))
  expected = _reference_loss(t_out["attn_logits"], s_out["attn_logits"], pairs, mixes)
  np.testing.assert_allclose(loss.distill_loss(s_out, handed, t), expected, rtol=2e-5)
  _assert_the_teacher_scale_shows(
    t_out["attn_logits"], s_out["attn_logits"], pairs, mixes, expected, 2e-5
  )
  one = resolve_distill(student, teacher, layer_map="uniform", head_map="pick", head_pick="0,1")
  first = resolve_distill(student, teacher, layer_map="uniform", head_map="first")
  assert one.head_pick == ((0, 1),) * 4
  np.testing.assert_allclose(
    loss.distill_loss(s_out, targets.run_teacher(teacher, tp, images, one), one),
    loss.distill_loss(s_out, targets.run_teacher(teacher, tp, images, first), first),
    rtol=1e-6,
  )


@pytest.mark.parametrize(
  "cfg,match",
  [
    ({"head_map": "first", "head_pick": "0,1"}, "for head_map 'pick'"),
    ({"head_map": "pick"}, "needs the teacher head"),
    ({"head_map": "pick", "head_pick": "0,1,2"}, "needs 2 teacher heads"),
    ({"head_map": "pick", "head_pick": "0,1;2,3"}, "each of the 4 selected"),
    ({"head_map": "pick", "head_pick": "0,4"}, "teacher heads are 0..3"),
    ({"head_map": "pick", "head_pick": "a,b"}, "use '3,5,6,7'"),
  ],
)
def test_a_bad_head_pick_names_its_field(shapes, cfg, match):
  student, teacher, *_ = shapes
  with pytest.raises(ConfigError, match=match) as e:
    resolve_distill(student, teacher, layer_map="uniform", **cfg)
  assert e.value.field == "transfer.head_pick", e.value


def test_picks_out_of_the_stored_targets_range_are_refused(shapes):
  """Without a teacher (stored targets) the pick's range is checked where the targets arrive."""
  student, teacher, _, tp, images = shapes
  t = spec.resolve(
    {"mode": "distill", "source": "precomputed", "head_map": "pick", "head_pick": "0,7"},
    student,
    None,
    16,
  )
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  stored = {"teacher_attn_logits": jnp.swapaxes(t_out["attn_logits"][:4], 0, 1)}
  with pytest.raises(ConfigError, match="the teacher has 4 heads") as e:
    targets.precomputed_targets(stored, t)
  assert e.value.field == "transfer.head_pick"


def test_sharpest_heads_by_hand():
  entropy_LH = np.array([[2.0, 1.0, 3.0, 0.5], [0.1, 0.2, 0.3, 0.4]])
  assert pairing.sharpest_heads(entropy_LH, (0, 1, 1), 2) == "1,3;0,1;0,1"
  assert pairing.sharpest_heads(-entropy_LH, (0,), 3) == "0,1,2"  # the flattest, by negation


def test_a_student_with_more_heads_than_its_teacher(shapes):
  """group: each student head reads one teacher head, in order; first: the student's extra heads are
  free (outside the loss)."""
  _, _, _, _, images = shapes
  student, teacher = build_model(num_heads=4), build_model(num_heads=2)
  sp = student.init(jax.random.key(3), images, train=False)["params"]
  tp = teacher.init(jax.random.key(4), images, train=False)["params"]
  _, t_out = teacher.apply({"params": tp}, images, train=False, want_qkv=True)
  _, s_out = student.apply({"params": sp}, images, train=False)
  for head_map, mix, heads in (
    ("group", pairing.head_mixing("group", 4, 2), 4),
    ("first", np.eye(2, 2), 2),
  ):
    t = resolve_distill(student, teacher, head_map=head_map)
    assert len(t.heads) == heads
    handed = targets.teacher_targets(t_out, t)
    pairs = list(zip(t.layers, t.teacher_layers))
    s_logits = s_out["attn_logits"][:, :, :heads]
    expected = _reference_loss(t_out["attn_logits"], s_logits, pairs, mix)
    np.testing.assert_allclose(loss.distill_loss(s_out, handed, t), expected, rtol=2e-5)


@pytest.mark.parametrize(
  "cfg",
  [
    dict(head_map="group"),  # an identity mix
    dict(head_map="first"),
    dict(layer_map="uniform"),
    dict(layer_map="0:0,1:1,2:2,3:3"),
  ],
)
def test_equal_shapes_give_todays_loss_through_every_new_path(cfg):
  """A teacher of the student's shape: each new path hands over what `same` does (group's mix is the
  identity, uniform the identity map, explicit pairs the same layers), so the loss is today's."""
  student, teacher = build_model(), build_model()
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  sp = student.init(jax.random.key(1), images, train=False)["params"]
  tp = teacher.init(jax.random.key(2), images, train=False)["params"]
  _, t_out = teacher.apply({"params": tp}, images, train=False, want_qkv=True)
  _, s_out = student.apply({"params": sp}, images, train=False)
  today = resolve_distill(student, teacher)
  t = resolve_distill(student, teacher, **cfg)
  np.testing.assert_allclose(
    loss.distill_loss(s_out, targets.teacher_targets(t_out, t), t),
    loss.distill_loss(s_out, targets.teacher_targets(t_out, today), today),
    rtol=1e-6,
  )


def test_copy_from_a_teacher_of_other_shape_uses_the_mixed_maps(shapes):
  """Copy in layer 1 from teacher layer 3 (uniform), heads grouped: the student's attention there is
  exactly the group mean of the teacher's maps."""
  student, teacher, sp, tp, images = shapes
  t = resolve_distill(
    student, teacher, mode="copy", layers="1", layer_map="uniform", head_map="group"
  )
  assert t.teacher_layers == (3,)
  handed = targets.run_teacher(teacher, tp, images, t)
  _, s_out = student.apply(
    {"params": sp}, images, train=False, override=targets.copy_override(handed, t)
  )
  _, t_out = teacher.apply({"params": tp}, images, train=False)
  p_t = jax.nn.softmax(t_out["attn_logits"][3], -1)  # [B, 4, N, N]
  expected = jnp.einsum("st,btqk->bsqk", t.head_mixing(), p_t)
  np.testing.assert_allclose(jax.nn.softmax(s_out["attn_logits"][1], -1), expected, atol=1e-6)


def test_drop_path_masks_are_shared_by_mapped_layers(shapes):
  """Each teacher layer a student layer reads takes that student layer's masks (the first, where several
  read it); the teacher's other layers are drawn independently; equal maps hand over the masks as they are."""
  from at_jax.models import encoder  # pylint: disable=import-outside-toplevel
  from at_jax.training import classify  # pylint: disable=import-outside-toplevel

  student, teacher, *_ = shapes
  t = resolve_distill(student, teacher, layer_map="uniform", head_map="group")
  masks = encoder.sample_drop_masks(jax.random.key(5), 256, student.depth, 0.5)
  teacher_masks = classify.teacher_drop_masks(jax.random.key(6), masks, t, teacher.depth, 0.5)
  assert teacher_masks.shape == (teacher.depth, 2, 256)
  for s_layer, t_layer in zip(t.layers, t.teacher_layers):  # (0, 1), (1, 3), (2, 5), (3, 7)
    np.testing.assert_array_equal(teacher_masks[t_layer], masks[s_layer])
  unmapped = np.asarray(teacher_masks[np.array([2, 4, 6])])
  assert 0.2 < (unmapped == 0).mean() < 0.5  # drawn at the teacher's own rates (0.14, 0.29, 0.43)
  assert not np.array_equal(unmapped[0], np.asarray(masks[1]))
  same = resolve_distill(student, build_model(num_heads=4), head_map="group")
  assert classify.teacher_drop_masks(jax.random.key(6), masks, same, 4, 0.5) is masks
  # Several student layers reading one teacher layer: the first one's masks.
  deep = build_model(depth=4)
  shallow = build_model(depth=2)
  t = resolve_distill(deep, shallow, layer_map="uniform")  # (0, 0, 1, 1)
  shared = classify.teacher_drop_masks(jax.random.key(6), masks, t, 2, 0.5)
  np.testing.assert_array_equal(shared[0], masks[0])
  np.testing.assert_array_equal(shared[1], masks[2])


def test_a_learned_head_mix_starts_as_the_mean_and_trains(shapes):
  """head_map "learned": the student's `head_mix` logits (zeros: the mean of the teacher's maps) mix
  each layer's teacher maps; the loss has a gradient in them; copy and the streamed losses refuse it."""
  student, teacher, sp, tp, images = shapes
  t = resolve_distill(student, teacher, layer_map="uniform", head_map="learned")
  assert t.target_keys == ("attn_logits",) and t.head_mixing() is None
  mixed = build_model(head_mix=(4, 2, 4))
  params = mixed.init(jax.random.key(1), images, train=False)["params"]
  assert params["head_mix"].shape == (4, 2, 4) and not params["head_mix"].any()
  handed = targets.run_teacher(teacher, tp, images, t)
  assert handed["attn_logits"].shape[2] == 4  # the teacher's heads: mixed in the step, by the param
  mean = resolve_distill(student, teacher, layer_map="uniform", head_map="mean")
  _, s_out = student.apply({"params": sp}, images, train=False)

  def distill(head_mix):
    return loss.distill_loss(s_out, targets.learned_mix(handed, head_mix, t), t)

  np.testing.assert_allclose(
    distill(params["head_mix"]),
    loss.distill_loss(s_out, targets.run_teacher(teacher, tp, images, mean), mean),
    rtol=1e-6,
  )
  assert float(jnp.abs(jax.grad(distill)(params["head_mix"])).max()) > 0

  def in_block(head_mix):  # the step's path: the student's blocks score themselves
    mixed_targets = targets.learned_mix(handed, head_mix, t)
    target = targets.attn_target(mixed_targets, t)
    _, out = student.apply({"params": sp}, images, train=False, attn_target=target)
    return loss.distill_loss(out, mixed_targets, t)

  np.testing.assert_allclose(in_block(params["head_mix"]), distill(params["head_mix"]), rtol=1e-5)
  grads = jax.grad(in_block)(params["head_mix"] + 0.3)
  np.testing.assert_allclose(
    grads, jax.grad(distill)(params["head_mix"] + 0.3), rtol=1e-4, atol=1e-7
  )
  for cfg, field in (
    ({"mode": "copy"}, "transfer.head_map"),
    ({"loss_impl": "blockwise"}, "transfer.loss_impl"),
  ):
    with pytest.raises(ConfigError) as e:
      resolve_distill(student, teacher, head_map="learned", **cfg)
    assert e.value.field == field
  fields, exported = vit.export_view(mixed, params)
  assert "head_mix" not in exported and "head_mix" not in fields


def test_a_learned_mix_from_group_starts_halfway_between_each_group_and_the_mean(shapes):
  """head_mix_init "group": at head_mix = 0 each student head distils 0.5 * its group + 0.5 * the mean
  of the teacher's maps (a numpy mix of the teacher's probabilities), so heads start apart; "mean"
  keeps the old start; the field is refused where no mix is learned."""
  student, teacher, sp, tp, images = shapes
  t = resolve_distill(
    student, teacher, layer_map="uniform", head_map="learned", head_mix_init="group"
  )
  handed = targets.run_teacher(teacher, tp, images, t)
  zeros = jnp.zeros((len(t.layers), student.num_heads, teacher.num_heads))
  got = targets.learned_mix(handed, zeros, t)["attn_probs"]
  mix = 0.5 * pairing.head_mixing("group", 2, 4) + 0.5 / 4  # rows [.375 .375 .125 .125], ...
  probs = jax.nn.softmax(np.asarray(handed["attn_logits"], np.float64), -1)
  np.testing.assert_allclose(got, np.einsum("st,SBtqk->SBsqk", mix, probs), atol=1e-6)
  assert not np.allclose(got[:, :, 0], got[:, :, 1])  # the two student heads are taught apart
  mean = resolve_distill(student, teacher, layer_map="uniform", head_map="learned")
  assert mean.head_mix_init == "mean" and not mean.head_mix_prior().any()
  for cfg in ({"head_mix_init": "first"}, {"head_mix_init": "group", "head_map": "group"}):
    with pytest.raises(ConfigError) as e:
      resolve_distill(student, teacher, **{"head_map": "learned", **cfg})
    assert e.value.field == "transfer.head_mix_init", e.value
