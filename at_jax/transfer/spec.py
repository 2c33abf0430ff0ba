"""What to transfer: modes, layer/head selection, and `Transfer`, the setting resolved against the models.

Mode is static Python (it changes the program):
  none     plain supervised training.
  copy     in the selected layers/heads the student uses softmax(teacher logits) (or the teacher's q, k or v)
           instead of its own; the teacher runs at evaluation too.
  distill  the student computes its own attention; an extra loss (weight `transfer.weight`) pulls it to the
           teacher's: cross-entropy over keys for `attn`, mean squared error for `q`/`k`/`v`. `features`
           is the paper's baseline, not attention transfer: the selected blocks' outputs (the residual
           stream) are pulled to the teacher's, normalised per token (`loss.feature_loss`). Features,
           q, k and v of a teacher of another width are reached through a trained linear map per layer
           (`ViT.feature_dim`; q/k/v head by head, so the head counts must be equal).
What the teacher hands over is in `targets` (the teacher's forward pass, stored targets, the student's
override or attention target), the distillation loss in `loss`.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from at_jax.errors import ConfigError
from at_jax.ops import attn_ce
from at_jax.transfer import grids, pairing

MODES = ("none", "copy", "distill")
WHATS = ("attn", "q", "k", "v", "features")
SOURCES = ("jointly", "precomputed")
# The paper's control: replace each image's teacher targets by their mean over the batch's images, keeping
# layer, head and query structure but no per-image information.
AVERAGES = ("none", "images")
# What the teacher must expose for each `what`, in the ViT's `out` dict.
TEACHER_KEY = {"attn": "attn_logits", "q": "q", "k": "k", "v": "v", "features": "features"}


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
  loss_block: int = 0  # block_q = block_k of the streamed losses; 0: attn_ce_tiles.auto_block
  teacher_layers: tuple[int, ...] = ()  # the teacher layer each of `layers` reads (`layer_map`)
  head_map: str = "same"  # pairing.HEAD_MAPS
  teacher_heads: int = 0  # the teacher's head count (0: no teacher known yet, or features)
  # () where the teacher's tokens are the student's; else the arguments of `grids.token_weights`
  # (teacher cls, teacher registers, teacher grid, student cls, student grid): maps are resampled.
  token_map: tuple[int, ...] = ()
  teacher_image_size: int = 0  # the size the teacher sees the images at (0: the student's)
  # transfer.prefix "drop": the student's leading (cls, register) tokens left out of the loss, whose
  # maps are then its patch rows over its patch keys, renormalised (as the teacher's targets are).
  student_prefix: int = 0
  head_mix_init: str = "mean"  # head_map "learned": where the mix starts (pairing.HEAD_MIX_INITS)
  # The taught maps are softmax(logits / T): sharper below 1, flatter above (`targets._tempered`).
  target_temperature: float = 1.0
  head_pick: tuple[tuple[int, ...], ...] = ()  # head_map "pick": [S][H_s] teacher heads read
  # distill: the fraction of training steps that distil (HASTE ends its alignment early); the steps
  # after train on labels alone, the teacher not run (`Task.make_label_step`).
  until: float = 1.0

  @property
  def active(self) -> bool:
    return self.mode != "none"

  def distill_steps(self, total_steps: int) -> int:
    """`transfer.until` in steps: how many steps, from the first, distil (0: every step)."""
    return math.ceil(self.until * total_steps) if self.until < 1 else 0

  @property
  def teacher_depth(self) -> int:
    """How many of the teacher's layers the transfer reads: it can be cut after the deepest."""
    return max(self.teacher_layers) + 1

  def head_mix_prior(self) -> np.ndarray:
    """head_map "learned": the [H_s, H_t] logits its mix starts from (`pairing.head_mix_prior`)."""
    teacher_heads = self.teacher_heads or self.num_heads
    return pairing.head_mix_prior(self.head_mix_init, self.num_heads, teacher_heads)

  def head_mixing(self) -> np.ndarray | None:
    """[H_s, H_t] rows summing to 1: the mix of teacher maps each student head distils under head_map
    "group" or "mean"; None for "same" and "first", which pick heads."""
    return pairing.head_mixing(self.head_map, self.num_heads, self.teacher_heads or self.num_heads)

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
    # Averaged heads and resampled grids are maps, which q and k cannot express.
    as_maps = self.head_mixing() is not None or self.head_map == "learned" or bool(self.token_map)
    streams = self.mode == "distill" and self.what == "attn" and self.average == "none"
    if streams and not as_maps:
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

  def teacher_map_bytes(self, student_tokens: int) -> int:
    """Bytes per example of the teacher's stacked float32 maps at its own head count and tokens, when
    they differ from the student's (they are then mixed or resampled into `maps_kept`'s and held beside
    them); 0 where the teacher's maps already have the student's shape or none are handed over."""
    if self.target_keys != ("attn_logits",):
      return 0
    heads = self.teacher_heads or self.num_heads
    tokens = student_tokens
    if self.token_map:  # (teacher cls, teacher registers, teacher grid, ...)
      tokens = self.token_map[0] + self.token_map[1] + self.token_map[2] ** 2
    if (heads, tokens) == (self.num_heads, student_tokens):
      return 0
    return len(self.layers) * 4 * heads * tokens**2

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


