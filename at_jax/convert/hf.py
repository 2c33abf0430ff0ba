"""Hugging Face `transformers` ViTs -> our ViT: `from_hf`, for the folders `hf_folder` finds and reads.

Families, by config.json's `model_type` (`FAMILIES`):
  vit                    ViTModel / ViTForImageClassification; the classifier becomes our `head`.
                         ViTModel's pooler (a tanh Dense on the normed cls token, which no attention map
                         or token depends on) is dropped.
  vit_mae                ViTMAEModel / ViTMAEForPreTraining: the encoder; decoder and mask token dropped.
  dinov2                 LayerScale; SwiGLU MLP (`mlp_act="swiglu"`) when `use_swiglu_ffn`. The mask
                         token is dropped. Dinov2ForImageClassification's classifier (on [cls | mean
                         patch token]) is our `head` with `pool="cls_mean"`, or with `pool="cls"` its cls
                         half when the mean half is zero, as our exports write it (`hf_dinov2`).
  dinov2_with_registers  the same, with register tokens.
  clip, clip_vision_model  the vision tower only: pre-LayerNorm, `hidden_act`, eps from the config; the
                         text tower and projections are dropped.

The architecture is read from config.json; a field it omits takes the value of transformers' config class
(`_DEFAULTS`), as transformers itself does when loading it. The weights must then match it key for key
and shape for shape (`keymap.apply`). Weights are in the names transformers writes (`save_pretrained`,
hub files: `attention.attention.query`, `mlp.weights_in`, ...).

A position table made for another image size is resampled as transformers' `interpolate_pos_encoding`
does (torch bicubic, align_corners=False, antialiased only for dinov2_with_registers), not as timm does
(`posemb.resample_posemb`, antialiased): the teacher then sees what it saw in transformers, e.g. DINOv2's
518-px (37x37) table at 224 px.
"""

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from at_jax.convert import hf_dinov2, hf_folder, hf_posemb, keymap
from at_jax.convert.keymap import Rules
from at_jax.errors import ConfigError
from at_jax.models import pooling

# The config-class defaults of the fields read (transformers 4.x/5.x ViTConfig, ViTMAEConfig,
# Dinov2Config, Dinov2WithRegistersConfig, CLIPVisionConfig).
_VIT = dict(
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
  hidden_act="gelu",
  layer_norm_eps=1e-12,
  image_size=224,
  patch_size=16,
  num_channels=3,
  qkv_bias=True,
)
_DINOV2 = {
  **{k: v for k, v in _VIT.items() if k != "intermediate_size"},
  **dict(
    layer_norm_eps=1e-6, patch_size=14, mlp_ratio=4, layerscale_value=1.0, use_swiglu_ffn=False
  ),
}
_CLIP = {
  **{k: v for k, v in _VIT.items() if k != "qkv_bias"},
  **dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=32),
}
_DEFAULTS = {
  "vit": _VIT,
  "vit_mae": _VIT,
  "dinov2": _DINOV2,
  "dinov2_with_registers": {**_DINOV2, "patch_size": 16, "num_register_tokens": 4},
  "clip": _CLIP,
  "clip_vision_model": _CLIP,
}
# transformers' `hidden_act` names -> ours (`encoder.ACTIVATIONS`); gelu_new, gelu_fast and
# gelu_pytorch_tanh are all the tanh approximation.
_ACTS = {
  "gelu": "gelu",
  "gelu_python": "gelu",
  "gelu_new": "gelu_tanh",
  "gelu_fast": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "quick_gelu": "quick_gelu",
}


@dataclasses.dataclass(frozen=True)
class _Names:
  """How a family names its weights (after its base-model prefix is stripped)."""

  prefixes: tuple[str, ...]  # task classes' base model: ViTForImageClassification's `vit.`, ...
  dropped: str  # keys that are not the vision encoder
  block: str  # block i's prefix
  norms: tuple[str, str, str]  # each block's two LayerNorms, the final one
  attn: tuple[str, str, str, str]  # query, key, value, output projections
  mlp: tuple[str, str]


