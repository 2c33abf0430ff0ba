"""Vision Transformer whose attention can be overridden layer by layer.

`ViT.__call__` returns `(logits, out)`, where `out` holds the pre-softmax attention logits every layer
attended with (the teacher's where a "logits" override copies them), stacked as `attn_logits`
[L, B, H, N, N] (and q/k/v [L, B, N, H, K] when `want_qkv`). The attention itself, its overrides and the
in-block distillation loss (`attn_target`) are in `attention`.

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

The blocks and the encoder that stacks them are in `encoder`; the initialisers (`weight_init`) and the
position tables (`posemb`) in `inits`.
"""

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from at_jax.errors import ConfigError
from at_jax.models import attention, encoder, inits, pooling, projection
from at_jax.ops import attn_ce

Array = jax.Array

# width, depth, mlp_dim, num_heads. The last three are small models for 28-32 px images.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
  "Ti": (192, 12, 768, 3),
  "S": (384, 12, 1536, 6),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
  "H": (1280, 32, 5120, 16),
  "Mu": (128, 6, 512, 4),
  "Mini": (64, 6, 256, 4),  # docs/study.md's: the demo's depth and heads at half the width
  "MiniDeep": (64, 12, 256, 8),  # projects/cross_shape's teacher: twice Mini's depth and heads
  "Nano": (64, 4, 256, 2),
  "Pico": (32, 2, 64, 2),
}


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


def _check_inputs(override: attention.Override | None, attn_target: attention.AttnTarget | None):
  if override is not None:
    unknown = set(override) - set(attention.OVERRIDE_KEYS) - {"mask"}
    if unknown or "mask" not in override:
      raise ValueError(
        f"override needs 'mask' and keys from {attention.OVERRIDE_KEYS}, got {sorted(override)}"
      )
  if attn_target is not None and attn_target.form.impl not in attn_ce.IMPLS:
    raise ConfigError(
      "transfer.loss_impl", f"unknown {attn_target.form.impl!r}; use one of {attn_ce.IMPLS}"
    )


