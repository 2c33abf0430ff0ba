"""Vision Transformer whose attention can be overridden layer by layer.

The only file with network math. `ViT.__call__` returns `(logits, out)`, where `out` holds every layer's
pre-softmax attention logits stacked as `attn_logits` [L, B, H, N, N] (and q/k/v [L, B, N, H, Dh] when
`want_qkv`). An optional `override` replaces, in the layers/heads its mask selects, the attention logits
or probabilities (attention copy) or q, k or v (the paper's Q/K/V variants).

Parameter names follow big_vision's ViT (`embedding`, `pos_embedding`, `cls`,
`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}`, `MlpBlock_0`, `head`),
except that `pos_embedding` covers the cls slot too ([1, 1 + num_patches, D]), as in timm and MAE, so
converted PyTorch teachers need no surgery. With `scan=True` the blocks live stacked under
`Transformer/encoderblock`; `scan_to_loop` / `loop_to_scan` convert.

dtype policy: params are float32; matmuls run in `dtype_mm` (bfloat16 on accelerators); the residual
stream, attention logits, softmax and LayerNorm are float32.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax.errors import ConfigError

Array = jax.Array
Override = Mapping[str, Array]

# width, depth, mlp_dim, num_heads. The last three are small models for 28-32 px images.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "Mu": (128, 6, 512, 4),
    "Nano": (64, 4, 256, 2),
    "Pico": (32, 2, 64, 2),
}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
OVERRIDE_KEYS = ("logits", "probs", "q", "k", "v")
_trunc_normal = nn.initializers.truncated_normal(0.02)


def decode_variant(variant: str) -> dict[str, int]:
  """`"L/16"` -> dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=16)."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if match is None or match.group(1) not in VARIANTS:
    raise ConfigError("model.variant", f"unknown ViT variant {variant!r}; expected NAME/PATCH with NAME "
                      f"in {sorted(VARIANTS)}, e.g. 'L/16' or 'Mu/4'")
  width, depth, mlp_dim, num_heads = VARIANTS[match.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(match.group(2)))


def sample_drop_masks(rng: Array, batch: int, depth: int, rate: float) -> Array:
  """Per-sample stochastic-depth masks [L, 2, B] (attention branch, MLP branch), already scaled.

  Layer l keeps a sample with probability 1 - rate * l / (depth - 1) (timm's linspace); kept samples are
  scaled by 1 / keep_prob. The train step draws these once and hands the same masks to teacher and student.
  """
  keep_L = 1.0 - jnp.linspace(0.0, rate, depth, dtype=jnp.float32)
  keep = jax.random.bernoulli(rng, keep_L[:, None, None], (depth, 2, batch))
  return keep.astype(jnp.float32) / keep_L[:, None, None]


class Attention(nn.Module):
  """Multi-head self-attention that exposes its logits and obeys an override."""
  num_heads: int
  qkv_bias: bool = True
  dtype_mm: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BND: Array, override: Override | None, want_qkv: bool
               ) -> tuple[Array, dict[str, Array]]:
    width = x_BND.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), use_bias=self.qkv_bias, dtype=self.dtype_mm,
        kernel_init=_trunc_normal, name=name)
    qkv = {name: dense(layer)(x_BND) for name, layer in (("q", "query"), ("k", "key"), ("v", "value"))}
    if override is not None:
      # `jnp.where` (not arithmetic blending) so that overridden entries pass exactly zero gradient back to
      # the student's own projections.
      for name in set(qkv) & set(override):
        qkv[name] = jnp.where(override["mask"][None, None, :, None],
                              override[name].astype(qkv[name].dtype), qkv[name])
    q_BNHD, k_BNHD, v_BNHD = qkv["q"], qkv["k"], qkv["v"]

    logits_BHNN = jnp.einsum("bqhd,bkhd->bhqk", q_BNHD, k_BNHD,
                             preferred_element_type=jnp.float32) * head_dim**-0.5
    if override is not None and "logits" in override:
      mask_BHNN = override["mask"][None, :, None, None]
      probs_BHNN = jax.nn.softmax(
          jnp.where(mask_BHNN, override["logits"].astype(jnp.float32), logits_BHNN), axis=-1)
    elif override is not None and "probs" in override:
      mask_BHNN = override["mask"][None, :, None, None]
      probs_BHNN = jnp.where(mask_BHNN, override["probs"].astype(jnp.float32),
                             jax.nn.softmax(logits_BHNN, axis=-1))
    else:
      probs_BHNN = jax.nn.softmax(logits_BHNN, axis=-1)

    y_BNHD = jnp.einsum("bhqk,bkhd->bqhd", probs_BHNN.astype(self.dtype_mm), v_BNHD.astype(self.dtype_mm))
    y_BND = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype_mm, kernel_init=_trunc_normal,
                            name="out")(y_BNHD)
    out = {"attn_logits": logits_BHNN}
    if want_qkv:
      out.update(q=q_BNHD.astype(jnp.float32), k=k_BNHD.astype(jnp.float32), v=v_BNHD.astype(jnp.float32))
    return y_BND, out


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype_mm: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype_mm, kernel_init=_trunc_normal, name=name)  # noqa: E731
    y = nn.gelu(dense(self.mlp_dim, "Dense_0")(x), approximate=False)  # Exact GELU, as timm/MAE.
    return dense(x.shape[-1], "Dense_1")(y)


