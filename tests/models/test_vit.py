"""The ViT contract: shapes, loop == scan, truncation, drop-path masks, pooling, variants, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.errors import ConfigError
from at_jax.models import encoder, vit
from tests.models.conftest import B, S, build_model


def test_output_shapes_and_names(setup):
  model, params, images = setup
  logits, out = model.apply({"params": params}, images, train=False, want_qkv=True)
  n = (S // 4) ** 2 + 1
  assert logits.shape == (B, 10)
  assert out["attn_logits"].shape == (2, B, 2, n, n) and out["attn_logits"].dtype == jnp.float32
  assert out["q"].shape == out["k"].shape == out["v"].shape == (2, B, n, 2, 16)
  attn = params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]
  assert set(attn) == {"query", "key", "value", "out"}
  assert params["pos_embedding"].shape == (1, n, 32) and params["cls"].shape == (1, 1, 32)
  assert set(params) == {"embedding", "cls", "pos_embedding", "Transformer", "fc_norm", "head"}


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_loop_equals_scan(setup, remat):
  model, params, images = setup
  scanned = build_model(scan=True, remat_policy=remat)
  scan_params = vit.loop_to_scan(params)
  assert scan_params["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 32)
  # Same structure as a scan model's own init.
  own = scanned.init(jax.random.key(1), images, train=False)["params"]
  assert jax.tree.structure(own) == jax.tree.structure(scan_params)
  a, out_a = model.apply({"params": params}, images, train=False, want_qkv=True)
  b, out_b = scanned.apply({"params": scan_params}, images, train=False, want_qkv=True)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  for k in ("attn_logits", "q", "v"):
    np.testing.assert_allclose(out_a[k], out_b[k], rtol=1e-6, atol=1e-6)
  back = vit.scan_to_loop(scan_params)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), back, params))
  # Gradients agree too (remat must not change them).
  loss = lambda m, p: m.apply({"params": p}, images, train=False)[0].sum()
  ga = vit.loop_to_scan(jax.grad(lambda p: loss(model, p))(params))
  gb = jax.grad(lambda p: loss(scanned, p))(scan_params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), ga, gb)


def test_loop_to_scan_stacks_host_arrays_on_the_host(setup):
  """A checkpoint read from disk (numpy leaves) is stacked with numpy: no device program, no device copy;
  the same values as the device path."""
  _, params, _ = setup
  host = jax.tree.map(np.asarray, params)
  compiles = []
  listener = lambda event, seconds, **kw: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    stacked = vit.loop_to_scan(host)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not [e for e in compiles if "compile" in e]
  leaves = jax.tree.leaves(stacked["Transformer"]["encoderblock"])
  assert leaves and all(type(x) is np.ndarray for x in leaves)
  on_device = vit.loop_to_scan(params)
  jax.tree.map(np.testing.assert_array_equal, stacked, on_device)


@pytest.mark.parametrize("scan", [False, True])
def test_truncate_keeps_the_first_layers(setup, scan):
  model, params, images = setup
  deep = build_model(depth=4, scan=scan)
  deep_params = deep.init(jax.random.key(2), images, train=False)["params"]
  short, short_params = vit.truncate(deep, deep_params, 3)
  assert short.depth == 3
  assert jax.tree.structure(short_params) == jax.tree.structure(
    short.init(jax.random.key(2), images, train=False)["params"]
  )
  _, out = deep.apply({"params": deep_params}, images, train=False, want_qkv=True)
  _, got = short.apply({"params": short_params}, images, train=False, want_qkv=True)
  for k in ("attn_logits", "q", "k"):
    np.testing.assert_array_equal(got[k], out[k][:3])
  assert vit.truncate(deep, deep_params, 4)[0] is deep


def test_gelu_is_the_exact_erf_form():
  x = jnp.linspace(-8.0, 8.0, 2001)
  gelu, reference = encoder.ACTIVATIONS["gelu"], lambda v: jax.nn.gelu(v, approximate=False)
  # 1 + erf(x) cancels in the far negative tail: absolute errors up to ~1e-6 where GELU is ~1e-7 (as in
  # PyTorch's nn.GELU, which computes this same form).
  np.testing.assert_allclose(gelu(x), reference(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    jax.vmap(jax.grad(gelu))(x), jax.vmap(jax.grad(reference))(x), rtol=1e-5, atol=1e-6
  )
  assert gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_drop_masks_statistics_and_sharing(setup):
  masks = encoder.sample_drop_masks(jax.random.key(3), 4000, 4, 0.3)
  assert masks.shape == (4, 2, 4000)
  np.testing.assert_array_equal(masks[0], 1.0)  # linspace starts at rate 0
  keep_last = np.mean(np.asarray(masks[-1]) > 0)
  assert abs(keep_last - 0.7) < 0.03
  np.testing.assert_allclose(
    np.asarray(masks[-1]).max(), 1 / 0.7, rtol=1e-6
  )  # kept samples rescaled
  model, params, images = setup
  dropped = build_model(drop_path=0.5)
  m = encoder.sample_drop_masks(jax.random.key(4), B, 2, 0.5)
  a, _ = dropped.apply({"params": params}, images, train=True, drop_masks=m)
  b, _ = dropped.apply(
    {"params": params}, images, train=False, drop_masks=m
  )  # masks win over `train`
  c, _ = dropped.apply({"params": params}, images, train=False)  # eval: no drop path
  ref, _ = model.apply({"params": params}, images, train=False)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(c, ref)
  # Without masks, train mode samples its own from the 'dropout' rng.
  d, _ = dropped.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(5)})
  assert not np.allclose(d, ref)


def test_all_ones_masks_equal_no_drop_path(setup):
  model, params, images = setup
  ones = jnp.ones((2, 2, B))
  a, _ = model.apply({"params": params}, images, train=False, drop_masks=ones)
  b, _ = model.apply({"params": params}, images, train=False)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_each_branch_takes_its_own_drop_mask_row(setup):
  """Masks are [L, R=2, B]: row 0 scales the attention branch, row 1 the MLP branch, per sample. Scaling
  a branch by m equals scaling its output projection (kernel and bias) by m, with no masks, so each
  sample matches an unmasked forward; a block reading one row for both branches does not."""
  _, _, images = setup
  model = build_model(depth=1)
  params = model.init(jax.random.key(2), images, train=False)["params"]
  attn_row, mlp_row = (0.0, 2.0, 1.0), (2.0, 0.0, 1.0)  # sample 0 drops attention, 1 the MLP
  masks = jnp.array([[attn_row, mlp_row]])
  masked, _ = model.apply({"params": params}, images, train=False, drop_masks=masks)

  def scaled(attn, mlp):
    p = jax.tree.map(lambda x: x, params)  # a copy whose dicts can be edited
    block = p["Transformer"]["encoderblock_0"]
    for parent, name, m in (
      (block["MultiHeadDotProductAttention_0"], "out", attn),
      (block["MlpBlock_0"], "Dense_1", mlp),
    ):
      parent[name] = jax.tree.map(lambda x, m=m: m * x, parent[name])
    return model.apply({"params": p}, images, train=False)[0]

  for b in range(B):
    expected = scaled(attn_row[b], mlp_row[b])[b]
    np.testing.assert_allclose(masked[b], expected, rtol=1e-5, atol=1e-6, err_msg=f"sample {b}")
  # Control: the branches matter, so a swapped or shared row would show.
  assert not np.allclose(scaled(0.0, 2.0)[0], scaled(2.0, 2.0)[0], atol=1e-4)
  assert not np.allclose(scaled(2.0, 0.0)[1], scaled(2.0, 2.0)[1], atol=1e-4)


def test_cls_pool_and_headless(setup):
  _, _, images = setup
  cls_model = build_model(pool="cls")
  p = cls_model.init(jax.random.key(0), images, train=False)["params"]
  assert "encoder_norm" in p and "fc_norm" not in p
  assert cls_model.apply({"params": p}, images, train=False)[0].shape == (B, 10)
  headless = build_model(num_classes=0)
  p = headless.init(jax.random.key(0), images, train=False)["params"]
  assert "head" not in p
  assert headless.apply({"params": p}, images, train=False)[0].shape == (B, 32)
  no_cls = build_model(class_token=False)
  p = no_cls.init(jax.random.key(0), images, train=False)["params"]
  assert no_cls.apply({"params": p}, images, train=False)[1]["attn_logits"].shape[-1] == 49
  with pytest.raises(ConfigError, match="model.pool"):
    build_model(pool="cls", class_token=False).init(jax.random.key(0), images, train=False)


def test_cls_mean_pool_reads_the_normed_cls_and_mean_patch_token(setup):
  """[cls | mean of the patches] after the one final LayerNorm (transformers' DINOv2 classifier input):
  registers are not averaged, the head reads 2 x width, and it needs a cls token as 'cls' does."""
  _, _, images = setup
  model = build_model(pool="cls_mean", num_registers=2)
  p = model.init(jax.random.key(0), images, train=False)["params"]
  assert "encoder_norm" in p and "fc_norm" not in p and p["head"]["kernel"].shape == (64, 10)
  logits, out = model.apply({"params": p}, images, train=False)
  normed = nn.LayerNorm(epsilon=model.norm_eps).apply({"params": p["encoder_norm"]}, out["tokens"])
  want = jnp.concatenate([normed[:, 0], normed[:, 3:].mean(axis=1)], axis=-1)  # 1 cls + 2 registers
  np.testing.assert_allclose(out["pre_logits"], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits, want @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5)
  # 'cls' pooling of the same encoder (its one LayerNorm too) gives the cls half.
  cls = build_model(pool="cls", num_registers=2, num_classes=0)
  encoder = {k: v for k, v in p.items() if k != "head"}
  np.testing.assert_array_equal(
    cls.apply({"params": encoder}, images, train=False)[0], out["pre_logits"][:, :32]
  )
  headless = build_model(pool="cls_mean", num_classes=0)
  hp = headless.init(jax.random.key(0), images, train=False)["params"]
  assert headless.apply({"params": hp}, images, train=False)[0].shape == (B, 64)
  for build in (
    lambda: build_model(pool="cls_mean", class_token=False),
    lambda: build_model(pool="x"),
  ):
    with pytest.raises(ConfigError, match="model.pool") as e:
      build()
    assert e.value.field == "model.pool"
  with pytest.raises(ConfigError, match="'cls_mean' pooling needs model.class_token=True"):
    vit.ViT(10, 4, 32, 2, 64, 2, pool="cls_mean", class_token=False).init(
      jax.random.key(0), images, train=False
    )


def test_bf16_matmuls_keep_float32_logits(setup):
  model, params, images = setup
  bf16 = build_model(dtype_mm="bfloat16")
  a, out = bf16.apply({"params": params}, images, train=False)
  ref, _ = model.apply({"params": params}, images, train=False)
  assert out["attn_logits"].dtype == jnp.float32 and a.dtype == jnp.float32
  np.testing.assert_allclose(a, ref, atol=0.1)


@pytest.mark.parametrize(
  "variant,expected",
  [
    ("Ti/16", (192, 12, 768, 3, 16)),
    ("S/16", (384, 12, 1536, 6, 16)),
    ("B/16", (768, 12, 3072, 12, 16)),
    ("L/16", (1024, 24, 4096, 16, 16)),
    ("H/14", (1280, 32, 5120, 16, 14)),
    ("Mu/4", (128, 6, 512, 4, 4)),
  ],
)
def test_variants(variant, expected):
  d = vit.decode_variant(variant)
  assert (d["width"], d["depth"], d["mlp_dim"], d["num_heads"], d["patch_size"]) == expected


def test_vitl_param_count_matches_timm():
  model = vit.build({"variant": "L/16", "num_classes": 1000})
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
  )
  # timm vit_large_patch16_224 with global_pool='avg' and fc_norm: 304,326,632 parameters.
  assert sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)) == 304_326_632


def test_build_errors():
  with pytest.raises(ConfigError, match="model.variant"):
    vit.build({"variant": "XXL/16", "num_classes": 10})
  with pytest.raises(ConfigError, match="unknown model fields"):
    vit.build({"variant": "Ti/16", "num_classes": 10, "dropout": 0.1})
  with pytest.raises(ConfigError, match="model.remat_policy"):
    vit.build({"variant": "Ti/16", "num_classes": 10, "remat_policy": "some"})
  with pytest.raises(ConfigError, match="model.attention_impl"):
    vit.build({"variant": "Ti/16", "num_classes": 10, "attention_impl": "flash"})
  m = vit.build({"variant": "Ti/16", "num_classes": 10, "width": 96})
  assert m.width == 96 and m.depth == 12  # explicit fields override the variant
  assert vit.build(vit.model_fields(m)) == m
