"""timm-named PyTorch state dicts -> our ViT: DeiT, AugReg, MAE, MoCo-v3, DINO, DINOv2 (with registers,
in timm's or Meta's own names; ViT-g's SwiGLU MLP packed or unpacked) and timm's CLIP towers.

The architecture is read off the keys and shapes (`_architecture`); then one rule per key maps it into
our layout (`key_rules`: `_embedding_rules`, `_head_rules`, `_block_rules`).
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from at_jax.convert import keymap, posemb
from at_jax.convert.keymap import Array, Rules
from at_jax.errors import ConfigError

# Stripped from the front of every key: DistributedDataParallel, MoCo-v3, DINO's MultiCropWrapper.
_PREFIXES = ("module.", "base_encoder.", "backbone.")
# Pre-training parts that are not the encoder: MAE's decoder and mask token, MoCo-v3's momentum encoder,
# predictor and projection MLP (head.0, head.1, ...), DINO's projection head, DINOv2's mask token.
_IGNORED = re.compile(
  r"^(decoder[._]|mask_token$|momentum_encoder\.|predictor\.|head\.(\d+|mlp|last_layer)\.)"
)
# Only decides that the LayerScale params exist; their values come from the checkpoint.
_DEFAULT_LAYERSCALE = 1e-5


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a timm state dict's keys and shapes say about its ViT."""

  width: int
  channels: int
  patch: int
  depth: int
  mlp_dim: int
  mlp_act: str  # "gelu", or "swiglu" (DINOv2-g), read off the MLP's keys and shapes (`_mlp`)
  mlp_keys: tuple[str, ...]  # the MLP's layers under `blocks.<i>.mlp.`: first layer(s), then second
  heads: int
  qk_norm: bool
  qkv_bias: bool
  layerscale: bool
  class_token: bool
  registers: int
  meta_registers: (
    bool  # Meta's DINOv2: `register_tokens`; position table covers cls but not registers.
  )
  pre_norm: bool
  has_norm: bool  # a final `norm` (cls readout); else `fc_norm` (average pooling)
  num_classes: int
  pos_len: int
  posemb_prefix: bool

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def reg_key(self) -> str:
    return "register_tokens" if self.meta_registers else "reg_token"


def from_timm(raw: Mapping[str, Any], path: str, num_heads: int | None) -> tuple[dict, dict]:
  """timm / MAE / MoCo-v3 / DINO / DINOv2 / CLIP state dict -> (config, params)."""
  sd = _encoder_keys(raw)
  keys = list(sd)
  keymap.check_supported(keys, path)
  if "patch_embed.proj.weight" not in sd:
    raise keymap.not_a_vit(keys, path, "patch_embed.proj.weight")
  a = _architecture(sd, path, num_heads)
  rules = key_rules(a, patch_bias="patch_embed.proj.bias" in sd)
  what = (
    f"a ViT of width {a.width}, depth {a.depth}, MLP {a.mlp_dim} ({a.mlp_act}), patch {a.patch}"
  )
  params = keymap.apply(sd, rules, path, what)
  if len(a.mlp_keys) == 3:  # timm's unpacked SwiGLU: fc1_g, fc1_x -> our [gate | value] Dense_0
    _pack_gates(params, a.depth)
  params.setdefault("embedding", {}).setdefault("bias", np.zeros((a.width,), np.float32))
  posemb_prefix = a.posemb_prefix
  if a.meta_registers and posemb_prefix:
    # Meta's DINOv2 adds pos_embed[0] to the cls token only; fold it in and drop the slot (timm does too).
    params["cls"] = params["cls"] + params["pos_embedding"][:, :1]
    params["pos_embedding"] = params["pos_embedding"][:, 1:]
    posemb_prefix = False
  return _config(a, posemb_prefix), params


def _encoder_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
  """The encoder's entries of `raw`, wrapper prefixes stripped and pre-training-only parts dropped."""
  sd = {}
  for key, value in raw.items():
    while key.startswith(_PREFIXES):
      key = key.split(".", 1)[1]
    if not _IGNORED.match(key):
      sd[key] = value
  return sd


