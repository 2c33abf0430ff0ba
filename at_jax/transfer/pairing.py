"""Which teacher layer and heads each student layer and head reads: the selections of `transfer.layers`
and `transfer.heads`, and the maps between a teacher and a student of other depths or head counts
(`transfer.layer_map`, `transfer.head_map`). Pure Python and numpy, resolved before any compute.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from at_jax.errors import ConfigError

# Which teacher layer each selected student layer reads (`layer_map`), besides explicit pairs "s:t,...":
# same     student layer i reads teacher layer i (the paper: equal depths);
# uniform  student layer i of L_s reads teacher layer ceil((i + 1) * L_t / L_s) - 1, the last of its span;
# last     the selected student layers, in order, read the teacher's last layers (HASTE's deep pairs).
LAYER_MAPS = ("same", "uniform", "last")
# What each student head distils when the head counts differ (`head_map`):
# same   head h reads teacher head h (equal counts);
# first  the first min(H_s, H_t) heads of each side pair up, the student's others are free;
# group  head h distils the mean map of a contiguous group of teacher heads, groups as equal as the
#        counts allow (one teacher head each, in order, when the student has more heads);
# mean   every head distils the mean map over all teacher heads;
# learned  per distilled layer and student head, a softmax-weighted mix of the teacher's maps, its logits
#        trained with the student (`ViT.head_mix`, dropped from exports; it starts as "mean");
# merge  SHD's (arXiv 2502.07436) merging of adjacent teacher heads, A = (A_p + A_q) / 2, round after round
#        (9 -> 5 -> 3), merging in the last round only as many pairs as reach the student's count.
# pick   student head h of the s-th selected layer reads teacher head `transfer.head_pick`[s][h], heads
#        chosen by the researcher (e.g. the sharpest: `evaluate.head_statistics`, `sharpest_heads`).
# group, mean and merge average probability maps (which stay distributions): they need the teacher's maps, not
# its q and k, so the streamed losses (`loss_impl`) and q/k/v transfer take same or first only.
HEAD_MAPS = ("same", "first", "pick", "group", "mean", "merge", "learned")
# Where a learned mix starts: every student head at the mean of the teacher's maps, or each halfway
# between its `group` and that mean (distinct starts: from the mean, all heads are taught one map, learn
# alike and stay alike; the cross-shape study found its four heads' mixes equal to 0.01).
HEAD_MIX_INITS = ("mean", "group")


def _parse_count(selection: str, field: str, limit: int) -> int:
  try:
    count = int(selection.split(":", 1)[1])
  except ValueError:
    raise ConfigError(field, f"{selection!r}: expected an integer after ':'") from None
  if not 0 < count <= limit:
    raise ConfigError(field, f"{selection!r}: count must be in [1, {limit}]")
  return count


def parse_selection(selection: Any, size: int, field: str, what: str = "layers") -> tuple[int, ...]:
  """Resolves a selection of layers or heads against `size` (the depth or the number of heads).

  Accepted specs: "all"; "first:k"; "last:k"; "end_layer:e" (e <= 0: indices [0, size + e), the paper's
  --end_layer); "i,j,k" or a sequence of ints (negative indices count from the end).
  """
  if isinstance(selection, str):
    selection = selection.strip()
    if selection == "all":
      return tuple(range(size))
    if selection.startswith("first:"):
      return tuple(range(_parse_count(selection, field, size)))
    if selection.startswith("last:"):
      return tuple(range(size - _parse_count(selection, field, size), size))
    if selection.startswith("end_layer:"):
      try:
        end = int(selection.split(":", 1)[1])
      except ValueError:
        raise ConfigError(field, f"{selection!r}: expected an integer after ':'") from None
      if not -size < end <= 0:
        raise ConfigError(
          field, f"{selection!r}: end_layer must be in ({-size}, 0] for {size} {what}"
        )
      return tuple(range(size + end))
    try:
      selection = [int(s) for s in selection.split(",") if s.strip()]
    except ValueError:
      raise ConfigError(
        field,
        f"{selection!r}: use 'all', 'first:k', 'last:k', 'end_layer:e' or a list "
        f"of indices like '0,3,5'",
      ) from None
  if not isinstance(selection, Sequence) or not all(_is_index(i) for i in selection):
    raise ConfigError(
      field, f"{selection!r}: use 'all', 'first:k', 'last:k', 'end_layer:e' or a list of integers"
    )
  indices = []
  for i in selection:
    if not -size <= int(i) < size:
      raise ConfigError(field, f"index {i} out of range for {size} {what} (valid: 0..{size - 1})")
    indices.append(int(i) % size)
  if not indices:
    raise ConfigError(field, "selects nothing; use 'all' or name at least one index")
  if len(set(indices)) != len(indices):
    raise ConfigError(field, f"repeated indices in {list(selection)}")
  return tuple(sorted(indices))


def _is_index(value: Any) -> bool:
  """An integer (numpy's too), not a bool or a float that int() would truncate."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def choice(field: str, value: str, options: Sequence[str]) -> str:
  if value not in options:
    raise ConfigError(field, f"unknown {value!r}; use one of {tuple(options)}")
  return value


def _merge_rounds(student_heads: int, teacher_heads: int) -> np.ndarray:
  """SHD's merges as one [H_s, H_t] matrix: each round averages adjacent pairs (0, 1), (2, 3), ... of the
  heads so far, carrying an odd one over, and the last merges only as many pairs as reach H_s."""
  mix = np.eye(teacher_heads)
  while mix.shape[0] > student_heads:
    n = mix.shape[0]
    merges = min(n // 2, n - student_heads)
    rows = [(mix[2 * i] + mix[2 * i + 1]) / 2 for i in range(merges)]
    mix = np.stack(rows + list(mix[2 * merges :]))
  return mix.astype(np.float32)


def head_mixing(head_map: str, student_heads: int, teacher_heads: int) -> np.ndarray | None:
  """The [H_s, H_t] mixing matrix of head_map "group", "mean" or "merge" (rows sum to 1); None for the
  maps that pick heads."""
  if head_map == "mean":
    return np.full((student_heads, teacher_heads), 1.0 / teacher_heads, np.float32)
  if head_map == "merge":
    return _merge_rounds(student_heads, teacher_heads)
  if head_map != "group":
    return None
  mix = np.zeros((student_heads, teacher_heads), np.float32)
  if teacher_heads >= student_heads:  # contiguous groups, sizes differing by at most one
    for h, group in enumerate(np.array_split(np.arange(teacher_heads), student_heads)):
      mix[h, group] = 1.0 / len(group)
  else:  # more student heads: each reads one teacher head, in order
    mix[np.arange(student_heads), np.arange(student_heads) * teacher_heads // student_heads] = 1.0
  return mix


def head_mix_prior(init: str, student_heads: int, teacher_heads: int) -> np.ndarray:
  """[H_s, H_t] logits the learned mix `softmax(prior + head_mix)` starts from (its param starts at 0,
  and weight decay pulls it back to this prior): zeros for "mean"; for "group", the log of halfway
  between each head's `group` and the mean, so that softmax(prior) is exactly that."""
  if init == "mean":
    return np.zeros((student_heads, teacher_heads), np.float32)
  group = head_mixing("group", student_heads, teacher_heads)
  return np.log(0.5 * group + 0.5 / teacher_heads).astype(np.float32)


def teacher_layers_for(
  layer_map: str, layers: tuple[int, ...], student_depth: int, teacher_depth: int
) -> tuple[int, ...]:
  """The teacher layer each selected student layer reads under a named `layer_map` (LAYER_MAPS)."""
  if layer_map == "same":
    teacher_layers = layers
  elif layer_map == "uniform":
    teacher_layers = tuple(-(-(i + 1) * teacher_depth // student_depth) - 1 for i in layers)
  elif layer_map == "last":
    if len(layers) > teacher_depth:
      raise ConfigError(
        "transfer.layer_map",
        f"'last': {len(layers)} student layers selected, but the teacher has {teacher_depth}",
      )
    teacher_layers = tuple(range(teacher_depth - len(layers), teacher_depth))
  else:
    raise ConfigError(
      "transfer.layer_map", f"unknown {layer_map!r}; use one of {LAYER_MAPS} or pairs 's:t,...'"
    )
  return teacher_layers


def _pairs(layer_map: Any) -> list[tuple[int, ...]] | None:
  """Explicit (student, teacher) layer pairs from "s:t,s:t" or a sequence of pairs; None for a name."""
  if isinstance(layer_map, str) and ":" not in layer_map:
    return None
  try:
    if isinstance(layer_map, str):
      return [tuple(int(x) for x in p.split(":")) for p in layer_map.split(",") if p.strip()]
    return [tuple(int(x) for x in pair) for pair in layer_map]
  except (TypeError, ValueError):
    raise ConfigError(
      "transfer.layer_map", f"{layer_map!r}: write pairs as 'student:teacher,...', e.g. '4:8,5:9'"
    ) from None


def resolve_layer_map(
  cfg: Mapping[str, Any], student: Any, teacher: Any | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(the student layers that transfer, the teacher layer each reads), from transfer.layers and
  transfer.layer_map; without a teacher (yet) the student's own indices stand in for the teacher's."""
  layer_map = cfg.get("layer_map", "same")
  pairs = _pairs(layer_map)
  if pairs is None:
    layers = parse_selection(cfg.get("layers", "all"), student.depth, "transfer.layers", "layers")
    if teacher is None:
      return layers, layers
    return layers, teacher_layers_for(layer_map, layers, student.depth, teacher.depth)
  if cfg.get("layers", "all") != "all":
    raise ConfigError(
      "transfer.layers",
      f"{cfg['layers']!r}: transfer.layer_map's pairs name the student's layers; leave this 'all'",
    )
  if not pairs or any(len(p) != 2 for p in pairs):
    raise ConfigError("transfer.layer_map", f"{layer_map!r}: pairs of (student, teacher) layers")
  # Validated and sorted as a selection (negative student indices count from the end); each keeps
  # its teacher layer through that.
  layers = parse_selection([s for s, _ in pairs], student.depth, "transfer.layer_map", "layers")
  teacher_of = {s % student.depth: t for s, t in pairs}
  teacher_layers = tuple(teacher_of[s] for s in layers)
  depth = teacher.depth if teacher is not None else None
  bad = [t for t in teacher_layers if t < 0 or (depth is not None and t >= depth)]
  if bad:
    raise ConfigError(
      "transfer.layer_map", f"teacher layers {bad} do not exist (the teacher has {depth} layers)"
    )
  return layers, teacher_layers


def resolve_heads(
  cfg: Mapping[str, Any], student: Any, teacher: Any | None, what: str, loss_impl: str
) -> tuple[str, tuple[int, ...], int]:
  """(head_map, the student heads that transfer, the teacher's head count or 0 without a teacher),
  from transfer.heads and transfer.head_map against both head counts."""
  head_map = choice("transfer.head_map", cfg.get("head_map", "same"), HEAD_MAPS)
  heads = parse_selection(cfg.get("heads", "all"), student.num_heads, "transfer.heads", "heads")
  if head_map != "same" and what != "attn":
    raise ConfigError(
      "transfer.head_map", f"{head_map!r}: {what!r} is handed over head by head; use 'same'"
    )
  if head_map in ("group", "mean", "merge", "learned") and loss_impl != "direct":
    raise ConfigError(
      "transfer.loss_impl",
      f"{loss_impl!r} streams the teacher's maps from its q and k, which cannot express the "
      f"averaged maps of transfer.head_map {head_map!r}; use 'direct' (or head_map 'first')",
    )
  if teacher is None or what == "features":
    return head_map, heads, 0
  h_s, h_t = student.num_heads, teacher.num_heads
  if head_map == "same" and h_s != h_t:
    raise ConfigError(
      "transfer.head_map",
      f"'same': the teacher has {h_t} heads and the student {h_s}; choose how they pair ('first', "
      "'group' or 'mean'), or give the student the teacher's head count (model.variant)",
    )
  if head_map == "merge" and h_t < h_s:
    raise ConfigError(
      "transfer.head_map",
      f"'merge' merges teacher heads down to the student's count; the teacher has {h_t}, fewer than "
      f"the student's {h_s} (use 'group' or 'first')",
    )
  if head_map == "first":
    k = min(h_s, h_t)
    if cfg.get("heads", "all") == "all":
      heads = tuple(range(k))
    elif max(heads) >= k:
      raise ConfigError(
        "transfer.heads",
        f"head_map 'first' pairs the first {k} heads only (teacher {h_t}, student {h_s}); "
        f"{[h for h in heads if h >= k]} have no partner",
      )
  return head_map, heads, h_t


def check_shape_maps(cfg: Mapping[str, Any], mode: str, head_map: str) -> None:
  """What the shape maps need: a learned mix of heads and a loss without the prefix, distillation."""
  init = cfg.get("head_mix_init", "mean")
  if init not in HEAD_MIX_INITS:
    raise ConfigError("transfer.head_mix_init", f"{init!r}: use one of {HEAD_MIX_INITS}")
  if init != "mean" and head_map != "learned":
    raise ConfigError(
      "transfer.head_mix_init",
      f"{init!r} sets where a learned mix starts; head_map is {head_map!r} (use 'mean', or 'learned')",
    )
  if head_map == "learned" and mode != "distill":
    raise ConfigError(
      "transfer.head_map",
      "'learned' mixes are trained by the distillation loss; copy takes the others",
    )
  if cfg.get("prefix", "keep") == "drop" and mode != "distill":
    raise ConfigError(
      "transfer.prefix",
      "'drop' leaves the cls row and column out of the distillation loss; copy replaces whole maps",
    )


def parse_head_pick(
  value: Any, head_map: str, layers: int, student_heads: int, teacher_heads: int
) -> tuple[tuple[int, ...], ...]:
  """`transfer.head_pick` for head_map "pick": per selected student layer, the teacher head each student
  head reads, [S][H_s]. Given as "3,5,6,7" (every layer alike) or "3,5,6,7;0,1,2,4;..." (one group per
  selected layer, in order), or as nested lists. `teacher_heads` 0: not known here (stored targets), the
  range is then checked where the targets arrive (`targets`)."""
  if isinstance(value, str):
    value = [group.split(",") for group in value.split(";")] if value.strip() else []
  if not value and head_map != "pick":
    return ()
  if head_map != "pick":
    raise ConfigError(
      "transfer.head_pick", f"names teacher heads for head_map 'pick', not {head_map!r}"
    )
  try:
    groups = [tuple(int(h) for h in group) for group in value]
  except (TypeError, ValueError):
    raise ConfigError("transfer.head_pick", f"{value!r}: use '3,5,6,7' or '3,5;0,1;...'") from None
  if not groups:
    raise ConfigError(
      "transfer.head_pick", "head_map 'pick' needs the teacher head of each student head"
    )
  if len(groups) == 1:
    groups = groups * layers
  if len(groups) != layers or any(len(g) != student_heads for g in groups):
    raise ConfigError(
      "transfer.head_pick",
      f"needs {student_heads} teacher heads (one per student head) for each of the {layers} selected "
      f"layers, or one group for all; got {[len(g) for g in groups]}",
    )
  limit = teacher_heads or max(h for g in groups for h in g) + 1
  if any(not 0 <= h < limit for g in groups for h in g):
    raise ConfigError("transfer.head_pick", f"teacher heads are 0..{limit - 1}; got {groups}")
  return tuple(groups)


def sharpest_heads(entropy_LH: np.ndarray, teacher_layers: Sequence[int], count: int) -> str:
  """The `transfer.head_pick` that gives each selected student layer the `count` teacher heads with the
  lowest mean attention entropy in the teacher layer it reads (`entropy_LH`: [L_t, H_t], e.g.
  `evaluate.head_statistics`), in the teacher's head order."""
  picks = [sorted(np.argsort(entropy_LH[t], kind="stable")[:count]) for t in teacher_layers]
  return ";".join(",".join(str(int(h)) for h in pick) for pick in picks)
