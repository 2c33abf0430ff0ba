"""Classification, with or without attention transfer: the loss and the pure train and eval steps.

Teacher params are an *argument* of the steps: never closed over, never donated, never in the state
(at_jax.training.state holds the state, its update and jit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from at_jax import metrics
from at_jax.data import mixup
from at_jax.models.encoder import sample_drop_masks
from at_jax.models.vit import ViT
from at_jax.training import state as train_state
from at_jax.training.state import TrainState
from at_jax.transfer import loss, spec, targets

Array = jax.Array
Batch = Mapping[str, Array]


def params_initializer(model: ViT, image_size: int) -> Callable[[Array], Any]:
  """key -> fresh ViT params for images of `image_size`."""
  images_BYXC = np.zeros(
    (1, image_size, image_size, 3), np.float32
  )  # numpy: building compiles nothing
  return lambda rng: model.init(rng, images_BYXC, train=False)["params"]


def init_state(
  model: ViT, tx: optax.GradientTransformation, rng: Array, image_size: int
) -> TrainState:
  """A fresh ViT state; meant to run under `jax.jit(..., out_shardings=...)` so it is born sharded."""
  return train_state.init_state(params_initializer(model, image_size), tx, rng)


def cross_entropy(logits: Array, labels: Array, label_smoothing: float) -> Array:
  """Mean softmax cross-entropy; `labels` are int [B] or soft/one-hot [B, C]."""
  num_classes = logits.shape[-1]
  if labels.ndim == 1:
    labels = jax.nn.one_hot(labels, num_classes)
  labels = optax.smooth_labels(labels.astype(jnp.float32), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()


def teacher_drop_masks(
  rng: Array, drop_masks: Array | None, t: spec.Transfer, teacher_depth: int, rate: float
) -> Array | None:
  """The teacher's drop-path masks [L_t, R, B]: the student's own where each student layer reads the
  teacher layer of its index (the paper's choice); for a teacher of another depth (`transfer.layer_map`),
  each teacher layer a student layer reads takes that student layer's masks (the first, where several
  read it), and its other layers are drawn independently at the student's rate over its own depth."""
  if drop_masks is None or t.teacher_layers == t.layers:
    return drop_masks
  own = sample_drop_masks(jax.random.fold_in(rng, 1), drop_masks.shape[2], teacher_depth, rate)
  first: dict[int, int] = {}
  for student_layer, teacher_layer in zip(t.layers, t.teacher_layers):
    first.setdefault(teacher_layer, student_layer)
  return own.at[np.asarray(list(first))].set(drop_masks[np.asarray(list(first.values()))])


def _teacher_targets(
  teacher: ViT | None,
  teacher_params: Any,
  batch: Batch,
  t: spec.Transfer,
  drop_masks: Array | None,
) -> targets.Targets | None:
  if not t.active:
    return None
  if t.source == "precomputed":
    return targets.precomputed_targets(batch, t)
  # The teacher runs frozen in eval mode, but with the student's drop-path masks (the paper's choice).
  return targets.run_teacher(teacher, teacher_params, batch["image"], t, drop_masks=drop_masks)


