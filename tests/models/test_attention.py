"""The attention contract, through the ViT: logits are scaled q.k, overrides apply where masked (and only
there), fully copied layers skip their own q and k, the fused path matches the materialised one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.models import attention, vit
from at_jax.ops import attn_ce
from tests.models.conftest import B, S, build_model


def test_logits_are_scaled_qk(setup):
  model, params, images = setup
  _, out = model.apply({"params": params}, images, train=False, want_qkv=True)
  expected = jnp.einsum("lbqhd,lbkhd->lbhqk", out["q"], out["k"]) / np.sqrt(16)
  np.testing.assert_allclose(out["attn_logits"], expected, rtol=1e-5, atol=1e-5)


def test_bf16_logits_are_qk_logits_in_dtype_mm(setup):
  """The layer forms its logits with `attn_ce.qk_logits` in `dtype_mm`: bf16 products, float32 sums."""
  _, params, images = setup
  bf16 = build_model(dtype_mm="bfloat16")
  _, out = bf16.apply({"params": params}, images, train=False, want_qkv=True)
  assert out["q"].dtype == jnp.float32  # bf16 values, handed back in float32
  expected = attn_ce.qk_logits(out["q"], out["k"], 16**-0.5, jnp.bfloat16)
  np.testing.assert_allclose(out["attn_logits"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("key", ["logits", "probs", "q", "k", "v"])
def test_override_with_own_values_changes_nothing(setup, scan, key):
  model, params, images = setup
  if scan:
    model, params = build_model(scan=True), vit.loop_to_scan(params)
  ref, out = model.apply({"params": params}, images, train=False, want_qkv=True)
  own = {"logits": out["attn_logits"], "probs": jax.nn.softmax(out["attn_logits"], -1)}.get(key)
  own = out[key] if own is None else own
  override = {key: own, "mask": jnp.ones((2, 2), bool)}
  got, _ = model.apply({"params": params}, images, train=False, override=override)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_override_applies_only_to_masked_layers_and_heads(setup):
  model, params, images = setup
  ref, out = model.apply({"params": params}, images, train=False)
  uniform = jnp.zeros_like(out["attn_logits"])  # softmax -> uniform attention
  mask = jnp.array([[False, False], [False, True]])  # layer 1, head 1 only
  got, out2 = model.apply(
    {"params": params}, images, train=False, override={"logits": uniform, "mask": mask}
  )
  assert not np.allclose(got, ref)
  # Layer 0 is untouched, so its logits are identical; layer 1 reports the logits it attended with.
  np.testing.assert_array_equal(out2["attn_logits"][0], out["attn_logits"][0])
  np.testing.assert_array_equal(out2["attn_logits"][1, :, 0], out["attn_logits"][1, :, 0])
  np.testing.assert_array_equal(out2["attn_logits"][1, :, 1], 0.0)
  none_masked, _ = model.apply(
    {"params": params},
    images,
    train=False,
    override={"logits": uniform, "mask": jnp.zeros((2, 2), bool)},
  )
  np.testing.assert_allclose(none_masked, ref, rtol=1e-6)


def _copy_loss(model, images, teacher_logits, mask):
  """Sum of squared class logits with the teacher's logits copied where `mask`, and the reported maps."""

  def loss(p):
    logits, out = model.apply(
      {"params": p}, images, train=False, override={"logits": teacher_logits, "mask": mask}
    )
    return jnp.sum(logits**2), out["attn_logits"]

  return loss


