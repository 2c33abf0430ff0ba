"""The teacher's targets: the teacher's forward pass, copying them into the student, stored targets, the
average-over-images control."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.errors import ConfigError
from at_jax.models import encoder, vit
from at_jax.transfer import spec, targets
from tests.transfer.conftest import B, S, resolve_distill, teacher_targets_and_out


def _copy_grads(student, sp, images, teacher_targets, transfer):
  def squared_logits(p):
    override = targets.copy_override(teacher_targets, transfer)
    logits, _ = student.apply({"params": p}, images, train=False, override=override)
    return jnp.sum(logits**2)

  return jax.grad(squared_logits)(sp)


@pytest.mark.parametrize(
  "cfg",
  [
    {"mode": "distill", "layers": "1,3"},
    {"mode": "distill", "average": "images"},
    {"mode": "copy", "what": "k", "layers": "first:2"},
  ],
)
def test_run_teacher_is_the_teacher_forward_pass(setup, cfg):
  """`run_teacher` hands over the selected layers of what the teacher's `out` holds, with the student's
  drop-path masks, cut to the teacher's depth when the teacher is truncated."""
  student, teacher, sp, tp, images = setup
  transfer = spec.resolve(cfg, student, teacher, S)
  masks = encoder.sample_drop_masks(jax.random.key(3), B, 4, 0.5)
  got = targets.run_teacher(teacher, tp, images, transfer, drop_masks=masks)
  _, out = teacher.apply(
    {"params": tp}, images, train=False, drop_masks=masks, want_qkv=spec.needs_qkv(transfer)
  )
  want = targets.teacher_targets(out, transfer)
  assert set(got) == set(want) == set(transfer.target_keys)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  short, short_params = vit.truncate(teacher, tp, max(transfer.layers) + 1)
  cut = targets.run_teacher(short, short_params, images, transfer, drop_masks=masks)
  for k in want:
    np.testing.assert_allclose(cut[k], want[k], rtol=1e-6, atol=1e-6)


def test_teacher_outputs_are_example_layers_of_the_keys(setup):
  """What precomputing stores: the teacher's keys in the given layers, [S, B, ...], no averaging."""
  _, teacher, _, tp, images = setup
  _, out = teacher.apply({"params": tp}, images, train=False, want_qkv=True)
  for keys in (("attn_logits",), ("q", "k"), ("v",)):
    got = targets.teacher_outputs(teacher, tp, images, (0, 2), keys)
    assert tuple(got) == keys
    for k in keys:
      np.testing.assert_array_equal(got[k], out[k][np.array([0, 2])])


@pytest.mark.parametrize("heads", ["all", "1"])
def test_copy_attn_gives_zero_qk_gradient_in_copied_layers(setup, heads):
  student, teacher, sp, tp, images = setup
  cfg = {"mode": "copy", "layers": "0,2", "heads": heads}
  transfer = spec.resolve(cfg, student, teacher, S)
  teacher_targets, _ = teacher_targets_and_out(teacher, tp, images, transfer)
  grads = _copy_grads(student, sp, images, teacher_targets, transfer)
  for i in range(4):
    attn = grads["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"]
    for name in ("query", "key"):
      kernel = np.asarray(attn[name]["kernel"])  # [D, H, K]
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
  transfer = spec.resolve({"mode": "copy"}, student, teacher, S)
  teacher_targets, _ = teacher_targets_and_out(teacher, tp, images, transfer)
  override = targets.copy_override(teacher_targets, transfer)
  a, _ = student.apply({"params": sp}, images, train=False, override=override)
  scrambled = jax.tree_util.tree_map_with_path(
    lambda p, x: x * 3.0 if any(getattr(k, "key", "") in ("query", "key") for k in p) else x, sp
  )
  b, _ = student.apply({"params": scrambled}, images, train=False, override=override)
  c, _ = student.apply({"params": scrambled}, images, train=False)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(a, c)


@pytest.mark.parametrize("what", ["q", "k", "v"])
def test_copy_qkv_variants(setup, what):
  """Copy: the student's own projection for `what` gets zero gradient in copied layers."""
  student, teacher, sp, tp, images = setup
  name = {"q": "query", "k": "key", "v": "value"}[what]
  cfg = {"mode": "copy", "what": what, "layers": "first:2"}
  transfer = spec.resolve(cfg, student, teacher, S)
  teacher_targets, _ = teacher_targets_and_out(teacher, tp, images, transfer)
  assert teacher_targets[what].shape == (2, B, (S // 4) ** 2 + 1, 2, 16)
  grads = _copy_grads(student, sp, images, teacher_targets, transfer)
  for i in range(4):
    g = np.asarray(
      grads["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"][name]["kernel"]
    )
    assert np.all(g == 0) == (i < 2), (what, i)


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
  transfer = resolve_distill(student, teacher, layers="1,2", source="precomputed")
  teacher_targets, t_out = teacher_targets_and_out(teacher, tp, images, transfer)
  assert set(teacher_targets) == {"q", "k"}  # distilled maps travel as q and k
  # stored example-major
  batch = {f"teacher_{k}": jnp.swapaxes(v, 0, 1) for k, v in teacher_targets.items()}
  for k, v in targets.precomputed_targets(batch, transfer).items():
    np.testing.assert_array_equal(v, teacher_targets[k])
  stored_maps = {"teacher_attn_logits": jnp.swapaxes(t_out["attn_logits"][1:3], 0, 1)}
  np.testing.assert_array_equal(
    targets.precomputed_targets(stored_maps, transfer)["attn_logits"], t_out["attn_logits"][1:3]
  )
  with pytest.raises(ConfigError, match=r"teacher_attn_logits or teacher_q\+teacher_k"):
    targets.precomputed_targets({}, transfer)


def test_average_over_images_control(setup):
  student, teacher, sp, tp, images = setup
  transfer = resolve_distill(student, teacher, layers="0,1", average="images")
  _, out = teacher.apply({"params": tp}, images, train=False)
  averaged = targets.teacher_targets(out, transfer)["attn_logits"]
  mean_map = jax.nn.softmax(out["attn_logits"][:2], -1).mean(axis=1)
  np.testing.assert_allclose(jax.nn.softmax(averaged[:, 0], -1), mean_map, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(averaged[:, 0], averaged[:, 1])  # every image gets the same maps
  with pytest.raises(ConfigError) as e:
    resolve_distill(student, teacher, average="queries")
  assert e.value.field == "transfer.average"
