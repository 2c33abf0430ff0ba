"""MAE pre-training steps: init, train and eval around `at_jax.models.mae.MAE`.

The train and eval steps mirror `classify.make_train_step` / `make_eval_step` (same arguments, same
`TrainState`), so the training loop can jit them the same way; labels and teacher params are ignored.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from at_jax.models.mae import MAE
from at_jax.training import classify as train_step
from at_jax.training.classify import TrainState

Array = jax.Array
Batch = Mapping[str, Array]


def init_mae_state(
  mae: MAE, tx: optax.GradientTransformation, rng: Array, image_size: int
) -> TrainState:
  """A fresh state (params = all MAE params); meant to run under `jax.jit(..., out_shardings=...)`."""
  rng_init, rng_train = jax.random.split(rng)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = mae.init(rng_init, images, train=False, mask_rng=jax.random.key(0))["params"]
  return train_step.new_state(params, tx, rng_train)


def make_mae_train_step(
  mae: MAE, tx: optax.GradientTransformation, *, schedule: optax.Schedule, ema_decay: float
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
  """The pure step `(state, batch, unused_teacher_params) -> (state, metrics)`; jit it with shardings.

  Labels are ignored: MAE pre-trains without them. The masking key is fold_in(state.rng, state.step), so a
  resumed run masks exactly as an uninterrupted one.
  """

  def loss_fn(params: Any, images_BHWC: Array, rng: Array) -> tuple[Array, dict]:
    return mae.apply({"params": params}, images_BHWC, train=True, mask_rng=rng)

  def step(state: TrainState, batch: Batch, unused_teacher_params: Any) -> tuple[TrainState, dict]:
    del unused_teacher_params
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch["image"], rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema
    ), metrics

  return step


def make_mae_eval_step(mae: MAE) -> Callable[[Any, Any, Batch, Any], dict]:
  """`(params, ema_params, batch, unused_teacher_params) -> sums` of masked reconstruction losses.

  The masking key is fixed (jax.random.key(0)), so evaluations of the same batches are comparable across
  steps. Returns {"count", "loss", "ema_loss"}: sums over the examples where batch["mask"] is True.
  """

  def evaluate(params: Any, ema_params: Any, batch: Batch, unused_teacher_params: Any) -> dict:
    del unused_teacher_params
    mask_B = batch["mask"].astype(jnp.float32)
    sums = {"count": mask_B.sum()}
    for name, p in (("", params), ("ema_", ema_params)):
      _, aux = mae.apply({"params": p}, batch["image"], train=False, mask_rng=jax.random.key(0))
      sums[f"{name}loss"] = (aux["example_loss"] * mask_B).sum()
    return sums

  return evaluate
