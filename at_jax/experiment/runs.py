"""A Run: everything built from a validated config before any compute, and its memory report."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from at_jax.data import sources
from at_jax.experiment import build, teachers, validation
from at_jax.models import vit
from at_jax.training.state import EvalStep, TrainState
from at_jax.training.tasks import Task, TrainStep
from at_jax.transfer import spec as transfer_spec
from at_jax.transfer.spec import Transfer


@dataclasses.dataclass
class Run:
  """Everything built and validated from a config, before any compute.

  Attributes:
    transfer: the resolved transfer setting (mode, what, layers, heads, weight, source).
    task: what is trained (classify or MAE): its params, steps and export.
    init_fn: key -> the fresh TrainState (jit it with out_shardings).
    step_fn, eval_fn: the task's pure train and eval steps for `tx`.
    label_step_fn: the train step after `task.switch_step` (`transfer.until`), else None.
    memory: the per-device memory estimate that validation checked (params, optimizer, EMA, teacher,
      activations), to print.
  """

  config: ml_collections.ConfigDict
  workdir: str
  model: vit.ViT
  teacher: vit.ViT | None
  teacher_params: Any
  transfer: Transfer
  mesh: jax.sharding.Mesh
  train_source: sources.Source
  eval_source: sources.Source
  total_steps: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  task: Task
  init_fn: Callable[[jax.Array], TrainState]
  step_fn: TrainStep
  eval_fn: EvalStep
  memory: str
  label_step_fn: TrainStep | None = None

  def export(self, params: Any) -> tuple[dict, Any]:
    """Final params (raw or EMA) -> (model config, params) of the ViT this run leaves, usable as
    teacher.init."""
    return self.task.export(params)

  @property
  def steps_per_epoch(self) -> int:
    """Steps of one pass over the training split, as build.schedule counts an epoch."""
    return build.steps_per_epoch(self.config, len(self.train_source))

  def phase(self, step: int) -> str:
    """What step `step` trains, as the progress line names it: the transfer mode (`none` for scratch
    and after a `transfer.until` switch), or `mae`."""
    if self.config.task == "mae":
      return "mae"
    distilling = self.label_step_fn is None or step <= self.task.switch_step
    return self.transfer.mode if distilling else "none"

  def eval_steps(self) -> frozenset[int]:
    """The steps before the last at which the run evaluates: multiples of evals.every_steps, or the
    ends of every evals.every_epochs epochs (rounded to a step each, so fractions of an epoch do not
    drift); the last step always evaluates."""
    e = self.config.evals
    if e.every_steps:
      return frozenset(range(e.every_steps, self.total_steps, e.every_steps))
    if not e.every_epochs:
      return frozenset()
    interval = max(1.0, e.every_epochs * self.steps_per_epoch)  # less than a step: every step
    count = math.ceil(self.total_steps / interval)
    return frozenset(
      step for k in range(1, count + 1) if (step := round(k * interval)) < self.total_steps
    )


def setup(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  check_targets: bool = True,
  validated: validation.Validated | None = None,
) -> Run:
  """Validates the config (unless the caller has: `validated`), loads the teacher onto the mesh, and
  builds the task's pieces.

  Raises ConfigError naming the field/file to fix; nothing is compiled.
  """
  model, mesh, train_source, eval_source, memory_line = validated or validation.validate(
    config, workdir, check_targets=check_targets
  )
  if config.transfer.mode == "none" or config.transfer.source == "precomputed":
    teacher, teacher_params = None, None
    stored = teachers.stored_teacher(config, workdir)  # the shape of the targets' teacher
    spec = transfer_spec.resolve(config.transfer.to_dict(), model, stored, config.data.image_size)
  else:
    teacher, teacher_params, spec = teachers.teacher_on_mesh(config, workdir, model, mesh)
  lr, total = build.schedule(config, len(train_source))
  task = build.task(config, model, teacher, spec, lr, total)
  tx = build.optimizer(config, task, lr, model.depth)
  step_fn, eval_fn = task.make_steps(tx)
  return Run(
    config=config,
    workdir=workdir,
    model=model,
    teacher=teacher,
    teacher_params=teacher_params,
    transfer=spec,
    mesh=mesh,
    train_source=train_source,
    eval_source=eval_source,
    total_steps=total,
    schedule=lr,
    tx=tx,
    task=task,
    init_fn=build.init_fn(task, tx),
    step_fn=step_fn,
    eval_fn=eval_fn,
    memory=memory_line,
    label_step_fn=task.make_label_step(tx) if task.make_label_step else None,
  )
