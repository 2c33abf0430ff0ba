"""The position table: which slots it covers (a square patch grid, with or without the prefix tokens'
slots), and fitting it to another image size by bicubic resampling, as timm does.

A fixed sin-cos table (`model.posemb="sincos2d"`, MAE's) is the param `pos_embedding` too, so it is
fitted the same way, as MAE's own `interpolate_pos_embed` does; the export's posemb stays as it was."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.errors import ConfigError
from at_jax.models import vit

Array = np.ndarray


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def has_prefix(pos_len: int, num_prefix: int, path: str) -> bool:
  """Whether a table of `pos_len` positions covers `num_prefix` prefix tokens besides a square grid."""
  # With prefix first: timm's default; ambiguous only for tiny grids (e.g. 9 positions, 5 prefix tokens).
  if num_prefix and _is_square(pos_len - num_prefix):
    return True
  if _is_square(pos_len):
    return False
  raise ConfigError(
    path,
    f"pos_embed has {pos_len} positions: neither a square grid nor one plus "
    f"{num_prefix} prefix (cls/register) slots",
  )


def check_grid(key: str, pos_len: int, cls_slot: bool, path: str) -> None:
  """Checks that table `key` of `pos_len` positions is a square grid (plus one slot if `cls_slot`)."""
  if not _is_square(pos_len - cls_slot):
    raise ConfigError(
      path,
      f"{key} has {pos_len} positions, not a square grid"
      + (" plus the cls slot" if cls_slot else ""),
    )


def resample_posemb(pos_BND: Array, grid: int, num_prefix: int) -> Array:
  """Resizes the patch part of a position table [1, N, D] to a grid x grid table; prefix slots unchanged.

  Bicubic with antialiasing, which is exactly timm's `resample_abs_pos_embed` (torch's bicubic with
  antialias=True) for up- and downsampling. The size-1 axis is the batch's (B).
  """
  prefix_BED, patches_BPD = pos_BND[:, :num_prefix], pos_BND[:, num_prefix:]
  old = math.isqrt(patches_BPD.shape[1])
  width = pos_BND.shape[-1]
  with jax.default_device(jax.devices("cpu")[0]):
    # Y, X: the patch grid's rows and columns.
    grid_YXD = jax.image.resize(
      jnp.asarray(patches_BPD.reshape(old, old, width)),
      (grid, grid, width),
      "bicubic",
      antialias=True,
      precision=jax.lax.Precision.HIGHEST,
    )
  return np.concatenate([prefix_BED, np.asarray(grid_YXD).reshape(1, grid * grid, width)], axis=1)


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
