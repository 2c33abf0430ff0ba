"""MAE pre-training (He et al., 2022) of a `vit.ViT` encoder, whose params then serve as a teacher.

The encoder is an ordinary ViT built by `vit.build`, so `params["encoder"]` has exactly the layout that
`vit.build(encoder_config(mae))` expects: `encoder_params` exports it as a teacher with no conversion.
Masking follows MAE's `random_masking` (per-sample argsort of uniform noise, keep the first T); the
encoder runs on the T visible patches only (`ViT(..., patch_keep=...)`); a light decoder sees the visible
tokens plus a shared mask token at every masked position, with MAE's fixed 2-D sin-cos position table, and
predicts each patch's pixels. The loss is the MSE on the masked patches only, against per-patch
normalised pixels (`norm_pix_loss`).

MAE's own recipe is the encoder's `posemb="sincos2d"` and `weight_init="mae"` (configs/mae_*.py); the
decoder's linear layers and blocks are drawn by the encoder's `weight_init` too, as MAE initialises the
whole model alike.

Its train and eval steps are in `at_jax.training.mae`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax.errors import ConfigError
from at_jax.models import inits, vit
from at_jax.models.encoder import Block, BlockArch, sample_drop_masks

Array = jax.Array
Batch = Mapping[str, Array]
NORM_PIX_EPS = 1e-6


def patchify(images_BYXC: Array, p: int) -> Array:
  """[B, Y, X, C] -> [B, P, Q]: patches row-major (as the ViT's conv), Q = p*p*C pixel values each in
  (row, col, c) order."""
  b, rows, cols, c = images_BYXC.shape
  if rows % p or cols % p:
    raise ValueError(f"image size {rows}x{cols} is not a multiple of the patch size {p}")
  x = images_BYXC.reshape(b, rows // p, p, cols // p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (rows // p) * (cols // p), p * p * c)


def unpatchify(patches_BPQ: Array, p: int) -> Array:
  """Inverse of `patchify` for square images: [B, P, Q] (Q = p*p*C) -> [B, Y, X, C]."""
  b, num_patches, length = patches_BPQ.shape
  side = int(round(num_patches**0.5))
  if side * side != num_patches or length % (p * p):
    raise ValueError(
      f"{num_patches} patches of length {length} are not a square grid of {p}x{p} patches"
    )
  c = length // (p * p)
  x = patches_BPQ.reshape(b, side, side, p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, side * p, side * p, c)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """T = int(P * (1 - mask_ratio)), the number of visible patches, truncated as MAE's `random_masking`
  (196 patches at 0.9 keep 19, not round()'s 20); at least 1 patch on each side."""
  keep = int(num_patches * (1 - mask_ratio))
  if not 0 < keep < num_patches:
    raise ConfigError(
      "mae.mask_ratio",
      f"{mask_ratio} keeps {keep} of {num_patches} patches; the encoder "
      "needs at least one visible patch and the loss at least one masked patch",
    )
  return keep


def random_masking(
  rng: Array, batch: int, num_patches: int, keep: int
) -> tuple[Array, Array, Array]:
  """Per-sample random masking by argsort of uniform noise, as MAE's `random_masking`.

  Returns:
    keep_BT: int [B, T] indices of the visible patches (in shuffled order, as the encoder sees them).
    restore_BP: int [B, P] the rank of each patch in the shuffle; gathering [visible, mask tokens] with it
      puts every token back at its patch position.
    mask_BP: float32 [B, P], 1 for masked (rank >= T) and 0 for visible patches.
  """
  noise_BP = jax.random.uniform(rng, (batch, num_patches))
  shuffle_BP = jnp.argsort(noise_BP, axis=1)  # Ascending: the smallest noise is kept.
  restore_BP = jnp.argsort(shuffle_BP, axis=1)
  return shuffle_BP[:, :keep], restore_BP, (restore_BP >= keep).astype(jnp.float32)


def reconstruction_loss(
  pred_BPQ: Array, target_BPQ: Array, mask_BP: Array, norm_pix: bool
) -> Array:
  """Per-example MSE over the masked patches only, [B].

  With `norm_pix`, each target patch is normalised by its own mean and variance first. The variance is
  the unbiased one (ddof=1), as MAE's `target.var(dim=-1)` in PyTorch.
  """
  target_BPQ = target_BPQ.astype(jnp.float32)
  if norm_pix:
    mean_BPQ = target_BPQ.mean(axis=-1, keepdims=True)
    var_BPQ = target_BPQ.var(axis=-1, keepdims=True, ddof=1)
    target_BPQ = (target_BPQ - mean_BPQ) / jnp.sqrt(var_BPQ + NORM_PIX_EPS)
  per_patch_BP = jnp.mean(jnp.square(pred_BPQ.astype(jnp.float32) - target_BPQ), axis=-1)
  return (per_patch_BP * mask_BP).sum(axis=1) / mask_BP.sum(axis=1)


def encoder_config(mae: "MAE") -> dict[str, Any]:
  """The model_config dict of the encoder, headless (num_classes=0): what `vit.build` takes for the export."""
  return {**dict(mae.encoder), "num_classes": 0}


def encoder_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The encoder's params (`params["encoder"]`), a ViT of `encoder_config(mae)`: the teacher export.

  With `pool="cls"` (or "cls_mean") the ViT's own `encoder_norm` is the LayerNorm over all tokens that
  MAE's `norm` is, so the trained MAE `encoder_norm` replaces it (the ViT's copy got no gradient); this is
  what MAE's fine-tuning without global pooling keeps. With gap pooling `fc_norm` is a new layer and stays as is.
  """
  enc = dict(params["encoder"])
  if "encoder_norm" in enc:
    enc["encoder_norm"] = params["encoder_norm"]
  return enc


class MAE(nn.Module):
  """Masked autoencoder around a `vit.ViT` encoder.

  Attributes:
    encoder: model_config dict for `vit.build`, e.g. {"variant": "Mu/7", "num_classes": 0, "pool": "cls"};
      num_classes is forced to 0 (no head).
    decoder_width, decoder_depth, decoder_heads, decoder_mlp_dim: the decoder's blocks (`Block`).
    mask_ratio: fraction of patches hidden from the encoder.
    norm_pix_loss: regress per-patch normalised pixels (MAE's better-performing target).
  """

  encoder: dict
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4
  decoder_mlp_dim: int = 512
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True

  @nn.compact
  def __call__(
    self, images_BYXC: Array, *, train: bool, mask_rng: Array
  ) -> tuple[Array, dict[str, Array]]:
    """Masks, encodes the visible patches, decodes all patches, and scores the masked ones.

    Args:
      images_BYXC: float images [B, Y, X, C].
      train: enables the encoder's stochastic depth (if it has drop_path > 0).
      mask_rng: key for the masking noise (and drop path); an argument, not `make_rng`, so that the train
        step derives it per step and evaluation can fix it.

    Returns:
      loss (mean over examples), and aux with "pred" [B, P, Q] (predicted pixels, normalised per patch
      when norm_pix_loss), "mask" [B, P] (1 = masked), "loss", and "example_loss" [B].
    """
    if self.decoder_width % self.decoder_heads:
      raise ConfigError("mae.decoder_heads", "decoder_width must be divisible by decoder_heads")
    # `copy(name=...)`: vit.build cannot name a module, and the params must sit under "encoder".
    encoder = vit.build(encoder_config(self)).copy(name="encoder")
    p = encoder.patch_size
    b, rows, cols, c = images_BYXC.shape
    target_BPQ = patchify(images_BYXC, p)
    num_patches = target_BPQ.shape[1]
    keep = num_kept(num_patches, self.mask_ratio)
    keep_BT, restore_BP, mask_BP = random_masking(mask_rng, b, num_patches, keep)

    drop_masks = None
    if train and encoder.drop_path > 0:
      # A key independent of the masking noise.
      drop_masks = sample_drop_masks(
        jax.random.fold_in(mask_rng, 1), b, encoder.depth, encoder.drop_path
      )
    _, out = encoder(images_BYXC, train=train, patch_keep=keep_BT, drop_masks=drop_masks)
    x_BND = nn.LayerNorm(epsilon=encoder.norm_eps, name="encoder_norm")(out["tokens"])  # N = E + T

    dtype_mm = jnp.dtype(encoder.dtype_mm)
    kernel = inits.dense_kernel(encoder.weight_init)  # xavier-uniform with "mae", as MAE's Linears
    x_BND = nn.Dense(self.decoder_width, dtype=dtype_mm, kernel_init=kernel, name="decoder_embed")(
      x_BND
    )
    x_BND = x_BND.astype(jnp.float32)
    num_prefix = encoder.num_prefix
    prefix_BED, visible_BTD = x_BND[:, :num_prefix], x_BND[:, num_prefix:]
    # trunc_normal(0.02) draws what MAE's normal_(std=.02) does (the cut is at 100 sigma).
    mask_token_BPD = self.param("mask_token", inits.trunc_normal(0.02), (1, 1, self.decoder_width))
    tokens_BPD = jnp.concatenate(
      [visible_BTD, jnp.broadcast_to(mask_token_BPD, (b, num_patches - keep, self.decoder_width))],
      axis=1,
    )
    tokens_BPD = jnp.take_along_axis(tokens_BPD, restore_BP[:, :, None], axis=1)  # Unshuffle.
    table_PD = inits.sincos_posemb_2d(rows // p, cols // p, self.decoder_width, "mae.decoder_width")
    tokens_BPD = tokens_BPD + table_PD[None]
    # The cls/register tokens get no decoder position (MAE's table has zeros in the cls slot).
    x_BND = jnp.concatenate([prefix_BED, tokens_BPD], axis=1)

    arch = BlockArch(self.decoder_mlp_dim, self.decoder_heads, norm_eps=encoder.norm_eps)
    arch = dataclasses.replace(arch, dtype_mm=dtype_mm, weight_init=encoder.weight_init)
    for i in range(self.decoder_depth):
      x_BND, _ = Block(arch, name=f"decoderblock_{i}")(x_BND, (None, None, None))
    x_BND = nn.LayerNorm(epsilon=encoder.norm_eps, name="decoder_norm")(x_BND)
    pred_BPQ = nn.Dense(p * p * c, dtype=dtype_mm, kernel_init=kernel, name="decoder_pred")(
      x_BND[:, num_prefix:]
    ).astype(jnp.float32)

    example_loss_B = reconstruction_loss(pred_BPQ, target_BPQ, mask_BP, self.norm_pix_loss)
    # Every example has P - T masked patches, so this equals MAE's sum(loss * mask) / sum(mask).
    loss = example_loss_B.mean()
    return loss, {"pred": pred_BPQ, "mask": mask_BP, "loss": loss, "example_loss": example_loss_B}
