"""Vision Transformer whose attention can be overridden layer by layer.

The only file with network math. `ViT.__call__` returns `(logits, out)`, where `out` holds the pre-softmax
attention logits every layer attended with (the teacher's where a "logits" override copies them), stacked
as `attn_logits` [L, B, H, N, N] (and q/k/v [L, B, N, H, Dh] when `want_qkv`). An optional `override`
replaces, in the layers/heads its mask selects, the attention logits or probabilities (attention copy) or
q, k or v (the paper's Q/K/V variants). An optional `attn_target`
(attention distillation) makes every selected layer compute, inside the block, its cross-entropy against
the teacher's attention, so that no layer's maps outlive the layer (see `AttnTarget`).

Parameter names follow big_vision's ViT (`embedding`, `pos_embedding`, `cls`,
`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}`, `MlpBlock_0`, `head`),
except that `pos_embedding` covers the cls slot too ([1, 1 + num_patches, D]), as in timm and MAE, so
converted PyTorch teachers need no surgery. With `scan=True` the blocks live stacked under
`Transformer/encoderblock`; `scan_to_loop` / `loop_to_scan` convert.

Architecture switches a teacher family may need its student to mirror (follow-up work, arXiv 2605.07191,
found transfer fails without them): register tokens, LayerScale, QK-norm, a LayerNorm before the encoder,
cls or gap readout, the MLP activation, LayerNorm epsilon, and whether the position table covers the
prefix tokens.

dtype policy: params are float32; matmuls run in `dtype_mm` (bfloat16 on accelerators); the residual
stream, attention logits, softmax and LayerNorm are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from at_jax import sharding
from at_jax.errors import ConfigError
from at_jax.ops import attn_ce as attn_loss

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
# How a layer turns q, k, v into its output where nothing needs its N x N maps (no copied maps, no direct
# distillation loss): "materialized" forms softmax(q k^T) v from the maps, "fused" calls
# `jax.nn.dot_product_attention`, which is cuDNN's flash attention on GPUs for bf16/fp16 matmuls (linear
# memory, no N x N map in HBM) and XLA's reference elsewhere (on TPUs and CPUs it still forms the maps).
ATTENTION_IMPLS = ("materialized", "fused")
_trunc_normal = nn.initializers.truncated_normal(0.02)


def decode_variant(variant: str) -> dict[str, int]:
  """`"L/16"` -> dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=16)."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if match is None or match.group(1) not in VARIANTS:
    raise ConfigError(
      "model.variant",
      f"unknown ViT variant {variant!r}; expected NAME/PATCH with NAME "
      f"in {sorted(VARIANTS)}, e.g. 'L/16' or 'Mu/4'",
    )
  width, depth, mlp_dim, num_heads = VARIANTS[match.group(1)]
  return dict(
    width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=int(match.group(2))
  )


def sample_drop_masks(rng: Array, batch: int, depth: int, rate: float) -> Array:
  """Per-sample stochastic-depth masks [L, 2, B] (attention branch, MLP branch), already scaled.

  Layer l keeps a sample with probability 1 - rate * l / (depth - 1) (timm's linspace); kept samples are
  scaled by 1 / keep_prob. The train step draws these once and hands the same masks to teacher and student.
  """
  keep_L = 1.0 - jnp.linspace(0.0, rate, depth, dtype=jnp.float32)
  keep = jax.random.bernoulli(rng, keep_L[:, None, None], (depth, 2, batch))
  return keep.astype(jnp.float32) / keep_L[:, None, None]