class Block(nn.Module):
  """Pre-norm encoder block. Scan-compatible: `(x, (override, drop)) -> (x, out)`."""
  mlp_dim: int
  num_heads: int
  qkv_bias: bool = True
  dtype_mm: Any = jnp.float32
  want_qkv: bool = False

  @nn.compact
  def __call__(self, x_BND: Array, inputs: tuple[Override | None, Array | None]
               ) -> tuple[Array, dict[str, Array]]:
    override, drop_2B = inputs
    scale = (lambda y, i: y) if drop_2B is None else (lambda y, i: y * drop_2B[i][:, None, None])
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(x_BND)
    y, out = Attention(self.num_heads, self.qkv_bias, self.dtype_mm,
                       name="MultiHeadDotProductAttention_0")(y, override, self.want_qkv)
    x_BND = x_BND + scale(y, 0).astype(jnp.float32)
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_1")(x_BND)
    y = MlpBlock(self.mlp_dim, self.dtype_mm, name="MlpBlock_0")(y)
    return x_BND + scale(y, 1).astype(jnp.float32), out


class Encoder(nn.Module):
  """The stack of blocks, as a Python loop or an `nn.scan`, optionally rematerialised."""
  depth: int
  mlp_dim: int
  num_heads: int
  qkv_bias: bool = True
  dtype_mm: Any = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  want_qkv: bool = False

  @nn.compact
  def __call__(self, x_BND: Array, override: Override | None, drop_L2B: Array | None
               ) -> tuple[Array, dict[str, Array]]:
    block = Block
    if self.remat_policy != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
    kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, qkv_bias=self.qkv_bias,
                  dtype_mm=self.dtype_mm, want_qkv=self.want_qkv)
    if self.scan:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=0, length=self.depth)
      return scanned(name="encoderblock", **kwargs)(x_BND, (override, drop_L2B))
    outs = []
    for i in range(self.depth):
      layer = lambda t: None if t is None else jax.tree.map(lambda a: a[i], t)  # noqa: E731
      x_BND, out = block(name=f"encoderblock_{i}", **kwargs)(x_BND, (layer(override), layer(drop_L2B)))
      outs.append(out)
    return x_BND, jax.tree.map(lambda *a: jnp.stack(a), *outs)