def _check_loss_impl(loss_impl: str, mode: str, what: str, average: str) -> None:
  if loss_impl not in attn_ce.IMPLS:
    raise ConfigError("transfer.loss_impl", f"unknown {loss_impl!r}; use one of {attn_ce.IMPLS}")
  if loss_impl != "direct" and (mode != "distill" or what != "attn" or average != "none"):
    raise ConfigError(
      "transfer.loss_impl",
      f"{loss_impl!r} computes the attention-map distillation loss "
      "from q and k; it needs mode='distill', what='attn', average='none' (use 'direct')",
    )


def _check_loss_block(loss_block: Any, loss_impl: str) -> int:
  """`transfer.loss_block` as an int: 0 (auto) or a power of two >= 16 (Triton's tile sizes), and 0
  for "direct", which has no blocks (an explicit setting is never silently ignored)."""
  if isinstance(loss_block, bool) or not isinstance(loss_block, int | np.integer):
    raise ConfigError("transfer.loss_block", f"must be an int, got {loss_block!r}")
  if loss_block != 0 and (loss_block < 16 or loss_block & (loss_block - 1)):
    raise ConfigError(
      "transfer.loss_block", f"{loss_block}: use 0 (auto) or a power of two >= 16 (16, 32, 64, ...)"
    )
  if loss_block != 0 and loss_impl == "direct":
    raise ConfigError(
      "transfer.loss_block",
      f"{loss_block} sets the tiles of loss_impl 'blockwise'/'pallas'; 'direct' has none (use 0)",
    )
  return int(loss_block)


def _is_number(value: Any) -> bool:
  """A real number as a config holds one (not a bool, which Python counts as an int)."""
  return isinstance(value, int | float | np.floating) and not isinstance(value, bool)


def _check_temperature(value: Any, what: str) -> float:
  """`transfer.target_temperature` as a float > 0; one other than 1 reshapes attention maps."""
  if not _is_number(value) or not 0 < value < float("inf"):
    raise ConfigError("transfer.target_temperature", f"must be a number > 0, got {value!r}")
  if value != 1 and what != "attn":
    raise ConfigError(
      "transfer.target_temperature",
      f"{value} sharpens or flattens attention maps; what is {what!r} (use 1.0, or what='attn')",
    )
  return float(value)