ACTIVATIONS = {
  # Exact GELU, as timm/MAE/the paper, in its erf form: jax.nn.gelu's exact form goes through erfc, which
  # XLA:CPU expands into two polynomial branches per element (12% of a Ti/16 step); same values to 1e-6.
  "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 2**-0.5)),
  "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


@dataclasses.dataclass(frozen=True)
class BlockArch:
  """What every encoder block shares; one hashable value instead of a field per module."""

  mlp_dim: int
  num_heads: int
  qkv_bias: bool = True
  qk_norm: bool = False  # LayerNorm over head_dim on q and k (timm q_norm/k_norm)
  layerscale_init: float = 0.0  # > 0: per-channel residual scales (CaiT/DINOv2 LayerScale)
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  dtype_mm: Any = jnp.float32
  attention_impl: str = "materialized"  # ATTENTION_IMPLS


@dataclasses.dataclass(frozen=True)
class AttnTarget:
  """The teacher's attention for the distillation loss, computed layer by layer inside the encoder.

  `values` are stacked over the selected `layers` only: either "logits" [S, B, H, N, N] (stored maps) or
  "q" and "k" [S, B, N, H, Dh_teacher], from which each block forms its layer's teacher logits
  (scale Dh_teacher**-0.5) when it needs them. `impl` picks how the per-query cross-entropy is computed
  (`attn_loss.IMPLS`): "direct" materialises one layer's maps; "blockwise"/"pallas" stream over blocks of
  queries and keys from q and k and never hold an N x N map (they need "q"/"k" values).
  """

  layers: tuple[int, ...]
  values: Mapping[str, Array]
  impl: str = "direct"


def _attention_ce(
  target: Mapping[str, Array],
  impl: str,
  q_BNHD: Array,
  k_BNHD: Array,
  logits_BHNN: Array,
  lse_BHN: Array | None,
) -> Array:
  """Per-head cross-entropy [H] of this layer's attention against the teacher's, mean over batch and queries.

  `lse_BHN`: logsumexp of the student's logits over keys, when the block's softmax already has it.
  """
  if "logits" in target:
    ce_BHN = attn_loss.ce_from_logits(target["logits"], logits_BHNN, s_lse_BHN=lse_BHN)
  elif impl == "direct":
    t_logits = attn_loss.qk_logits(target["q"], target["k"], target["q"].shape[-1] ** -0.5)
    ce_BHN = attn_loss.ce_from_logits(t_logits, logits_BHNN, s_lse_BHN=lse_BHN)
  else:
    loss = functools.partial(
      attn_loss.attention_ce,
      impl,
      scale_t=target["q"].shape[-1] ** -0.5,
      scale_s=q_BNHD.shape[-1] ** -0.5,
    )
    if (
      impl == "pallas"
    ):  # a kernel is opaque to XLA's partitioner: hand each device its own examples
      loss = sharding.per_batch_shard(loss)
    ce_BHN = loss(target["q"], target["k"], q_BNHD, k_BNHD)
  return ce_BHN.mean(axis=(0, 2))


def _fused_attention(q_BNHD: Array, k_BNHD: Array, v_BNHD: Array, dtype: Any) -> Array:
  """softmax(q k^T / sqrt(Dh)) v without handing the maps back; see ATTENTION_IMPLS."""
  flash = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return jax.nn.dot_product_attention(
    q_BNHD.astype(dtype),
    k_BNHD.astype(dtype),
    v_BNHD.astype(dtype),
    implementation="cudnn" if flash else "xla",
  )


class Attention(nn.Module):
  """Multi-head self-attention that exposes its logits, obeys an override and scores itself against a target.

  Attributes:
    copied: every head of this layer takes the teacher's logits (a static fact of the override). The layer
      then skips its own q and k and their gradient, which are all zero (XLA cannot tell from a traced mask).
  """

  arch: BlockArch
  loss_impl: str = "direct"
  copied: bool = False

  @nn.compact
  def __call__(
    self,
    x_BND: Array,
    override: Override | None,
    want_qkv: bool,
    target: Mapping[str, Array] | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    a = self.arch
    width = x_BND.shape[-1]
    head_dim = width // a.num_heads
    dense = lambda name: nn.DenseGeneral(
      (a.num_heads, head_dim),
      use_bias=a.qkv_bias,
      dtype=a.dtype_mm,
      kernel_init=_trunc_normal,
      name=name,
    )
    own_qk = not self.copied or want_qkv or self.is_initializing()
    projections = (("q", "query"), ("k", "key"), ("v", "value")) if own_qk else (("v", "value"),)
    qkv = {name: dense(layer)(x_BND) for name, layer in projections}
    if a.qk_norm and own_qk:
      qkv["q"] = nn.LayerNorm(epsilon=a.norm_eps, name="query_norm")(qkv["q"].astype(jnp.float32))
      qkv["k"] = nn.LayerNorm(epsilon=a.norm_eps, name="key_norm")(qkv["k"].astype(jnp.float32))
    if override is not None:
      # `jnp.where` (not arithmetic blending) so that overridden entries pass exactly zero gradient back to
      # the student's own projections.
      for name in set(qkv) & set(override):
        qkv[name] = jnp.where(
          override["mask"][None, None, :, None], override[name].astype(qkv[name].dtype), qkv[name]
        )
    v_BNHD = qkv["v"]
    maps_override = override is not None and ("logits" in override or "probs" in override)
    needs_maps = maps_override or (
      target is not None and ("logits" in target or self.loss_impl == "direct")
    )

    if not own_qk:  # every head copied: the teacher's logits are this layer's
      logits_BHNN = sharding.constrain_batch(override["logits"].astype(jnp.float32))
    else:
      # Formed here for `out`; where only `out` reads them and nobody reads that, XLA drops them.
      logits_BHNN = (
        jnp.einsum(
          "bqhd,bkhd->bhqk",
          qkv["q"].astype(a.dtype_mm),
          qkv["k"].astype(a.dtype_mm),
          preferred_element_type=jnp.float32,
        )
        * head_dim**-0.5
      )
      # The biggest activation: keep it split along the batch like the data (GSPMD could otherwise follow
      # the fsdp-sharded projection kernels and gather the batch).
      logits_BHNN = sharding.constrain_batch(logits_BHNN)
    lse_BHN = None
    if a.attention_impl == "fused" and not needs_maps:
      y_BNHD = _fused_attention(qkv["q"], qkv["k"], v_BNHD, a.dtype_mm)
    else:
      if override is not None and "logits" in override and own_qk:
        mask_BHNN = override["mask"][None, :, None, None]
        logits_BHNN = jnp.where(mask_BHNN, override["logits"].astype(jnp.float32), logits_BHNN)
      if override is not None and "probs" in override:
        mask_BHNN = override["mask"][None, :, None, None]
        probs_BHNN = jnp.where(
          mask_BHNN, override["probs"].astype(jnp.float32), jax.nn.softmax(logits_BHNN, axis=-1)
        )
      elif target is not None and own_qk:
        # The distillation CE needs logsumexp(logits) too: one pass over the maps serves both.
        lse_BHN = jax.nn.logsumexp(logits_BHNN, axis=-1)
        probs_BHNN = jnp.exp(logits_BHNN - lse_BHN[..., None])
      else:
        probs_BHNN = jax.nn.softmax(logits_BHNN, axis=-1)
      y_BNHD = jnp.einsum(
        "bhqk,bkhd->bqhd", probs_BHNN.astype(a.dtype_mm), v_BNHD.astype(a.dtype_mm)
      )
    y_BND = nn.DenseGeneral(
      width, axis=(-2, -1), dtype=a.dtype_mm, kernel_init=_trunc_normal, name="out"
    )(y_BNHD)
    out = {"attn_logits": logits_BHNN}
    if target is not None:
      out["attn_ce"] = _attention_ce(
        target, self.loss_impl, qkv["q"], qkv["k"], logits_BHNN, lse_BHN
      )
    if want_qkv:
      out.update({k: x.astype(jnp.float32) for k, x in qkv.items()})
    return y_BND, out


class MlpBlock(nn.Module):
  arch: BlockArch

  @nn.compact
  def __call__(self, x: Array) -> Array:
    a = self.arch
    dense = lambda n, name: nn.Dense(n, dtype=a.dtype_mm, kernel_init=_trunc_normal, name=name)
    y = ACTIVATIONS[a.mlp_act](dense(a.mlp_dim, "Dense_0")(x))
    return dense(x.shape[-1], "Dense_1")(y)


class Block(nn.Module):
  """Pre-norm encoder block. Scan-compatible: `(x, (override, drop, target)) -> (x, out)`."""

  arch: BlockArch
  want_qkv: bool = False
  loss_impl: str = "direct"
  copied: bool = False

  @nn.compact
  def __call__(
    self, x_BND: Array, inputs: tuple[Override | None, Array | None, Mapping[str, Array] | None]
  ) -> tuple[Array, dict[str, Array]]:
    a = self.arch
    override, drop_2B, target = inputs
    width = x_BND.shape[-1]

    def residual(y, i):
      y = y.astype(jnp.float32)
      if a.layerscale_init > 0:
        y = y * self.param(f"layerscale_{i}", nn.initializers.constant(a.layerscale_init), (width,))
      return y if drop_2B is None else y * drop_2B[i][:, None, None]

    y = nn.LayerNorm(epsilon=a.norm_eps, name="LayerNorm_0")(x_BND)
    y, out = Attention(a, self.loss_impl, self.copied, name="MultiHeadDotProductAttention_0")(
      y, override, self.want_qkv, target
    )
    x_BND = x_BND + residual(y, 0)
    y = nn.LayerNorm(epsilon=a.norm_eps, name="LayerNorm_1")(x_BND)
    return x_BND + residual(MlpBlock(a, name="MlpBlock_0")(y), 1), out


def _copied_layers(override: Override | None, depth: int) -> np.ndarray:
  """[L] bool: the layers whose every head takes the teacher's logits, read from a concrete (numpy) mask.

  A traced mask says nothing at trace time; those layers then compute their own q and k as well.
  """
  if override is None or "logits" not in override or not isinstance(override["mask"], np.ndarray):
    return np.zeros((depth,), bool)
  return override["mask"].all(axis=1)


class Encoder(nn.Module):
  """The stack of blocks, as a Python loop or an `nn.scan`, optionally rematerialised."""

  depth: int
  arch: BlockArch
  scan: bool = False
  remat_policy: str = "none"
  want_qkv: bool = False

  @nn.compact
  def __call__(
    self,
    x_BND: Array,
    override: Override | None,
    drop_L2B: Array | None,
    target: AttnTarget | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    block = Block
    if self.remat_policy != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
    impl = "direct" if target is None else target.impl
    copied_L = _copied_layers(override, self.depth)
    if self.scan:
      # Scanned blocks need every layer's inputs alike: unselected layers get zero targets (a uniform
      # teacher map) whose loss the reduction in `transfer` ignores.
      full = (
        None
        if target is None
        else {
          k: jnp.zeros((self.depth,) + v.shape[1:], v.dtype).at[jnp.asarray(target.layers)].set(v)
          for k, v in target.values.items()
        }
      )
      scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=0,
        length=self.depth,
      )
      return scanned(self.arch, self.want_qkv, impl, bool(copied_L.all()), name="encoderblock")(
        x_BND, (override, drop_L2B, full)
      )
    outs = []
    for i in range(self.depth):
      layer = lambda t: None if t is None else jax.tree.map(lambda a: a[i], t)
      target_i = None
      if target is not None and i in target.layers:
        target_i = {k: v[target.layers.index(i)] for k, v in target.values.items()}
      x_BND, out = block(
        self.arch, self.want_qkv, impl, bool(copied_L[i]), name=f"encoderblock_{i}"
      )(x_BND, (layer(override), layer(drop_L2B), target_i))
      outs.append(out)
    if target is not None:  # layers without a target report zero loss, so that the outputs stack
      heads = self.arch.num_heads
      outs = [
        o if "attn_ce" in o else {**o, "attn_ce": jnp.zeros((heads,), jnp.float32)} for o in outs
      ]
    return x_BND, jax.tree.map(lambda *a: jnp.stack(a), *outs)


class ViT(nn.Module):
  """ViT classifier; `num_classes=0` gives a headless encoder (e.g. an MAE teacher).

  The token sequence is [cls (if class_token), registers (num_registers), patches].

  Attributes:
    pool: "gap" (mean of patch tokens, then LayerNorm `fc_norm`, as MAE and the paper) or "cls"
      (LayerNorm `encoder_norm` over the sequence, then the cls token). The cls token stays in the sequence
      with gap pooling too (`class_token`), so student and teacher maps are both (1 + patches)^2.
    posemb_prefix: the learned position table also covers the cls/register tokens (timm's default, MAE);
      False: patches only (big_vision, timm `no_embed_class`, DINOv2 with registers).
    pre_norm: LayerNorm on the token sequence before the first block (CLIP's ln_pre, timm norm_pre).
    drop_path: max stochastic-depth rate (linear over depth), used when `train` and no masks are given.
    attention_impl: `ATTENTION_IMPLS`; "fused" gives the same function (to float tolerance) without the
      maps in layers that need none.
  """

  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool: str = "gap"
  class_token: bool = True
  num_registers: int = 0
  posemb_prefix: bool = True
  pre_norm: bool = False
  qkv_bias: bool = True
  qk_norm: bool = False
  layerscale_init: float = 0.0
  mlp_act: str = "gelu"
  norm_eps: float = 1e-6
  drop_path: float = 0.0
  head_init_std: float = 0.02
  dtype_mm: str = "float32"
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "materialized"

  @property
  def num_prefix(self) -> int:
    return int(self.class_token) + self.num_registers

  @nn.compact
  def __call__(
    self,
    images_BHWC: Array,
    *,
    train: bool,
    override: Override | None = None,
    drop_masks: Array | None = None,
    want_qkv: bool = False,
    patch_keep: Array | None = None,
    attn_target: AttnTarget | None = None,
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
      patch_keep: [B, K] int indices of the patches to keep (MAE's visible patches); None keeps all.
      attn_target: the teacher's attention in some layers (`AttnTarget`); each of those layers then
        reports its per-head cross-entropy against it, mean over batch and queries, in "attn_ce" [L, H]
        (zero in the other layers).

    Returns:
      logits [B, num_classes] (pre-logits [B, D] when num_classes == 0), and a dict with
      "attn_logits" [L, B, H, N, N] float32, "pre_logits" [B, D], "tokens" [B, N, D] (the encoder's
      output before any final norm), and "q"/"k"/"v" if asked.
    """
    dtype_mm = jnp.dtype(self.dtype_mm)
    x = nn.Conv(
      self.width,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      dtype=dtype_mm,
      name="embedding",
      # PyTorch's default Conv2d init (uniform +-1/sqrt(fan_in)), as the paper's student.
      kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    )(images_BHWC)
    batch = x.shape[0]
    patches_BPD = x.reshape(batch, -1, self.width).astype(jnp.float32)
    num_patches = patches_BPD.shape[1]
    table = num_patches + (self.num_prefix if self.posemb_prefix else 0)
    pos_1TD = self.param("pos_embedding", _trunc_normal, (1, table, self.width))
    patches_BPD = patches_BPD + pos_1TD[:, table - num_patches :]
    if patch_keep is not None:
      patches_BPD = jnp.take_along_axis(patches_BPD, patch_keep[:, :, None], axis=1)
    prefix = []
    if self.class_token:
      prefix.append(self.param("cls", _trunc_normal, (1, 1, self.width)))
    if self.num_registers:
      prefix.append(self.param("registers", _trunc_normal, (1, self.num_registers, self.width)))
    if prefix:
      prefix_1RD = jnp.concatenate(prefix, axis=1)
      if self.posemb_prefix:
        prefix_1RD = prefix_1RD + pos_1TD[:, : self.num_prefix]
      patches_BPD = jnp.concatenate([jnp.tile(prefix_1RD, (batch, 1, 1)), patches_BPD], axis=1)
    x_BND = patches_BPD
    if self.pre_norm:
      x_BND = nn.LayerNorm(epsilon=self.norm_eps, name="pre_norm")(x_BND)

    if drop_masks is None and train and self.drop_path > 0:
      drop_masks = sample_drop_masks(self.make_rng("dropout"), batch, self.depth, self.drop_path)
    if override is not None:
      unknown = set(override) - set(OVERRIDE_KEYS) - {"mask"}
      if unknown or "mask" not in override:
        raise ValueError(
          f"override needs 'mask' and keys from {OVERRIDE_KEYS}, got {sorted(override)}"
        )
    arch = BlockArch(
      self.mlp_dim,
      self.num_heads,
      self.qkv_bias,
      self.qk_norm,
      self.layerscale_init,
      self.mlp_act,
      self.norm_eps,
      dtype_mm,
      self.attention_impl,
    )
    if attn_target is not None and attn_target.impl not in attn_loss.IMPLS:
      raise ConfigError(
        "transfer.loss_impl", f"unknown {attn_target.impl!r}; use one of {attn_loss.IMPLS}"
      )
    x_BND, out = Encoder(
      self.depth, arch, self.scan, self.remat_policy, want_qkv, name="Transformer"
    )(x_BND, override, drop_masks, attn_target)
    out["tokens"] = x_BND

    if self.pool == "gap":
      pre_BD = nn.LayerNorm(epsilon=self.norm_eps, name="fc_norm")(
        x_BND[:, self.num_prefix :].mean(axis=1)
      )
    elif self.pool == "cls":
      if not self.class_token:
        raise ConfigError("model.pool", "'cls' pooling needs model.class_token=True")
      pre_BD = nn.LayerNorm(epsilon=self.norm_eps, name="encoder_norm")(x_BND)[:, 0]
    else:
      raise ConfigError("model.pool", f"unknown pooling {self.pool!r}; use 'gap' or 'cls'")
    out["pre_logits"] = pre_BD
    if self.num_classes == 0:
      return pre_BD, out
    logits = nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.truncated_normal(self.head_init_std),
      name="head",
    )(pre_BD)
    return logits, out

  def tokens_for(self, image_size: int) -> int:
    return (image_size // self.patch_size) ** 2 + self.num_prefix


# Fields that belong to the training recipe, not the architecture: a student that mirrors its teacher
# (`model.arch = "teacher"`) keeps its own values of these and takes everything else from the teacher.
RECIPE_FIELDS = (
  "num_classes",
  "pool",
  "drop_path",
  "head_init_std",
  "dtype_mm",
  "scan",
  "remat_policy",
  "attention_impl",
)


def expand(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """`variant` ("L/16") expanded into shape fields; explicit fields win over the variant's."""
  kwargs = dict(model_config)
  variant = kwargs.pop("variant", None)
  return {**decode_variant(variant), **kwargs} if variant else kwargs


def mirror(teacher_config: Mapping[str, Any], student_config: Mapping[str, Any]) -> dict[str, Any]:
  """Same architecture as the teacher (registers, LayerScale, QK-norm, ...), the student's recipe fields."""
  arch = {k: v for k, v in expand(teacher_config).items() if k not in RECIPE_FIELDS}
  return {**arch, **{k: v for k, v in student_config.items() if k in RECIPE_FIELDS}}


def build(model_config: Mapping[str, Any]) -> ViT:
  """A ViT from a plain dict of its fields; `variant` ("L/16") expands into shape fields first."""
  kwargs = expand(model_config)
  fields = set(ViT.__dataclass_fields__) - {"parent", "name"}
  unknown = set(kwargs) - fields
  if unknown:
    raise ConfigError("model", f"unknown model fields {sorted(unknown)}; valid: {sorted(fields)}")
  if kwargs.get("remat_policy", "none") not in REMAT_POLICIES:
    raise ConfigError(
      "model.remat_policy", f"{kwargs['remat_policy']!r} is not one of {sorted(REMAT_POLICIES)}"
    )
  if kwargs.get("attention_impl", "materialized") not in ATTENTION_IMPLS:
    raise ConfigError(
      "model.attention_impl", f"{kwargs['attention_impl']!r} is not one of {ATTENTION_IMPLS}"
    )
  if kwargs.get("mlp_act", "gelu") not in ACTIVATIONS:
    raise ConfigError("model.mlp_act", f"{kwargs['mlp_act']!r} is not one of {sorted(ACTIVATIONS)}")
  if kwargs.get("width", 768) % kwargs.get("num_heads", 12):
    raise ConfigError("model.num_heads", "width must be divisible by num_heads")
  return ViT(**kwargs)


def model_fields(model: ViT) -> dict[str, Any]:
  """The plain-dict description of `model` that `build` accepts (stored beside exported params)."""
  return {k: getattr(model, k) for k in ViT.__dataclass_fields__ if k not in ("parent", "name")}


def truncate(model: ViT, params: Mapping[str, Any], depth: int) -> tuple[ViT, dict[str, Any]]:
  """`model` and `params` cut after block `depth - 1`: a teacher whose later layers transfer nothing.

  Unrolled, XLA would drop those layers as dead code; a scan over layers runs every iteration, and their
  params would still take memory. The final norm stays (tiny; its output goes unused).
  """
  if depth >= model.depth:
    return model, dict(params)
  enc = dict(params["Transformer"])
  if "encoderblock" in enc:  # scanned: [L, ...] leaves
    enc["encoderblock"] = jax.tree.map(lambda a: a[:depth], enc["encoderblock"])
  else:
    for i in range(depth, model.depth):
      del enc[f"encoderblock_{i}"]
  return model.clone(depth=depth), {**params, "Transformer": enc}


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
  names = sorted(
    (k for k in enc if k.startswith("encoderblock_")), key=lambda k: int(k.split("_")[1])
  )
  blocks = [enc.pop(k) for k in names]
  enc["encoderblock"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  params["Transformer"] = enc
  return params
