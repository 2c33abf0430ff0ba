"""The teacher's targets: the teacher's forward pass, the stored targets, and what they become in the student.

Targets are a dict laid out layer-major over the *selected* layers only: {key: [S, B, ...]} with
S = len(layers). Keys are the teacher's `out` names: "attn_logits" [S, B, H, N, N], or "q"/"k"/"v"
[S, B, N, H, K]. Distilling attention maps hands over the teacher's q and k rather than its maps: each
student block forms its layer's teacher logits when it needs them (`attention.AttnTarget`), so no stack of
N x N maps is ever alive, and `loss_impl` "blockwise"/"pallas" never forms one at all.

`teacher_outputs` is the one forward pass of the teacher, for the train step and copy-mode evaluation
(through `run_teacher`) and for precomputing stored targets.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.errors import ConfigError
from at_jax.models import attention, vit
from at_jax.ops import attn_ce
from at_jax.transfer import grids, spec

Array = jax.Array
Targets = dict[str, Array]


def _select(
  teacher_out: Mapping[str, Array], layers: Sequence[int], keys: Sequence[str]
) -> Targets:
  """{key: [S, B, ...]}: the teacher's `keys` in `layers`, with no gradient."""
  rows = np.asarray(layers)
  return {k: jax.lax.stop_gradient(teacher_out[k][rows]) for k in keys}


def _first_heads(x: Array, axis: int, heads: int) -> Array:
  """The first `heads` heads of `x` along `axis`; zeros for heads the teacher lacks (left free: they are
  outside `transfer.heads`, so no loss or override reads them)."""
  x = jax.lax.slice_in_dim(x, 0, min(heads, x.shape[axis]), axis=axis)
  missing = heads - x.shape[axis]
  if missing:
    shape = list(x.shape)
    shape[axis] = missing
    x = jnp.concatenate([x, jnp.zeros(shape, x.dtype)], axis=axis)
  return x


def _picked_heads(x: Array, key: str, pick: tuple[tuple[int, ...], ...]) -> Array:
  """head_map "pick": for each selected layer s the teacher heads `pick`[s], in order, of `key`'s
  [S, B, H, N, N] maps or [S, B, N, H, K] q/k."""
  axis = 2 if key == "attn_logits" else 3
  if max(max(g) for g in pick) >= x.shape[axis]:
    raise ConfigError("transfer.head_pick", f"{pick}: the teacher has {x.shape[axis]} heads")
  index = np.asarray(pick).reshape(
    (len(pick), 1) + (1,) * (axis - 2) + (-1,) + (1,) * (x.ndim - axis - 1)
  )
  return jnp.take_along_axis(x, jnp.asarray(index), axis=axis)


def _to_student_heads(targets: Targets, transfer: spec.Transfer) -> Targets:
  """The teacher's targets at the student's head count (`transfer.head_map`, see `pairing.HEAD_MAPS`):
  "first" picks heads of maps or of q and k; "group" and "mean" mix probability maps (rows stay
  distributions) and hand them over as log-probabilities, which are logits of exactly those maps."""
  if transfer.head_map in ("same", "learned"):  # learned: mixed in the step by the student's param
    return targets
  if transfer.head_map == "pick":
    return {k: _picked_heads(v, k, transfer.head_pick) for k, v in targets.items()}
  mix = transfer.head_mixing()
  adapted = dict(targets)
  for key, value in targets.items():
    if key == "attn_logits" and mix is not None:  # [S, B, H_t, N, N] -> [S, B, H_s, N, N]
      probs = jax.nn.softmax(value.astype(jnp.float32), -1)
      mixed = jnp.einsum("st,SBtqk->SBsqk", jnp.asarray(mix), probs)
      adapted[key] = attn_ce.logits_of(mixed)
    elif key == "attn_logits":
      adapted[key] = _first_heads(value, 2, transfer.num_heads)
    elif key in ("q", "k"):  # [S, B, N, H, K]
      adapted[key] = _first_heads(value, 3, transfer.num_heads)
  return adapted


def _to_student(targets: Targets, transfer: spec.Transfer) -> Targets:
  """The teacher's targets at the student's heads, then on the student's tokens (`grids`), then at the
  taught maps' temperature (`_tempered`)."""
  adapted = _to_student_heads(targets, transfer)
  if transfer.token_map and "attn_logits" in adapted:
    weights = grids.token_weights(*transfer.token_map)
    adapted = {**adapted, "attn_logits": grids.resample_logits(adapted["attn_logits"], weights)}
  return _tempered(adapted, transfer)