def _check_until(value: Any, mode: str) -> float:
  """`transfer.until` as a fraction in (0, 1]; below 1 only for distillation."""
  if not _is_number(value) or not 0 < value <= 1:
    raise ConfigError(
      "transfer.until", f"the fraction of training that distils, (0, 1]; got {value!r}"
    )
  if value < 1 and mode != "distill":
    raise ConfigError(
      "transfer.until",
      f"{value}: copy runs the teacher at every step and at test; only distill stops",
    )
  return float(value)


def _check_features(mode: str, source: str, heads: Any) -> None:
  """Feature distillation is a distillation of whole block outputs, from a jointly run teacher."""
  if mode != "distill":
    raise ConfigError(
      "transfer.what", "'features' (block outputs) can only be distilled; copy transfers attention"
    )
  if source != "jointly":
    raise ConfigError("transfer.source", "'features' are not stored by precompute; use 'jointly'")
  if heads != "all":
    raise ConfigError("transfer.heads", f"{heads!r}: 'features' have no heads; use 'all'")


def _check_feature_width(student: Any, teacher: Any, what: str) -> None:
  """The student's distilled features (or q, k, v) reach the teacher's width directly or through its
  `feature_proj` head (`ViT.feature_dim`, mapping `ViT.projected`)."""
  if student.feature_dim and student.projected != what:
    raise ConfigError(
      "model.feature_dim", f"the width map projects {student.projected!r}; {what!r} is distilled"
    )
  student_width = student.feature_dim or student.width
  if student_width != teacher.width:
    raise ConfigError(
      "model.feature_dim",
      f"{student.feature_dim}: the student's {what} are {student_width} wide and the teacher's "
      f"{teacher.width}; set model.feature_dim={teacher.width} (or 0, which sets it when widths differ)",
    )


def _check_teacher(student: Any, teacher: Any, t: "Transfer") -> None:
  """ConfigError unless `teacher` can hand `student` what `t` transfers (its tokens: `_token_map`)."""
  what = t.what
  if teacher.depth <= max(t.teacher_layers):
    raise ConfigError(
      "transfer.layers",
      f"layer {max(t.teacher_layers)} does not exist in the teacher (depth {teacher.depth}); "
      "transfer.layer_map 'uniform' or 'last' maps a deeper student onto a shallower teacher",
    )
  if what == "attn":
    return
  widths_differ = teacher.width != student.width
  if what != "features" and widths_differ and t.mode == "copy":
    raise ConfigError(
      "teacher.init",
      f"copying {what!r} needs equal widths (teacher {teacher.width}, student {student.width}, "
      "model.variant); distillation maps the student's to the teacher's width",
    )
  if t.mode == "distill":
    _check_feature_width(student, teacher, what)


