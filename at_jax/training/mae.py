"""MAE pre-training steps: init, train and eval around `at_jax.models.mae.MAE`.

The train and eval steps mirror `classify.make_train_step` / `make_eval_step` (same arguments, same
`TrainState`), so the training loop can jit them the same way; labels and teacher params are ignored.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from at_jax.models.mae import MAE
from at_jax.training import state as train_state
from at_jax.training.state import TrainState

Array = jax.Array
Batch = Mapping[str, Array]


def params_initializer(mae: MAE, image_size: int) -> Callable[[Array], Any]:
  """key -> fresh MAE params (encoder and decoder) for images of `image_size`."""
  images_BYXC = np.zeros(
    (1, image_size, image_size, 3), np.float32
  )  # numpy: building compiles nothing
  return lambda rng: mae.init(rng, images_BYXC, train=False, mask_rng=rng)["params"]


def init_mae_state(
  mae: MAE, tx: optax.GradientTransformation, rng: Array, image_size: int
) -> TrainState:
  """A fresh state (params = all MAE params); meant to run under `jax.jit(..., out_shardings=...)`."""
  return train_state.init_state(params_initializer(mae, image_size), tx, rng)


def make_mae_train_step(
  mae: MAE,
  tx: optax.GradientTransformation,
  *,
  schedule: optax.Schedule,
  ema_decay: float,
  accum_steps: int = 1,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
  """The pure step `(state, batch, unused_teacher_params) -> (state, metrics)`; jit it with shardings.

  Labels are ignored: MAE pre-trains without them. The masking key is fold_in(state.rng, state.step)
  (fold_in of that and the micro-batch index with `accum_steps` > 1, MAE's accum_iter: the grads are
  the micro-batches' mean, one optimizer step), so a resumed run masks exactly as an uninterrupted one.
  """

  def grad_fn(params: Any, batch: Batch, rng: Array) -> tuple[Any, dict]:
    def loss_fn(p: Any) -> tuple[Array, dict]:
      return mae.apply({"params": p}, batch["image"], train=True, mask_rng=rng)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, {"loss": loss}

  def step(state: TrainState, batch: Batch, unused_teacher_params: Any) -> tuple[TrainState, dict]:
    del unused_teacher_params
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = train_state.accumulate_gradients(
      grad_fn, state.params, batch, rng, accum_steps
    )
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return train_state.apply_gradients(state, grads, tx, ema_decay), metrics

  return step


def make_mae_eval_step(mae: MAE) -> Callable[[Any, Any, Batch, Any], dict]:
  """`(params, ema_params, batch, unused_teacher_params) -> sums` of masked reconstruction losses.

  The masking key is fixed (jax.random.key(0)), so evaluations of the same batches are comparable across
  steps. Returns {"count", "loss", "ema_loss"}: sums over the examples where batch["mask"] is True.
  """

  def evaluate(params: Any, ema_params: Any, batch: Batch, unused_teacher_params: Any) -> dict:
    del unused_teacher_params
    mask_B = batch["mask"].astype(jnp.float32)

    def sums(p: Any) -> dict:
      _, aux = mae.apply({"params": p}, batch["image"], train=False, mask_rng=jax.random.key(0))
      return {"loss": (aux["example_loss"] * mask_B).sum()}

    return {"count": mask_B.sum(), **train_state.raw_and_ema(sums, params, ema_params)}

  return evaluate
