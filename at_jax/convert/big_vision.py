"""big_vision (and google-research vision_transformer) `.npz` files -> our ViT.

Both store flax params under '/'-joined names, in the loop layout (`encoderblock_{i}`) or big_vision's
scan layout (one `encoderblock` with a leading layer axis), under `params/` or elsewhere (`_NPZ_PREFIXES`).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from at_jax.convert import keymap, posemb
from at_jax.convert.keymap import Array, Rules
from at_jax.errors import ConfigError

# big_vision keeps params under one of these (checked in order); keys elsewhere are optimizer state.
_NPZ_PREFIXES = ("params/", "opt/target/", "params/img/", "")


@dataclasses.dataclass(frozen=True)
class _Architecture:
  """What a big_vision file's keys and shapes say about its ViT."""

  width: int
  channels: int
  patch: int
  depth: int
  mlp_dim: int
  heads: int
  num_classes: int
  # Their names of a block's attention, second LayerNorm and MLP (legacy files number them).
  mha: str
  ln2: str
  mlp: str
  pos_key: str
  pos_len: int
  posemb_prefix: bool

  @property
  def head_dim(self) -> int:
    return self.width // self.heads


def from_big_vision(raw: Mapping[str, Any], path: str, num_heads: int | None) -> tuple[dict, dict]:
  """big_vision (or google-research vision_transformer) `.npz` -> (config, params)."""
  prefix = next((p for p in _NPZ_PREFIXES if p + "embedding/kernel" in raw), None)
  if prefix is None:
    raise keymap.not_a_vit(list(raw), path, "params/embedding/kernel")
  w = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
  keymap.check_supported(list(w), path)
  _unstack_scan(w, path)
  a = _architecture(w, path, num_heads)
  rules = _outer_rules(a)
  for i in range(a.depth):
    rules.update(_block_rules(a, i))
  what = f"a big_vision ViT of width {a.width}, depth {a.depth}, MLP {a.mlp_dim}, patch {a.patch}"
  params = keymap.apply(w, rules, path, what)
  return _config(a), params


def _unstack_scan(w: dict[str, Any], path: str) -> None:
  """Scan layout: one [L, ...] array per block parameter; unstacks them into encoderblock_{i}, in place."""
  stacked = {k: w.pop(k) for k in list(w) if k.startswith("Transformer/encoderblock/")}
  depths = {array.shape[:1] for array in stacked.values()}
  if len(depths) > 1 or () in depths:
    raise ConfigError(
      path, f"scan-layout blocks disagree on their leading (layer) axis: {sorted(depths)}"
    )
  for key, array in stacked.items():
    for i, layer in enumerate(array):
      w[key.replace("encoderblock/", f"encoderblock_{i}/")] = layer


def _architecture(w: Mapping[str, Any], path: str, num_heads: int | None) -> _Architecture:
  kernel = keymap.shape_of(w, "embedding/kernel", path, 4)
  if kernel[0] != kernel[1]:
    raise ConfigError(path, f"embedding/kernel has shape {kernel}: non-square patches")
  patch, _, channels, width = kernel
  depth = keymap.depth_of(
    list(w),
    r"Transformer/encoderblock_(\d+)/",
    path,
    "Transformer/encoderblock_0/LayerNorm_0/scale",
  )
  # google-research/vision_transformer numbers submodules in creation order; big_vision names them.
  legacy = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in w
  mha, ln2, mlp = (
    ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if legacy
    else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  )
  query = keymap.shape_of(w, f"Transformer/encoderblock_0/{mha}/query/kernel", path, 3)  # [D, H, K]
  heads = keymap.resolve_heads(width, num_heads, query[1], path)
  mlp_dim = keymap.shape_of(w, f"Transformer/encoderblock_0/{mlp}/Dense_0/kernel", path, 2)[1]
  num_classes = keymap.shape_of(w, "head/kernel", path, 2)[1] if "head/kernel" in w else 0
  if "cls" not in w:
    raise ConfigError(
      path,
      "unsupported architecture: no cls token, i.e. big_vision pool_type 'gap', which "
      "applies encoder_norm to every token before averaging; at_jax's ViT averages first, "
      "then applies fc_norm",
    )
  pos_key, pos_len = _position_table(w, path)
  return _Architecture(
    width=width,
    channels=channels,
    patch=patch,
    depth=depth,
    mlp_dim=mlp_dim,
    heads=heads,
    num_classes=num_classes,
    mha=mha,
    ln2=ln2,
    mlp=mlp,
    pos_key=pos_key,
    pos_len=pos_len,
    posemb_prefix=pos_key != "pos_embedding",
  )


