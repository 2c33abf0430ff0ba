"""Everything attention transfer: modes, layer/head selection, teacher targets, overrides and losses.

Mode is static Python (it changes the program):
  none     plain supervised training.
  copy     in the selected layers/heads the student uses softmax(teacher logits) (or the teacher's q, k or v)
           instead of its own; the teacher runs at evaluation too.
  distill  the student computes its own attention; an extra loss (weight `transfer.weight`) pulls it to the
           teacher's: cross-entropy over keys for `attn`, mean squared error for `q`/`k`/`v`.
Teacher targets are laid out layer-major over the *selected* layers only: [S, B, ...] with S = len(layers).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.errors import ConfigError

Array = jax.Array
MODES = ("none", "copy", "distill")
WHATS = ("attn", "q", "k", "v")
SOURCES = ("jointly", "precomputed")
# The paper's control: replace each image's teacher targets by their mean over the batch's images, keeping
# layer, head and query structure but no per-image information.
AVERAGES = ("none", "images")
# What the teacher must expose for each `what`, in the ViT's `out` dict.
TEACHER_KEY = {"attn": "attn_logits", "q": "q", "k": "k", "v": "v"}


def _parse_count(spec: str, field: str, limit: int) -> int:
  try:
    count = int(spec.split(":", 1)[1])
  except ValueError:
    raise ConfigError(field, f"{spec!r}: expected an integer after ':'") from None
  if not 0 < count <= limit:
    raise ConfigError(field, f"{spec!r}: count must be in [1, {limit}]")
  return count


def parse_selection(spec: Any, size: int, field: str, what: str = "layers") -> tuple[int, ...]:
  """Resolves a selection of layers or heads against `size` (the depth or the number of heads).

  Accepted specs: "all"; "first:k"; "last:k"; "end_layer:e" (e <= 0: indices [0, size + e), the paper's
  --end_layer); "i,j,k" or a sequence of ints (negative indices count from the end).
  """
  if isinstance(spec, str):
    spec = spec.strip()
    if spec == "all":
      return tuple(range(size))
    if spec.startswith("first:"):
      return tuple(range(_parse_count(spec, field, size)))
    if spec.startswith("last:"):
      return tuple(range(size - _parse_count(spec, field, size), size))
    if spec.startswith("end_layer:"):
      try:
        end = int(spec.split(":", 1)[1])
      except ValueError:
        raise ConfigError(field, f"{spec!r}: expected an integer after ':'") from None
      if not -size < end <= 0:
        raise ConfigError(field, f"{spec!r}: end_layer must be in ({-size}, 0] for {size} {what}")
      return tuple(range(size + end))
    try:
      spec = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
      raise ConfigError(field, f"{spec!r}: use 'all', 'first:k', 'last:k', 'end_layer:e' or a list "
                        f"of indices like '0,3,5'") from None
  indices = []
  for i in spec:
    if not -size <= int(i) < size:
      raise ConfigError(field, f"index {i} out of range for {size} {what} (valid: 0..{size - 1})")
    indices.append(int(i) % size)
  if not indices:
    raise ConfigError(field, "selects nothing; use 'all' or name at least one index")
  if len(set(indices)) != len(indices):
    raise ConfigError(field, f"repeated indices in {list(spec)}")
  return tuple(sorted(indices))


@dataclasses.dataclass(frozen=True)
class Transfer:
  """A validated transfer setting, resolved against the student's depth and heads."""
  mode: str = "none"
  what: str = "attn"
  layers: tuple[int, ...] = ()
  heads: tuple[int, ...] = ()
  weight: float = 3.0
  source: str = "jointly"
  depth: int = 0
  num_heads: int = 0
  average: str = "none"

  @property
  def active(self) -> bool:
    return self.mode != "none"

  @property
  def teacher_in_eval(self) -> bool:
    return self.mode == "copy"

  @property
  def teacher_key(self) -> str:
    return TEACHER_KEY[self.what]

  def head_mask(self) -> np.ndarray:
    """[S, H] bool over the selected layers: which heads transfer."""
    mask = np.zeros((len(self.layers), self.num_heads), bool)
    mask[:, list(self.heads)] = True
    return mask

  def layer_head_mask(self) -> np.ndarray:
    """[L, H] bool over all of the student's layers."""
    mask = np.zeros((self.depth, self.num_heads), bool)
    mask[np.ix_(self.layers, self.heads)] = True
    return mask


