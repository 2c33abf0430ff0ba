"""A teacher of another token grid: its attention maps resampled onto the student's tokens.

A map is a distribution over keys for each query. Both axes are resampled between square patch grids of
g_t and g_s cells over the same image, separably per grid axis:
- keys carry probability mass: shrinking sums each teacher cell's mass into the student cells it
  overlaps, in proportion to the overlap (area weights; mass preserved exactly); growing interpolates
  the teacher's mass density bilinearly at the student cells' centres;
- queries are rows, each a distribution: a student query takes the overlap-weighted (shrinking) or
  bilinear (growing) average of the teacher rows around it, a convex mix, so it stays a distribution.
Every row is renormalised at the end. Prefix tokens (`transfer.prefix` "keep"): the cls row and column are
kept as they are (the student has a cls token) or dropped (it has none); the teacher's registers are
dropped. The student's own register tokens have no counterpart in the teacher's maps and are refused.
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.errors import ConfigError
from at_jax.ops import attn_ce

Array = jax.Array
PREFIXES = ("keep", "drop")


def _overlaps(n_from: int, n_to: int) -> np.ndarray:
  """[n_to, n_from]: the length of overlap between cell i of n_to and cell j of n_from, on [0, 1]."""
  edges_to, edges_from = np.linspace(0, 1, n_to + 1), np.linspace(0, 1, n_from + 1)
  low = np.maximum(edges_to[:-1, None], edges_from[None, :-1])
  high = np.minimum(edges_to[1:, None], edges_from[None, 1:])
  return np.clip(high - low, 0, None)


def _bilinear(n_from: int, n_to: int) -> np.ndarray:
  """[n_to, n_from]: linear interpolation weights of the n_from cell centres at the n_to cell centres
  (clamped at the edges); rows sum to 1."""
  centres = (np.arange(n_to) + 0.5) * n_from / n_to - 0.5  # in units of n_from cells
  centres = np.clip(centres, 0, n_from - 1)
  low = np.floor(centres).astype(int)
  high = np.minimum(low + 1, n_from - 1)
  frac = centres - low
  weights = np.zeros((n_to, n_from))
  weights[np.arange(n_to), low] += 1 - frac
  weights[np.arange(n_to), high] += frac
  return weights


def axis_weights(n_from: int, n_to: int) -> tuple[np.ndarray, np.ndarray]:
  """(query weights, key weights), each [n_to, n_from], along one grid axis (see the module docstring).
  Query rows sum to 1; shrinking key columns sum to 1 (each teacher cell's mass all goes somewhere)."""
  if n_to == n_from:
    return np.eye(n_to), np.eye(n_to)
  if n_to < n_from:
    overlap = _overlaps(n_from, n_to)
    return overlap / overlap.sum(1, keepdims=True), overlap / overlap.sum(0, keepdims=True)
  weights = _bilinear(n_from, n_to)
  return weights, weights * (n_from / n_to)  # density at the centre times the student cell's size


@functools.lru_cache(maxsize=16)
def token_weights(
  teacher_cls: bool, teacher_registers: int, teacher_grid: int, student_cls: bool, student_grid: int
) -> tuple[np.ndarray, np.ndarray]:
  """(Q, K), each [N_s, N_t] float32 over whole token sequences ([cls], [registers], patches): the
  student's target map is rows-renormalised Q @ P_t @ K^T for a teacher map P_t."""
  q_axis, k_axis = axis_weights(teacher_grid, student_grid)
  t_prefix, s_prefix = int(teacher_cls) + teacher_registers, int(student_cls)
  n_t, n_s = t_prefix + teacher_grid**2, s_prefix + student_grid**2
  q, k = np.zeros((n_s, n_t), np.float32), np.zeros((n_s, n_t), np.float32)
  if (
    student_cls
  ):  # kept as it is; the teacher's registers (and its cls, for a student without) dropped
    q[0, 0] = k[0, 0] = 1.0
  q[s_prefix:, t_prefix:] = np.kron(q_axis, q_axis)
  k[s_prefix:, t_prefix:] = np.kron(k_axis, k_axis)
  return q, k


def resample_logits(logits: Array, weights: tuple[np.ndarray, np.ndarray]) -> Array:
  """Teacher logits [..., N_t, N_t] -> the student's target logits [..., N_s, N_s]: log of the resampled,
  row-renormalised probability maps (logits of exactly those maps)."""
  q, k = (jnp.asarray(w) for w in weights)
  probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
  resampled = jnp.einsum("sq,...qk,tk->...st", q, probs, k)
  resampled = resampled / resampled.sum(-1, keepdims=True)
  return attn_ce.logits_of(resampled)


def token_map(
  cfg: Mapping[str, Any],
  student: Any,
  teacher: Any,
  what: str,
  loss_impl: str,
  sizes: tuple[int, int],
) -> tuple[int, ...]:
  """`Transfer.token_map` for a teacher of another token grid or prefix, the arguments of
  `token_weights` (() where the tokens match), with an error naming the field for every combination it
  cannot serve. `sizes`: (the student's image size, the teacher's)."""
  image_size, t_size = sizes
  prefix = cfg.get("prefix", "keep")
  if prefix not in PREFIXES:
    raise ConfigError("transfer.prefix", f"unknown {prefix!r}; use one of {PREFIXES}")
  s_grid, t_grid = image_size // student.patch_size, t_size // teacher.patch_size
  s_tokens, t_tokens = student.tokens_for(image_size), teacher.tokens_for(t_size)
  if t_size % teacher.patch_size:
    field = "teacher.image_size" if t_size != image_size else "teacher.init"
    raise ConfigError(
      field, f"the teacher's patch {teacher.patch_size} does not divide its image size {t_size}"
    )
  s_shape = (s_grid, student.class_token, student.num_registers)
  same_tokens = s_shape == (t_grid, teacher.class_token, teacher.num_registers)
  if same_tokens and prefix == "keep":
    return ()
  if what != "attn" and prefix == "drop":
    raise ConfigError("transfer.prefix", f"'drop' applies to attention maps, not {what!r}")
  if what != "attn":
    raise ConfigError(
      "teacher.init",
      f"teacher sees {t_tokens} tokens per image and the student {s_tokens}: {what!r} is handed "
      "over token by token; match model.patch_size/class_token to the teacher, or set "
      "teacher.image_size to give it the student's grid",
    )
  if loss_impl != "direct":
    raise ConfigError(
      "transfer.loss_impl",
      f"{loss_impl!r} streams the teacher's maps from its q and k; maps resampled from its "
      f"{t_grid}x{t_grid} grid to the student's {s_grid}x{s_grid} need 'direct'",
    )
  if prefix == "drop":  # patch rows over patch keys on both sides (the student's cut in the loss)
    return (int(teacher.class_token), teacher.num_registers, t_grid, 0, s_grid)
  if student.num_registers:
    raise ConfigError(
      "transfer.prefix",
      f"the student's {student.num_registers} register tokens have no counterpart in the teacher's "
      "resampled maps ('keep' drops the teacher's registers); give the student none",
    )
  if student.class_token and not teacher.class_token:
    raise ConfigError(
      "model.class_token", "the teacher has no cls token whose map row the student's could keep"
    )
  return (int(teacher.class_token), teacher.num_registers, t_grid, int(student.class_token), s_grid)