@pytest.mark.parametrize(
  "scan,mask", [(False, [[1, 1], [0, 1]]), (False, [[1, 1], [1, 1]]), (True, [[1, 1], [1, 1]])]
)
def test_fully_copied_layers_skip_their_own_q_and_k(setup, scan, mask):
  """A numpy mask tells the ViT at trace time which layers copy every head: the same loss and gradients as
  a traced mask, with the student's own q, k and q k^T (and their backward) gone from the program."""
  model, params, images = setup
  if scan:
    model, params = build_model(scan=True), vit.loop_to_scan(params)
  n = (S // 4) ** 2 + 1
  teacher_logits = 3 * jax.random.normal(jax.random.key(5), (2, B, 2, n, n))
  static = np.asarray(mask, bool)
  grad_fns = {
    kind: jax.jit(jax.value_and_grad(_copy_loss(model, images, teacher_logits, m), has_aux=True))
    for kind, m in (("static", static), ("traced", jnp.asarray(static)))
  }
  (loss_s, maps_s), g_s = grad_fns["static"](params)
  (loss_t, maps_t), g_t = grad_fns["traced"](params)
  np.testing.assert_allclose(loss_s, loss_t, rtol=1e-6)
  np.testing.assert_allclose(maps_s, maps_t, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(maps_s[static.all(1)], teacher_logits[static.all(1)])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_s, g_t)
  flops = {k: f.lower(params).compile().cost_analysis()["flops"] for k, f in grad_fns.items()}
  assert flops["static"] < 0.9 * flops["traced"], flops


def test_loop_equals_scan_when_only_some_layers_copy(setup):
  """A static mask copying every head of layer 1 only: the scan's blocks share one `copied` flag, which
  a partly copying stack must leave off (a copied block skips its own q and k and attends with the
  override's logits, here layer 0 with teacher maps its mask does not select). Loop and scan attend
  alike, layer 0 with its own logits."""
  model, params, images = setup
  scanned, scan_params = build_model(scan=True), vit.loop_to_scan(params)
  n = (S // 4) ** 2 + 1
  teacher_logits = 3 * jax.random.normal(jax.random.key(5), (2, B, 2, n, n))
  override = {"logits": teacher_logits, "mask": np.array([[False, False], [True, True]])}
  own, own_out = model.apply({"params": params}, images, train=False)
  loop, loop_out = model.apply({"params": params}, images, train=False, override=override)
  scan, scan_out = scanned.apply({"params": scan_params}, images, train=False, override=override)
  assert not np.allclose(loop, own, atol=1e-4)  # the copy in layer 1 matters
  np.testing.assert_allclose(scan, loop, rtol=1e-6, atol=1e-6)
  for layer in range(2):
    np.testing.assert_allclose(
      scan_out["attn_logits"][layer],
      loop_out["attn_logits"][layer],
      rtol=1e-6,
      atol=1e-6,
      err_msg=f"layer {layer}",
    )
  np.testing.assert_allclose(scan_out["attn_logits"][0], own_out["attn_logits"][0], atol=1e-6)
  np.testing.assert_array_equal(scan_out["attn_logits"][1], teacher_logits[1])


def _peaked_qk(params, gain):
  """The q and k kernels times `gain`: random init attends almost uniformly (logits ~0.05), where
  rounding the logits barely shows."""
  kernels = {("query", "kernel"), ("key", "kernel")}
  return jax.tree_util.tree_map_with_path(
    lambda p, x: gain * x if tuple(getattr(k, "key", "") for k in p[-2:]) in kernels else x,
    params,
  )


def _ce_per_head(teacher_logits_LBHNN, student_logits_LBHNN) -> np.ndarray:
  """numpy, float64: [L, H] mean over batch and queries of -sum_k softmax(t)_k log_softmax(s)_k."""
  t = np.asarray(teacher_logits_LBHNN, np.float64)
  p = np.exp(t - t.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  s = np.asarray(student_logits_LBHNN, np.float64)
  log_q = s - s.max(-1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
  return -(p * log_q).sum(-1).mean((1, 3))


def test_bf16_in_block_ce_reads_the_float32_logits(setup):
  """dtype_mm bf16 rounds the matmuls' inputs, not the logits: softmax, logsumexp and the in-block
  distillation CE run on the float32 logits each layer reports. Peaked maps (q, k kernels x20, logits
  up to ~18) and few queries (one image of 17 tokens), so that bf16-rounded logits move the CE by
  ~5e-4, far outside the tolerance."""
  _, _, images = setup
  model, images, rtol = build_model(variant="Pico/7", dtype_mm="bfloat16"), images[:1], 1e-6
  params = _peaked_qk(model.init(jax.random.key(1), images, train=False)["params"], 20.0)
  n = (S // 7) ** 2 + 1
  teacher_logits = 3 * jax.random.normal(jax.random.key(5), (2, 1, 2, n, n))
  target = attention.AttnTarget((0, 1), {"logits": teacher_logits})
  _, out = model.apply({"params": params}, images, train=False, attn_target=target)
  assert out["attn_logits"].dtype == jnp.float32 and out["attn_ce"].shape == (2, 2)
  want = _ce_per_head(teacher_logits, out["attn_logits"])
  np.testing.assert_allclose(out["attn_ce"], want, rtol=rtol)
  # Control: the CE of the same logits rounded to bf16 is far outside `rtol`.
  rounded = out["attn_logits"].astype(jnp.bfloat16).astype(jnp.float32)
  assert np.abs(_ce_per_head(teacher_logits, rounded) / want - 1).max() > 100 * rtol


@pytest.mark.parametrize("scan", [False, True])
def test_fused_attention_matches_materialized(setup, scan):
  """`attention_impl="fused"` is the same function, also where a layer needs its maps (copied logits,
  a direct distillation loss) and so keeps the materialised path."""
  _, params, images = setup
  if scan:
    params = vit.loop_to_scan(params)
  models = {impl: build_model(scan=scan, attention_impl=impl) for impl in attention.ATTENTION_IMPLS}
  n = (S // 4) ** 2 + 1
  rng = np.random.default_rng(0)
  qk = {k: jnp.asarray(rng.normal(size=(1, B, n, 2, 16)), jnp.float32) for k in ("q", "k")}
  cases = {
    "plain": {},
    "v override": {
      "override": {
        "v": jnp.asarray(rng.normal(size=(2, B, n, 2, 16)), jnp.float32),
        "mask": np.array([[True, False], [False, False]]),
      }
    },
    "copied head": {
      "override": {
        "logits": jnp.asarray(rng.normal(size=(2, B, 2, n, n)), jnp.float32),
        "mask": np.array([[False, True], [False, False]]),
      }
    },
    "direct loss": {"attn_target": attention.AttnTarget((1,), qk)},
    "blockwise loss": {
      "attn_target": attention.AttnTarget((1,), qk, attention.LossForm("blockwise"))
    },
  }
  for name, kwargs in cases.items():

    def loss(p, impl):
      logits, out = models[impl].apply({"params": p}, images, train=False, **kwargs)
      return jnp.sum(logits**2) + out.get("attn_ce", jnp.zeros(())).sum()

    got = {impl: jax.value_and_grad(loss)(params, impl) for impl in models}
    np.testing.assert_allclose(got["fused"][0], got["materialized"][0], rtol=1e-5, err_msg=name)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name),
      got["fused"][1],
      got["materialized"][1],
    )


def test_override_rejects_unknown_keys(setup):
  model, params, images = setup
  with pytest.raises(ValueError, match="override needs"):
    model.apply({"params": params}, images, train=False, override={"attn": jnp.zeros(1)})
