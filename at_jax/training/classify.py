"""TrainState, sharded init and the pure train/eval steps (loss + grads + optax + EMA).

Teacher params are an *argument* of the steps: never closed over, never donated, never in the state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from at_jax import sharding
from at_jax.data import randaugment as augment
from at_jax.models.vit import ViT, sample_drop_masks
from at_jax.transfer import spec as transfer

Array = jax.Array
Batch = Mapping[str, Array]


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Array


def new_state(params: Any, tx: optax.GradientTransformation, rng: Array) -> TrainState:
  """Step 0 of training `params`: fresh optimizer state, EMA = params."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema_params=params,
    rng=rng,
  )


def init_state(
  model: ViT, tx: optax.GradientTransformation, rng: Array, image_size: int
) -> TrainState:
  """A fresh ViT state; meant to run under `jax.jit(..., out_shardings=...)` so it is born sharded."""
  rng_init, rng_train = jax.random.split(rng)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return new_state(model.init(rng_init, images, train=False)["params"], tx, rng_train)


def create_sharded_state(
  init_fn: Callable[[Array], TrainState], rng: Array, mesh: Mesh
) -> tuple[TrainState, Any]:
  """Returns (init_fn(rng), its shardings); the state is created directly in its shardings."""
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init_fn, rng))
  return jax.jit(init_fn, out_shardings=shardings)(rng), shardings


def cross_entropy(logits: Array, labels: Array, label_smoothing: float) -> Array:
  """Mean softmax cross-entropy; `labels` are int [B] or soft/one-hot [B, C]."""
  num_classes = logits.shape[-1]
  if labels.ndim == 1:
    labels = jax.nn.one_hot(labels, num_classes)
  labels = optax.smooth_labels(labels.astype(jnp.float32), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()


def _teacher_targets(
  teacher: ViT | None,
  teacher_params: Any,
  batch: Batch,
  t: transfer.Transfer,
  drop_masks: Array | None,
) -> transfer.Targets | None:
  if not t.active:
    return None
  if t.source == "precomputed":
    return transfer.precomputed_targets(batch, t)
  # The teacher runs frozen in eval mode, but with the student's drop-path masks (the paper's choice);
  # it may be cut after its last transferred layer (`vit.truncate`), so it takes the masks of its layers.
  if drop_masks is not None:
    drop_masks = drop_masks[: teacher.depth]
  _, out = teacher.apply(
    {"params": teacher_params},
    batch["image"],
    train=False,
    drop_masks=drop_masks,
    want_qkv=transfer.needs_qkv(t),
  )
  return transfer.teacher_targets(out, t)


def make_loss_fn(
  model: ViT,
  teacher: ViT | None,
  t: transfer.Transfer,
  *,
  label_smoothing: float,
  mix: Mapping[str, float] | None = None,
) -> Callable[[Any, Batch, Any, Array], tuple[Array, dict]]:
  """`(params, batch, teacher_params, rng) -> (loss, aux)`; aux has ce_loss, distill_loss, logits, labels.

  One draw of drop-path masks per step serves both models, so the teacher's maps come from a forward pass
  with the same residual branches dropped as the student's. With `mix` (mixup_alpha, cutmix_alpha,
  switch_prob, prob; batch mode, on the global batch) both models see the same mixed images, and the
  label smoothing goes into the mixed soft targets.
  """
  mixing = mix is not None and (mix["mixup_alpha"] > 0 or mix["cutmix_alpha"] > 0)

  def loss_fn(params: Any, batch: Batch, teacher_params: Any, rng: Array) -> tuple[Array, dict]:
    rng_drop, rng_model, rng_mix = jax.random.split(rng, 3)
    images, labels = batch["image"], batch["label"]
    smoothing = label_smoothing
    if mixing:
      images, labels = augment.mix_batch(
        rng_mix, images, labels, model.num_classes, label_smoothing=label_smoothing, **mix
      )
      batch, smoothing = {**batch, "image": images}, 0.0
    drop_masks = None
    if model.drop_path > 0:
      drop_masks = sample_drop_masks(rng_drop, images.shape[0], model.depth, model.drop_path)
    targets = _teacher_targets(teacher, teacher_params, batch, t, drop_masks)
    override = transfer.copy_override(targets, t) if t.mode == "copy" else None
    distilling = t.mode == "distill"
    logits, out = model.apply(
      {"params": params},
      images,
      train=True,
      override=override,
      drop_masks=drop_masks,
      want_qkv=distilling and t.what != "attn",
      attn_target=transfer.attn_target(targets, t) if distilling else None,
      rngs={"dropout": rng_model},
    )
    ce = cross_entropy(logits, labels, smoothing)
    distill = transfer.distill_loss(out, targets, t) if distilling else jnp.zeros(())
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
  t: transfer.Transfer,
  *,
  schedule: optax.Schedule,
  label_smoothing: float,
  ema_decay: float,
  mix: Mapping[str, float] | None = None,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
  """The pure step `(state, batch, teacher_params) -> (state, metrics)`; jit it with shardings."""
  loss_fn = make_loss_fn(model, teacher, t, label_smoothing=label_smoothing, mix=mix)

  def step(state: TrainState, batch: Batch, teacher_params: Any) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, teacher_params, rng
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, params)
    labels = aux["labels"]
    hard = labels if labels.ndim == 1 else labels.argmax(-1)  # mixed: the dominant class
    metrics = {
      "loss": loss,
      "ce_loss": aux["ce_loss"],
      "distill_loss": aux["distill_loss"],
      "train_acc": jnp.mean(aux["logits"].argmax(-1) == hard),
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(state.step),
    }
    return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema
    ), metrics

  return step


def make_eval_step(
  model: ViT, teacher: ViT | None, t: transfer.Transfer
) -> Callable[[Any, Any, Batch, Any], dict]:
  """`(params, ema_params, batch, teacher_params) -> sums`: 100 x top-1/top-5 hits for raw and EMA params,
  and "count"; the loop divides every sum by the count, giving percentages.

  In copy mode the teacher runs here too: the student cannot work without its maps.
  """

  def evaluate(params: Any, ema_params: Any, batch: Batch, teacher_params: Any) -> dict:
    override = None
    if t.teacher_in_eval:
      _, out = teacher.apply(
        {"params": teacher_params}, batch["image"], train=False, want_qkv=transfer.needs_qkv(t)
      )
      override = transfer.copy_override(transfer.teacher_targets(out, t), t)
    mask = batch["mask"].astype(jnp.float32)
    sums = {"count": mask.sum()}
    for name, p in (("", params), ("ema_", ema_params)):
      logits, _ = model.apply({"params": p}, batch["image"], train=False, override=override)
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      hits = top5 == batch["label"][:, None]
      sums[f"{name}top1"] = 100.0 * (hits[:, 0] * mask).sum()
      sums[f"{name}top5"] = 100.0 * (hits.any(-1) * mask).sum()
    return sums

  return evaluate


def jit_steps(train_step, eval_step, mesh: Mesh, state_shardings: Any, teacher_shardings: Any):
  """`jax.jit` with explicit shardings; the state is donated, the teacher is not."""
  batch = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  train = jax.jit(
    sharding.on_mesh(train_step, mesh),
    in_shardings=(state_shardings, batch, teacher_shardings),
    out_shardings=(state_shardings, rep),
    donate_argnums=(0,),
  )
  evaluate = jax.jit(
    sharding.on_mesh(eval_step, mesh),
    in_shardings=(state_shardings.params, state_shardings.ema_params, batch, teacher_shardings),
    out_shardings=rep,
  )
  return train, evaluate