_BERT_ATTN = (
  "attention.attention.query",
  "attention.attention.key",
  "attention.attention.value",
  "attention.output.dense",
)
_VIT_NAMES = _Names(
  ("vit.",),
  r"^pooler\.",
  "encoder.layer.{i}.",
  ("layernorm_before", "layernorm_after", "layernorm"),
  _BERT_ATTN,
  ("intermediate.dense", "output.dense"),
)
_DINOV2_NAMES = _Names(
  ("dinov2.", "dinov2_with_registers."),
  r"^$",  # the classifier: `hf_dinov2.classifier` reads it
  "encoder.layer.{i}.",
  ("norm1", "norm2", "layernorm"),
  _BERT_ATTN,
  ("mlp.fc1", "mlp.fc2"),
)
_CLIP_NAMES = _Names(
  ("vision_model.",),
  r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)",
  "encoder.layers.{i}.",
  ("layer_norm1", "layer_norm2", "post_layernorm"),
  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
  ("mlp.fc1", "mlp.fc2"),
)
FAMILIES: dict[str, _Names] = {
  "vit": _VIT_NAMES,
  "vit_mae": dataclasses.replace(_VIT_NAMES, dropped=r"^decoder\."),
  "dinov2": _DINOV2_NAMES,
  "dinov2_with_registers": _DINOV2_NAMES,
  "clip": _CLIP_NAMES,
  "clip_vision_model": _CLIP_NAMES,
}
# Families whose interpolate_pos_encoding antialiases (torch's `antialias=True`); the others do not.
_ANTIALIASED = ("dinov2_with_registers",)
# Dropped in every family: mask tokens (MAE-style masking, DINOv2's iBOT) and CLIP's position-id buffer.
_ALWAYS_DROPPED = re.compile(r"^embeddings\.(mask_token|position_ids)$")


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a config.json says about its ViT."""

  model_type: str
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  grid: int  # of the position table (config image_size // patch_size)
  channels: int
  act: str  # ours
  eps: float
  qkv_bias: bool
  layerscale: float  # 0: none
  registers: int

  @property
  def clip(self) -> bool:
    return self.model_type.startswith("clip")


def from_hf(
  path: str, num_heads: int | None, image_size: int | None, resample: bool
) -> tuple[dict, dict]:
  """A transformers folder (`hf_folder.is_hf_folder`) -> (`vit.build` config, float32 params).

  `num_heads`, if given, must agree with the config. With `resample` and an `image_size` whose patch
  grid differs from the table's, the table is resampled as transformers does (module docstring);
  otherwise it is left as stored, for `posemb.fit_posemb` to accept or refuse.
  """
  folder = hf_folder.resolve(path)
  config = hf_folder.read_config(folder)
  config_path = os.path.join(folder, hf_folder.CONFIG_FILE)
  model_type = config["model_type"]
  if model_type not in FAMILIES:
    raise ConfigError(
      config_path,
      f"model_type {model_type!r} is not a supported transformers ViT; supported: "
      f"{', '.join(sorted(FAMILIES))}",
    )
  a = _architecture(model_type, config, config_path, num_heads)
  sd, pool = _encoder_keys(hf_folder.read_weights(folder), FAMILIES[model_type]), "cls"
  if model_type.startswith("dinov2"):
    sd, pool = hf_dinov2.classifier(sd)
  num_classes = int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else 0
  what = (
    f"the {model_type} ViT its config.json describes (width {a.width}, depth {a.depth}, MLP "
    f"{a.mlp_dim}, patch {a.patch}, {a.grid}x{a.grid} position grid)"
  )
  params = keymap.apply(sd, key_rules(a, num_classes, pool), path, what)
  params.setdefault("embedding", {}).setdefault("bias", np.zeros((a.width,), np.float32))
  posemb_prefix = True
  if a.registers:
    # transformers adds pos[0] to the cls token only, then inserts the registers: fold it into the cls
    # token and keep a patches-only table (as timm does for these models).
    params["cls"] = params["cls"] + params["pos_embedding"][:, :1]
    params["pos_embedding"] = params["pos_embedding"][:, 1:]
    posemb_prefix = False
  if resample and image_size and image_size % a.patch == 0 and image_size // a.patch != a.grid:
    slots = 1 if posemb_prefix else 0
    params["pos_embedding"] = hf_posemb.resample_like_hf(
      params["pos_embedding"], slots, image_size // a.patch, model_type in _ANTIALIASED
    )
  return _config(a, num_classes, posemb_prefix, pool), params


def _get(vision: Mapping[str, Any], model_type: str, name: str) -> Any:
  return vision.get(name, _DEFAULTS[model_type][name])


def _square(value: Any, name: str, config_path: str) -> int:
  """An int or a square [h, w] size of the config; non-square ones our ViT does not take."""
  if isinstance(value, list | tuple):
    if len(value) != 2 or value[0] != value[1]:
      raise ConfigError(config_path, f"{name} {value}: at_jax's ViT takes square sizes only")
    value = value[0]
  return int(value)


def _architecture(
  model_type: str, config: Mapping[str, Any], config_path: str, num_heads: int | None
) -> Architecture:
  vision = config.get("vision_config", {}) if model_type == "clip" else config
  get = lambda name: _get(vision, model_type, name)
  width, heads = int(get("hidden_size")), int(get("num_attention_heads"))
  if num_heads is not None and num_heads != heads:
    raise ConfigError("num_heads", f"{config_path} says {heads} heads, not {num_heads}")
  if width % heads:
    raise ConfigError(config_path, f"hidden_size {width} is not divisible by {heads} heads")
  patch = _square(get("patch_size"), "patch_size", config_path)
  image = _square(get("image_size"), "image_size", config_path)
  defaults = _DEFAULTS[model_type]
  swiglu = bool(get("use_swiglu_ffn")) if "use_swiglu_ffn" in defaults else False
  if "mlp_ratio" in defaults:
    mlp_dim = hf_dinov2.dinov2_mlp_dim(width, get("mlp_ratio"), swiglu)
  else:
    mlp_dim = int(get("intermediate_size"))
  act = "swiglu" if swiglu else _ACTS.get(get("hidden_act"))
  if act is None:
    raise ConfigError(
      config_path,
      f"hidden_act {get('hidden_act')!r} has no at_jax equivalent; supported: {sorted(_ACTS)}",
    )
  layerscale = float(get("layerscale_value")) if "layerscale_value" in defaults else 0.0
  if "layerscale_value" in defaults and layerscale <= 0:
    raise ConfigError(
      config_path, f"layerscale_value {layerscale}: at_jax needs > 0 for LayerScale"
    )
  return Architecture(
    model_type=model_type,
    width=width,
    depth=int(get("num_hidden_layers")),
    heads=heads,
    mlp_dim=mlp_dim,
    patch=patch,
    grid=image // patch,
    channels=int(get("num_channels")),
    act=act,
    eps=float(get("layer_norm_eps")),
    qkv_bias=bool(get("qkv_bias")) if "qkv_bias" in defaults else True,
    layerscale=layerscale,
    registers=int(get("num_register_tokens")) if "num_register_tokens" in defaults else 0,
  )


def _encoder_keys(raw: Mapping[str, Any], names: _Names) -> dict[str, Any]:
  """The vision encoder's entries: base-model prefix stripped, the family's other parts dropped."""
  dropped = re.compile(names.dropped)
  sd = {}
  for key, value in raw.items():
    for prefix in names.prefixes:
      if key.startswith(prefix):
        key = key[len(prefix) :]
        break
    if not dropped.search(key) and not _ALWAYS_DROPPED.match(key):
      sd[key] = value
  return sd


def key_rules(a: Architecture, num_classes: int, pool: str = "cls") -> Rules:
  """One rule per weight: embeddings, (CLIP's) pre-norm, every block, the final norm, the head on `pool`'s
  pre-logits (the importer's table, which `export_hf` inverts to write DINOv2 folders)."""
  width, names = a.width, FAMILIES[a.model_type]
  conv = lambda w: {"embedding/kernel": w.transpose(2, 3, 1, 0)}  # OIHW -> HWIO
  kernel = (width, a.channels, a.patch, a.patch)
  table = 1 + a.grid * a.grid  # the cls slot, then the patch grid
  rules: Rules = {}
  if a.clip:  # no patch bias; cls token and position table without their batch axis
    rules["embeddings.patch_embedding.weight"] = (kernel, conv)
    rules["embeddings.class_embedding"] = ((width,), lambda w: {"cls": w.reshape(1, 1, width)})
    rules["embeddings.position_embedding.weight"] = (
      (table, width),
      lambda w: {"pos_embedding": w[None]},
    )
    keymap.layer_norm("pre_layrnorm", "pre_norm", width, rules)  # sic: transformers' spelling
  else:
    rules["embeddings.patch_embeddings.projection.weight"] = (kernel, conv)
    rules["embeddings.patch_embeddings.projection.bias"] = (
      (width,),
      lambda w: {"embedding/bias": w},
    )
    rules["embeddings.cls_token"] = ((1, 1, width), lambda w: {"cls": w})
    rules["embeddings.position_embeddings"] = ((1, table, width), lambda w: {"pos_embedding": w})
  if a.registers:
    rules["embeddings.register_tokens"] = (
      (1, a.registers, width),
      lambda w: {"registers": w},
    )
  keymap.layer_norm(names.norms[2], "encoder_norm", width, rules)
  if num_classes:
    head_in = pooling.pre_logits_width(pool, width)
    rules["classifier.weight"] = ((num_classes, head_in), lambda w: {"head/kernel": w.T})
    rules["classifier.bias"] = ((num_classes,), lambda w: {"head/bias": w})
  for i in range(a.depth):
    rules.update(_block_rules(a, names, i))
  return rules


def _block_rules(a: Architecture, names: _Names, i: int) -> Rules:
  """Block `i`: LayerNorms, separate q/k/v split per head, output projection, MLP, LayerScale."""
  width, heads, head_dim = a.width, a.heads, a.width // a.heads
  src, dst = names.block.format(i=i), f"Transformer/encoderblock_{i}/"
  attn = dst + "MultiHeadDotProductAttention_0"
  rules: Rules = {}
  keymap.layer_norm(src + names.norms[0], dst + "LayerNorm_0", width, rules)
  keymap.layer_norm(src + names.norms[1], dst + "LayerNorm_1", width, rules)
  for ours, theirs in zip(("query", "key", "value"), names.attn[:3], strict=True):
    # [H*K, D] (out, in) -> [D, H, K]; bias [H*K] -> [H, K]
    rules[f"{src}{theirs}.weight"] = (
      (width, width),
      lambda w, m=f"{attn}/{ours}": {f"{m}/kernel": w.T.reshape(width, heads, head_dim)},
    )
    if a.qkv_bias:
      rules[f"{src}{theirs}.bias"] = (
        (width,),
        lambda w, m=f"{attn}/{ours}": {f"{m}/bias": w.reshape(heads, head_dim)},
      )
  rules[f"{src}{names.attn[3]}.weight"] = (  # [D, H*K] (out, in) -> [H, K, D]
    (width, width),
    lambda w: {f"{attn}/out/kernel": w.T.reshape(heads, head_dim, width)},
  )
  rules[f"{src}{names.attn[3]}.bias"] = ((width,), lambda w: {f"{attn}/out/bias": w})
  # SwiGLU's fused weights_in is [gate | value] (2 * mlp_dim), our gated Dense_0's layout.
  fc1, fc2 = ("mlp.weights_in", "mlp.weights_out") if a.act == "swiglu" else names.mlp
  hidden = a.mlp_dim * (2 if a.act == "swiglu" else 1)
  for j, theirs, shape in ((0, fc1, (hidden, width)), (1, fc2, (width, a.mlp_dim))):
    mlp = f"{dst}MlpBlock_0/Dense_{j}"
    rules[f"{src}{theirs}.weight"] = (shape, lambda w, m=mlp: {f"{m}/kernel": w.T})
    rules[f"{src}{theirs}.bias"] = ((shape[0],), lambda w, m=mlp: {f"{m}/bias": w})
  if a.layerscale:
    for j in (0, 1):
      rules[f"{src}layer_scale{j + 1}.lambda1"] = (
        (width,),
        lambda w, n=f"{dst}layerscale_{j}": {n: w},
      )
  return rules


def _config(a: Architecture, num_classes: int, posemb_prefix: bool, pool: str) -> dict:
  """The `vit.build` config. Every family reads out the cls token after the final LayerNorm (DINOv2's
  classifier the mean patch token too: `pool`)."""
  return dict(
    num_classes=num_classes,
    patch_size=a.patch,
    width=a.width,
    depth=a.depth,
    mlp_dim=a.mlp_dim,
    num_heads=a.heads,
    pool=pool,
    class_token=True,
    num_registers=a.registers,
    posemb_prefix=posemb_prefix,
    pre_norm=a.clip,
    qkv_bias=a.qkv_bias,
    qk_norm=False,
    layerscale_init=a.layerscale,
    mlp_act=a.act,
    norm_eps=a.eps,
    scan=False,
  )
