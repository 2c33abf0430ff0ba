"""Everything attention transfer: modes, layer/head selection, teacher targets, overrides and losses.

Mode is static Python (it changes the program):
  none     plain supervised training.
  copy     in the selected layers/heads the student uses softmax(teacher logits) (or the teacher's q, k or v)
           instead of its own; the teacher runs at evaluation too.
  distill  the student computes its own attention; an extra loss (weight `transfer.weight`) pulls it to the
           teacher's: cross-entropy over keys for `attn`, mean squared error for `q`/`k`/`v`.
Teacher targets are a dict laid out layer-major over the *selected* layers only: {key: [S, B, ...]} with
S = len(layers). Keys are the teacher's `out` names: "attn_logits" [S, B, H, N, N], or "q"/"k"/"v"
[S, B, N, H, Dh]. Distilling attention maps hands over the teacher's q and k rather than its maps: each
student block forms its layer's teacher logits when it needs them (`vit.AttnTarget`), so no stack of
N x N maps is ever alive, and `loss_impl` "blockwise"/"pallas" never forms one at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.errors import ConfigError
from at_jax.models import vit
from at_jax.ops import attn_ce as attn_loss

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
      raise ConfigError(
        field,
        f"{spec!r}: use 'all', 'first:k', 'last:k', 'end_layer:e' or a list "
        f"of indices like '0,3,5'",
      ) from None
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
  loss_impl: str = "direct"

  @property
  def active(self) -> bool:
    return self.mode != "none"

  @property
  def teacher_in_eval(self) -> bool:
    return self.mode == "copy"

  @property
  def teacher_key(self) -> str:
    return TEACHER_KEY[self.what]

  @property
  def target_keys(self) -> tuple[str, ...]:
    """What a jointly run teacher hands over: q and k for distilled maps (the per-layer maps are formed
    inside the student's blocks), else the transferred quantity itself (copy needs the maps; averaging
    over images averages maps)."""
    if self.mode == "distill" and self.what == "attn" and self.average == "none":
      return ("q", "k")
    return (self.teacher_key,)

  @property
  def maps_kept(self) -> int:
    """How many layers' [B, H, N, N] maps the transfer keeps alive on top of the student's own attention:
    a stack of teacher logits for copy (and averaged or stored maps), one layer's teacher logits at a time
    for direct distillation from q and k, none for the blockwise losses or q/k/v transfer."""
    if not self.active or self.what != "attn":
      return 0
    if self.target_keys == ("attn_logits",):
      return len(self.layers)
    return 1 if self.loss_impl == "direct" else 0

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
    raise ConfigError(
      "transfer.source", "copy mode runs the teacher at evaluation too; use 'jointly'"
    )
  layers = parse_selection(cfg.get("layers", "all"), student.depth, "transfer.layers", "layers")
  heads = parse_selection(cfg.get("heads", "all"), student.num_heads, "transfer.heads", "heads")
  weight = float(cfg.get("weight", 3.0))
  if mode == "distill" and not weight > 0:
    raise ConfigError("transfer.weight", f"must be > 0 for distillation, got {weight}")
  loss_impl = cfg.get("loss_impl", "direct")
  if loss_impl not in attn_loss.IMPLS:
    raise ConfigError("transfer.loss_impl", f"unknown {loss_impl!r}; use one of {attn_loss.IMPLS}")
  if loss_impl != "direct" and (mode != "distill" or what != "attn" or average != "none"):
    raise ConfigError(
      "transfer.loss_impl",
      f"{loss_impl!r} computes the attention-map distillation loss "
      "from q and k; it needs mode='distill', what='attn', average='none' (use 'direct')",
    )
  if teacher is not None:
    if teacher.depth <= max(layers):
      raise ConfigError(
        "transfer.layers",
        f"layer {max(layers)} does not exist in the teacher (depth {teacher.depth})",
      )
    if teacher.num_heads != student.num_heads:
      raise ConfigError(
        "teacher.init",
        f"teacher has {teacher.num_heads} heads, student "
        f"{student.num_heads}; attention maps need the same head count (model.num_heads)",
      )
    t_tokens, s_tokens = teacher.tokens_for(image_size), student.tokens_for(image_size)
    if t_tokens != s_tokens:
      raise ConfigError(
        "teacher.init",
        f"teacher sees {t_tokens} tokens per image and the student "
        f"{s_tokens} at {image_size}px; match model.patch_size/class_token to the teacher",
      )
    if what != "attn" and teacher.width != student.width:
      raise ConfigError(
        "teacher.init",
        f"transferring {what!r} needs equal widths (teacher "
        f"{teacher.width}, student {student.width}, model.width)",
      )
    if student.drop_path > 0 and teacher.depth != student.depth:
      raise ConfigError(
        "model.drop_path",
        "teacher and student share drop-path masks, which needs equal "
        f"depths (teacher {teacher.depth}, student {student.depth}); set drop_path=0",
      )
  return Transfer(
    mode, what, layers, heads, weight, source, student.depth, student.num_heads, average, loss_impl
  )


def needs_qkv(t: Transfer) -> bool:
  """Whether the teacher must return q/k/v (`want_qkv`)."""
  return t.active and t.target_keys != ("attn_logits",)


Targets = dict[str, Array]


def teacher_targets(teacher_out: Mapping[str, Array], t: Transfer) -> Targets:
  """Selected layers of what the teacher hands over (`t.target_keys`), {key: [S, B, ...]}, with no gradient."""
  targets = {k: jax.lax.stop_gradient(teacher_out[k][np.asarray(t.layers)]) for k in t.target_keys}
  if t.average == "images":
    key, x_SB = t.teacher_key, targets[t.teacher_key]
    if (
      t.what == "attn"
    ):  # average the maps, not the logits; log(mean map) is a logit whose softmax is it
      mean = jnp.log(jax.nn.softmax(x_SB.astype(jnp.float32), -1).mean(axis=1, keepdims=True))
    else:
      mean = x_SB.mean(axis=1, keepdims=True)
    targets[key] = jnp.broadcast_to(mean, x_SB.shape)
  return targets


def precomputed_targets(batch: Mapping[str, Array], t: Transfer) -> Targets:
  """Targets carried in the batch as `teacher_<key>` [B, S, ...] (example-major, as stored) -> [S, B, ...].

  Distilled maps come as stored logits (`teacher_attn_logits`) or as q and k (`teacher_q`, `teacher_k`).
  """
  options = [(t.teacher_key,)]
  if t.mode == "distill" and t.what == "attn":
    options = (
      [("q", "k"), ("attn_logits",)] if t.loss_impl != "direct" else [("attn_logits",), ("q", "k")]
    )
  for keys in options:
    if all(f"teacher_{k}" in batch for k in keys):
      return {k: jnp.swapaxes(batch[f"teacher_{k}"], 0, 1) for k in keys}
  wanted = " or ".join("+".join(f"teacher_{k}" for k in keys) for keys in options)
  raise ConfigError(
    "transfer.source",
    f"'precomputed' needs batches carrying {wanted} (written by launch/precompute.py)",
  )


def copy_override(targets: Mapping[str, Array], t: Transfer) -> dict[str, Array]:
  """The ViT `override` that swaps the teacher's quantity into the selected layers/heads."""
  x_SB = targets[t.teacher_key]
  full = jnp.zeros((t.depth,) + x_SB.shape[1:], x_SB.dtype).at[np.asarray(t.layers)].set(x_SB)
  key = "logits" if t.what == "attn" else t.what
  # A numpy mask is static: layers that copy every head then skip their own q and k (`vit.Attention`).
  return {key: full, "mask": t.layer_head_mask()}


