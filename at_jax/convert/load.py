"""Converts pretrained ViT checkpoints into at_jax params; the only module that knows foreign key names.

Reads
  * timm-named PyTorch state dicts: `.pth`, `.pt`, `.bin`, `.pth.tar` (needs torch) or `.safetensors`
    (needs only `safetensors`). Covers DeiT, AugReg, MAE (fine-tuned with avg pool + `fc_norm`, and the
    pre-training release `{"model": ...}` whose decoder is dropped), MoCo-v3 (`module.base_encoder.`),
    DINO, DINOv2 (LayerScale, patch 14) and DINOv2 with registers (timm's or Meta's own key names), and
    timm's CLIP towers (`norm_pre`; pass `family`).
  * big_vision / google-research ViT `.npz` files (loop or scan layout).

The architecture is read off the keys and shapes. What a checkpoint does not store comes from a table:
the number of heads (`_HEADS_BY_WIDTH`, or `num_heads`), LayerNorm epsilon and MLP activation
(`FAMILIES`). The result is a `vit.build` config and float32 numpy params in our layout (big_vision names,
position table with the prefix slots when the checkpoint has them):

  python -m at_jax.convert mae_pretrain_vit_large.pth /tmp/mae_l      # then --config.teacher.init=/tmp/mae_l
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from at_jax import checkpoint
from at_jax.errors import ConfigError
from at_jax.models import vit

Array = np.ndarray
# A conversion rule: checkpoint key -> (expected shape, function from its array to {our '/' path: array}).
Rules = dict[str, tuple[tuple[int, ...], Callable[[Array], dict[str, Array]]]]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar")
# Checkpoints that nest the state dict; the first one present wins (so the raw weights over the EMA).
_WRAPPERS = ("model", "state_dict", "model_ema", "state_dict_ema")
# Stripped from the front of every key: DistributedDataParallel, MoCo-v3, DINO's MultiCropWrapper.
_PREFIXES = ("module.", "base_encoder.", "backbone.")
# Pre-training parts that are not the encoder: MAE's decoder and mask token, MoCo-v3's momentum encoder,
# predictor and projection MLP (head.0, head.1, ...), DINO's projection head, DINOv2's mask token.
_IGNORED = re.compile(
  r"^(decoder[._]|mask_token$|momentum_encoder\.|predictor\.|head\.(\d+|mlp|last_layer)\.)"
)
# big_vision keeps params under one of these (checked in order); keys elsewhere are optimizer state.
_NPZ_PREFIXES = ("params/", "opt/target/", "params/img/", "")

# Widths of the released ViT sizes (Ti, S, B, L, H, g, DINOv2-g, G) -> heads. Mostly head_dim 64, but not
# ViT-H/g/G, so this is a table and not `width // 64`.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24, 1664: 16}
_DEFAULT_LAYERSCALE = (
  1e-5  # Only decides that the params exist; their values come from the checkpoint.
)

# Per family, the architecture fields a checkpoint does not store. Empty: the reader's defaults fit (exact
# GELU and eps 1e-6 for PyTorch files; tanh GELU, flax's nn.gelu, for big_vision .npz).
FAMILIES: dict[str, dict[str, Any]] = {
  "vit": {},
  "deit": {},
  "augreg": {},
  "mae": {},
  "mocov3": {},
  "dino": {},
  "dinov2": {},
  "big_vision": {},
  # timm's CLIP towers use torch.nn.LayerNorm's eps; OpenAI's models also QuickGELU.
  "clip": {"norm_eps": 1e-5},
  "clip_openai": {"norm_eps": 1e-5, "mlp_act": "quick_gelu"},
}

# Keys of architectures our ViT cannot express, and why (searched before anything else is inferred).
_UNSUPPORTED = (
  (r"relative_position|rel_pos", "relative position bias (BEiT, data2vec, Swin)"),
  (r"\.(q_bias|v_bias)$", "separate q/v biases (BEiT)"),
  (
    r"dist_token|head_dist",
    "a distillation token whose head is averaged with the cls head (DeiT distilled)",
  ),
  (r"attn_pool\.|MAPHead_", "attention-pooling (MAP) head"),
  (r"\.attn\.norm\.", "a LayerNorm on the attention output (timm scale_attn_norm)"),
  (r"\.mlp\.norm\.", "a LayerNorm inside the MLP (timm scale_mlp_norm)"),
  (r"\.mlp\.(fc1_g|fc1_x|w12|w3)\.", "a SwiGLU MLP (e.g. DINOv2 ViT-g)"),
  (r"\.attn\.gate\.", "gated attention"),
  (r"patch_embed\.backbone|^stem\.", "a hybrid CNN stem"),
  (r"pre_logits", "a pre-logits representation layer"),
)
_MAX_LISTED = 10


def load_teacher(
  path: str,
  *,
  image_size: int | None = None,
  resample_posemb: bool = False,
  family: str | None = None,
  num_heads: int | None = None,
) -> tuple[dict, dict]:
  """Reads a pretrained ViT checkpoint as (model_config, params) for `vit.build`.

  Args:
    path: a `.pth`/`.pt`/`.bin`/`.pth.tar`/`.safetensors` file with timm key names, or a big_vision `.npz`.
    image_size: the input size the teacher will see; None keeps the checkpoint's (grid * patch size).
    resample_posemb: resample the position table bicubically (as timm's `resample_abs_pos_embed`) when
      its grid differs from `image_size`; otherwise that is an error.
    family: a `FAMILIES` name, for what the keys do not tell (LayerNorm eps, MLP activation).
    num_heads: the number of attention heads, for widths missing from `_HEADS_BY_WIDTH`.

  Returns:
    model_config: plain dict of `vit.ViT` fields (loop layout, `num_classes` 0 when there is no head).
    params: nested dict of float32 numpy arrays in `vit.ViT`'s layout.

  Raises:
    ConfigError: unreadable file, unsupported architecture, missing/unknown keys, shape mismatches, or a
      position grid that does not fit `image_size` (field: the path or the argument to fix).
  """
  if family is not None and family not in FAMILIES:
    raise ConfigError("family", f"unknown family {family!r}; one of {sorted(FAMILIES)}")
  if num_heads is not None and num_heads < 1:
    raise ConfigError("num_heads", f"must be >= 1, got {num_heads}")
  flat = _read(path)
  if path.lower().endswith(".npz"):
    config, params = _from_big_vision(flat, path, num_heads)
  else:
    config, params = _from_timm(flat, path, num_heads)
  config.update(FAMILIES.get(family, {}))
  if config["pre_norm"] and family is None:
    raise ConfigError(
      "family",
      f"{path}: a LayerNorm before the blocks (norm_pre) marks a CLIP tower, whose "
      "LayerNorm eps and MLP activation the checkpoint does not store; pass family='clip' "
      "(GELU, eps 1e-5) or 'clip_openai' (QuickGELU, eps 1e-5)",
    )
  image_size = fit_posemb(params, config, path, image_size, resample_posemb)
  _check_against_model(config, params, image_size, path)
  return config, params


# ---------------------------------------------------------------------------------------------------------
# Reading files into {key: array}.


def _unreadable(path: str, error: Exception) -> ConfigError:
  return ConfigError(
    path,
    f"cannot read the file (truncated or not a checkpoint): {type(error).__name__}: "
    f"{str(error)[:200]}",
  )


def _read(path: str) -> dict[str, Any]:
  """{key: array-like} of the checkpoint's tensors (torch tensors stay tensors until used)."""
  if not os.path.isfile(path):
    raise ConfigError(path, "no such file")
  name = path.lower()
  if name.endswith(".npz"):
    return _read_npz(path)
  if name.endswith(".safetensors"):
    return _read_safetensors(path)
  if name.endswith(_TORCH_SUFFIXES):
    return _read_torch(path)
  raise ConfigError(
    path,
    "unknown checkpoint type; expected a file ending in "
    f"{', '.join(('.npz', '.safetensors') + _TORCH_SUFFIXES)}",
  )


def _read_npz(path: str) -> dict[str, Any]:
  try:
    # Reads every member now, so that a truncated archive fails here and not halfway through conversion.
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except Exception as e:  # pylint: disable=broad-exception-caught  # zipfile/zlib/numpy errors vary.
    raise _unreadable(path, e) from e


def _read_safetensors(path: str) -> dict[str, Any]:
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(
      path, "reading .safetensors needs the safetensors package: pip install safetensors"
    ) from e
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-exception-caught  # SafetensorError, OSError, ...
    raise _unreadable(path, e) from e


def _read_torch(path: str) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=import-outside-toplevel  # Only PyTorch files need it.
  except ImportError as e:
    raise ConfigError(
      path,
      "reading PyTorch checkpoints needs torch: pip install torch (the CPU wheel is "
      "enough), or convert the file to .safetensors elsewhere",
    ) from e
  try:
    # weights_only: a checkpoint is data; never run the pickled code of an arbitrary file.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if found is None:  # Random bytes also fail as "weights only" unpickling errors.
      raise _unreadable(path, e) from e
    raise ConfigError(
      path,
      f"holds a Python object ({found.group(1)}) besides tensors, which torch.load("
      "weights_only=True) refuses to unpickle; if you trust the file, save just its state "
      "dict: torch.save(torch.load(f, weights_only=False)['model'], 'model.pth')",
    ) from e
  except Exception as e:  # pylint: disable=broad-exception-caught  # RuntimeError, EOFError, ... vary.
    raise _unreadable(path, e) from e
  return _pick_state_dict(obj, path)


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _pick_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
  if _is_state_dict(obj):
    return obj
  if isinstance(obj, Mapping):
    for key in _WRAPPERS:
      if _is_state_dict(obj.get(key)):
        return obj[key]
  top = _listed(list(obj)) if isinstance(obj, Mapping) else type(obj).__name__
  raise ConfigError(
    path,
    f"no state dict found: expected a dict of tensors, or one under any of {_WRAPPERS}; "
    f"found {top}",
  )


def _f32(value: Any) -> Array:
  if hasattr(
    value, "detach"
  ):  # A torch tensor (bf16/fp16 have no numpy twin: cast in torch first).
    value = value.detach().float().numpy()
  return np.asarray(value, np.float32)


# ---------------------------------------------------------------------------------------------------------
# Key-name mappings.


def _listed(keys: list[str]) -> str:
  shown = ", ".join(keys[:_MAX_LISTED])
  return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _check_supported(keys: list[str], path: str) -> None:
  found = [(why, [k for k in keys if re.search(pattern, k)]) for pattern, why in _UNSUPPORTED]
  found = [f"{why} (keys {_listed(hits)})" for why, hits in found if hits]
  if found:
    raise ConfigError(
      path, f"unsupported architecture: {'; '.join(found)}; at_jax's ViT cannot express it"
    )


def _not_a_vit(keys: list[str], path: str, anchor: str) -> ConfigError:
  return ConfigError(
    path,
    f"not a ViT checkpoint: no {anchor!r}; its keys ({_listed(keys)}) match none of "
    "the supported families (timm-named DeiT/AugReg/MAE/MoCo-v3/DINO/DINOv2/CLIP ViTs, "
    "big_vision .npz ViTs)",
  )


def _shape(flat: Mapping[str, Any], key: str, path: str, ndim: int) -> tuple[int, ...]:
  """The shape of `flat[key]`, which the architecture is inferred from; checks it exists with `ndim` axes."""
  if key not in flat:
    # Name what the block has instead (e.g. timm's parallel blocks, `blocks.0.attns.0...`).
    block = re.match(r"blocks\.\d+\.|Transformer/encoderblock_\d+/|", key).group(0)
    near = [k for k in flat if block and k.startswith(block)]
    raise ConfigError(
      path, f"missing key {key!r}" + (f"; {block} has {_listed(near)}" if near else "")
    )
  shape = tuple(flat[key].shape)
  if len(shape) != ndim:
    raise ConfigError(path, f"{key} has shape {shape}, expected {ndim} axes")
  return shape


def _depth(keys: list[str], pattern: str, path: str, example: str) -> int:
  indices = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
  if not indices:
    raise ConfigError(path, f"no transformer blocks (keys like {example!r})")
  return max(indices) + 1


def _resolve_heads(width: int, num_heads: int | None, stored: int | None, path: str) -> int:
  """`num_heads` if given, else what the checkpoint shows (`stored`), else the width table."""
  if num_heads is not None and stored is not None and num_heads != stored:
    raise ConfigError(
      "num_heads", f"{path} has {stored} heads (from its q/k shapes), not {num_heads}"
    )
  heads = num_heads or stored or _HEADS_BY_WIDTH.get(width)
  if heads is None:
    raise ConfigError(
      "num_heads",
      f"{path}: the number of attention heads is not stored and width {width} "
      f"is not a known ViT size {_HEADS_BY_WIDTH}; pass num_heads (--num_heads)",
    )
  if width % heads:
    raise ConfigError("num_heads", f"width {width} of {path} is not divisible by {heads} heads")
  return heads


def _ln(src: str, dst: str, width: int, rules: Rules) -> None:
  """A torch LayerNorm (`weight`, `bias`) -> a flax one (`scale`, `bias`)."""
  rules[f"{src}.weight"] = ((width,), lambda a: {f"{dst}/scale": a})
  rules[f"{src}.bias"] = ((width,), lambda a: {f"{dst}/bias": a})


def _apply(flat: Mapping[str, Any], rules: Rules, path: str, what: str) -> dict[str, Any]:
  """Checks `flat` holds exactly the keys and shapes of `rules` and converts it into nested params."""
  missing = sorted(set(rules) - set(flat))
  unknown = sorted(set(flat) - set(rules))
  if missing or unknown:
    problems = ([f"missing keys {_listed(missing)}"] if missing else []) + (
      [f"unknown keys {_listed(unknown)}"] if unknown else []
    )
    raise ConfigError(path, f"does not match {what}: {'; '.join(problems)}")
  params: dict[str, Any] = {}
  for key, (shape, to_ours) in rules.items():
    got = tuple(flat[key].shape)
    if got != shape:
      raise ConfigError(path, f"{key} has shape {got}, expected {shape} for {what}")
    for dst, array in to_ours(_f32(flat[key])).items():
      *parents, leaf = dst.split("/")
      node = params
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = np.ascontiguousarray(array, np.float32)
  return params


def _from_timm(raw: Mapping[str, Any], path: str, num_heads: int | None) -> tuple[dict, dict]:
  """timm / MAE / MoCo-v3 / DINO / DINOv2 / CLIP state dict -> (config, params)."""
  sd = {}
  for key, value in raw.items():
    while key.startswith(_PREFIXES):
      key = key.split(".", 1)[1]
    if not _IGNORED.match(key):
      sd[key] = value
  keys = list(sd)
  _check_supported(keys, path)
  if "patch_embed.proj.weight" not in sd:
    raise _not_a_vit(keys, path, "patch_embed.proj.weight")

  kernel = _shape(sd, "patch_embed.proj.weight", path, 4)
  if kernel[2] != kernel[3]:
    raise ConfigError(path, f"patch_embed.proj.weight has shape {kernel}: non-square patches")
  width, channels, patch, _ = kernel
  depth = _depth(keys, r"blocks\.(\d+)\.", path, "blocks.0.attn.qkv.weight")
  mlp_dim = _shape(sd, "blocks.0.mlp.fc1.weight", path, 2)[0]
  qk_norm = "blocks.0.attn.q_norm.weight" in sd
  # QK-norm weights are per head_dim: the one checkpoint kind that reveals its number of heads.
  head_dim = _shape(sd, "blocks.0.attn.q_norm.weight", path, 1)[0] if qk_norm else 0
  stored_heads = width // head_dim if head_dim and width % head_dim == 0 else None
  heads = _resolve_heads(width, num_heads, stored_heads, path)
  head_dim = width // heads
  class_token = "cls_token" in sd
  meta_registers = (
    "register_tokens" in sd
  )  # Meta's DINOv2: position table covers cls but not registers.
  reg_key = "register_tokens" if meta_registers else "reg_token"
  registers = _shape(sd, reg_key, path, 3)[1] if reg_key in sd else 0
  qkv_bias = "blocks.0.attn.qkv.bias" in sd
  layerscale = "blocks.0.ls1.gamma" in sd
  pre_norm = "norm_pre.weight" in sd
  num_classes = _shape(sd, "head.weight", path, 2)[0] if "head.weight" in sd else 0

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

  if "pos_embed" not in sd:
    raise ConfigError(
      path,
      "unsupported architecture: no learned position table 'pos_embed' (rotary or "
      "no position embeddings, e.g. timm's EVA/RoPE ViTs)",
    )
  pos_len = _shape(sd, "pos_embed", path, 3)[1]
  posemb_prefix = _posemb_has_prefix(
    pos_len, int(class_token) + (0 if meta_registers else registers), path
  )

  rules: Rules = {
    "patch_embed.proj.weight": (
      (width, channels, patch, patch),  # OIHW -> HWIO
      lambda a: {"embedding/kernel": a.transpose(2, 3, 1, 0)},
    ),
    "pos_embed": ((1, pos_len, width), lambda a: {"pos_embedding": a}),
  }
  # CLIP-style stems have no patch bias; ours always has one, so it stays zero.
  if "patch_embed.proj.bias" in sd:
    rules["patch_embed.proj.bias"] = ((width,), lambda a: {"embedding/bias": a})
  if class_token:
    rules["cls_token"] = ((1, 1, width), lambda a: {"cls": a})
  if registers:
    rules[reg_key] = ((1, registers, width), lambda a: {"registers": a})
  if pre_norm:
    _ln("norm_pre", "pre_norm", width, rules)
  _ln("norm" if has_norm else "fc_norm", "encoder_norm" if has_norm else "fc_norm", width, rules)
  if num_classes:
    rules["head.weight"] = ((num_classes, width), lambda a: {"head/kernel": a.T})
    rules["head.bias"] = ((num_classes,), lambda a: {"head/bias": a})

  def split_qkv(a: Array, dst: str) -> dict[str, Array]:
    """Fused [3D, D] (out, in) weight or [3D] bias -> query/key/value [D, H, Dh] kernels or [H, Dh] biases."""
    a = a.reshape(3, heads, head_dim, *a.shape[1:])
    return {
      f"{dst}/{name}/{'kernel' if a.ndim == 4 else 'bias'}": (
        a[j].transpose(2, 0, 1) if a.ndim == 4 else a[j]
      )
      for j, name in enumerate(("query", "key", "value"))
    }

  for i in range(depth):
    src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    attn = dst + "MultiHeadDotProductAttention_0"
    _ln(src + "norm1", dst + "LayerNorm_0", width, rules)
    _ln(src + "norm2", dst + "LayerNorm_1", width, rules)
    rules[src + "attn.qkv.weight"] = ((3 * width, width), lambda a, d=attn: split_qkv(a, d))
    if qkv_bias:
      rules[src + "attn.qkv.bias"] = ((3 * width,), lambda a, d=attn: split_qkv(a, d))
    if qk_norm:
      _ln(src + "attn.q_norm", attn + "/query_norm", head_dim, rules)
      _ln(src + "attn.k_norm", attn + "/key_norm", head_dim, rules)
    rules[src + "attn.proj.weight"] = (  # [D, H*Dh] (out, in) -> [H, Dh, D]
      (width, width),
      lambda a, d=attn: {f"{d}/out/kernel": a.T.reshape(heads, head_dim, width)},
    )
    rules[src + "attn.proj.bias"] = ((width,), lambda a, d=attn: {f"{d}/out/bias": a})
    for j, fc, shape in ((0, "fc1", (mlp_dim, width)), (1, "fc2", (width, mlp_dim))):
      mlp = f"{dst}MlpBlock_0/Dense_{j}"
      rules[f"{src}mlp.{fc}.weight"] = (shape, lambda a, m=mlp: {f"{m}/kernel": a.T})
      rules[f"{src}mlp.{fc}.bias"] = ((shape[0],), lambda a, m=mlp: {f"{m}/bias": a})
    if layerscale:
      for j in (0, 1):
        rules[f"{src}ls{j + 1}.gamma"] = ((width,), lambda a, n=f"{dst}layerscale_{j}": {n: a})

  what = f"a ViT of width {width}, depth {depth}, MLP {mlp_dim}, patch {patch}"
  params = _apply(sd, rules, path, what)
  params.setdefault("embedding", {}).setdefault("bias", np.zeros((width,), np.float32))
  if meta_registers and posemb_prefix:
    # Meta's DINOv2 adds pos_embed[0] to the cls token only; fold it in and drop the slot (timm does too).
    params["cls"] = params["cls"] + params["pos_embedding"][:, :1]
    params["pos_embedding"] = params["pos_embedding"][:, 1:]
    posemb_prefix = False
  config = dict(
    num_classes=num_classes,
    patch_size=patch,
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=heads,
    pool="cls" if has_norm else "gap",
    class_token=class_token,
    num_registers=registers,
    posemb_prefix=posemb_prefix,
    pre_norm=pre_norm,
    qkv_bias=qkv_bias,
    qk_norm=qk_norm,
    layerscale_init=_DEFAULT_LAYERSCALE if layerscale else 0.0,
    mlp_act="gelu",
    norm_eps=1e-6,
    scan=False,
  )
  return config, params


def _from_big_vision(raw: Mapping[str, Any], path: str, num_heads: int | None) -> tuple[dict, dict]:
  """big_vision (or google-research vision_transformer) `.npz` -> (config, params)."""
  prefix = next((p for p in _NPZ_PREFIXES if p + "embedding/kernel" in raw), None)
  if prefix is None:
    raise _not_a_vit(list(raw), path, "params/embedding/kernel")
  w = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
  _check_supported(list(w), path)
  # Scan layout: one [L, ...] array per block parameter; unstack into encoderblock_{i}.
  stacked = {k: w.pop(k) for k in list(w) if k.startswith("Transformer/encoderblock/")}
  depths = {a.shape[:1] for a in stacked.values()}
  if len(depths) > 1 or () in depths:
    raise ConfigError(
      path, f"scan-layout blocks disagree on their leading (layer) axis: {sorted(depths)}"
    )
  for key, array in stacked.items():
    for i, layer in enumerate(array):
      w[key.replace("encoderblock/", f"encoderblock_{i}/")] = layer
  keys = list(w)

  kernel = _shape(w, "embedding/kernel", path, 4)
  if kernel[0] != kernel[1]:
    raise ConfigError(path, f"embedding/kernel has shape {kernel}: non-square patches")
  patch, _, channels, width = kernel
  depth = _depth(
    keys, r"Transformer/encoderblock_(\d+)/", path, "Transformer/encoderblock_0/LayerNorm_0/scale"
  )
  # google-research/vision_transformer numbers submodules in creation order; big_vision names them.
  legacy = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in w
  mha, ln2, mlp = (
    ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if legacy
    else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  )
  query = _shape(w, f"Transformer/encoderblock_0/{mha}/query/kernel", path, 3)  # [D, H, Dh]
  heads = _resolve_heads(width, num_heads, query[1], path)
  head_dim = width // heads
  mlp_dim = _shape(w, f"Transformer/encoderblock_0/{mlp}/Dense_0/kernel", path, 2)[1]
  class_token = "cls" in w
  num_classes = _shape(w, "head/kernel", path, 2)[1] if "head/kernel" in w else 0
  if not class_token:
    raise ConfigError(
      path,
      "unsupported architecture: no cls token, i.e. big_vision pool_type 'gap', which "
      "applies encoder_norm to every token before averaging; at_jax's ViT averages first, "
      "then applies fc_norm",
    )
  # big_vision's table covers the patches only; the original ViT's (posembed_input) the cls token too.
  pos_key = next(
    (k for k in ("pos_embedding", "Transformer/posembed_input/pos_embedding") if k in w), None
  )
  if pos_key is None:
    raise ConfigError(
      path, "no stored position table (pos_embedding): fixed 'sincos2d' tables are not supported"
    )
  pos_len = _shape(w, pos_key, path, 3)[1]
  posemb_prefix = pos_key != "pos_embedding"
  if (
    pos_len - posemb_prefix < 1
    or math.isqrt(pos_len - posemb_prefix) ** 2 != pos_len - posemb_prefix
  ):
    raise ConfigError(
      path,
      f"{pos_key} has {pos_len} positions, not a square grid"
      + (" plus the cls slot" if posemb_prefix else ""),
    )

  same = lambda dst: lambda a: {dst: a}
  rules: Rules = {
    "embedding/kernel": ((patch, patch, channels, width), same("embedding/kernel")),
    "embedding/bias": ((width,), same("embedding/bias")),
    "cls": ((1, 1, width), same("cls")),
    pos_key: ((1, pos_len, width), same("pos_embedding")),
    "Transformer/encoder_norm/scale": ((width,), same("encoder_norm/scale")),
    "Transformer/encoder_norm/bias": ((width,), same("encoder_norm/bias")),
  }
  if num_classes:
    rules["head/kernel"] = ((width, num_classes), same("head/kernel"))
    rules["head/bias"] = ((num_classes,), same("head/bias"))
  for i in range(depth):
    block = f"Transformer/encoderblock_{i}/"
    ours = block + "MultiHeadDotProductAttention_0/"
    for theirs, name in (("LayerNorm_0", "LayerNorm_0"), (ln2, "LayerNorm_1")):
      for leaf in ("scale", "bias"):
        rules[f"{block}{theirs}/{leaf}"] = ((width,), same(f"{block}{name}/{leaf}"))
    for name in ("query", "key", "value"):
      rules[f"{block}{mha}/{name}/kernel"] = (
        (width, heads, head_dim),
        same(f"{ours}{name}/kernel"),
      )
      rules[f"{block}{mha}/{name}/bias"] = ((heads, head_dim), same(f"{ours}{name}/bias"))
    rules[f"{block}{mha}/out/kernel"] = ((heads, head_dim, width), same(f"{ours}out/kernel"))
    rules[f"{block}{mha}/out/bias"] = ((width,), same(f"{ours}out/bias"))
    for j, shape in ((0, (width, mlp_dim)), (1, (mlp_dim, width))):
      rules[f"{block}{mlp}/Dense_{j}/kernel"] = (shape, same(f"{block}MlpBlock_0/Dense_{j}/kernel"))
      rules[f"{block}{mlp}/Dense_{j}/bias"] = (
        (shape[1],),
        same(f"{block}MlpBlock_0/Dense_{j}/bias"),
      )

  what = f"a big_vision ViT of width {width}, depth {depth}, MLP {mlp_dim}, patch {patch}"
  params = _apply(w, rules, path, what)
  config = dict(
    num_classes=num_classes,
    patch_size=patch,
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=heads,
    pool="cls",
    class_token=True,
    num_registers=0,
    posemb_prefix=posemb_prefix,
    pre_norm=False,
    qkv_bias=True,
    qk_norm=False,
    layerscale_init=0.0,
    # flax's nn.gelu, which big_vision and vision_transformer use, is the tanh approximation.
    mlp_act="gelu_tanh",
    norm_eps=1e-6,
    scan=False,
  )
  return config, params


# ---------------------------------------------------------------------------------------------------------
# Position table.


def _posemb_has_prefix(pos_len: int, num_prefix: int, path: str) -> bool:
  """Whether a table of `pos_len` positions covers `num_prefix` prefix tokens besides a square grid."""
  is_square = lambda n: n > 0 and math.isqrt(n) ** 2 == n
  # With prefix first: timm's default; ambiguous only for tiny grids (e.g. 9 positions, 5 prefix tokens).
  if num_prefix and is_square(pos_len - num_prefix):
    return True
  if is_square(pos_len):
    return False
  raise ConfigError(
    path,
    f"pos_embed has {pos_len} positions: neither a square grid nor one plus "
    f"{num_prefix} prefix (cls/register) slots",
  )


def resample_posemb(pos_1TD: Array, grid: int, num_prefix: int) -> Array:
  """Resizes the patch part of a position table [1, T, D] to a grid x grid table; prefix slots unchanged.

  Bicubic with antialiasing, which is exactly timm's `resample_abs_pos_embed` (torch's bicubic with
  antialias=True) for up- and downsampling.
  """
  prefix_1RD, patches_1PD = pos_1TD[:, :num_prefix], pos_1TD[:, num_prefix:]
  old = math.isqrt(patches_1PD.shape[1])
  width = pos_1TD.shape[-1]
  with jax.default_device(jax.devices("cpu")[0]):
    grid_GGD = jax.image.resize(
      jnp.asarray(patches_1PD.reshape(old, old, width)),
      (grid, grid, width),
      "bicubic",
      antialias=True,
      precision=jax.lax.Precision.HIGHEST,
    )
  return np.concatenate([prefix_1RD, np.asarray(grid_GGD).reshape(1, grid * grid, width)], axis=1)


def fit_posemb(
  params: dict, config: dict, path: str, image_size: int | None, resample: bool
) -> int:
  """Makes the position table fit `image_size` (resampling if allowed); returns the image size."""
  model = vit.build(
    config
  )  # reads fields with the ViT's defaults (exports may predate newer fields)
  patch = model.patch_size
  num_prefix = model.num_prefix if model.posemb_prefix else 0
  grid = math.isqrt(params["pos_embedding"].shape[1] - num_prefix)
  if image_size is None:
    return grid * patch
  if image_size <= 0 or image_size % patch:
    raise ConfigError(
      "image_size", f"{image_size} is not a positive multiple of the patch size {patch} of {path}"
    )
  new_grid = image_size // patch
  if new_grid != grid:
    if not resample:
      raise ConfigError(
        path,
        f"its position embeddings are for a {grid}x{grid} patch grid ({grid * patch} px "
        f"at patch {patch}), not {new_grid}x{new_grid} ({image_size} px); pass "
        "resample_posemb=True (CLI --resample, config teacher.resample_posemb=True) to "
        f"resample them bicubically, or use image size {grid * patch}",
      )
    params["pos_embedding"] = resample_posemb(params["pos_embedding"], new_grid, num_prefix)
  return image_size


def _check_against_model(config: dict, params: dict, image_size: int, path: str) -> None:
  """Guards against drift between this converter and `vit.ViT`: same tree, same shapes."""
  model = vit.build(config)
  channels = params["embedding"]["kernel"].shape[2]
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  want = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)["params"]
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(want)}
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  if want != got:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise RuntimeError(
      f"at_jax.convert bug: params converted from {path} do not fit vit.ViT({config}): "
      + ", ".join(f"{k}: {got.get(k)} vs {want.get(k)}" for k in diff[:_MAX_LISTED])
    )


# ---------------------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m at_jax.convert",
    description="Converts a pretrained ViT (timm/MAE/MoCo-v3/DINO/DINOv2 .pth/.safetensors, big_vision "
    ".npz) into a params export for --config.teacher.init.",
  )
  parser.add_argument("src", help="checkpoint file")
  parser.add_argument("dst", help="export directory to write (at_jax.checkpoint.save_params)")
  parser.add_argument(
    "--image_size", type=int, default=None, help="input size; default: the checkpoint's"
  )
  parser.add_argument(
    "--resample", action="store_true", help="resample position embeddings to image_size"
  )
  parser.add_argument(
    "--num_heads", type=int, default=None, help="heads, for widths not in the size table"
  )
  parser.add_argument(
    "--family",
    choices=sorted(FAMILIES),
    default=None,
    help="for what the keys do not tell (e.g. clip_openai: QuickGELU, eps 1e-5)",
  )
  args = parser.parse_args(argv)
  try:
    config, params = load_teacher(
      args.src,
      image_size=args.image_size,
      resample_posemb=args.resample,
      family=args.family,
      num_heads=args.num_heads,
    )
    checkpoint.save_params(args.dst, params, config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(config, indent=2, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
