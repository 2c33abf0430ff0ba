"""Our ViT as an NNX module, through flax's Linen-to-NNX bridge (`flax.nnx.bridge.ToNNX`).

`to_nnx(vit.build(...), image_size)` gives a `ViTNNX`: a stateful NNX module holding the linen ViT's
variables as `nnx.Param`s, called as the linen ViT is (`model(images, train=False, override=...)`) and
returning the same `(logits, out)`, with every layer's pre-softmax attention in `out["attn_logits"]`
[L, B, H, N, N]. It works with `nnx.jit`, `nnx.grad` / `nnx.value_and_grad` and `nnx.Optimizer` like any
NNX module; the linen module does the computing, so the two give the same numbers from the same params.

`from_params(model_config, params)` and `from_export(path)` load what `vit.build` / `checkpoint.save_params`
describe (an export of ours, or a converted timm/big_vision checkpoint saved as one) without running an
init; `linen_params(model)` hands the params back in the linen layout (`checkpoint.save_params` takes it).

Example::

  model = bridge.from_export("/path/to/export")
  logits_BV, out = model(images_BYXC, train=False)
  out["attn_logits"]  # [L, B, H, N, N]
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.bridge import variables as bridge_variables

from at_jax import checkpoint
from at_jax.errors import ConfigError
from at_jax.models import attention, fit, vit

Array = jax.Array


def _rngs(rngs: nnx.Rngs | int) -> nnx.Rngs:
  """A seed becomes separate "params" and "dropout" streams: drop-path (train=True) needs the latter."""
  return rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(params=rngs, dropout=rngs + 1)


class ViTNNX(nnx.bridge.ToNNX):
  """A `vit.ViT` as an NNX module: `ToNNX` with the ViT's call signature spelt out.

  Build one with `to_nnx`, `from_params` or `from_export`. Its variables are the linen ViT's params as
  `nnx.Param` attributes named as in the linen tree (`model.embedding["kernel"]`,
  `model.Transformer["encoderblock_0"]...`); `linen_params` returns that tree.
  """

  def __call__(  # type: ignore[override]  # ToNNX's is *args, **kwargs
    self,
    images_BYXC: Array,
    *,
    train: bool,
    override: attention.Override | None = None,
    drop_masks: Array | None = None,
    want_qkv: bool = False,
    patch_keep: Array | None = None,
    attn_target: attention.AttnTarget | None = None,
    rngs: nnx.Rngs | Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """`vit.ViT.__call__`'s arguments and result: (logits [B, V] or pre-logits [B, D], out), with
    out["attn_logits"] [L, B, H, N, N]. `rngs`: for drop-path when `train` (default: the module's own
    "dropout" stream, which advances on every call)."""
    return super().__call__(
      images_BYXC,
      train=train,
      override=override,
      drop_masks=drop_masks,
      want_qkv=want_qkv,
      patch_keep=patch_keep,
      attn_target=attn_target,
      rngs=rngs,
    )

  @property
  def linen(self) -> vit.ViT:
    """The wrapped linen ViT (its fields: depth, num_heads, patch_size, ...)."""
    return self.to_nnx__module


def to_nnx(
  model: vit.ViT, image_size: int, *, channels: int = 3, rngs: nnx.Rngs | int = 0
) -> ViTNNX:
  """`model` (e.g. `vit.build({"variant": "Pico/7", "num_classes": 10})`) as an NNX module with freshly
  initialised params, for [B, image_size, image_size, channels] images (the position table's size)."""
  nnx_model = ViTNNX(model, rngs=_rngs(rngs))
  # The bridge creates linen variables on a first call (lazy init); one image sets every shape.
  dummy_BYXC = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return nnx_model.lazy_init(dummy_BYXC, train=False)


def from_params(
  model_config: Mapping[str, Any], params: Mapping[str, Any], *, rngs: nnx.Rngs | int = 0
) -> ViTNNX:
  """The ViT `model_config` describes (`vit.build`'s dict) holding `params` (the linen tree, e.g. from
  `checkpoint.load_params`), as an NNX module. No init runs: the params become its variables as they are.
  Raises ConfigError (field `params`) when they are not that ViT's: a leaf missing, extra (linen would
  ignore it: a deeper checkpoint would run truncated) or of another shape."""
  model = vit.build(model_config)
  try:
    differ = fit.mismatches(model, params, *fit.input_shape(model, params))
  except ValueError as e:
    differ = [str(e)]
  if differ:
    raise ConfigError(
      "params", f"not the params of the ViT model_config describes: {', '.join(differ[:10])}"
    )
  nnx_model = ViTNNX(model, rngs=_rngs(rngs))
  arrays = jax.tree.map(jnp.asarray, dict(params))  # numpy leaves from an export -> device arrays
  # What the bridge does with the variables its lazy init creates: one nnx.Param per leaf, grouped in
  # attributes named after the top-level entries of the linen tree.
  attrs = bridge_variables.linen_vars_to_nnx_attrs({"params": arrays})
  for name, value in attrs.items():
    setattr(nnx_model, name, nnx.data(value))
  return nnx_model


def from_export(path: str, *, rngs: nnx.Rngs | int = 0) -> ViTNNX:
  """The ViT exported at `path` (`checkpoint.save_params`: model_config.json + params) as an NNX module.
  Raises `ConfigError` naming `path` when it is not a finished export."""
  model_config, params = checkpoint.load_params(path)
  return from_params(model_config, params, rngs=rngs)


def linen_params(model: ViTNNX) -> dict[str, Any]:
  """The params of `model` as the linen ViT's tree: `vit.ViT.apply({"params": ...})` and
  `checkpoint.save_params(path, ..., vit.model_fields(model.linen))` take it."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
