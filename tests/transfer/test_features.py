"""Feature distillation (`transfer.what="features"`, the paper's baseline): the loss, what it reads from
both models, its start-up checks, and a real train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import checkpoint
from at_jax.errors import ConfigError
from at_jax.experiment import teachers
from at_jax.models import vit
from at_jax.transfer import loss, spec, targets
from tests.transfer.conftest import S, build_model, resolve_distill


def _block_outputs(model, params, images) -> np.ndarray:
  """[L, B, N, D]: each block's output, by running the blocks one at a time through `intermediates`."""
  _, state = model.apply(
    {"params": params}, images, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  blocks = state["intermediates"]["Transformer"]
  return np.stack(
    [np.asarray(blocks[f"encoderblock_{i}"]["__call__"][0][0]) for i in range(model.depth)]
  )


def test_feature_loss_is_per_token_standardised_mse():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 5, 8)), rng.normal(size=(2, 3, 5, 8))
  norm = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  expected = ((norm(s) - norm(t)) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(loss.feature_loss(jnp.asarray(s), jnp.asarray(t)), expected, rtol=1e-5)
  # Blind to each token's scale and offset; zero for equal features; about 2 for unrelated ones.
  scaled = 3.0 * t + rng.normal(size=(2, 3, 5, 1))
  np.testing.assert_allclose(loss.feature_loss(jnp.asarray(scaled), jnp.asarray(t)), 0, atol=1e-5)
  wide = rng.normal(size=(1, 4, 64, 256)), rng.normal(size=(1, 4, 64, 256))
  assert float(loss.feature_loss(*map(jnp.asarray, wide))[0]) == pytest.approx(2.0, abs=0.05)


def test_distill_loss_reads_the_selected_blocks_outputs(setup):
  student, teacher, sp, tp, images = setup
  transfer = resolve_distill(student, teacher, what="features", layers="1,3", weight=2.0)
  assert transfer.target_keys == ("features",) and not spec.needs_qkv(transfer)
  teacher_targets = targets.run_teacher(teacher, tp, images, transfer)
  t_blocks, s_blocks = _block_outputs(teacher, tp, images), _block_outputs(student, sp, images)
  np.testing.assert_allclose(teacher_targets["features"], t_blocks[[1, 3]], rtol=1e-5, atol=1e-6)
  _, s_out = student.apply({"params": sp}, images, train=False)
  expected = 2.0 * np.sum(
    loss.feature_loss(jnp.asarray(s_blocks[[1, 3]]), jnp.asarray(t_blocks[[1, 3]]))
  )
  np.testing.assert_allclose(
    loss.distill_loss(s_out, teacher_targets, transfer), expected, rtol=1e-5
  )
  _, same = student.apply({"params": tp}, images, train=False)  # the student *is* the teacher
  assert float(loss.distill_loss(same, teacher_targets, transfer)) == pytest.approx(0, abs=1e-8)
  # The gradient reaches the student's blocks up to the last distilled one, not the head.
  grads = jax.grad(
    lambda p: loss.distill_loss(
      student.apply({"params": p}, images, train=False)[1], teacher_targets, transfer
    )
  )(sp)
  assert float(jnp.abs(grads["Transformer"]["encoderblock_0"]["LayerNorm_0"]["scale"]).max()) > 0
  assert float(jnp.abs(grads["head"]["kernel"]).max()) == 0


@pytest.mark.parametrize(
  "cfg, field",
  [
    ({"mode": "copy"}, "transfer.what"),
    ({"source": "precomputed"}, "transfer.source"),
    ({"heads": "first:1"}, "transfer.heads"),
  ],
)
def test_settings_that_cannot_distill_features_name_their_field(setup, cfg, field):
  student, teacher, *_ = setup
  with pytest.raises(ConfigError) as e:
    spec.resolve({"mode": "distill", "what": "features", **cfg}, student, teacher, S)
  assert e.value.field == field


def test_features_are_handed_over_token_by_token():
  """A teacher of another token grid, or a prefix dropped, is refused naming the field (the loss would
  otherwise fail to broadcast [b, n_s, d] against [b, n_t, d] at the first step)."""
  student = build_model()
  for cfg, teacher, field in [
    ({}, build_model(patch_size=2 * student.patch_size), "teacher.init"),
    ({"prefix": "drop"}, build_model(), "transfer.prefix"),
  ]:
    with pytest.raises(ConfigError, match="features") as e:
      spec.resolve({"mode": "distill", "what": "features", **cfg}, student, teacher, S)
    assert e.value.field == field


def test_heads_need_not_match_and_other_widths_need_the_projection():
  student = build_model()
  other_heads = build_model(num_heads=1)
  assert spec.resolve({"mode": "distill", "what": "features"}, student, other_heads, S).active
  wide_teacher = build_model(width=48)
  for unfit in (student, build_model(feature_dim=40)):
    with pytest.raises(ConfigError, match="model.feature_dim=48") as e:
      spec.resolve({"mode": "distill", "what": "features"}, unfit, wide_teacher, S)
    assert e.value.field == "model.feature_dim"
  with pytest.raises(ConfigError) as e:  # a width map of the features cannot serve q
    spec.resolve({"mode": "distill", "what": "q"}, build_model(feature_dim=48), wide_teacher, S)
  assert e.value.field == "model.feature_dim"
  with pytest.raises(ConfigError) as e:  # copy swaps the teacher's q in: the widths must match
    spec.resolve({"mode": "copy", "what": "q"}, student, wide_teacher, S)
  assert e.value.field == "teacher.init"


@pytest.mark.parametrize("what", ["q", "v"])
def test_a_narrower_student_distils_q_k_v_through_its_width_map(setup, what):
  """Q/K/V of a teacher of another width (same heads, wider heads): the student's heads flattened,
  mapped per layer to the teacher's width and compared head by head, against numpy."""
  *_, images = setup
  student = build_model(feature_dim=48, projected=what)
  teacher = build_model(width=48)  # 2 heads of 24 against the student's 2 of 16
  sp = student.init(jax.random.key(3), images, train=False)["params"]
  tp = teacher.init(jax.random.key(4), images, train=False)["params"]
  transfer = resolve_distill(student, teacher, what=what, layers="1,3")
  handed = targets.run_teacher(teacher, tp, images, transfer)
  _, out = student.apply({"params": sp}, images, train=False, want_qkv=True)
  own = np.asarray(out[what])[[1, 3]]  # [S, B, N, H, K]
  kernel, bias = (np.asarray(sp["feature_proj"][n])[[1, 3]] for n in ("kernel", "bias"))
  flat = own.reshape(*own.shape[:3], -1)
  mapped = np.einsum("lbnd,ldf->lbnf", flat, kernel) + bias[:, None, None]
  teacher_SBNHK = np.asarray(handed[what])
  err = (mapped.reshape(teacher_SBNHK.shape) - teacher_SBNHK) ** 2
  expected = 3.0 * err.mean(axis=(1, 2, 4)).mean(1).sum()
  distill = lambda p: loss.distill_loss(
    student.apply({"params": p}, images, train=False)[1], handed, transfer
  )
  np.testing.assert_allclose(distill(sp), expected, rtol=1e-5)
  assert float(jnp.abs(jax.grad(distill)(sp)["feature_proj"]["kernel"][1]).max()) > 0
  fields, exported = vit.export_view(student, sp)
  assert (fields["feature_dim"], fields["projected"]) == (0, "features")
  assert "feature_proj" not in exported


def test_a_narrower_student_distils_through_its_trained_projection(setup):
  *_, images = setup
  student, teacher = build_model(feature_dim=48), build_model(width=48)
  sp = student.init(jax.random.key(3), images, train=False)["params"]
  tp = teacher.init(jax.random.key(4), images, train=False)["params"]
  assert sp["feature_proj"]["kernel"].shape == (4, 32, 48)
  transfer = resolve_distill(student, teacher, what="features", layers="1,3")
  teacher_targets = targets.run_teacher(teacher, tp, images, transfer)
  s_blocks = _block_outputs(student, sp, images)[[1, 3]]
  proj = sp["feature_proj"]
  projected = np.einsum("lbnd,ldf->lbnf", s_blocks, np.asarray(proj["kernel"])[[1, 3]])
  projected = projected + np.asarray(proj["bias"])[[1, 3], None, None]
  expected = 3.0 * np.sum(loss.feature_loss(jnp.asarray(projected), teacher_targets["features"]))
  distill = lambda p: loss.distill_loss(
    student.apply({"params": p}, images, train=False)[1], teacher_targets, transfer
  )
  np.testing.assert_allclose(distill(sp), expected, rtol=1e-5)
  grads = jax.grad(distill)(sp)["feature_proj"]["kernel"]
  assert float(jnp.abs(grads[1]).max()) > 0 and float(jnp.abs(grads[0]).max()) == 0
  # The export is the ViT without the head: same logits, no feature_proj, feature_dim 0.
  fields, exported = vit.export_view(student, sp)
  assert fields["feature_dim"] == 0 and "feature_proj" not in exported
  np.testing.assert_allclose(
    vit.build(fields).apply({"params": exported}, images, train=False)[0],
    student.apply({"params": sp}, images, train=False)[0],
    rtol=1e-6,
  )


def test_the_student_config_gains_the_projection_when_widths_differ(tiny_config, tmp_path):
  teacher = vit.build({"variant": "Mini/7", "num_classes": 0})
  tp = teacher.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), train=False)["params"]
  checkpoint.save_params(str(tmp_path / "teacher"), tp, vit.model_fields(teacher))
  config = tiny_config(mode="distill", what="features")
  config.teacher.init = str(tmp_path / "teacher")
  assert teachers.model_config(config, str(tmp_path))["feature_dim"] == 64  # Pico is 32 wide
  config.transfer.what = "k"  # k of another width: the same head, mapping the student's k
  fields = teachers.model_config(config, str(tmp_path))
  assert (fields["feature_dim"], fields["projected"]) == (64, "k")
  config.transfer.what = "attn"
  assert teachers.model_config(config, str(tmp_path))["feature_dim"] == 0
  config.model.feature_dim = 64  # only feature distillation trains the head
  with pytest.raises(ConfigError) as e:
    teachers.model_config(config, str(tmp_path))
  assert e.value.field == "model.feature_dim"


def test_the_train_loss_adds_feature_distillation(setup):
  from at_jax.training import classify  # pylint: disable=import-outside-toplevel

  student, teacher, sp, tp, images = setup
  transfer = resolve_distill(student, teacher, what="features", layers="first:2")
  loss_fn = classify.make_loss_fn(student, teacher, transfer, label_smoothing=0.0)
  batch = {"image": images, "label": jnp.arange(images.shape[0])}
  total, aux = jax.jit(loss_fn)(sp, batch, tp, jax.random.key(0))
  teacher_targets = targets.run_teacher(teacher, tp, images, transfer)
  _, s_out = student.apply({"params": sp}, images, train=True, rngs={"dropout": jax.random.key(1)})
  expected = loss.distill_loss(s_out, teacher_targets, transfer)  # drop_path 0: train == eval
  np.testing.assert_allclose(aux["distill_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(total, aux["ce_loss"] + aux["distill_loss"], rtol=1e-6)
