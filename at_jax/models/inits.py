"""How the ViT and the MAE draw their initial params, in one place: timm's trunc-normal, MAE's
xavier-uniform, and MAE's fixed 2-D sin-cos position table.

`model.weight_init` picks the recipe (`WEIGHT_INITS`): "timm" (trunc_normal(0.02) linears, PyTorch's
default conv init for the patch embedding: the paper's student) or "mae" (xavier-uniform linears and patch
embedding: MAE's pre-training). `model.posemb` picks the position table (`POSEMBS`): "learned"
(trunc_normal(0.02), trained) or "sincos2d" (MAE's fixed table, never trained).
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from at_jax.errors import ConfigError

Array = jax.Array
Initializer = Callable[..., Array]

WEIGHT_INITS = ("timm", "mae")
POSEMBS = ("learned", "sincos2d")
# float32 `jax.random.normal` never draws beyond ~5.4 sigma (its uniform stays inside (-1, 1)): a cut
# further out than this removes nothing, so a plain normal is the exact truncated distribution there.
_NORMAL_REACH = 6.0


def trunc_normal(std: float, lower: float = -2.0, upper: float = 2.0) -> Initializer:
  """timm's `trunc_normal_(std=std, a=lower, b=upper)`: normal(0, std) cut at *absolute* bounds.

  Not `jax.nn.initializers.truncated_normal(std)`, which cuts at +-2 *standard deviations* and does not
  correct the spread: its samples have std 0.88 * std (0.0176 for 0.02). timm's +-2 is +-100 sigma at
  std 0.02, so its init is normal(0, 0.02) (MAE's models_mae.py says so and draws normal_(std=.02)).
  Beyond `_NORMAL_REACH` sigma this draws a plain normal: jax.random.truncated_normal there would map the
  uniform's endpoint -1 to erfinv(-1) = -inf and clip it to the bound (torch's trunc_normal_ can do the
  same), a -2.0 weight about once in 10^7 draws. std 0 gives zeros (a zero-initialised head).
  """
  if std < 0:
    raise ValueError(f"trunc_normal needs std >= 0, got {std}")
  if std == 0:
    return nn.initializers.zeros
  lo, hi = lower / std, upper / std

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    if -lo > _NORMAL_REACH and hi > _NORMAL_REACH:
      z = jax.random.normal(key, shape, dtype)
    else:
      z = jax.random.truncated_normal(key, lo, hi, shape, dtype)
    return z * jnp.asarray(std, dtype)

  return init


def xavier_uniform(fused: int = 1) -> Initializer:
  """`torch.nn.init.xavier_uniform_` on the kernel seen as one [in, out] matrix: U(-b, b) with
  b = sqrt(6 / (fan_in + fan_out)), fan_in the product of all axes but the last, fan_out the last.

  That is MAE's init of a Linear, and of its patch embedding (`xavier_uniform_(w.view([D, -1]))`: fan_in
  p * p * C, fan_out D, where flax's own xavier_uniform would count the p * p receptive field in the
  fan_out too). Flax's DenseGeneral hands its init the kernel flattened to [in, out] already.
  `fused`: the kernel is 1/fused of a PyTorch Linear that computes several outputs at once, whose fan_out
  is `fused` times ours: q, k and v are one Linear(D, 3D) in MAE (timm's Block), so fused=3.
  """

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    fan_in, fan_out = math.prod(shape[:-1]), shape[-1] * fused
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def check(posemb: str, weight_init: str, width: int) -> None:
  """Raises ConfigError("model.posemb" / "model.weight_init") for a value that is not a known recipe, or a
  sin-cos table the model's width cannot hold."""
  if posemb not in POSEMBS:
    raise ConfigError("model.posemb", f"{posemb!r} is not one of {POSEMBS}")
  if posemb == "sincos2d":
    sincos_posemb_2d(1, 1, width, "model.posemb")
  if weight_init not in WEIGHT_INITS:
    raise ConfigError("model.weight_init", f"{weight_init!r} is not one of {WEIGHT_INITS}")


def dense_kernel(weight_init: str, fused: int = 1) -> Initializer:
  """The kernel init of a linear layer: trunc_normal(0.02) ("timm") or `xavier_uniform(fused)` ("mae")."""
  return xavier_uniform(fused) if weight_init == "mae" else trunc_normal(0.02)


def patch_kernel(weight_init: str) -> Initializer:
  """The patch embedding's kernel [p, p, C, D]: MAE's xavier-uniform as a Linear ("mae"), or PyTorch's
  default Conv2d init, U(+-1/sqrt(fan_in)) ("timm": timm's init leaves the conv alone, as the paper's
  student does). Its bias starts at zero in both, where PyTorch's default draws it from the same
  U(+-1/sqrt(fan_in)) (+-0.036 at 16x16x3): a difference kept so that the committed studies and demo
  figures reproduce (docs/faithfulness.md)."""
  if weight_init == "mae":
    return xavier_uniform()
  return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def sincos_posemb_2d(grid_h: int, grid_w: int, width: int, field: str) -> np.ndarray:
  """MAE's fixed 2-D sin-cos table [grid_h * grid_w, width] (float32), patches row-major.

  As MAE's `get_2d_sincos_pos_embed`: the first half of the channels encodes the column, the second half
  the row, each as [sin, cos] of the coordinate times frequencies 1 / 10000 ** (i / (width / 4)),
  computed in float64 as MAE's numpy does. `field`: the config field that sets `width`, for the error.
  """
  if width % 4:
    raise ConfigError(
      field, f"a 2-D sin-cos position table needs a width divisible by 4, got {width}"
    )
  omega_F = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  row_P, col_P = [
    a.reshape(-1) for a in np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  ]
  halves = []
  for coord_P in (col_P, row_P):
    angle_PF = coord_P[:, None] * omega_F[None]
    halves += [np.sin(angle_PF), np.cos(angle_PF)]
  return np.concatenate(halves, axis=1).astype(np.float32)


def posemb_table(posemb: str, grid_h: int, grid_w: int, prefix: int) -> Initializer:
  """The init of the position table [1, prefix + grid_h * grid_w, D]: trunc_normal(0.02) ("learned"), or
  MAE's sin-cos table with zero rows in the `prefix` (cls/register) slots ("sincos2d"; the key is unused)."""
  if posemb == "learned":
    return trunc_normal(0.02)

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    del key
    table_PD = sincos_posemb_2d(grid_h, grid_w, shape[-1], "model.posemb")
    table_ND = np.concatenate([np.zeros((prefix, shape[-1]), np.float32), table_PD])
    return jnp.asarray(table_ND[None], dtype)

  return init