def resolve(
  cfg: Mapping[str, Any],
  student: Any,
  teacher: Any | None,
  image_size: int,
  *,
  teacher_image_size: int = 0,
) -> Transfer:
  """Validates `config.transfer` against the student (and teacher) ViTs; errors name the config field.

  Args:
    cfg: the `transfer` config: mode, what, layers, heads, weight, source, average, loss_impl,
      loss_block.
    student, teacher: `ViT` modules (teacher may be None when mode is "none" or source "precomputed").
    image_size: the training image size, to check token counts.
    teacher_image_size: the size the teacher sees the images at (`teacher.image_size`; 0: image_size).
  """
  mode = cfg["mode"]
  if mode not in MODES:
    raise ConfigError("transfer.mode", f"unknown mode {mode!r}; use one of {MODES}")
  if mode == "none":
    return Transfer(depth=student.depth, num_heads=student.num_heads)
  what = pairing.choice("transfer.what", cfg.get("what", "attn"), WHATS)
  source = pairing.choice("transfer.source", cfg.get("source", "jointly"), SOURCES)
  average = pairing.choice("transfer.average", cfg.get("average", "none"), AVERAGES)
  if what == "features":
    _check_features(mode, source, cfg.get("heads", "all"))
  if mode == "copy" and source == "precomputed":
    raise ConfigError(
      "transfer.source", "copy mode runs the teacher at evaluation too; use 'jointly'"
    )
  layers, teacher_layers = pairing.resolve_layer_map(cfg, student, teacher)
  weight = float(cfg.get("weight", 3.0))
  if mode == "distill" and not weight > 0:
    raise ConfigError("transfer.weight", f"must be > 0 for distillation, got {weight}")
  loss_impl = cfg.get("loss_impl", "direct")
  _check_loss_impl(loss_impl, mode, what, average)
  loss_block = _check_loss_block(cfg.get("loss_block", 0), loss_impl)
  head_map, heads, teacher_heads = pairing.resolve_heads(cfg, student, teacher, what, loss_impl)
  pairing.check_shape_maps(cfg, mode, head_map)
  t = Transfer(
    mode,
    what,
    layers,
    heads,
    weight,
    source,
    student.depth,
    student.num_heads,
    average,
    loss_impl,
    loss_block,
    teacher_layers,
    head_map,
    teacher_heads,
    head_mix_init=cfg.get("head_mix_init", "mean"),
    target_temperature=_check_temperature(cfg.get("target_temperature", 1.0), what),
    head_pick=pairing.parse_head_pick(
      cfg.get("head_pick", ""), head_map, len(layers), student.num_heads, teacher_heads
    ),
    until=_check_until(cfg.get("until", 1.0), mode),
  )
  return (
    t
    if teacher is None
    else _against_teacher(cfg, t, student, teacher, image_size, teacher_image_size)
  )


def _against_teacher(
  cfg: Mapping[str, Any],
  t: Transfer,
  student: Any,
  teacher: Any,
  image_size: int,
  teacher_size: int,
) -> Transfer:
  """`t` checked against the teacher, with its tokens (`_token_map`) and the size it sees images at."""
  _check_teacher(student, teacher, t)
  t_size = teacher_size or image_size
  if t_size != image_size and t.source == "precomputed":
    raise ConfigError("teacher.image_size", "stored targets were computed at data.image_size")
  token_map = grids.token_map(cfg, student, teacher, t.what, t.loss_impl, (image_size, t_size))
  teacher_image_size = t_size if t_size != image_size else 0
  dropped = (
    int(student.class_token) + student.num_registers if token_map and not token_map[3] else 0
  )
  return dataclasses.replace(
    t, token_map=token_map, teacher_image_size=teacher_image_size, student_prefix=dropped
  )


# The teacher `out` keys that a ViT returns only when run with `want_qkv`.
QKV_KEYS = ("q", "k", "v")


def wants_qkv(keys: Sequence[str]) -> bool:
  """Whether a ViT must run with `want_qkv` to return `keys` of its `out`."""
  return any(k in QKV_KEYS for k in keys)


def needs_qkv(transfer: Transfer) -> bool:
  """Whether the teacher must return q/k/v (`want_qkv`) for what it hands over."""
  return transfer.active and wants_qkv(transfer.target_keys)


def selected(values: Sequence[int]) -> str:
  """A short human description of a selection, for logs: '0-17' or '0,5,9'."""
  v = list(values)
  if v and v == list(range(v[0], v[-1] + 1)):
    return f"{v[0]}-{v[-1]}" if len(v) > 1 else str(v[0])
  return ",".join(map(str, v))


def describe(t: Transfer) -> str:
  """An active transfer in one line, for logs: what, where from, and any setting off the paper's."""
  text = f"{t.mode} {t.what}, layers {selected(t.layers)}"
  if t.teacher_layers != t.layers:
    text += f" <- teacher's {selected(t.teacher_layers)}"
  text += f", heads {selected(t.heads)}" + (f" ({t.head_map})" if t.head_map != "same" else "")
  sharpness = f", maps at T={t.target_temperature:g}" if t.target_temperature != 1 else ""
  until = f", for the first {t.until:.0%} of steps" if t.until < 1 else ""
  return f"{text}, weight {t.weight}{sharpness}{until}"