def _position_table(w: Mapping[str, Any], path: str) -> tuple[str, int]:
  """(key, positions) of the stored table: big_vision's covers the patches only; the original ViT's
  (`posembed_input`) the cls token too."""
  pos_key = next(
    (k for k in ("pos_embedding", "Transformer/posembed_input/pos_embedding") if k in w), None
  )
  if pos_key is None:
    raise ConfigError(
      path, "no stored position table (pos_embedding): fixed 'sincos2d' tables are not supported"
    )
  pos_len = keymap.shape_of(w, pos_key, path, 3)[1]
  posemb.check_grid(pos_key, pos_len, pos_key != "pos_embedding", path)
  return pos_key, pos_len


def _same(dst: str) -> Callable[[Array], dict[str, Array]]:
  """A rule's conversion that keeps the array, under our name `dst`."""
  return lambda w: {dst: w}


def _outer_rules(a: _Architecture) -> Rules:
  """Patch embedding, cls token, position table, final LayerNorm and the classifier, if any."""
  width = a.width
  rules: Rules = {
    "embedding/kernel": ((a.patch, a.patch, a.channels, width), _same("embedding/kernel")),
    "embedding/bias": ((width,), _same("embedding/bias")),
    "cls": ((1, 1, width), _same("cls")),
    a.pos_key: ((1, a.pos_len, width), _same("pos_embedding")),
    "Transformer/encoder_norm/scale": ((width,), _same("encoder_norm/scale")),
    "Transformer/encoder_norm/bias": ((width,), _same("encoder_norm/bias")),
  }
  if a.num_classes:
    rules["head/kernel"] = ((width, a.num_classes), _same("head/kernel"))
    rules["head/bias"] = ((a.num_classes,), _same("head/bias"))
  return rules


def _block_rules(a: _Architecture, i: int) -> Rules:
  """Block `i` under its names, renamed to big_vision's where the legacy layout numbers them."""
  width, heads, head_dim, mha, mlp = a.width, a.heads, a.head_dim, a.mha, a.mlp
  block = f"Transformer/encoderblock_{i}/"
  ours = block + "MultiHeadDotProductAttention_0/"
  rules: Rules = {}
  for theirs, name in (("LayerNorm_0", "LayerNorm_0"), (a.ln2, "LayerNorm_1")):
    for leaf in ("scale", "bias"):
      rules[f"{block}{theirs}/{leaf}"] = ((width,), _same(f"{block}{name}/{leaf}"))
  for name in ("query", "key", "value"):
    rules[f"{block}{mha}/{name}/kernel"] = ((width, heads, head_dim), _same(f"{ours}{name}/kernel"))
    rules[f"{block}{mha}/{name}/bias"] = ((heads, head_dim), _same(f"{ours}{name}/bias"))
  rules[f"{block}{mha}/out/kernel"] = ((heads, head_dim, width), _same(f"{ours}out/kernel"))
  rules[f"{block}{mha}/out/bias"] = ((width,), _same(f"{ours}out/bias"))
  for j, shape in ((0, (width, a.mlp_dim)), (1, (a.mlp_dim, width))):
    rules[f"{block}{mlp}/Dense_{j}/kernel"] = (shape, _same(f"{block}MlpBlock_0/Dense_{j}/kernel"))
    rules[f"{block}{mlp}/Dense_{j}/bias"] = (
      (shape[1],),
      _same(f"{block}MlpBlock_0/Dense_{j}/bias"),
    )
  return rules


def _config(a: _Architecture) -> dict:
  """The `vit.build` config: a cls readout, qkv biases, no LayerScale, tanh GELU."""
  return dict(
    num_classes=a.num_classes,
    patch_size=a.patch,
    width=a.width,
    depth=a.depth,
    mlp_dim=a.mlp_dim,
    num_heads=a.heads,
    pool="cls",
    class_token=True,
    num_registers=0,
    posemb_prefix=a.posemb_prefix,
    pre_norm=False,
    qkv_bias=True,
    qk_norm=False,
    layerscale_init=0.0,
    # flax's nn.gelu, which big_vision and vision_transformer use, is the tanh approximation.
    mlp_act="gelu_tanh",
    norm_eps=1e-6,
    scan=False,
  )
