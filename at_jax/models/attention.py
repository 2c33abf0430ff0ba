"""The ViT's multi-head self-attention: it exposes its logits, obeys an override and scores itself.

An `Override` replaces, in the layers/heads its mask selects, the attention logits or probabilities
(attention copy) or q, k or v (the paper's Q/K/V variants). An `AttnTarget` (attention distillation) makes
every selected layer compute, inside the block, its cross-entropy against the teacher's attention, so that
no layer's maps outlive the layer.

Parameter names follow big_vision's `MultiHeadDotProductAttention_0/{query,key,value,out}` (and
`query_norm`/`key_norm` with QK-norm). dtype policy as the ViT's: matmuls in `dtype_mm`, logits, softmax and
LayerNorm in float32.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax import sharding
from at_jax.models import inits
from at_jax.ops import attn_ce

Array = jax.Array
# {"mask": [L, H] bool (per layer: [H]), and one of OVERRIDE_KEYS: "logits"/"probs" [L, B, H, N, N] or
# "q"/"k"/"v" [L, B, N, H, K]}; see `ViT.__call__`.
Override = Mapping[str, Array]
OVERRIDE_KEYS = ("logits", "probs", "q", "k", "v")
# How a layer turns q, k, v into its output where nothing needs its N x N maps (no copied maps, no direct
# distillation loss): "materialized" forms softmax(q k^T) v from the maps, "fused" calls
# `jax.nn.dot_product_attention`, which is cuDNN's flash attention on GPUs for bf16/fp16 matmuls (linear
# memory, no N x N map in HBM) and XLA's reference elsewhere (on TPUs and CPUs it still forms the maps).
ATTENTION_IMPLS = ("materialized", "fused")


@dataclasses.dataclass(frozen=True)
class BlockArch:
  """What every encoder block shares; one hashable value instead of a field per module."""

  mlp_dim: int
  num_heads: int
  qkv_bias: bool = True
  qk_norm: bool = False  # LayerNorm over head_dim on q and k (timm q_norm/k_norm)
  layerscale_init: float = 0.0  # > 0: per-channel residual scales (CaiT/DINOv2 LayerScale)
  mlp_act: str = "gelu"  # encoder.ACTIVATIONS
  norm_eps: float = 1e-6
  dtype_mm: Any = jnp.float32
  attention_impl: str = "materialized"  # ATTENTION_IMPLS
  weight_init: str = "timm"  # inits.WEIGHT_INITS: how the linear layers' kernels are drawn


@dataclasses.dataclass(frozen=True)
class LossForm:
  """How a layer scores its attention against its target; static (a module field), hence apart from
  the target's arrays. `impl` (`attn_ce.IMPLS`): "direct" materialises one layer's maps;
  "blockwise"/"pallas" stream over blocks of queries and keys from q and k and never hold an N x N map
  (they need "q"/"k" values). `block`: their query and key tile size (`transfer.loss_block`; 0 =
  `attn_ce_tiles.auto_block`). `skip`: the student's leading tokens (cls, registers) whose rows and
  columns the loss leaves out (`transfer.prefix` "drop"); its maps are renormalised over the rest."""

  impl: str = "direct"
  block: int = 0
  skip: int = 0


@dataclasses.dataclass(frozen=True)
class AttnTarget:
  """The teacher's attention for the distillation loss, computed layer by layer inside the encoder.

  `values` are stacked over the selected `layers` only: "logits" [S, B, H, N, N] (maps), "probs" (a
  learned mix of maps) or "q" and "k" [S, B, N, H, K_teacher], from which each block forms its layer's
  teacher logits (scale K_teacher**-0.5) when it needs them. `form`: how the loss is computed.
  """

  layers: tuple[int, ...]
  values: Mapping[str, Array]
  form: LossForm = LossForm()


def layer_attention_ce(
  target: Mapping[str, Array],
  form: LossForm,
  q_BNHK: Array,
  k_BNHK: Array,
  logits_BHNN: Array,
  lse_BHN: Array | None,
) -> Array:
  """Per-head cross-entropy [H] of one layer's attention against the teacher's, mean over batch and queries.

  `target`: this layer's slice of `AttnTarget.values`. `lse_BHN`: logsumexp of the student's logits over
  keys, when the layer's softmax already has it.
  """
  if form.skip:  # the target covers the tokens after the student's prefix; renormalised over them
    logits_BHNN, lse_BHN = logits_BHNN[:, :, form.skip :, form.skip :], None
  if "logits" in target:
    ce_BHN = attn_ce.ce_from_logits(target["logits"], logits_BHNN, student_lse_BHN=lse_BHN)
  elif "probs" in target:  # a learned mix of the teacher's maps: differentiable in the mix
    ce_BHN = attn_ce.ce_from_probs(target["probs"], logits_BHNN, student_lse=lse_BHN)
  elif form.impl == "direct":
    scale = target["q"].shape[-1] ** -0.5
    teacher_logits_BHNN = attn_ce.qk_logits(target["q"], target["k"], scale)
    ce_BHN = attn_ce.ce_from_logits(teacher_logits_BHNN, logits_BHNN, student_lse_BHN=lse_BHN)
  else:
    ce_BHN = attn_ce.attention_ce(
      form.impl,
      target["q"],
      target["k"],
      q_BNHK,
      k_BNHK,
      scale_teacher=target["q"].shape[-1] ** -0.5,
      scale_student=q_BNHK.shape[-1] ** -0.5,
      block_q=form.block,
      block_k=form.block,
    )
  return ce_BHN.mean(axis=(0, 2))


def fused_attention(q_BNHK: Array, k_BNHK: Array, v_BNHK: Array, dtype: Any) -> Array:
  """softmax(q k^T / sqrt(K)) v [B, N, H, K] without handing the maps back; see ATTENTION_IMPLS."""
  flash = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return jax.nn.dot_product_attention(
    q_BNHK.astype(dtype),
    k_BNHK.astype(dtype),
    v_BNHK.astype(dtype),
    implementation="cudnn" if flash else "xla",
  )


def _override_qkv(qkv: dict[str, Array], override: Override) -> dict[str, Array]:
  """q/k/v with the override's values in its masked heads.

  `jnp.where` (not arithmetic blending) so that overridden entries pass exactly zero gradient back to the
  student's own projections.
  """
  mask_BNHK = override["mask"][None, None, :, None]
  for name in set(qkv) & set(override):
    qkv[name] = jnp.where(mask_BNHK, override[name].astype(qkv[name].dtype), qkv[name])
  return qkv


def _probs(
  logits_BHNN: Array, override: Override | None, with_lse: bool
) -> tuple[Array, Array | None]:
  """(softmax over keys, with copied probabilities in the override's heads; logsumexp if `with_lse`)."""
  if override is not None and "probs" in override:
    mask_BHNN = override["mask"][None, :, None, None]
    probs_BHNN = override["probs"].astype(jnp.float32)
    return jnp.where(mask_BHNN, probs_BHNN, jax.nn.softmax(logits_BHNN, axis=-1)), None
  if (
    with_lse
  ):  # the distillation CE needs logsumexp(logits) too: one pass over the maps serves both
    lse_BHN = jax.nn.logsumexp(logits_BHNN, axis=-1)
    return jnp.exp(logits_BHNN - lse_BHN[..., None]), lse_BHN
  return jax.nn.softmax(logits_BHNN, axis=-1), None


class Attention(nn.Module):
  """Multi-head self-attention that exposes its logits, obeys an override and scores itself against a target.

  Attributes:
    copied: every head of this layer takes the teacher's logits (a static fact of the override). The layer
      then skips its own q and k and their gradient, which are all zero (XLA cannot tell from a traced mask).
  """

  arch: BlockArch
  copied: bool = False
  loss: LossForm = LossForm()

  def _project(self, x_BND: Array, own_qk: bool) -> dict[str, Array]:
    """{"q", "k", "v"} [B, N, H, K] (only "v" without `own_qk`), QK-normed if the arch says so."""
    a = self.arch
    head_dim = x_BND.shape[-1] // a.num_heads
    dense = lambda name: nn.DenseGeneral(
      (a.num_heads, head_dim),
      use_bias=a.qkv_bias,
      dtype=a.dtype_mm,
      # q, k, v are one Linear(D, 3D) in timm's and MAE's Block: xavier counts its fan_out 3D.
      kernel_init=inits.dense_kernel(a.weight_init, fused=3),
      name=name,
    )
    projections = (("q", "query"), ("k", "key"), ("v", "value")) if own_qk else (("v", "value"),)
    qkv = {name: dense(layer)(x_BND) for name, layer in projections}
    if a.qk_norm and own_qk:
      qkv["q"] = nn.LayerNorm(epsilon=a.norm_eps, name="query_norm")(qkv["q"].astype(jnp.float32))
      qkv["k"] = nn.LayerNorm(epsilon=a.norm_eps, name="key_norm")(qkv["k"].astype(jnp.float32))
    return qkv

  def _logits(self, qkv: Mapping[str, Array], override: Override | None, own_qk: bool) -> Array:
    """The float32 logits [B, H, N, N] this layer attends with, the override's in its copied heads."""
    if not own_qk:  # every head copied: the teacher's logits are this layer's
      return sharding.constrain_batch(override["logits"].astype(jnp.float32))
    # Formed here for `out`; where only `out` reads them and nobody reads that, XLA drops them.
    head_dim = qkv["q"].shape[-1]
    logits_BHNN = attn_ce.qk_logits(qkv["q"], qkv["k"], head_dim**-0.5, self.arch.dtype_mm)
    # The biggest activation: keep it split along the batch like the data (GSPMD could otherwise follow
    # the fsdp-sharded projection kernels and gather the batch).
    logits_BHNN = sharding.constrain_batch(logits_BHNN)
    if override is not None and "logits" in override:
      mask_BHNN = override["mask"][None, :, None, None]
      logits_BHNN = jnp.where(mask_BHNN, override["logits"].astype(jnp.float32), logits_BHNN)
    return logits_BHNN

  @nn.compact
  def __call__(
    self,
    x_BND: Array,
    override: Override | None,
    want_qkv: bool,
    target: Mapping[str, Array] | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """(output [B, N, D], out) where out has "attn_logits" [B, H, N, N], "attn_ce" [H] given a `target`
    (this layer's slice of `AttnTarget.values`), and float32 "q"/"k"/"v" [B, N, H, K] if `want_qkv`."""
    a = self.arch
    own_qk = not self.copied or want_qkv or self.is_initializing()
    qkv = self._project(x_BND, own_qk)
    if override is not None:
      qkv = _override_qkv(qkv, override)
    maps_override = override is not None and ("logits" in override or "probs" in override)
    needs_maps = maps_override or (
      target is not None and ("logits" in target or self.loss.impl == "direct")
    )
    logits_BHNN = self._logits(qkv, override, own_qk)
    lse_BHN = None
    if a.attention_impl == "fused" and not needs_maps:
      y_BNHK = fused_attention(qkv["q"], qkv["k"], qkv["v"], a.dtype_mm)
    else:
      probs_BHNN, lse_BHN = _probs(logits_BHNN, override, target is not None and own_qk)
      y_BNHK = jnp.einsum(
        "bhqk,bkhd->bqhd", probs_BHNN.astype(a.dtype_mm), qkv["v"].astype(a.dtype_mm)
      )
    y_BND = nn.DenseGeneral(
      x_BND.shape[-1],
      axis=(-2, -1),
      dtype=a.dtype_mm,
      kernel_init=inits.dense_kernel(a.weight_init),
      name="out",
    )(y_BNHK)
    out = {"attn_logits": logits_BHNN}
    if target is not None:
      out["attn_ce"] = layer_attention_ce(
        target, self.loss, qkv["q"], qkv["k"], logits_BHNN, lse_BHN
      )
    if want_qkv:
      out.update({k: x.astype(jnp.float32) for k, x in qkv.items()})
    return y_BND, out
