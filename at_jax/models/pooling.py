"""The ViT's readouts (`ViT.pool`): the pre-logits its head reads, from the encoder's output tokens.

gap       mean of the patch tokens, then LayerNorm `fc_norm` (MAE's fine-tuning, the paper's)  [B, D]
cls       LayerNorm `encoder_norm` over the sequence, then the cls token (ViT, DeiT, DINOv2)   [B, D]
cls_mean  the same LayerNorm, then [cls token | mean of the patch tokens], registers not       [B, 2D]
          averaged: the input of transformers' Dinov2ForImageClassification's classifier
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax.errors import ConfigError

POOLS = ("gap", "cls", "cls_mean")


def check(pool: str, class_token: bool) -> None:
  """ConfigError (`model.pool`) for an unknown pooling, or one reading a cls token the ViT lacks."""
  if pool not in POOLS:
    raise ConfigError("model.pool", f"unknown pooling {pool!r}; use one of {POOLS}")
  if pool != "gap" and not class_token:
    raise ConfigError("model.pool", f"{pool!r} pooling needs model.class_token=True")


def pre_logits_width(pool: str, width: int) -> int:
  """How many inputs the head of a ViT `width` wide has (the pre-logits' width)."""
  return 2 * width if pool == "cls_mean" else width


def pre_logits(pool: str, x_BND: jax.Array, num_prefix: int, norm_eps: float) -> jax.Array:
  """The pre-logits of the encoder's output `x_BND`, whose first `num_prefix` tokens are the cls token
  and registers. Called inside the ViT's compact `__call__`, so its LayerNorm is the ViT's own
  (`fc_norm` or `encoder_norm`, the names the converters read and write)."""
  if pool == "gap":
    return nn.LayerNorm(epsilon=norm_eps, name="fc_norm")(x_BND[:, num_prefix:].mean(axis=1))
  normed_BND = nn.LayerNorm(epsilon=norm_eps, name="encoder_norm")(x_BND)
  if pool == "cls":
    return normed_BND[:, 0]
  # cls_mean: both halves after the final norm, as transformers reads its last_hidden_state.
  return jnp.concatenate([normed_BND[:, 0], normed_BND[:, num_prefix:].mean(axis=1)], axis=-1)