def _tempered(targets: Targets, transfer: spec.Transfer) -> Targets:
  """The taught maps at `transfer.target_temperature` T: softmax(logits / T), handed over as logits / T
  (or as q / T beside k, which form them). Mixed or resampled maps arrive as log-probabilities log p, so
  theirs become p^(1/T) renormalised: the map itself is sharpened (T < 1) or flattened (T > 1), after
  any mixing. A learned mix is tempered where it is mixed (`learned_mix`)."""
  temperature = transfer.target_temperature
  if temperature == 1 or transfer.what != "attn" or transfer.head_map == "learned":
    return targets
  key = "attn_logits" if "attn_logits" in targets else "q"
  return {**targets, key: targets[key] / temperature}


def learned_mix(targets: Targets, head_mix_SHT: Array, transfer: spec.Transfer) -> Targets:
  """head_map "learned": each student head's target is softmax(prior + `head_mix_SHT`)-weighted over
  the teacher's maps of its layer, "attn_logits" [S, B, H_t, N, N] -> "attn_probs" [S, B, H_s, N, N],
  a target differentiable in the mix (the student's param; the teacher's maps have no gradient). The
  prior is where the mix starts (`Transfer.head_mix_prior`); the mixed maps are then tempered as
  fixed mixes are (`_tempered`)."""
  prior_HT = jnp.asarray(transfer.head_mix_prior(), jnp.float32)
  mix_SHT = jax.nn.softmax(prior_HT + head_mix_SHT.astype(jnp.float32), -1)
  probs = jax.nn.softmax(targets["attn_logits"].astype(jnp.float32), -1)
  mixed = jnp.einsum("Sst,SBtqk->SBsqk", mix_SHT, probs)
  if transfer.target_temperature != 1:
    mixed = jax.nn.softmax(attn_ce.logits_of(mixed) / transfer.target_temperature, -1)
  rest = {k: v for k, v in targets.items() if k != "attn_logits"}
  return {**rest, "attn_probs": mixed}


def _average(targets: Targets, transfer: spec.Transfer, weights_B: Array | None = None) -> Targets:
  """With `average = "images"`, every image's transferred quantity replaced by its mean over the batch,
  over the images `weights_B` marks (an eval batch's mask: padding left out); all when None."""
  if transfer.average != "images":
    return targets
  key = transfer.teacher_key
  stacked = targets[key]  # [S, B, ...]
  attn = transfer.what == "attn"  # average the maps, not the logits: log(mean map) is a logit of it
  values = jax.nn.softmax(stacked.astype(jnp.float32), -1) if attn else stacked
  if weights_B is None:
    mean = values.mean(axis=1, keepdims=True)
  else:
    w_B = weights_B.astype(jnp.float32)
    w_B = jnp.where(w_B.sum() > 0, w_B, 1.0)  # padding alone: no image is counted, any mean serves
    w = w_B.reshape((1, -1) + (1,) * (values.ndim - 2))
    mean = (values.astype(jnp.float32) * w).sum(1, keepdims=True) / w.sum(1, keepdims=True)
    mean = mean if attn else mean.astype(stacked.dtype)
  return {**targets, key: jnp.broadcast_to(jnp.log(mean) if attn else mean, stacked.shape)}


def teacher_outputs(
  teacher: vit.ViT,
  teacher_params: Any,
  images_BYXC: Array,
  layers: Sequence[int],
  keys: Sequence[str],
  *,
  drop_masks: Array | None = None,
) -> Targets:
  """The frozen teacher's `keys` (its `out` names) in `layers`, {key: [S, B, ...]}, with no gradient.

  The teacher runs in eval mode, with q/k/v only when `keys` need them. `drop_masks` [L, R, B]: the
  student's drop-path masks (the paper's choice); the teacher may be cut after its last transferred layer
  (`vit.truncate`), so it takes the masks of its layers.
  """
  if drop_masks is not None:
    drop_masks = drop_masks[: teacher.depth]
  _, out = teacher.apply(
    {"params": teacher_params},
    images_BYXC,
    train=False,
    drop_masks=drop_masks,
    want_qkv=spec.wants_qkv(keys),
  )
  return _select(out, layers, keys)


def teacher_view(images_BYXC: Array, transfer: spec.Transfer) -> Array:
  """The images as the teacher sees them: bilinearly resized to `transfer.teacher_image_size` where
  that is set and differs (antialiased when shrinking)."""
  size = transfer.teacher_image_size
  if not size or images_BYXC.shape[1:3] == (size, size):
    return images_BYXC
  shape = (images_BYXC.shape[0], size, size, images_BYXC.shape[3])
  return jax.image.resize(images_BYXC, shape, "bilinear")