def resolve(cfg: Mapping[str, Any], student: Any, teacher: Any | None, image_size: int) -> Transfer:
  """Validates `config.transfer` against the student (and teacher) ViTs; errors name the config field.

  Args:
    cfg: the `transfer` config: mode, what, layers, heads, weight, source.
    student, teacher: `ViT` modules (teacher may be None when mode is "none" or source "precomputed").
    image_size: the training image size, to check token counts.
  """
  mode, what, source = cfg["mode"], cfg.get("what", "attn"), cfg.get("source", "jointly")
  if mode not in MODES:
    raise ConfigError("transfer.mode", f"unknown mode {mode!r}; use one of {MODES}")
  if mode == "none":
    return Transfer(depth=student.depth, num_heads=student.num_heads)
  if what not in WHATS:
    raise ConfigError("transfer.what", f"unknown {what!r}; use one of {WHATS}")
  if source not in SOURCES:
    raise ConfigError("transfer.source", f"unknown {source!r}; use one of {SOURCES}")
  average = cfg.get("average", "none")
  if average not in AVERAGES:
    raise ConfigError("transfer.average", f"unknown {average!r}; use one of {AVERAGES}")
  if mode == "copy" and source == "precomputed":
    raise ConfigError("transfer.source", "copy mode runs the teacher at evaluation too; use 'jointly'")
  layers = parse_selection(cfg.get("layers", "all"), student.depth, "transfer.layers", "layers")
  heads = parse_selection(cfg.get("heads", "all"), student.num_heads, "transfer.heads", "heads")
  weight = float(cfg.get("weight", 3.0))
  if mode == "distill" and not weight > 0:
    raise ConfigError("transfer.weight", f"must be > 0 for distillation, got {weight}")
  if teacher is not None:
    if teacher.depth <= max(layers):
      raise ConfigError("transfer.layers", f"layer {max(layers)} does not exist in the teacher "
                        f"(depth {teacher.depth})")
    if teacher.num_heads != student.num_heads:
      raise ConfigError("teacher.init", f"teacher has {teacher.num_heads} heads, student "
                        f"{student.num_heads}; attention maps need the same head count (model.num_heads)")
    t_tokens, s_tokens = teacher.tokens_for(image_size), student.tokens_for(image_size)
    if t_tokens != s_tokens:
      raise ConfigError("teacher.init", f"teacher sees {t_tokens} tokens per image and the student "
                        f"{s_tokens} at {image_size}px; match model.patch_size/class_token to the teacher")
    if what != "attn" and teacher.width != student.width:
      raise ConfigError("teacher.init", f"transferring {what!r} needs equal widths (teacher "
                        f"{teacher.width}, student {student.width}, model.width)")
    if student.drop_path > 0 and teacher.depth != student.depth:
      raise ConfigError("model.drop_path", "teacher and student share drop-path masks, which needs equal "
                        f"depths (teacher {teacher.depth}, student {student.depth}); set drop_path=0")
  return Transfer(mode, what, layers, heads, weight, source, student.depth, student.num_heads, average)


def teacher_targets(teacher_out: Mapping[str, Array], t: Transfer) -> Array:
  """Selected layers of the teacher's transferred quantity, [S, B, ...], with no gradient."""
  targets_SB = jax.lax.stop_gradient(teacher_out[t.teacher_key][np.asarray(t.layers)])
  if t.average == "images":
    if t.what == "attn":  # average the maps, not the logits; log(mean map) is a logit whose softmax is it
      mean = jnp.log(jax.nn.softmax(targets_SB.astype(jnp.float32), -1).mean(axis=1, keepdims=True))
    else:
      mean = targets_SB.mean(axis=1, keepdims=True)
    targets_SB = jnp.broadcast_to(mean, targets_SB.shape)
  return targets_SB


def precomputed_targets(batch: Mapping[str, Array], t: Transfer) -> Array:
  """Targets carried in the batch as `teacher_<key>` [B, S, ...] (example-major, as stored), -> [S, B, ...]."""
  key = f"teacher_{t.teacher_key}"
  if key not in batch:
    raise ConfigError("transfer.source", f"'precomputed' needs batch[{key!r}] from the data pipeline")
  return jnp.swapaxes(batch[key], 0, 1)


def copy_override(targets_SB: Array, t: Transfer) -> dict[str, Array]:
  """The ViT `override` that swaps the teacher's quantity into the selected layers/heads."""
  full = jnp.zeros((t.depth,) + targets_SB.shape[1:], targets_SB.dtype).at[np.asarray(t.layers)].set(targets_SB)
  key = "logits" if t.what == "attn" else t.what
  return {key: full, "mask": jnp.asarray(t.layer_head_mask())}


def attention_cross_entropy(teacher_logits: Array, student_logits: Array) -> Array:
  """-sum_j softmax(t)_j log_softmax(s)_j over the key axis (last), in float32; shape of inputs minus it."""
  p_t = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(p_t * jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1), axis=-1)


def _reduce(per_SH: Array, t: Transfer) -> Array:
  """Mean over the selected heads of each layer, summed over layers (the paper's reduction)."""
  mask_SH = jnp.asarray(t.head_mask(), jnp.float32)
  return jnp.sum(jnp.sum(per_SH * mask_SH, axis=1) / jnp.sum(mask_SH, axis=1))


def distill_loss(student_out: Mapping[str, Array], targets_SB: Array, t: Transfer) -> Array:
  """weight * sum over selected layers of the mean (over batch, selected heads, queries) loss.

  `attn`: cross-entropy between softmax(teacher logits) and log_softmax(student logits) over keys; its
  minimum over the student is the teacher's attention entropy. `q`/`k`/`v`: mean squared error.
  """
  student_SB = student_out[t.teacher_key][np.asarray(t.layers)]
  if t.what == "attn":  # [S, B, H, N, N] -> per query [S, B, H, N] -> [S, H]
    per_SH = attention_cross_entropy(targets_SB, student_SB).mean(axis=(1, 3))
  else:  # [S, B, N, H, Dh] -> [S, H]
    err = (student_SB.astype(jnp.float32) - targets_SB.astype(jnp.float32)) ** 2
    per_SH = err.mean(axis=(1, 2, 4))
  return t.weight * _reduce(per_SH, t)


def needs_qkv(t: Transfer) -> bool:
  return t.active and t.what != "attn"


def selected(values: Sequence[int]) -> str:
  """A short human description of a selection, for logs: '0-17' or '0,5,9'."""
  v = list(values)
  if v and v == list(range(v[0], v[-1] + 1)):
    return f"{v[0]}-{v[-1]}" if len(v) > 1 else str(v[0])
  return ",".join(map(str, v))