def _architecture(sd: Mapping[str, Any], path: str, num_heads: int | None) -> Architecture:
  kernel = keymap.shape_of(sd, "patch_embed.proj.weight", path, 4)
  if kernel[2] != kernel[3]:
    raise ConfigError(path, f"patch_embed.proj.weight has shape {kernel}: non-square patches")
  width, channels, patch, _ = kernel
  depth = keymap.depth_of(list(sd), r"blocks\.(\d+)\.", path, "blocks.0.attn.qkv.weight")
  mlp_act, mlp_dim, mlp_keys = _mlp(sd, path)
  qk_norm = "blocks.0.attn.q_norm.weight" in sd
  # QK-norm weights are per head_dim: the one checkpoint kind that reveals its number of heads.
  head_dim = keymap.shape_of(sd, "blocks.0.attn.q_norm.weight", path, 1)[0] if qk_norm else 0
  stored_heads = width // head_dim if head_dim and width % head_dim == 0 else None
  heads = keymap.resolve_heads(width, num_heads, stored_heads, path)
  class_token = "cls_token" in sd
  meta_registers = "register_tokens" in sd
  reg_key = "register_tokens" if meta_registers else "reg_token"
  registers = keymap.shape_of(sd, reg_key, path, 3)[1] if reg_key in sd else 0
  qkv_bias = "blocks.0.attn.qkv.bias" in sd
  layerscale = "blocks.0.ls1.gamma" in sd
  pre_norm = "norm_pre.weight" in sd
  num_classes = keymap.shape_of(sd, "head.weight", path, 2)[0] if "head.weight" in sd else 0
  has_norm = _final_norm(sd, class_token, path)
  pos_len, posemb_prefix = _position_table(sd, class_token, registers, meta_registers, path)
  return Architecture(
    width=width,
    channels=channels,
    patch=patch,
    depth=depth,
    mlp_dim=mlp_dim,
    mlp_act=mlp_act,
    mlp_keys=mlp_keys,
    heads=heads,
    qk_norm=qk_norm,
    qkv_bias=qkv_bias,
    layerscale=layerscale,
    class_token=class_token,
    registers=registers,
    meta_registers=meta_registers,
    pre_norm=pre_norm,
    has_norm=has_norm,
    num_classes=num_classes,
    pos_len=pos_len,
    posemb_prefix=posemb_prefix,
  )


def _mlp(sd: Mapping[str, Any], path: str) -> tuple[str, int, tuple[str, ...]]:
  """(activation, mlp_dim, layer names) of block 0's MLP: fc1/fc2, a plain MLP or, with fc1 twice fc2's
  input wide, timm's SwiGLUPacked (act(first half) * second half); Meta's DINOv2 w12/w3, packed the same
  way; timm's unpacked SwiGLU fc1_g/fc1_x/fc2. The packed halves are [gate | value], our Dense_0's."""
  if "blocks.0.mlp.fc1_g.weight" in sd:
    names, factors = ("fc1_g", "fc1_x", "fc2"), (1,)
  elif "blocks.0.mlp.w12.weight" in sd:
    names, factors = ("w12", "w3"), (2,)
  else:
    names, factors = ("fc1", "fc2"), (1, 2)
  first, second = (f"blocks.0.mlp.{name}.weight" for name in (names[0], names[-1]))
  rows = keymap.shape_of(sd, first, path, 2)[0]
  inner = keymap.shape_of(sd, second, path, 2)[1]
  if rows not in [f * inner for f in factors]:
    kinds = {
      1: "as many (plain MLP)" if names[0] == "fc1" else "as many",
      2: "twice as many (SwiGLU)",
    }
    raise ConfigError(
      path,
      f"{first} has {rows} output features and {second} {inner} input features; expected "
      + " or ".join(kinds[f] for f in factors),
    )
  gated = names[0] != "fc1" or rows == 2 * inner
  return ("swiglu" if gated else "gelu"), inner, names


