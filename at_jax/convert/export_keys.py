"""Our params -> timm's and Hugging Face's key names, and what each of them cannot express.

timm's names come from inverting the importer's own rules (`timm.key_rules`), not from a second table:
every rule's function only rearranges its array (transposes, reshapes, splits the fused qkv), so
applying it to the key's element indices says where each of our values sits in that key's tensor
(`invert`). Hugging Face's names come the same way from its importer's rules (`export_hf`): ViTModel
for a plain ViT, DINOv2 for one with LayerScale, registers, SwiGLU or `cls_mean` pooling
(`hf_model_type`). A SwiGLU ViT goes to timm as DINOv2-g's `SwiGLUPacked` (`mlp.fc1` [gate | value], as
our Dense_0).
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from at_jax.convert import hf_dinov2, timm
from at_jax.convert.keymap import Rules

# What `timm_args` is written as beside the exported weights (read back by convert.load for the heads).
TIMM_ARGS_FILE = "timm_args.json"
TARGET_NAMES = {
  "timm": "timm's VisionTransformer",
  "hf": "Hugging Face's ViT or DINOv2 (ViTModel, Dinov2Model, Dinov2WithRegistersModel)",
}
# Our MLP activations -> timm's `act_layer` names (timm.layers.get_act_layer) and Hugging Face's
# `hidden_act` (transformers' ACT2FN): exact GELU, tanh GELU, OpenAI's QuickGELU in both. SwiGLU is
# SiLU in timm's `SwiGLUPacked`, a `mlp_layer` no JSON kwarg can name: only the DINOv2-g entrypoints
# build it (`_TIMM_SWIGLU`); in Hugging Face it is DINOv2's `use_swiglu_ffn`, not a `hidden_act`.
_TIMM_ACTS = {
  "gelu": "gelu",
  "gelu_tanh": "gelu_tanh",
  "quick_gelu": "quick_gelu",
  "swiglu": "silu",
}
HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
# timm's LayerNorm eps is no JSON kwarg: the entrypoint carries it. Standard ViTs use 1e-6, the CLIP
# towers 1e-5 (`vit_*_clip_*`); every other architecture field is a kwarg that overrides the name's.
_TIMM_EPS_NAMES = ((1e-6, ""), (1e-5, "_clip"))
# SwiGLU ViTs: timm's DINOv2-g entrypoints (mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, eps 1e-6), by
# register count; their other fields (size, LayerScale, registers, no_embed_class) are kwargs too.
_TIMM_SWIGLU = {0: "vit_giant_patch14_dinov2", 4: "vit_giant_patch14_reg4_dinov2"}
_TIMM_SWIGLU_EPS = 1e-6
# (width, depth, heads) -> timm's size name; with 4x MLP, patch and image size they name a model.
_TIMM_SIZES = {
  (192, 12, 3): "tiny",
  (384, 12, 6): "small",
  (768, 12, 12): "base",
  (1024, 24, 16): "large",
}
# fmt: off
_TIMM_ENTRYPOINTS = {
  "vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch8_224", "vit_small_patch16_224",
  "vit_small_patch16_384", "vit_small_patch32_224", "vit_small_patch32_384", "vit_base_patch8_224",
  "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch32_224", "vit_base_patch32_384",
  "vit_large_patch14_224", "vit_large_patch16_224", "vit_large_patch16_384", "vit_large_patch32_224",
  "vit_large_patch32_384", "vit_base_patch16_clip_224", "vit_base_patch32_clip_224",
  "vit_large_patch14_clip_224",
}
# fmt: on
def _eps_suffix(eps: float) -> str | None:
  return next((s for e, s in _TIMM_EPS_NAMES if math.isclose(eps, e, rel_tol=1e-6)), None)


def unsupported(f: Mapping[str, Any]) -> dict[str, list[str]]:
  """Per target ("timm", "hf"), what of the ViT fields `f` it cannot express (empty: it can)."""
  timm_cannot = []
  if f["mlp_act"] == "swiglu":
    if not math.isclose(f["norm_eps"], _TIMM_SWIGLU_EPS, rel_tol=1e-6):
      timm_cannot.append(
        f"LayerNorm eps {f['norm_eps']} with SwiGLU (norm_eps; its SwiGLU entrypoints, DINOv2-g's, "
        "fix 1e-6)"
      )
  elif _eps_suffix(f["norm_eps"]) is None:
    timm_cannot.append(
      f"LayerNorm eps {f['norm_eps']} (norm_eps; its entrypoints fix 1e-6, or 1e-5 for CLIP towers)"
    )
  if f["mlp_act"] not in _TIMM_ACTS:
    timm_cannot.append(f"the MLP activation {f['mlp_act']!r} (mlp_act)")
  if f["pool"] == "cls_mean":
    timm_cannot.append(
      "'cls_mean' pooling (model.pool; timm's head reads the cls token or the patch tokens' mean, "
      "not both: DINOv2's [cls | mean patch token] classifier is transformers')"
    )
  hf_cannot = [
    what
    for cannot, what in (
      (f["qk_norm"], "QK-norm (qk_norm)"),
      (f["pre_norm"], "a LayerNorm before the blocks (pre_norm)"),
      (not f["class_token"], "a ViT without a cls token (class_token=False)"),
      (
        f["pool"] not in ("cls", "cls_mean"),
        f"{f['pool']!r} pooling (pool; it reads the LayerNorm-ed cls token, no fc_norm)",
      ),
      (
        f["pool"] == "cls_mean" and not f["num_classes"],
        "'cls_mean' pooling without a head (model.pool; a headless DINOv2 pools the cls token alone)",
      ),
      (
        f["mlp_act"] not in HF_ACTS and f["mlp_act"] != "swiglu",
        f"the MLP activation {f['mlp_act']!r} (mlp_act)",
      ),
      (
        hf_model_type(f) != "vit" and dinov2_mlp_ratio(f) is None,
        f"an MLP {f['mlp_dim']} wide at width {f['width']} (mlp_dim; DINOv2's config builds "
        "int(width * mlp_ratio) hidden units for a whole mlp_ratio, SwiGLU 2/3 of them rounded up "
        "to a multiple of 8)",
      ),
    )
    if cannot
  ]
  return {"timm": timm_cannot, "hf": hf_cannot}


def hf_model_type(f: Mapping[str, Any]) -> str:
  """The transformers `model_type` that holds the ViT `f`: "vit" (ViTModel) for a plain one; DINOv2's
  for LayerScale, SwiGLU or `cls_mean` pooling (its classifier's) ("dinov2"), with registers
  "dinov2_with_registers"."""
  if f["num_registers"] > 0:
    return "dinov2_with_registers"
  if f["layerscale_init"] > 0 or f["mlp_act"] == "swiglu" or f["pool"] == "cls_mean":
    return "dinov2"
  return "vit"


def dinov2_mlp_ratio(f: Mapping[str, Any]) -> int | None:
  """The whole `mlp_ratio` (transformers 5's config takes no other) from which DINOv2 builds the MLP of
  `f` (as `hf_dinov2.dinov2_mlp_dim` reads it back), or None where none does."""
  swiglu = f["mlp_act"] == "swiglu"
  for ratio in range(1, 2 * (f["mlp_dim"] + 8) // f["width"] + 2):
    if hf_dinov2.dinov2_mlp_dim(f["width"], ratio, swiglu) == f["mlp_dim"]:
      return ratio
  return None


def _timm_architecture(f: Mapping[str, Any], channels: int, pos_len: int) -> timm.Architecture:
  """The importer's description of the timm ViT that `f` is."""
  return timm.Architecture(
    width=f["width"],
    channels=channels,
    patch=f["patch_size"],
    depth=f["depth"],
    mlp_dim=f["mlp_dim"],
    mlp_act=f["mlp_act"],  # SwiGLU: timm's SwiGLUPacked, fc1 2 * mlp_dim wide ([gate | value])
    mlp_keys=("fc1", "fc2"),
    heads=f["num_heads"],
    qk_norm=f["qk_norm"],
    qkv_bias=f["qkv_bias"],
    layerscale=f["layerscale_init"] > 0,
    class_token=f["class_token"],
    registers=f["num_registers"],
    meta_registers=False,
    pre_norm=f["pre_norm"],
    has_norm=f["pool"] == "cls",
    num_classes=f["num_classes"],
    pos_len=pos_len,
    posemb_prefix=f["posemb_prefix"],
  )


def invert(rules: Rules, ours: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The checkpoint that `keymap.apply(checkpoint, rules)` would turn into `ours` ({'/' path: array}).

  Raises RuntimeError where the rules and the params disagree (a param left over, a tensor element no
  param fills): the refusals and the fit check come first, so that is a bug, not bad input.
  """
  out, used = {}, set()
  for key, (shape, to_ours) in rules.items():
    size = math.prod(shape)
    values = np.zeros(size, np.float32)
    filled = np.zeros(size, np.int64)
    for dst, index in to_ours(np.arange(size).reshape(shape)).items():
      if dst not in ours or ours[dst].shape != index.shape:
        raise RuntimeError(f"export bug: {key} needs {dst} {index.shape}, the params have none")
      values[index.ravel()] = ours[dst].ravel()
      np.add.at(filled, index.ravel(), 1)
      used.add(dst)
    if not (filled == 1).all():
      raise RuntimeError(f"export bug: the params fill {key} {shape} partly or twice")
    out[key] = values.reshape(shape)
  if set(ours) - used:
    raise RuntimeError(f"export bug: params without a key: {sorted(set(ours) - used)}")
  return out


def timm_state_dict(
  f: Mapping[str, Any], params: Mapping[str, np.ndarray], image_size: int
) -> dict[str, np.ndarray]:
  """timm's VisionTransformer state dict holding `params` ({'/' path: array}) of the ViT `f`."""
  ours = dict(params)
  channels = ours["embedding/kernel"].shape[2]
  if f["pre_norm"]:
    # timm's patch embedding has no bias under pre_norm (CLIP's). The bias is added to every patch
    # just before its position: folded into the table's patch slots, it computes the same.
    patches = (image_size // f["patch_size"]) ** 2
    table_BND = ours["pos_embedding"].copy()
    table_BND[:, -patches:] += ours.pop("embedding/bias")
    ours["pos_embedding"] = table_BND
  a = _timm_architecture(f, channels, ours["pos_embedding"].shape[1])
  # The importer reads the patch bias where the checkpoint has one: it has one unless pre_norm.
  return invert(timm.key_rules(a, patch_bias=not f["pre_norm"]), ours)


def _timm_name(f: Mapping[str, Any], image_size: int) -> str:
  """The timm entrypoint: the model `f` is where there is one, else a stock one whose architecture the
  kwargs override whole; with the LayerNorm eps of `f`, which no kwarg can set. SwiGLU: DINOv2-g's
  (the one with registers for 4), the only entrypoints that build timm's SwiGLUPacked."""
  if f["mlp_act"] == "swiglu":
    return _TIMM_SWIGLU.get(f["num_registers"], _TIMM_SWIGLU[0])
  clip = _eps_suffix(f["norm_eps"])
  size = _TIMM_SIZES.get((f["width"], f["depth"], f["num_heads"]))
  named = f"vit_{size}_patch{f['patch_size']}{clip}_{image_size}"
  if size and f["mlp_dim"] == 4 * f["width"] and named in _TIMM_ENTRYPOINTS:
    return named
  return f"vit_base_patch16{clip}_224"


def timm_args(f: Mapping[str, Any], image_size: int, channels: int) -> dict[str, Any]:
  """{"model_name", "kwargs"} for `timm.create_model(model_name, pretrained=False, **kwargs)`."""
  width = f["width"]
  # timm builds int(width * mlp_ratio) hidden units (SwiGLUPacked: fc1's, [gate | value], twice
  # mlp_dim; it halves them for fc2): nudge a ratio that float rounding would truncate.
  hidden = f["mlp_dim"] * (2 if f["mlp_act"] == "swiglu" else 1)
  ratio = hidden / width if int(width * (hidden / width)) == hidden else (hidden + 0.5) / width
  prefix = f["class_token"] or f["num_registers"] > 0
  kwargs = dict(
    img_size=image_size,
    patch_size=f["patch_size"],
    in_chans=channels,
    num_classes=f["num_classes"],
    global_pool="token" if f["pool"] == "cls" else "avg",
    embed_dim=width,
    depth=f["depth"],
    num_heads=f["num_heads"],
    mlp_ratio=ratio,
    qkv_bias=f["qkv_bias"],
    qk_norm=f["qk_norm"],
    # 0.0, not None: timm.create_model drops None kwargs, and DINOv2's entrypoints default to LayerScale.
    init_values=f["layerscale_init"] if f["layerscale_init"] > 0 else 0.0,
    class_token=f["class_token"],
    reg_tokens=f["num_registers"],
    no_embed_class=bool(prefix and not f["posemb_prefix"]),
    pre_norm=f["pre_norm"],
    fc_norm=f["pool"] == "gap",
    act_layer=_TIMM_ACTS[f["mlp_act"]],
  )
  return {"model_name": _timm_name(f, image_size), "kwargs": kwargs}