def attn_target(targets: Mapping[str, Array], t: Transfer) -> vit.AttnTarget | None:
  """The student's `attn_target` when distilling maps: its blocks then score themselves layer by layer."""
  if t.mode != "distill" or t.what != "attn":
    return None
  values = (
    {"logits": targets["attn_logits"]}
    if "attn_logits" in targets
    else {"q": targets["q"], "k": targets["k"]}
  )
  return vit.AttnTarget(t.layers, values, t.loss_impl)


def attention_cross_entropy(teacher_logits: Array, student_logits: Array) -> Array:
  """-sum_j softmax(t)_j log_softmax(s)_j over the key axis (last), in float32; shape of inputs minus it."""
  return attn_loss.ce_from_logits(teacher_logits, student_logits)


def _teacher_logits(targets: Mapping[str, Array]) -> Array:
  """[S, B, H, N, N] teacher logits from stored logits or from q and k."""
  if "attn_logits" in targets:
    return targets["attn_logits"]
  return attn_loss.qk_logits(targets["q"], targets["k"], targets["q"].shape[-1] ** -0.5)


def _reduce(per_SH: Array, t: Transfer) -> Array:
  """Mean over the selected heads of each layer, summed over layers (the paper's reduction)."""
  mask_SH = jnp.asarray(t.head_mask(), jnp.float32)
  return jnp.sum(jnp.sum(per_SH * mask_SH, axis=1) / jnp.sum(mask_SH, axis=1))


def distill_loss(
  student_out: Mapping[str, Array], targets: Mapping[str, Array], t: Transfer
) -> Array:
  """weight * sum over selected layers of the mean (over batch, selected heads, queries) loss.

  `attn`: cross-entropy between softmax(teacher logits) and log_softmax(student logits) over keys; its
  minimum over the student is the teacher's attention entropy. Taken from the per-layer "attn_ce" the
  student's blocks computed (given `attn_target`), else from its stacked "attn_logits" (the reference
  formula, materialising every selected layer's maps). `q`/`k`/`v`: mean squared error.
  """
  layers = np.asarray(t.layers)
  if t.what == "attn" and "attn_ce" in student_out:
    per_SH = student_out["attn_ce"][layers]
  elif t.what == "attn":  # [S, B, H, N, N] -> per query [S, B, H, N] -> [S, H]
    per_SH = attention_cross_entropy(
      _teacher_logits(targets), student_out["attn_logits"][layers]
    ).mean((1, 3))
  else:  # [S, B, N, H, Dh] -> [S, H]
    err = (
      student_out[t.what][layers].astype(jnp.float32) - targets[t.what].astype(jnp.float32)
    ) ** 2
    per_SH = err.mean(axis=(1, 2, 4))
  return t.weight * _reduce(per_SH, t)


def selected(values: Sequence[int]) -> str:
  """A short human description of a selection, for logs: '0-17' or '0,5,9'."""
  v = list(values)
  if v and v == list(range(v[0], v[-1] + 1)):
    return f"{v[0]}-{v[-1]}" if len(v) > 1 else str(v[0])
  return ",".join(map(str, v))