def _final_norm(sd: Mapping[str, Any], class_token: bool, path: str) -> bool:
  """True for a final `norm` (cls readout), False for `fc_norm` (average pooling); else an error."""
  # MAE fine-tuning (and timm's global_pool="avg") replaces `norm` by `fc_norm` after averaging.
  has_norm, has_fc_norm = "norm.weight" in sd, "fc_norm.weight" in sd
  if has_norm == has_fc_norm:
    raise ConfigError(
      path,
      "expected exactly one final LayerNorm, 'norm' (cls readout) or 'fc_norm' "
      f"(average pooling); found {'both' if has_norm else 'neither'}",
    )
  if has_norm and not class_token:
    raise ConfigError(
      path,
      "unsupported architecture: a final 'norm' without a cls token (timm "
      "global_pool='avg' with fc_norm=False normalises before averaging); at_jax's ViT "
      "averages first, then applies fc_norm",
    )
  return has_norm


def _position_table(
  sd: Mapping[str, Any], class_token: bool, registers: int, meta_registers: bool, path: str
) -> tuple[int, bool]:
  """(positions in `pos_embed`, whether they include the prefix tokens' slots)."""
  if "pos_embed" not in sd:
    raise ConfigError(
      path,
      "unsupported architecture: no learned position table 'pos_embed' (rotary or "
      "no position embeddings, e.g. timm's EVA/RoPE ViTs)",
    )
  pos_len = keymap.shape_of(sd, "pos_embed", path, 3)[1]
  num_prefix = int(class_token) + (0 if meta_registers else registers)
  return pos_len, posemb.has_prefix(pos_len, num_prefix, path)


def key_rules(a: Architecture, patch_bias: bool) -> Rules:
  """One rule per key of the timm ViT that `a` describes (with a patch-embedding bias or not): the
  importer's table, which `export_keys` inverts to write timm's and Hugging Face's keys."""
  rules = _embedding_rules(a, patch_bias)
  rules.update(_head_rules(a))
  for i in range(a.depth):
    rules.update(_block_rules(a, i))
  return rules


def _embedding_rules(a: Architecture, patch_bias: bool) -> Rules:
  """Patch embedding, position table, cls and register tokens, and CLIP's LayerNorm before the blocks."""
  width = a.width
  rules: Rules = {
    "patch_embed.proj.weight": (
      (width, a.channels, a.patch, a.patch),  # OIHW -> HWIO
      lambda w: {"embedding/kernel": w.transpose(2, 3, 1, 0)},
    ),
    "pos_embed": ((1, a.pos_len, width), lambda w: {"pos_embedding": w}),
  }
  # CLIP-style stems have no patch bias; ours always has one, so it stays zero.
  if patch_bias:
    rules["patch_embed.proj.bias"] = ((width,), lambda w: {"embedding/bias": w})
  if a.class_token:
    rules["cls_token"] = ((1, 1, width), lambda w: {"cls": w})
  if a.registers:
    rules[a.reg_key] = ((1, a.registers, width), lambda w: {"registers": w})
  if a.pre_norm:
    keymap.layer_norm("norm_pre", "pre_norm", width, rules)
  return rules


def _head_rules(a: Architecture) -> Rules:
  """The final LayerNorm (`norm` or `fc_norm`) and the classifier, if any."""
  rules: Rules = {}
  keymap.layer_norm(
    "norm" if a.has_norm else "fc_norm", "encoder_norm" if a.has_norm else "fc_norm", a.width, rules
  )
  if a.num_classes:
    rules["head.weight"] = ((a.num_classes, a.width), lambda w: {"head/kernel": w.T})
    rules["head.bias"] = ((a.num_classes,), lambda w: {"head/bias": w})
  return rules


def _split_qkv(w: Array, dst: str, heads: int, head_dim: int) -> dict[str, Array]:
  """Fused [3D, D] (out, in) weight or [3D] bias -> query/key/value [D, H, K] kernels or [H, K] biases."""
  w = w.reshape(3, heads, head_dim, *w.shape[1:])
  return {
    f"{dst}/{name}/{'kernel' if w.ndim == 4 else 'bias'}": (
      w[j].transpose(2, 0, 1) if w.ndim == 4 else w[j]
    )
    for j, name in enumerate(("query", "key", "value"))
  }


