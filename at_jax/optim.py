"""The optax chain: AdamW, per-step warmup + cosine to a min lr, weight-decay mask, layer-wise lr decay."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
import optax

from at_jax.errors import ConfigError

_LAYER_RE = re.compile(r"encoderblock_(\d+)")
# The stem: layer 0 of layer-wise lr decay, as in timm (`cls_token|reg_token|pos_embed|patch_embed|norm_pre`).
_EMBEDDING_NAMES = ("embedding", "pos_embedding", "cls", "registers", "pre_norm")
# optim.decay_rule: which params weight decay skips (`weight_decay_mask`).
DECAY_RULES = ("timm", "mae")
# Leaves that are vectors in PyTorch (biases, LayerNorm, LayerScale): MAE's rule never decays them.
_VECTOR_NAMES = ("bias", "scale")


# What each optimizer setting may be, as (lowest, lowest included, highest, highest included): the values
# the code would take without complaint and then train wrongly with fall outside. A negative lr or clip
# norm ascends, eps 0 gives 0/0 for params without gradient, ema_decay 1 freezes the EMA. Written as what
# is allowed, so NaN fails too.
HPARAM_RANGES = {
  "base_lr": (0, True, math.inf, False),
  "min_lr": (0, True, math.inf, False),
  "b1": (0, True, 1, False),
  "b2": (0, True, 1, False),
  "eps": (0, False, math.inf, False),
  "weight_decay": (0, True, math.inf, False),
  "layer_decay": (0, False, 1, True),
  "grad_clip": (0, True, math.inf, False),
  "label_smoothing": (0, True, 1, False),
  "ema_decay": (0, True, 1, False),
}
_HPARAM_NOTES = {"layer_decay": " (1: no layer decay)", "grad_clip": " (0: no clipping)"}
# MAE's AdamW constants with no layer decay, for callers without a config whose subject is not the
# optimizer (benchmarks' steps, tests): `make_optimizer(params, schedule=..., depth=..., **MAE_ADAMW)`.
MAE_ADAMW = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, layer_decay=1.0)


def check_hparams(**values: float) -> None:
  """Raises ConfigError("optim.<name>") for a value outside `HPARAM_RANGES[name]`.

  The one place these ranges live: start-up validation checks the whole config.optim with it, and
  `make_optimizer` (and mixup's label smoothing) check their own arguments.
  """
  for name, value in values.items():
    lo, lo_in, hi, hi_in = HPARAM_RANGES[name]
    above = lo <= value if lo_in else lo < value
    below = value <= hi if hi_in else value < hi
    if not (above and below):
      bounds = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
      raise ConfigError(
        f"optim.{name}", f"must be in {bounds}{_HPARAM_NOTES.get(name, '')}, got {value!r}"
      )


def make_schedule(
  *, base_lr: float, batch_size: int, warmup_steps: int, total_steps: int, min_lr: float
) -> optax.Schedule:
  """Linear warmup from 0 to base_lr * batch_size / 256, then half-cosine to `min_lr` (absolute)."""
  peak = base_lr * batch_size / 256
  if total_steps <= 0:
    raise ConfigError("schedule.epochs", "training must last at least one step")
  if not 0 <= warmup_steps < total_steps:
    raise ConfigError(
      "schedule.warmup_epochs",
      f"warmup ({warmup_steps} steps) must be shorter than training ({total_steps} steps)",
    )
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end_value=min_lr)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def check_decay_rule(rule: str) -> None:
  """Raises ConfigError("optim.decay_rule") unless `rule` is one of `DECAY_RULES`."""
  if rule not in DECAY_RULES:
    raise ConfigError("optim.decay_rule", f"{rule!r} is not one of {DECAY_RULES}")


def weight_decay_mask(params: Any, rule: str = "timm", frozen_posemb: bool = False) -> Any:
  """True for the leaves that get weight decay.

  "timm": kernels (Dense/Conv) only; biases, norms, the position table, cls/register and mask tokens get
  none (timm's ViT `no_weight_decay`, the paper's fine-tuning). "mae": MAE's pre-training
  (`optim_factory.add_weight_decay(model, wd)`, no skip list): everything but PyTorch's 1-D params
  (biases, norms, LayerScale) and the frozen params, so the cls, register and mask tokens ([1, 1, D]) are
  decayed; so is a *learned* position table there, while a fixed one (`frozen_posemb`: model.posemb =
  "sincos2d", MAE's requires_grad=False table) never is, under either rule.

  Decided by name, not by ndim, so a scan layout's stacked biases ([L, D]) are not mistaken for matrices.
  """
  check_decay_rule(rule)

  def decays(path, _) -> bool:
    name = _path_names(path)[-1]
    if rule == "timm":
      return name == "kernel"
    if name == "pos_embedding" and frozen_posemb:
      return False
    return name not in _VECTOR_NAMES and not name.startswith("layerscale_")

  return jax.tree_util.tree_map_with_path(decays, params)


def layer_decay_scales(params: Any, depth: int, decay: float) -> Any:
  """lr multipliers decay ** (depth + 1 - layer_id), MAE's convention.

  layer_id: 0 for the stem (patch and position embeddings, cls and register tokens, the pre-norm, as
  timm), i + 1 for block i, depth + 1 for the final norm and head. In the scan layout a block leaf is
  [L, ...] and gets a per-layer multiplier array broadcast over its other axes, so loop and scan
  layouts get identical updates.
  """

  def scale(path, leaf):
    names = _path_names(path)
    if names[0] in _EMBEDDING_NAMES:
      return decay ** (depth + 1)
    if names[0] == "Transformer" and names[1] == "encoderblock":  # scan layout
      ids = np.arange(1, depth + 1)
      return (
        (decay ** (depth + 1 - ids))
        .reshape((depth,) + (1,) * (len(leaf.shape) - 1))
        .astype(np.float32)
      )
    match = _LAYER_RE.fullmatch(names[1]) if names[0] == "Transformer" else None
    if match:
      return decay ** (depth - int(match.group(1)))
    return 1.0

  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by the matching leaf (scalar or broadcastable array) of `scales`."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
  params: Any,
  *,
  schedule: optax.Schedule,
  b1: float,
  b2: float,
  eps: float,
  weight_decay: float,
  layer_decay: float,
  depth: int,
  grad_clip: float | None = None,
  decay_rule: str = "timm",
  frozen_posemb: bool = False,
) -> optax.GradientTransformation:
  """AdamW as MAE/timm: decoupled weight decay scaled by the (layer-decayed) learning rate.

  Args:
    params: the params pytree, or its `jax.eval_shape` (only structure and shapes are read).
    decay_rule, frozen_posemb: which leaves are decayed (`weight_decay_mask`).
  """
  check_hparams(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, layer_decay=layer_decay)
  check_hparams(grad_clip=grad_clip or 0.0)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts += [
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.add_decayed_weights(
      weight_decay, mask=weight_decay_mask(params, decay_rule, frozen_posemb)
    ),
    optax.scale_by_learning_rate(schedule),
  ]
  if layer_decay < 1:
    parts.append(scale_by_tree(layer_decay_scales(params, depth, layer_decay)))
  return optax.chain(*parts)
