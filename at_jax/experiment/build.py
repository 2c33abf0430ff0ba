"""From a config to what a run trains: the lr schedule, the task (classify or MAE) and its optimizer.

Pure construction, no compute: start-up validation builds these abstractly to estimate memory, and
`runs.setup` builds them for the run.
"""

import math

import jax
import ml_collections
import optax

from at_jax import optim
from at_jax.models import mae, vit
from at_jax.training import state as train_state
from at_jax.training.tasks import Task, classify_task, mae_task
from at_jax.transfer.spec import Transfer

TASKS = ("classify", "mae")


def steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Steps of one pass over `num_examples` training examples (at least 1)."""
  return max(1, num_examples // config.data.batch_size)


def warmup_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """`schedule.warmup_epochs` in steps, as asked (`schedule` cuts it to fit `schedule.steps`)."""
  return int(round(config.schedule.warmup_epochs * steps_per_epoch(config, num_examples)))


def schedule(config: ml_collections.ConfigDict, num_examples: int) -> tuple[optax.Schedule, int]:
  """(warmup + cosine lr schedule, total steps) for `num_examples` training examples per epoch.

  A run shortened with `schedule.steps` (a smoke test of a recipe) keeps its warm-up up to steps - 1
  (the run's start-up line says so); given in epochs, a warm-up as long as the run is refused.
  """
  s = config.schedule
  total = (
    s.steps if s.steps > 0 else int(math.ceil(s.epochs * steps_per_epoch(config, num_examples)))
  )
  warmup = warmup_steps(config, num_examples)
  if s.steps > 0:
    warmup = min(warmup, total - 1)
  o = config.optim
  lr = optim.make_schedule(
    base_lr=o.base_lr,
    batch_size=config.data.batch_size,
    warmup_steps=warmup,
    total_steps=total,
    min_lr=o.min_lr,
  )
  return lr, total


def task(
  config: ml_collections.ConfigDict,
  model: vit.ViT,
  teacher: vit.ViT | None,
  spec: Transfer,
  lr: optax.Schedule,
  total_steps: int,
) -> Task:
  """`config.task`: the student ViT on labels (with `spec`'s transfer), or an MAE around it; a
  distillation with `transfer.until` < 1 distils its first ceil(until x `total_steps`) steps."""
  image_size, o, d = config.data.image_size, config.optim, config.data
  if config.task == "mae":
    module = mae.MAE(encoder=vit.model_fields(model), **config.mae.to_dict())
    return mae_task(
      module, image_size=image_size, schedule=lr, ema_decay=o.ema_decay, accum_steps=o.accum_steps
    )
  mix = dict(
    mixup_alpha=d.mixup,
    cutmix_alpha=d.cutmix,
    switch_prob=d.mixup_switch_prob,
    prob=d.mixup_prob,
    group_size=d.mix_group_size,
  )
  return classify_task(
    model,
    teacher,
    spec,
    image_size=image_size,
    schedule=lr,
    label_smoothing=o.label_smoothing,
    ema_decay=o.ema_decay,
    mix=mix,
    accum_steps=o.accum_steps,
    switch_step=spec.distill_steps(total_steps),
  )


def optimizer(
  config: ml_collections.ConfigDict, the_task: Task, lr: optax.Schedule, depth: int
) -> optax.GradientTransformation:
  """AdamW (optim.make_optimizer) fitted to the task's params, read abstractly."""
  o = config.optim
  return optim.make_optimizer(
    jax.eval_shape(lambda: the_task.init_params(jax.random.key(0))),  # traced: compiles nothing
    schedule=lr,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    layer_decay=o.layer_decay,
    depth=depth,
    grad_clip=o.grad_clip or None,
    decay_rule=o.decay_rule,
    # model.posemb is a recipe field (vit.RECIPE_FIELDS): the student's own even when it mirrors a teacher.
    frozen_posemb=config.model.posemb == "sincos2d",
  )


def init_fn(the_task: Task, tx: optax.GradientTransformation):
  """key -> the fresh TrainState of `the_task` (jit it with out_shardings: it is born sharded)."""
  return lambda rng: train_state.init_state(the_task.init_params, tx, rng)