def _block_rules(a: Architecture, i: int) -> Rules:
  """Block `i`: its two LayerNorms, attention (fused qkv split per head, QK-norm), MLP, LayerScale."""
  width, heads, head_dim = a.width, a.heads, a.head_dim
  src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
  attn = dst + "MultiHeadDotProductAttention_0"
  rules: Rules = {}
  keymap.layer_norm(src + "norm1", dst + "LayerNorm_0", width, rules)
  keymap.layer_norm(src + "norm2", dst + "LayerNorm_1", width, rules)
  qkv = lambda w: _split_qkv(w, attn, heads, head_dim)
  rules[src + "attn.qkv.weight"] = ((3 * width, width), qkv)
  if a.qkv_bias:
    rules[src + "attn.qkv.bias"] = ((3 * width,), qkv)
  if a.qk_norm:
    keymap.layer_norm(src + "attn.q_norm", attn + "/query_norm", head_dim, rules)
    keymap.layer_norm(src + "attn.k_norm", attn + "/key_norm", head_dim, rules)
  rules[src + "attn.proj.weight"] = (  # [D, H*K] (out, in) -> [H, K, D]
    (width, width),
    lambda w: {f"{attn}/out/kernel": w.T.reshape(heads, head_dim, width)},
  )
  rules[src + "attn.proj.bias"] = ((width,), lambda w: {f"{attn}/out/bias": w})
  rules.update(_mlp_rules(a, src, f"{dst}MlpBlock_0/"))
  if a.layerscale:
    for j in (0, 1):
      rules[f"{src}ls{j + 1}.gamma"] = ((width,), lambda w, n=f"{dst}layerscale_{j}": {n: w})
  return rules


def _mlp_rules(a: Architecture, src: str, dst: str) -> Rules:
  """The MLP's first layer -> Dense_0 (SwiGLU's packed [gate | value] as is; timm's unpacked fc1_g and
  fc1_x -> gate_* and value_* halves, concatenated by `_pack_gates`), its second -> Dense_1."""
  *first, second = a.mlp_keys
  rows = a.mlp_dim * (2 if a.mlp_act == "swiglu" and len(first) == 1 else 1)
  rules: Rules = {}
  for name, half in zip(first, ("", "") if len(first) == 1 else ("gate_", "value_")):
    m = f"{dst}Dense_0/{half}"
    rules[f"{src}mlp.{name}.weight"] = ((rows, a.width), lambda w, m=m: {f"{m}kernel": w.T})
    rules[f"{src}mlp.{name}.bias"] = ((rows,), lambda w, m=m: {f"{m}bias": w})
  rules[f"{src}mlp.{second}.weight"] = (
    (a.width, a.mlp_dim),
    lambda w: {f"{dst}Dense_1/kernel": w.T},
  )
  rules[f"{src}mlp.{second}.bias"] = ((a.width,), lambda w: {f"{dst}Dense_1/bias": w})
  return rules


def _pack_gates(params: dict, depth: int) -> None:
  """Each block's Dense_0 gate_* and value_* halves (timm's fc1_g, fc1_x) -> one [gate | value] layer."""
  for i in range(depth):
    dense = params["Transformer"][f"encoderblock_{i}"]["MlpBlock_0"]["Dense_0"]
    for leaf in ("kernel", "bias"):
      halves = [dense.pop(f"{half}_{leaf}") for half in ("gate", "value")]
      dense[leaf] = np.concatenate(halves, axis=-1)


def _config(a: Architecture, posemb_prefix: bool) -> dict:
  """The `vit.build` config; PyTorch ViTs use exact GELU and LayerNorm eps 1e-6 unless a family says."""
  return dict(
    num_classes=a.num_classes,
    patch_size=a.patch,
    width=a.width,
    depth=a.depth,
    mlp_dim=a.mlp_dim,
    num_heads=a.heads,
    pool="cls" if a.has_norm else "gap",
    class_token=a.class_token,
    num_registers=a.registers,
    posemb_prefix=posemb_prefix,
    pre_norm=a.pre_norm,
    qkv_bias=a.qkv_bias,
    qk_norm=a.qk_norm,
    layerscale_init=_DEFAULT_LAYERSCALE if a.layerscale else 0.0,
    mlp_act=a.mlp_act,
    norm_eps=1e-6,
    scan=False,
  )
