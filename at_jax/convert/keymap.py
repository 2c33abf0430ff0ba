"""The machinery every key mapping shares: conversion rules and their application, shapes and depths read
off the keys, the number of heads, and the errors that name keys (not a ViT, unsupported architecture).

A rule maps one checkpoint key to the shape it must have and a function from its array to
{our '/'-joined param path: array}; `apply` checks a checkpoint against its rules and builds the params.
"""

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from at_jax.errors import ConfigError

Array = np.ndarray
# A conversion rule: checkpoint key -> (expected shape, function from its array to {our '/' path: array}).
Rules = dict[str, tuple[tuple[int, ...], Callable[[Array], dict[str, Array]]]]

# Widths of the released ViT sizes (Ti, S, B, L, H, g, DINOv2-g, G) -> heads. Mostly head_dim 64, but not
# ViT-H/g/G, so this is a table and not `width // 64`.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24, 1664: 16}
# At most this many keys are named in an error message.
MAX_LISTED = 10

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
  (r"\.attn\.gate\.", "gated attention"),
  (r"patch_embed\.backbone|^stem\.", "a hybrid CNN stem"),
  (r"pre_logits", "a pre-logits representation layer"),
)


def listed(keys: list[str]) -> str:
  """The first `MAX_LISTED` of `keys`, comma-separated, and how many more there are."""
  shown = ", ".join(keys[:MAX_LISTED])
  return shown + (f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def check_supported(keys: list[str], path: str) -> None:
  """Raises when any key belongs to an architecture our ViT cannot express (`_UNSUPPORTED`)."""
  found = [(why, [k for k in keys if re.search(pattern, k)]) for pattern, why in _UNSUPPORTED]
  found = [f"{why} (keys {listed(hits)})" for why, hits in found if hits]
  if found:
    raise ConfigError(
      path, f"unsupported architecture: {'; '.join(found)}; at_jax's ViT cannot express it"
    )


def not_a_vit(keys: list[str], path: str, anchor: str) -> ConfigError:
  """The error for a checkpoint without the `anchor` key every ViT of its format has."""
  return ConfigError(
    path,
    f"not a ViT checkpoint: no {anchor!r}; its keys ({listed(keys)}) match none of "
    "the supported families (timm-named DeiT/AugReg/MAE/MoCo-v3/DINO/DINOv2/CLIP ViTs, "
    "big_vision .npz ViTs)",
  )


def shape_of(flat: Mapping[str, Any], key: str, path: str, ndim: int) -> tuple[int, ...]:
  """The shape of `flat[key]`, which the architecture is inferred from; checks it exists with `ndim` axes."""
  if key not in flat:
    # Name what the block has instead (e.g. timm's parallel blocks, `blocks.0.attns.0...`).
    block = re.match(r"blocks\.\d+\.|Transformer/encoderblock_\d+/|", key).group(0)
    near = [k for k in flat if block and k.startswith(block)]
    raise ConfigError(
      path, f"missing key {key!r}" + (f"; {block} has {listed(near)}" if near else "")
    )
  shape = tuple(flat[key].shape)
  if len(shape) != ndim:
    raise ConfigError(path, f"{key} has shape {shape}, expected {ndim} axes")
  return shape


def depth_of(keys: list[str], pattern: str, path: str, example: str) -> int:
  """The number of blocks: one more than the largest block index that `pattern` captures in `keys`."""
  indices = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
  if not indices:
    raise ConfigError(path, f"no transformer blocks (keys like {example!r})")
  return max(indices) + 1


def resolve_heads(width: int, num_heads: int | None, stored: int | None, path: str) -> int:
  """`num_heads` if given, else what the checkpoint shows (`stored`), else the width table."""
  if num_heads is not None and stored is not None and num_heads != stored:
    raise ConfigError(
      "num_heads", f"{path} has {stored} heads (from its q/k shapes), not {num_heads}"
    )
  heads = num_heads or stored or HEADS_BY_WIDTH.get(width)
  if heads is None:
    raise ConfigError(
      "num_heads",
      f"{path}: the number of attention heads is not stored and width {width} "
      f"is not a known ViT size {HEADS_BY_WIDTH}; pass num_heads (--num_heads)",
    )
  if width % heads:
    raise ConfigError("num_heads", f"width {width} of {path} is not divisible by {heads} heads")
  return heads


def layer_norm(src: str, dst: str, width: int, rules: Rules) -> None:
  """Adds the rules of a torch LayerNorm (`weight`, `bias`) -> a flax one (`scale`, `bias`)."""
  rules[f"{src}.weight"] = ((width,), lambda a: {f"{dst}/scale": a})
  rules[f"{src}.bias"] = ((width,), lambda a: {f"{dst}/bias": a})


def f32(value: Any) -> Array:
  """A checkpoint's array as float32 numpy; a torch tensor is cast in torch first (bf16 has no numpy
  twin)."""
  if hasattr(value, "detach"):
    value = value.detach().float().numpy()
  return np.asarray(value, np.float32)


def apply(flat: Mapping[str, Any], rules: Rules, path: str, what: str) -> dict[str, Any]:
  """Checks `flat` holds exactly the keys and shapes of `rules` and converts it into nested params."""
  missing = sorted(set(rules) - set(flat))
  unknown = sorted(set(flat) - set(rules))
  if missing or unknown:
    problems = ([f"missing keys {listed(missing)}"] if missing else []) + (
      [f"unknown keys {listed(unknown)}"] if unknown else []
    )
    raise ConfigError(path, f"does not match {what}: {'; '.join(problems)}")
  params: dict[str, Any] = {}
  for key, (shape, to_ours) in rules.items():
    got = tuple(flat[key].shape)
    if got != shape:
      raise ConfigError(path, f"{key} has shape {got}, expected {shape} for {what}")
    for dst, array in to_ours(f32(flat[key])).items():
      *parents, leaf = dst.split("/")
      node = params
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = np.ascontiguousarray(array, np.float32)
  return params