class ViT(nn.Module):
  """ViT classifier; `num_classes=0` gives a headless encoder (e.g. an MAE teacher).

  The token sequence is [cls (if class_token), registers (num_registers), patches].

  Attributes:
    pool: `pooling.POOLS`: "gap" (mean of patch tokens, then LayerNorm `fc_norm`, as MAE and the paper),
      "cls" (LayerNorm `encoder_norm` over the sequence, then the cls token) or "cls_mean" (the same
      LayerNorm, then [cls | mean patch token], 2 * width: transformers' DINOv2 classifier's input). The
      cls token stays in the sequence with gap pooling too (`class_token`), so student and teacher maps
      are both (1 + patches)^2.
    posemb_prefix: the learned position table also covers the cls/register tokens (timm's default, MAE);
      False: patches only (big_vision, timm `no_embed_class`, DINOv2 with registers).
    pre_norm: LayerNorm on the token sequence before the first block (CLIP's ln_pre, timm norm_pre).
    drop_path: max stochastic-depth rate (linear over depth), used when `train` and no masks are given.
    attention_impl: `attention.ATTENTION_IMPLS`; "fused" gives the same function (to float tolerance)
      without the maps in layers that need none.
    posemb: "learned" (trunc-normal, trained) or "sincos2d" (MAE's fixed 2-D sin-cos table, zero in the
      prefix slots). The fixed table is still the param `pos_embedding`, so exports, conversion and
      resampling treat it as any table, and fine-tuning from it starts where MAE's does; the module stops
      its gradient and the optimizer never decays it, so training leaves it as it is.
    weight_init: `inits.WEIGHT_INITS`: "timm" (the paper's student) or "mae" (MAE's pre-training).
    feature_dim: > 0 adds a trained linear map per layer of `projected` ("features": each block's
      output; "q"/"k"/"v": its heads flattened) to this width, `feature_proj` (out["projected_<name>"]),
      so they can be distilled from a teacher of another width. It is a training head: exports drop it
      (`export_view`), as MAE's exports drop its decoder.
    head_mix: (S, H_s, H_t) for transfer.head_map "learned": the logits `head_mix` of each distilled
      layer's softmax mix of teacher heads per student head, trained with the student, read by the loss
      (not the forward pass) and dropped from exports, as `feature_proj` is.
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
  posemb: str = "learned"
  weight_init: str = "timm"
  feature_dim: int = 0
  projected: str = "features"
  head_mix: tuple[int, ...] = ()

  @property
  def num_prefix(self) -> int:
    return int(self.class_token) + self.num_registers

  def _tokens(self, images_BYXC: Array, patch_keep: Array | None) -> Array:
    """The token sequence [B, N, D] entering the first block: prefix tokens, then (kept) patches."""
    x = nn.Conv(
      self.width,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      dtype=jnp.dtype(self.dtype_mm),
      name="embedding",
      kernel_init=inits.patch_kernel(self.weight_init),
    )(images_BYXC)
    batch, grid_h, grid_w = x.shape[:3]
    patches_BPD = x.reshape(batch, -1, self.width).astype(jnp.float32)
    num_patches = patches_BPD.shape[1]
    prefix_slots = self.num_prefix if self.posemb_prefix else 0
    table = num_patches + prefix_slots
    table_init = inits.posemb_table(self.posemb, grid_h, grid_w, prefix_slots)
    pos_BND = self.param("pos_embedding", table_init, (1, table, self.width))
    if self.posemb == "sincos2d":  # fixed, as MAE's requires_grad=False pos_embed
      pos_BND = jax.lax.stop_gradient(pos_BND)
    patches_BPD = patches_BPD + pos_BND[:, table - num_patches :]
    if patch_keep is not None:
      patches_BPD = jnp.take_along_axis(patches_BPD, patch_keep[:, :, None], axis=1)
    prefix = []
    # trunc_normal(0.02) is normal(0.02) (timm's cut is at +-100 sigma): also MAE's cls init.
    token_init = inits.trunc_normal(0.02)
    if self.class_token:
      prefix.append(self.param("cls", token_init, (1, 1, self.width)))
    if self.num_registers:
      shape = (1, self.num_registers, self.width)
      prefix.append(self.param("registers", token_init, shape))
    if prefix:
      prefix_BED = jnp.concatenate(prefix, axis=1)
      if self.posemb_prefix:
        prefix_BED = prefix_BED + pos_BND[:, : self.num_prefix]
      patches_BPD = jnp.concatenate([jnp.tile(prefix_BED, (batch, 1, 1)), patches_BPD], axis=1)
    x_BND = patches_BPD
    if self.pre_norm:
      x_BND = nn.LayerNorm(epsilon=self.norm_eps, name="pre_norm")(x_BND)
    return x_BND

  def _arch(self) -> encoder.BlockArch:
    return encoder.BlockArch(
      self.mlp_dim,
      self.num_heads,
      self.qkv_bias,
      self.qk_norm,
      self.layerscale_init,
      self.mlp_act,
      self.norm_eps,
      jnp.dtype(self.dtype_mm),
      self.attention_impl,
      self.weight_init,
    )

  @nn.compact
  def __call__(
    self,
    images_BYXC: Array,
    *,
    train: bool,
    override: attention.Override | None = None,
    drop_masks: Array | None = None,
    want_qkv: bool = False,
    patch_keep: Array | None = None,
    attn_target: attention.AttnTarget | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Runs the ViT.

    Args:
      images_BYXC: float images [B, Y, X, C].
      train: enables stochastic depth when `drop_masks` is None.
      override: None, or a dict with "mask" [L, H] bool (which layers/heads to override) and one of
        "logits"/"probs" [L, B, H, N, N] (attention copy) or "q"/"k"/"v" [L, B, N, H, K]
        (`attention.Override`).
      drop_masks: [L, R, B] per-sample residual scales from `encoder.sample_drop_masks`; given, they are applied
        whatever `train` is (the teacher runs with the student's masks).
      want_qkv: also return q, k, v per layer.
      patch_keep: [B, T] int indices of the patches to keep (MAE's visible patches); None keeps all.
      attn_target: the teacher's attention in some layers (`attention.AttnTarget`); each of those layers
        then reports its per-head cross-entropy against it, mean over batch and queries, in "attn_ce"
        [L, H] (zero in the other layers).

    Returns:
      logits [B, V] (pre-logits when num_classes == 0), and a dict with "attn_logits"
      [L, B, H, N, N] float32, "pre_logits" [B, D] ([B, 2D] with "cls_mean" pooling), "tokens"
      [B, N, D] (the encoder's output before any final norm), "features" [L, B, N, D] (each block's
      output, for feature distillation), and "q"/"k"/"v" if asked.
    """
    x_BND = self._tokens(images_BYXC, patch_keep)
    if drop_masks is None and train and self.drop_path > 0:
      batch = x_BND.shape[0]
      drop_masks = encoder.sample_drop_masks(
        self.make_rng("dropout"), batch, self.depth, self.drop_path
      )
    _check_inputs(override, attn_target)
    want_qkv = want_qkv or (bool(self.feature_dim) and self.projected != "features")
    x_BND, out = encoder.Encoder(
      self.depth, self._arch(), self.scan, self.remat_policy, want_qkv, name="Transformer"
    )(x_BND, override, drop_masks, attn_target)
    out["tokens"] = x_BND
    if self.feature_dim:  # q/k/v [L, B, N, H, K] mapped with their heads flattened
      x_LBND = out[self.projected].reshape(*out[self.projected].shape[:3], -1)
      out[f"projected_{self.projected}"] = projection.FeatureProjection(
        self.feature_dim, self.dtype_mm, name="feature_proj"
      )(x_LBND)
    if self.head_mix:  # zeros: each head starts at the mean of the teacher's maps
      self.param("head_mix", nn.initializers.zeros, tuple(self.head_mix))
    pooling.check(self.pool, self.class_token)  # a ViT built without `build`
    pre = pooling.pre_logits(self.pool, x_BND, self.num_prefix, self.norm_eps)  # [B, D] or [B, 2D]
    out["pre_logits"] = pre
    if self.num_classes == 0:
      return pre, out
    logits_BV = nn.Dense(
      self.num_classes,
      kernel_init=inits.trunc_normal(self.head_init_std),  # timm's trunc_normal_ (std 2e-5: MAE's)
      name="head",
    )(pre)
    return logits_BV, out

  def tokens_for(self, image_size: int) -> int:
    return (image_size // self.patch_size) ** 2 + self.num_prefix


# Fields that belong to the training recipe, not the architecture: a student that mirrors its teacher
# (`model.arch = "teacher"`) keeps its own values of these and takes everything else from the teacher.
# posemb and weight_init are how the weights start and whether the table trains: a student mirroring a
# sin-cos MAE teacher still learns its own table (the paper's student); the teacher keeps its own.
# fmt: off
RECIPE_FIELDS = (
  "num_classes", "pool", "drop_path", "head_init_std", "dtype_mm", "scan", "remat_policy",
  "attention_impl", "posemb", "weight_init", "feature_dim", "projected", "head_mix",
)
# fmt: on


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
  if kwargs.get("remat_policy", "none") not in encoder.REMAT_POLICIES:
    raise ConfigError(
      "model.remat_policy",
      f"{kwargs['remat_policy']!r} is not one of {sorted(encoder.REMAT_POLICIES)}",
    )
  if kwargs.get("attention_impl", "materialized") not in attention.ATTENTION_IMPLS:
    raise ConfigError(
      "model.attention_impl",
      f"{kwargs['attention_impl']!r} is not one of {attention.ATTENTION_IMPLS}",
    )
  if kwargs.get("projected", "features") not in projection.PROJECTED:
    raise ConfigError(
      "model.projected", f"{kwargs['projected']!r} is not one of {projection.PROJECTED}"
    )
  if kwargs.get("mlp_act", "gelu") not in encoder.ACTIVATIONS:
    raise ConfigError(
      "model.mlp_act", f"{kwargs['mlp_act']!r} is not one of {sorted(encoder.ACTIVATIONS)}"
    )
  pooling.check(kwargs.get("pool", "gap"), kwargs.get("class_token", True))
  inits.check(
    kwargs.get("posemb", "learned"), kwargs.get("weight_init", "timm"), kwargs.get("width", 768)
  )
  if not kwargs.get("head_init_std", 0.02) >= 0:
    raise ConfigError("model.head_init_std", f"must be >= 0, got {kwargs['head_init_std']!r}")
  if kwargs.get("width", 768) % kwargs.get("num_heads", 12):
    raise ConfigError("model.num_heads", "width must be divisible by num_heads")
  return ViT(**kwargs)


def model_fields(model: ViT) -> dict[str, Any]:
  """The plain-dict description of `model` that `build` accepts (stored beside exported params)."""
  return {k: getattr(model, k) for k in ViT.__dataclass_fields__ if k not in ("parent", "name")}


def export_view(model: ViT, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """The fields and params of `model` as exported and evaluated: without the training-only heads
  (`feature_proj`, `head_mix`), so an export is the same ViT whatever it was distilled from."""
  heads = ("feature_proj", "head_mix")
  fields = {k: v for k, v in model_fields(model).items() if k != "head_mix"}
  exported = {**fields, "feature_dim": 0, "projected": "features"}
  return exported, {k: v for k, v in params.items() if k not in heads}


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
  for i in range(jax.tree.leaves(stacked)[0].shape[0]):
    enc[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  params["Transformer"] = enc
  return params


def loop_to_scan(params: Mapping[str, Any]) -> dict[str, Any]:
  """Stacks `encoderblock_{i}` into `Transformer/encoderblock` with a leading layer axis."""
  params = dict(params)
  enc = dict(params["Transformer"])
  names = sorted((k for k in enc if k.startswith("encoderblock_")), key=lambda k: int(k[13:]))
  blocks = [enc.pop(k) for k in names]
  # Host arrays (a checkpoint just read) stay there: jnp.stack compiles a program per leaf shape.
  stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(blocks)) else jnp.stack
  enc["encoderblock"] = jax.tree.map(lambda *a: stack(a), *blocks)
  params["Transformer"] = enc
  return params