def make_loss_fn(
  model: ViT,
  teacher: ViT | None,
  t: spec.Transfer,
  *,
  label_smoothing: float,
  mix: Mapping[str, float] | None = None,
) -> Callable[[Any, Batch, Any, Array], tuple[Array, dict]]:
  """`(params, batch, teacher_params, rng) -> (loss, aux)`; aux has ce_loss, distill_loss, logits, labels.

  One draw of drop-path masks per (micro-)batch serves both models, so the teacher's maps come from a
  forward pass with the same residual branches dropped as the student's. With `mix` (mixup_alpha,
  cutmix_alpha, switch_prob, prob, and group_size: one draw per group of that many consecutive examples,
  0 = per batch; see `mixup.mix_groups`) both models see the same mixed images, and the label smoothing
  goes into the mixed soft targets.
  """
  mixing = mix is not None and (mix["mixup_alpha"] > 0 or mix["cutmix_alpha"] > 0)

  def loss_fn(params: Any, batch: Batch, teacher_params: Any, rng: Array) -> tuple[Array, dict]:
    rng_drop, rng_model, rng_mix = jax.random.split(rng, 3)
    images, labels = batch["image"], batch["label"]
    smoothing = label_smoothing
    if mixing:
      images, labels = mixup.mix_groups(
        rng_mix, images, labels, model.num_classes, label_smoothing=label_smoothing, **mix
      )
      batch, smoothing = {**batch, "image": images}, 0.0
    drop_masks = None
    if model.drop_path > 0:
      drop_masks = sample_drop_masks(rng_drop, images.shape[0], model.depth, model.drop_path)
    masks = drop_masks
    if t.active and teacher is not None:
      masks = teacher_drop_masks(rng_drop, drop_masks, t, teacher.depth, model.drop_path)
    teacher_targets = _teacher_targets(teacher, teacher_params, batch, t, masks)
    if (
      t.head_map == "learned"
    ):  # the student's own mix of the teacher's heads, trained by this loss
      teacher_targets = targets.learned_mix(teacher_targets, params["head_mix"], t)
    override = targets.copy_override(teacher_targets, t) if t.mode == "copy" else None
    distilling = t.mode == "distill"
    logits, out = model.apply(
      {"params": params},
      images,
      train=True,
      override=override,
      drop_masks=drop_masks,
      want_qkv=distilling and t.what in spec.QKV_KEYS,
      attn_target=targets.attn_target(teacher_targets, t) if distilling else None,
      rngs={"dropout": rng_model},
    )
    ce = cross_entropy(logits, labels, smoothing)
    distill = loss.distill_loss(out, teacher_targets, t) if distilling else jnp.zeros(())
    return ce + distill, {
      "ce_loss": ce,
      "distill_loss": distill,
      "logits": logits,
      "labels": labels,
    }

  return loss_fn


def make_train_step(
  model: ViT,
  teacher: ViT | None,
  tx: optax.GradientTransformation,
  t: spec.Transfer,
  *,
  schedule: optax.Schedule,
  label_smoothing: float,
  ema_decay: float,
  mix: Mapping[str, float] | None = None,
  accum_steps: int = 1,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
  """The pure step `(state, batch, teacher_params) -> (state, metrics)`; jit it with shardings.

  With `accum_steps` k > 1 the batch is k micro-batches (`train_state.accumulate_gradients`, whole mix
  groups each): the teacher, drop-path masks and mixing run per micro-batch, the grads and metrics are
  their means, and the optimizer, EMA and schedule take one step.
  """
  loss_fn = make_loss_fn(model, teacher, t, label_smoothing=label_smoothing, mix=mix)
  unit = int((mix or {}).get("group_size", 0)) or 1

  def step(state: TrainState, batch: Batch, teacher_params: Any) -> tuple[TrainState, dict]:
    def grad_fn(params: Any, micro: Batch, rng: Array) -> tuple[Any, dict]:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, micro, teacher_params, rng
      )
      labels = aux["labels"]
      hard = labels if labels.ndim == 1 else labels.argmax(-1)  # mixed: the dominant class
      return grads, {
        "loss": loss,
        "ce_loss": aux["ce_loss"],
        "distill_loss": aux["distill_loss"],
        "train_acc": jnp.mean(aux["logits"].argmax(-1) == hard),
      }

    rng = jax.random.fold_in(state.rng, state.step)
    grads, logged = train_state.accumulate_gradients(
      grad_fn, state.params, batch, rng, accum_steps, unit
    )
    logged.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return train_state.apply_gradients(state, grads, tx, ema_decay), logged

  return step


def make_eval_step(
  model: ViT, teacher: ViT | None, t: spec.Transfer
) -> Callable[[Any, Any, Batch, Any], dict]:
  """`(params, ema_params, batch, teacher_params) -> sums`: 100 x top-1/top-5 hits for raw and EMA params,
  and "count"; the loop divides every sum by the count, giving percentages.

  In copy mode the teacher runs here too: the student cannot work without its maps.
  """

  def evaluate(params: Any, ema_params: Any, batch: Batch, teacher_params: Any) -> dict:
    override = None
    if t.teacher_in_eval:
      copied = targets.run_teacher(
        teacher, teacher_params, batch["image"], t, weights_B=batch["mask"]
      )
      override = targets.copy_override(copied, t)
    mask = batch["mask"].astype(jnp.float32)

    def sums(p: Any) -> dict:
      logits, _ = model.apply({"params": p}, batch["image"], train=False, override=override)
      hits = metrics.top_k_hits(logits, batch["label"], (1, 5))
      return {f"top{k}": 100.0 * (hits[k] * mask).sum() for k in (1, 5)}

    return {"count": mask.sum(), **train_state.raw_and_ema(sums, params, ema_params)}

  return evaluate