def run_teacher(
  teacher: vit.ViT,
  teacher_params: Any,
  images_BYXC: Array,
  transfer: spec.Transfer,
  *,
  drop_masks: Array | None = None,
  weights_B: Array | None = None,
) -> Targets:
  """What a jointly run teacher hands over: `transfer.target_keys` of the teacher layers the selected
  student layers read, at the student's head count and tokens, averaged over images if asked (over
  those `weights_B` marks, e.g. an eval batch's mask), {key: [S, B, ...]}, with no gradient. The teacher
  sees the images at `transfer.teacher_image_size` where that is set (`teacher_view`); `drop_masks` as
  in `teacher_outputs`."""
  stacked = teacher_outputs(
    teacher,
    teacher_params,
    teacher_view(images_BYXC, transfer),
    transfer.teacher_layers,
    transfer.target_keys,
    drop_masks=drop_masks,
  )
  return _average(_to_student(stacked, transfer), transfer, weights_B)


def teacher_targets(teacher_out: Mapping[str, Array], transfer: spec.Transfer) -> Targets:
  """`run_teacher`'s targets from a teacher `out` the caller already has."""
  selected = _select(teacher_out, transfer.teacher_layers, transfer.target_keys)
  return _average(_to_student(selected, transfer), transfer)


def precomputed_targets(batch: Mapping[str, Array], transfer: spec.Transfer) -> Targets:
  """Targets carried in the batch as `teacher_<key>` [B, S, ...] (example-major, as stored) -> [S, B, ...],
  at the teacher's shape as `precompute` stored them, then at the student's (heads, tokens) as a jointly
  run teacher's are. Distilled maps come as stored logits (`teacher_attn_logits`) or as q and k
  (`teacher_q`, `teacher_k`; formed into maps where heads are mixed or tokens resampled).
  """
  options = [(transfer.teacher_key,)]
  if transfer.mode == "distill" and transfer.what == "attn":
    streamed = transfer.loss_impl != "direct"
    options = [("q", "k"), ("attn_logits",)] if streamed else [("attn_logits",), ("q", "k")]
  for keys in options:
    if all(f"teacher_{k}" in batch for k in keys):
      stored = {k: jnp.swapaxes(batch[f"teacher_{k}"], 0, 1) for k in keys}
      if transfer.target_keys == ("attn_logits",) and "attn_logits" not in stored:
        q, k = stored.pop("q"), stored.pop("k")  # maps to mix or resample, stored as q and k
        stored["attn_logits"] = attn_ce.qk_logits(q, k, q.shape[-1] ** -0.5)
      return _to_student(stored, transfer)  # stored at the teacher's layers, heads and tokens
  wanted = " or ".join("+".join(f"teacher_{k}" for k in keys) for keys in options)
  raise ConfigError(
    "transfer.source",
    f"'precomputed' needs batches carrying {wanted} (written by launch/precompute.py)",
  )


def copy_override(targets: Mapping[str, Array], transfer: spec.Transfer) -> dict[str, Array]:
  """The ViT `override` that swaps the teacher's quantity into the selected layers/heads."""
  stacked = targets[transfer.teacher_key]  # [S, B, ...]
  full = jnp.zeros((transfer.depth,) + stacked.shape[1:], stacked.dtype)
  full = full.at[np.asarray(transfer.layers)].set(stacked)  # [L, B, ...]
  key = "logits" if transfer.what == "attn" else transfer.what
  # A numpy mask is static: layers that copy every head then skip their own q and k (`attention.Attention`).
  return {key: full, "mask": transfer.layer_head_mask()}


def attn_target(
  targets: Mapping[str, Array], transfer: spec.Transfer
) -> attention.AttnTarget | None:
  """The student's `attn_target` when distilling maps: its blocks then score themselves layer by layer."""
  if transfer.mode != "distill" or transfer.what != "attn":
    return None
  if "attn_probs" in targets:  # a learned mix of heads (`learned_mix`)
    values = {"probs": targets["attn_probs"]}
  elif "attn_logits" in targets:
    values = {"logits": targets["attn_logits"]}
  else:
    values = {"q": targets["q"], "k": targets["k"]}
  form = attention.LossForm(transfer.loss_impl, transfer.loss_block, transfer.student_prefix)
  return attention.AttnTarget(transfer.layers, values, form)