class ViT(nn.Module):
  """ViT classifier; `num_classes=0` gives a headless encoder (e.g. an MAE teacher).

  Attributes:
    pool: "gap" (mean of patch tokens, then LayerNorm `fc_norm`, as MAE and the paper) or "cls"
      (LayerNorm `encoder_norm` over the sequence, then the cls token). The cls token stays in the sequence
      with gap pooling too (`class_token`), so student and teacher maps are both (1 + patches)^2.
    drop_path: max stochastic-depth rate (linear over depth), used when `train` and no masks are given.
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool: str = "gap"
  class_token: bool = True
  qkv_bias: bool = True
  drop_path: float = 0.0
  head_init_std: float = 0.02
  dtype_mm: str = "float32"
  scan: bool = False
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, images_BHWC: Array, *, train: bool, override: Override | None = None,
               drop_masks: Array | None = None, want_qkv: bool = False
               ) -> tuple[Array, dict[str, Array]]:
    """Runs the ViT.

    Args:
      images_BHWC: float images [B, H, W, C].
      train: enables stochastic depth when `drop_masks` is None.
      override: None, or a dict with "mask" [L, H] bool (which layers/heads to override) and one of
        "logits"/"probs" [L, B, H, N, N] (attention copy) or "q"/"k"/"v" [L, B, N, H, Dh].
      drop_masks: [L, 2, B] per-sample residual scales from `sample_drop_masks`; given, they are applied
        whatever `train` is (the teacher runs with the student's masks).
      want_qkv: also return q, k, v per layer.

    Returns:
      logits [B, num_classes] (pre-logits [B, D] when num_classes == 0), and a dict with
      "attn_logits" [L, B, H, N, N] float32, "pre_logits" [B, D], and "q"/"k"/"v" if asked.
    """
    dtype_mm = jnp.dtype(self.dtype_mm)
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                dtype=dtype_mm, name="embedding",
                # PyTorch's default Conv2d init (uniform +-1/sqrt(fan_in)), as the paper's student.
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))(images_BHWC)
    batch = x.shape[0]
    x_BND = x.reshape(batch, -1, self.width).astype(jnp.float32)
    if self.class_token:
      cls = self.param("cls", _trunc_normal, (1, 1, self.width))
      x_BND = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)), x_BND], axis=1)
    x_BND = x_BND + self.param("pos_embedding", _trunc_normal, (1,) + x_BND.shape[1:])

    if drop_masks is None and train and self.drop_path > 0:
      drop_masks = sample_drop_masks(self.make_rng("dropout"), batch, self.depth, self.drop_path)
    if override is not None:
      unknown = set(override) - set(OVERRIDE_KEYS) - {"mask"}
      if unknown or "mask" not in override:
        raise ValueError(f"override needs 'mask' and keys from {OVERRIDE_KEYS}, got {sorted(override)}")
    x_BND, out = Encoder(self.depth, self.mlp_dim, self.num_heads, self.qkv_bias, dtype_mm, self.scan,
                         self.remat_policy, want_qkv, name="Transformer")(x_BND, override, drop_masks)

    if self.pool == "gap":
      tokens = x_BND[:, 1:] if self.class_token else x_BND
      pre_BD = nn.LayerNorm(epsilon=1e-6, name="fc_norm")(tokens.mean(axis=1))
    elif self.pool == "cls":
      if not self.class_token:
        raise ConfigError("model.pool", "'cls' pooling needs model.class_token=True")
      pre_BD = nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x_BND)[:, 0]
    else:
      raise ConfigError("model.pool", f"unknown pooling {self.pool!r}; use 'gap' or 'cls'")
    out["pre_logits"] = pre_BD
    if self.num_classes == 0:
      return pre_BD, out
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(self.head_init_std),
                      name="head")(pre_BD)
    return logits, out

  def tokens_for(self, image_size: int) -> int:
    return (image_size // self.patch_size) ** 2 + int(self.class_token)


def build(model_config: Mapping[str, Any]) -> ViT:
  """A ViT from a plain dict of its fields; `variant` ("L/16") expands into shape fields first."""
  kwargs = dict(model_config)
  if kwargs.get("variant"):
    kwargs = {**decode_variant(kwargs["variant"]), **{k: v for k, v in kwargs.items() if k != "variant"}}
  kwargs.pop("variant", None)
  fields = set(ViT.__dataclass_fields__) - {"parent", "name"}
  unknown = set(kwargs) - fields
  if unknown:
    raise ConfigError("model", f"unknown model fields {sorted(unknown)}; valid: {sorted(fields)}")
  if kwargs.get("remat_policy", "none") not in REMAT_POLICIES:
    raise ConfigError("model.remat_policy", f"{kwargs['remat_policy']!r} is not one of {sorted(REMAT_POLICIES)}")
  if kwargs.get("width", 768) % kwargs.get("num_heads", 12):
    raise ConfigError("model.num_heads", "width must be divisible by num_heads")
  return ViT(**kwargs)


def model_fields(model: ViT) -> dict[str, Any]:
  """The plain-dict description of `model` that `build` accepts (stored beside exported params)."""
  return {k: getattr(model, k) for k in ViT.__dataclass_fields__ if k not in ("parent", "name")}


def scan_to_loop(params: Mapping[str, Any]) -> dict[str, Any]:
  """Unstacks `Transformer/encoderblock` ([L, ...] leaves) into `encoderblock_{i}`."""
  params = dict(params)
  enc = dict(params["Transformer"])
  stacked = enc.pop("encoderblock")
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    enc[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  params["Transformer"] = enc
  return params


def loop_to_scan(params: Mapping[str, Any]) -> dict[str, Any]:
  """Stacks `encoderblock_{i}` into `Transformer/encoderblock` with a leading layer axis."""
  params = dict(params)
  enc = dict(params["Transformer"])
  names = sorted((k for k in enc if k.startswith("encoderblock_")), key=lambda k: int(k.split("_")[1]))
  blocks = [enc.pop(k) for k in names]
  enc["encoderblock"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  params["Transformer"] = enc
  return params
