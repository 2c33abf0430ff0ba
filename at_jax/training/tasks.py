"""A task is what a run trains: classification (with or without attention transfer) or MAE pre-training.

Both give the training loop the same four things, so the mesh, data, checkpoints, metrics and resume
are shared: how to initialise the params, the train and eval steps (built once the optimizer exists,
which needs the params' shapes), and what the final export is (a ViT, usable as `teacher.init`).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from at_jax.models import mae, vit
from at_jax.training import classify
from at_jax.training import mae as mae_steps
from at_jax.training.state import EvalStep
from at_jax.transfer.spec import Transfer

Array = jax.Array
TrainStep = Callable  # (state, batch, teacher_params) -> (state, metrics)


@dataclasses.dataclass(frozen=True)
class Task:
  """How to init, step, evaluate and export one kind of training.

  Attributes:
    name: "classify" or "mae".
    init_params: key -> fresh params (abstractly evaluable: `jax.eval_shape(init_params, key)`).
    make_steps: optimizer -> (train step, eval step), pure functions to jit (`state.jit_steps`).
    export: final params -> (model config, params) of a ViT, what `checkpoint.save_params` writes.
  """

  name: str
  init_params: Callable[[Array], Any]
  make_steps: Callable[[optax.GradientTransformation], tuple[TrainStep, EvalStep]]
  export: Callable[[Any], tuple[dict, Any]]
  # A distillation that stops (`transfer.until`): after step `switch_step` the loop runs this train
  # step instead, on labels alone with no teacher. A second program, not a `lax.cond` in one: a cond
  # step ran 1.4-1.5x slower in both phases on the CPU (docs/recipe.md), and on a GPU a conditional's
  # predicate can cost a device-to-host read per step.
  make_label_step: Callable[[optax.GradientTransformation], TrainStep] | None = None
  switch_step: int = 0


def classify_task(
  model: vit.ViT,
  teacher: vit.ViT | None,
  spec: Transfer,
  *,
  image_size: int,
  schedule: optax.Schedule,
  label_smoothing: float,
  ema_decay: float,
  mix: Mapping[str, float] | None = None,
  accum_steps: int = 1,
  switch_step: int = 0,
) -> Task:
  """A ViT classifier trained on labels, with `spec`'s attention transfer from `teacher`; `mix` and
  `accum_steps` as `classify.make_train_step` takes them; `switch_step` > 0: the transfer stops after
  that step (`Task.make_label_step`)."""

  def train_step(tx: optax.GradientTransformation, with_teacher: bool) -> TrainStep:
    transfer = spec if with_teacher else Transfer()
    return classify.make_train_step(
      model,
      teacher if with_teacher else None,
      tx,
      transfer,
      schedule=schedule,
      label_smoothing=label_smoothing,
      ema_decay=ema_decay,
      mix=mix,
      accum_steps=accum_steps,
    )

  def make_steps(tx: optax.GradientTransformation) -> tuple[TrainStep, EvalStep]:
    return train_step(tx, True), classify.make_eval_step(model, teacher, spec)

  return Task(
    name="classify",
    init_params=classify.params_initializer(model, image_size),
    make_steps=make_steps,
    export=lambda params: vit.export_view(model, params),
    make_label_step=(lambda tx: train_step(tx, False)) if switch_step else None,
    switch_step=switch_step,
  )


def mae_task(
  module: mae.MAE,
  *,
  image_size: int,
  schedule: optax.Schedule,
  ema_decay: float,
  accum_steps: int = 1,
) -> Task:
  """MAE pre-training of `module.encoder`; the export is the encoder alone, a teacher."""

  def make_steps(tx: optax.GradientTransformation) -> tuple[TrainStep, EvalStep]:
    step = mae_steps.make_mae_train_step(
      module, tx, schedule=schedule, ema_decay=ema_decay, accum_steps=accum_steps
    )
    return step, mae_steps.make_mae_eval_step(module)

  return Task(
    name="mae",
    init_params=mae_steps.params_initializer(module, image_size),
    make_steps=make_steps,
    export=lambda params: (mae.encoder_config(module), mae.encoder_params(params)),
  )
