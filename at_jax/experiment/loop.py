"""train_and_evaluate(config, workdir): wires the modules; the training loop. No model math here.

The only module that reads the whole config. Everything that can be wrong with the config or its
inputs (mode, layers, heads, mesh, batch, image size, dataset, teacher) is checked in `setup` before any
compilation or training step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from at_jax import checkpoint, metrics, optim, sharding
from at_jax.convert import load as convert
from at_jax.data import pipeline as data
from at_jax.errors import ConfigError
from at_jax.evaluate import attention as evaluate
from at_jax.models import mae, vit
from at_jax.training import classify as train_step
from at_jax.training import mae as mae_steps
from at_jax.transfer import spec as transfer

TEACHER_DIR = "teacher"  # <workdir>/teacher: where a config's teacher.pretrain is trained
EXPORT_DIR = "params"  # <run workdir>/params: the final params export, usable as teacher.init


class Preempted(Exception):
  """Raised after a SIGTERM / preemption notice once the state is checkpointed; relaunch to resume."""


class _SigtermFlag:
  """Turns SIGTERM (how Cloud TPU, Kubernetes and Slurm announce preemption) into a flag the loop polls
  at step boundaries, so the save happens between steps, never inside one."""

  def __init__(self):
    self.raised = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Run:
  """Everything built and validated from a config, before any compute."""

  config: ml_collections.ConfigDict
  workdir: str
  model: vit.ViT
  teacher: vit.ViT | None
  teacher_params: Any
  t: transfer.Transfer
  mesh: Any
  train_source: data.Source
  eval_source: data.Source
  total_steps: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  # What the task trains, as functions of the pieces above (see `_task_functions`):
  init_fn: Callable[[jax.Array], train_step.TrainState]
  step_fn: Callable
  eval_fn: Callable
  export: Callable[
    [Any], tuple[dict, Any]
  ]  # final params -> (model_config, params) for teacher.init


def teacher_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the teacher's params export is: teacher.init, or the export of its pretrain run."""
  if config.teacher.init:
    return config.teacher.init
  if config.teacher.pretrain is not None:
    return os.path.join(workdir, TEACHER_DIR, EXPORT_DIR)
  raise ConfigError(
    "teacher.init",
    f"transfer.mode={config.transfer.mode!r} needs a frozen teacher: "
    "set teacher.init to a params export (at_jax.checkpoint.save_params), e.g. the "
    f"'{EXPORT_DIR}' folder that every run leaves in its workdir",
  )


def load_vit(path: str, config: ml_collections.ConfigDict) -> tuple[dict, Any]:
  """(model_config, numpy params) of a ViT fitted to data.image_size, from our params export (a directory)
  or a PyTorch/timm/big_vision checkpoint file (converted by at_jax.convert).

  The teacher.* conversion fields apply: resample_posemb (bicubic resampling of a position table made for
  another image size; otherwise that is an error), and for files num_heads and family.
  """
  size, t = config.data.image_size, config.teacher
  if os.path.isfile(path):
    return _convert_file(
      os.path.abspath(path),
      os.path.getmtime(path),
      size,
      t.resample_posemb,
      t.family or None,
      t.num_heads or None,
    )
  model_config, params = checkpoint.load_params(path)
  convert.fit_posemb(params, model_config, path, size, t.resample_posemb)
  return model_config, params


@functools.lru_cache(maxsize=2)
def _convert_file(
  path: str,
  mtime: float,
  image_size: int,
  resample: bool,
  family: str | None,
  num_heads: int | None,
) -> tuple[dict, Any]:
  """One conversion per file and setting: start-up reads the teacher's architecture (model.arch=teacher)
  and its weights, and a ViT-L .pth is over a gigabyte. `mtime` makes a rewritten file a new entry."""
  del mtime
  return convert.load_teacher(
    path, image_size=image_size, resample_posemb=resample, family=family, num_heads=num_heads
  )


def load_teacher(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, Any]:
  """The frozen teacher: `teacher.init` (an export or a checkpoint file), or its pretrain run's export."""
  return load_vit(teacher_path(config, workdir), config)


def init_from_pretrained(fresh: Any, loaded: Any, scan: bool) -> tuple[dict, list[str], list[str]]:
  """`fresh` params with every leaf that `loaded` has at the same path and shape taken from `loaded`.

  Returns (params, paths kept fresh (e.g. a new head), loaded paths not used (e.g. MAE's encoder_norm when
  the student pools with gap)). Loop/scan layouts are converted to the student's.
  """
  loaded = dict(loaded)
  if "Transformer" in loaded:
    stacked = "encoderblock" in loaded["Transformer"]
    if scan and not stacked:
      loaded = vit.loop_to_scan(loaded)
    elif stacked and not scan:
      loaded = vit.scan_to_loop(loaded)
  flat_loaded = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
  used, kept = set(), []

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    value = flat_loaded.get(key)
    if value is None or tuple(value.shape) != tuple(leaf.shape):
      kept.append(key)
      return leaf
    used.add(key)
    return np.asarray(value, leaf.dtype)

  params = jax.tree_util.tree_map_with_path(pick, fresh)
  return params, kept, sorted(set(flat_loaded) - used)


def teacher_model_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The teacher's architecture, read without its weights where possible."""
  if config.teacher.init and os.path.isfile(config.teacher.init):
    return load_teacher(config, workdir)[0]
  if config.teacher.init:
    return checkpoint.read_model_config(config.teacher.init)
  if config.teacher.pretrain is not None:
    return {k: v for k, v in config.teacher.pretrain.model.to_dict().items() if k != "arch"}
  return checkpoint.read_model_config(teacher_path(config, workdir))  # raises, naming teacher.init


def model_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The student's ViT fields; `model.arch = "teacher"` mirrors the teacher's architecture."""
  fields = config.model.to_dict()
  fields.pop("init", None)
  arch = fields.pop("arch", "own")
  if arch == "own":
    return fields
  if arch == "teacher":
    return vit.mirror(teacher_model_config(config, workdir), fields)
  raise ConfigError(
    "model.arch",
    f"{arch!r}: use 'own' (the fields of config.model) or 'teacher' (the "
    "teacher's architecture, freshly initialised, with this config's recipe fields "
    f"{list(vit.RECIPE_FIELDS)})",
  )


def teacher_on_mesh(
  config: ml_collections.ConfigDict, workdir: str, model: vit.ViT, mesh
) -> tuple[vit.ViT, Any, transfer.Transfer]:
  """The frozen teacher, the transfer setting resolved against it, and the teacher cut after its last
  transferred layer (`vit.truncate`) with its params placed on `mesh`. It computes attention as the
  student does (`model.attention_impl`)."""
  model_config, params = load_teacher(config, workdir)
  teacher = vit.build({**model_config, "attention_impl": model.attention_impl})
  t = transfer.resolve(config.transfer.to_dict(), model, teacher, config.data.image_size)
  teacher, params = vit.truncate(teacher, params, max(t.layers) + 1)
  return teacher, jax.device_put(params, sharding.tree_shardings(mesh, params)), t


def validate(
  config: ml_collections.ConfigDict, workdir: str, *, check_targets: bool = True
) -> tuple[vit.ViT, Any, data.Source, data.Source]:
  """Checks everything that needs no teacher (model, image size, mesh, batches, data, transfer vs student).

  With `transfer.source = "precomputed"` (and `check_targets`) also the stored teacher targets against the
  config (at_jax.precompute; launch/precompute.py skips this check, it is about to write them).

  Returns (model, mesh, train_source, eval_source). Cheap: runs before a teacher is trained or loaded.
  """
  o, s = config.optim, config.schedule
  # Values the code would take without complaint and then train wrongly with: a negative lr or clip norm
  # ascends, eps 0 gives 0/0 for params without gradient, ema_decay 1 freezes the EMA, log_every_steps 0
  # fails after compilation, a negative `steps` falls back to `epochs`. Written as what is allowed, so NaN
  # fails too. layer_decay is also checked by optim.make_optimizer, but only after a teacher is trained.
  allowed = {
    "optim.base_lr": (0 <= o.base_lr < math.inf, "finite and >= 0"),
    "optim.min_lr": (0 <= o.min_lr < math.inf, "finite and >= 0"),
    "optim.b1": (0 <= o.b1 < 1, "in [0, 1)"),
    "optim.b2": (0 <= o.b2 < 1, "in [0, 1)"),
    "optim.eps": (0 < o.eps < math.inf, "finite and > 0"),
    "optim.weight_decay": (0 <= o.weight_decay < math.inf, "finite and >= 0"),
    "optim.layer_decay": (0 < o.layer_decay <= 1, "in (0, 1] (1: no layer decay)"),
    "optim.grad_clip": (0 <= o.grad_clip < math.inf, "finite and >= 0 (0: no clipping)"),
    "optim.label_smoothing": (0 <= o.label_smoothing < 1, "in [0, 1)"),
    "optim.ema_decay": (0 <= o.ema_decay < 1, "in [0, 1)"),
    "schedule.steps": (s.steps >= 0, ">= 0 (0: train for schedule.epochs)"),
    "schedule.log_every_steps": (s.log_every_steps >= 1, ">= 1"),
  }
  for field, (ok, expected) in allowed.items():
    if not ok:
      group, name = field.split(".")
      raise ConfigError(field, f"must be {expected}, got {config[group][name]!r}")
  if config.task == "mae" and o.layer_decay != 1:
    # MAE's params sit under "encoder"/"decoder*", which optim.layer_decay_scales gives no layer ids: every
    # multiplier would be 1. Layer decay is a fine-tuning setting (MAE pre-trains without it).
    raise ConfigError(
      "optim.layer_decay",
      f"{o.layer_decay} would be ignored by MAE pre-training "
      "(task='mae'), which uses no layer-wise lr decay; set optim.layer_decay=1",
    )
  model = vit.build(model_config(config, workdir))
  if config.model.init and not os.path.exists(config.model.init):
    raise ConfigError(
      "model.init",
      f"{config.model.init} does not exist; it should be a params export "
      "(a run's params/ folder) or a PyTorch/timm/big_vision checkpoint file",
    )
  image_size = config.data.image_size
  if image_size % model.patch_size:
    raise ConfigError(
      "data.image_size",
      f"{image_size} is not divisible by the patch size "
      f"{model.patch_size} (model.variant / model.patch_size)",
    )
  t = transfer.resolve(config.transfer.to_dict(), model, None, image_size)
  precomputed = t.active and t.source == "precomputed"
  d = config.data
  if precomputed:
    # Stored targets describe one fixed view of each unmixed image. Random crop and flip are the base
    # geometry of every config, so the fixed view replaces them (_train_iter says so); the opt-in
    # augmentations below are recipe choices, which must not be dropped behind the user's back.
    for field, on in (
      ("mixup", d.mixup > 0),
      ("cutmix", d.cutmix > 0),
      ("randaugment", bool(d.randaugment)),
      ("random_erase", d.random_erase > 0),
    ):
      if on:
        raise ConfigError(
          f"data.{field}",
          "transfer.source='precomputed' trains on the fixed view the "
          "teacher targets were computed on, so mixup, cutmix, randaugment and random_erase "
          "must be off (--config.data.mixup=0 --config.data.cutmix=0 "
          "--config.data.randaugment='' --config.data.random_erase=0)",
        )
    if t.average != "none":
      raise ConfigError(
        "transfer.average",
        "averages the targets over each batch's images, which needs the "
        "teacher in the step; use transfer.source='jointly'",
      )
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch(d.batch_size, mesh, "data.batch_size")
  sharding.check_batch(d.eval_batch_size, mesh, "data.eval_batch_size")
  data_dir = d.dir or None
  train_source = data.make_source(d.name, d.train_split, data_dir)
  eval_source = data.make_source(d.name, d.eval_split, data_dir)
  if precomputed and check_targets:
    targets = data.TeacherTargets(data.targets_dir(config.transfer.targets_dir, workdir), t.layers)
    expected = dict(
      what=t.what,
      image_size=image_size,
      crop_pct=d.crop_pct,
      normalization=d.normalization,
      dataset=d.name,
      split=d.train_split,
      num_examples=len(train_source),
      num_heads=model.num_heads,
      tokens=model.tokens_for(image_size),
    )
    if t.what != "attn":  # q/k/v replace the student's own: same head size
      expected["head_dim"] = model.width // model.num_heads
    targets.check(**expected)
  return model, mesh, train_source, eval_source


def setup(config: ml_collections.ConfigDict, workdir: str, *, check_targets: bool = True) -> Run:
  """Builds and validates everything; raises ConfigError naming the field/file to fix."""
  model, mesh, train_source, eval_source = validate(config, workdir, check_targets=check_targets)
  image_size = config.data.image_size
  if config.transfer.mode == "none" or config.transfer.source == "precomputed":
    teacher, teacher_params = None, None
    t = transfer.resolve(config.transfer.to_dict(), model, None, image_size)
  else:
    teacher, teacher_params, t = teacher_on_mesh(config, workdir, model, mesh)

  steps_per_epoch = max(1, len(train_source) // config.data.batch_size)
  s = config.schedule
  total = s.steps if s.steps > 0 else int(math.ceil(s.epochs * steps_per_epoch))
  warmup = (
    int(round(s.warmup_epochs * steps_per_epoch))
    if s.steps <= 0
    else min(int(round(s.warmup_epochs * steps_per_epoch)), total - 1)
  )
  o = config.optim
  schedule = optim.make_schedule(
    base_lr=o.base_lr,
    batch_size=config.data.batch_size,
    warmup_steps=warmup,
    total_steps=total,
    min_lr=o.min_lr,
  )
  # What is trained: the ViT (classification, with or without transfer) or an MAE around it.
  images = np.zeros((1, image_size, image_size, 3), np.float32)
  if config.task == "classify":
    init_params = lambda r: model.init(r, images, train=False)["params"]
  elif config.task == "mae":
    if t.active:
      raise ConfigError(
        "transfer.mode",
        "MAE pre-training (task='mae') learns without labels or teacher; set transfer.mode='none'",
      )
    module = mae.MAE(encoder=vit.model_fields(model), **config.mae.to_dict())
    init_params = lambda r: module.init(r, images, train=False, mask_rng=r)["params"]
  else:
    raise ConfigError("task", f"unknown task {config.task!r}; use 'classify' or 'mae'")
  tx = optim.make_optimizer(
    jax.eval_shape(init_params, jax.random.key(0)),
    schedule=schedule,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    layer_decay=o.layer_decay,
    depth=model.depth,
    grad_clip=o.grad_clip or None,
  )

  def init_fn(rng):
    rng_init, rng_train = jax.random.split(rng)
    return train_step.new_state(init_params(rng_init), tx, rng_train)

  if config.task == "mae":
    step_fn = mae_steps.make_mae_train_step(module, tx, schedule=schedule, ema_decay=o.ema_decay)
    eval_fn = mae_steps.make_mae_eval_step(module)
    export = lambda p: (mae.encoder_config(module), mae.encoder_params(p))
  else:
    d = config.data
    mix = dict(
      mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, switch_prob=d.mixup_switch_prob, prob=d.mixup_prob
    )
    step_fn = train_step.make_train_step(
      model,
      teacher,
      tx,
      t,
      schedule=schedule,
      label_smoothing=o.label_smoothing,
      ema_decay=o.ema_decay,
      mix=mix,
    )
    eval_fn = train_step.make_eval_step(model, teacher, t)
    export = lambda p: (vit.model_fields(model), p)
  return Run(
    config,
    workdir,
    model,
    teacher,
    teacher_params,
    t,
    mesh,
    train_source,
    eval_source,
    total,
    schedule,
    tx,
    init_fn,
    step_fn,
    eval_fn,
    export,
  )


def memory_report(run: Run) -> str:
  """Per-device memory of state (params, optimizer, EMA), teacher and activations, from shapes alone."""
  abstract = jax.eval_shape(run.init_fn, jax.random.key(0))
  shardings = sharding.tree_shardings(run.mesh, abstract)
  m, t = run.model, run.t
  state = {
    "params": (abstract.params, shardings.params),
    "optimizer": (abstract.opt_state, shardings.opt_state),
    "ema": (abstract.ema_params, shardings.ema_params),
  }
  estimate = {k: sharding.bytes_per_device(*v) for k, v in state.items()}
  if run.teacher_params is not None:
    estimate["teacher"] = sharding.bytes_per_device(
      run.teacher_params, jax.tree.map(lambda a: getattr(a, "sharding", None), run.teacher_params)
    )
  estimate["activations"] = sharding.activation_bytes(
    examples=max(1, run.config.data.batch_size // run.mesh.size),
    tokens=m.tokens_for(run.config.data.image_size),
    width=m.width,
    mlp_dim=m.mlp_dim,
    heads=m.num_heads,
    depth=m.depth,
    mm_bytes=jax.numpy.dtype(m.dtype_mm).itemsize,
    remat_policy=m.remat_policy,
    maps_kept=t.maps_kept,
  )
  return sharding.check_fits(estimate)


def evaluate_run(run: Run, eval_fn, state: train_step.TrainState) -> dict[str, float]:
  """The eval step's sums over the whole eval split, divided by the example count.

  Classification: top1/top5 (%) for raw and EMA params; MAE: reconstruction loss / ema_loss.
  """
  d = run.config.data
  it = data.eval_iterator(
    run.eval_source,
    global_batch_size=d.eval_batch_size,
    image_size=d.image_size,
    crop_pct=d.crop_pct,
    normalization=d.normalization,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_threads=d.num_threads,
  )
  totals: dict[str, float] = {}
  skipped = 0
  for batch in it:
    skipped += int(batch.pop("skipped").sum())  # unreadable records, already masked out of the sums
    sums = eval_fn(
      state.params, state.ema_params, sharding.global_batch(batch, run.mesh), run.teacher_params
    )
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = totals.pop("count")
  if skipped:
    print(
      f"WARNING: {skipped} unreadable eval examples skipped (this process); the figures leave them out",
      flush=True,
    )
  return {k: v / count for k, v in sorted(totals.items())}


def _train_iter(run: Run, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  """Training batches; with precomputed targets, in the fixed view they were computed on, carrying them."""
  d = run.config.data
  targets = None
  if run.t.active and run.t.source == "precomputed":
    directory = data.targets_dir(run.config.transfer.targets_dir, run.workdir)
    targets = data.TeacherTargets(directory, run.t.layers)
    if jax.process_index() == 0:
      print(
        f"Teacher targets: {', '.join(targets.metadata['keys'])} from {directory} (teacher "
        f"{targets.metadata['teacher']}); training on their fixed view ({data.TARGETS_VIEW}), which "
        "replaces random-resized crop and flip"
        + (
          "; the teacher ran without the student's drop-path masks"
          if run.model.drop_path > 0
          else ""
        ),
        flush=True,
      )
  return data.train_iterator(
    run.train_source,
    global_batch_size=d.batch_size,
    image_size=d.image_size,
    seed=run.config.seed,
    start_step=start_step,
    normalization=d.normalization,
    rrc_scale=tuple(d.rrc_scale),
    hflip=d.hflip,
    randaugment=d.randaugment,
    random_erase=d.random_erase,
    fixed_view=targets is not None,
    crop_pct=d.crop_pct,
    targets=targets,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_threads=d.num_threads,
  )


def _fresh_state_and_steps(run: Run):
  """A fresh sharded state, the run's Checkpointer, and the jitted (train, eval) steps."""
  config = run.config
  state, shardings = train_step.create_sharded_state(
    run.init_fn, jax.random.key(config.seed), run.mesh
  )
  ckpt = checkpoint.Checkpointer(
    os.path.join(run.workdir, "checkpoints"),
    save_every=config.ckpt.every_steps,
    keep=config.ckpt.keep,
  )
  teacher_shardings = (
    None if run.teacher_params is None else jax.tree.map(lambda a: a.sharding, run.teacher_params)
  )
  train_fn, eval_fn = train_step.jit_steps(
    run.step_fn, run.eval_fn, run.mesh, shardings, teacher_shardings
  )
  return state, shardings, ckpt, train_fn, eval_fn


def _data_position(run: Run, step: int, skipped_examples: int = 0) -> dict[str, Any]:
  """The data iterator's position, saved with each checkpoint: the stream is a pure function of these, and
  after `step` steps it stands at example `step * batch_size` of it. `skipped_examples`: how many of those
  examples stood in for unreadable records (all processes), so the logged count continues on resume."""
  d = run.config.data
  return {
    "step": step,
    "examples_seen": step * d.batch_size,
    "skipped_examples": skipped_examples,
    "seed": run.config.seed,
    "data.batch_size": d.batch_size,
    "data.name": d.name,
    "data.train_split": d.train_split,
    "num_examples": len(run.train_source),
  }


def _check_data_position(run: Run, saved: Mapping[str, Any]) -> None:
  """Refuses to resume on a data stream other than the checkpoint's: it would replay or skip examples."""
  now = _data_position(run, int(saved.get("step", 0)))
  for key in ("seed", "data.batch_size", "data.name", "data.train_split", "num_examples"):
    if key in saved and saved[key] != now[key]:
      field = key if key.startswith("data.") or key == "seed" else "data.train_split"
      raise ConfigError(
        field,
        f"the checkpoint in {run.workdir}/checkpoints was written with {key}="
        f"{saved[key]!r}, this run has {now[key]!r}: resuming would not continue its data "
        "stream. Restore the setting or use a new --workdir",
      )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from <workdir>/checkpoints if present), evaluates, exports params; returns evals."""
  run = setup(config, workdir)
  print(memory_report(run), flush=True)  # raises before compiling when the config cannot fit
  state, shardings, ckpt, train_fn, eval_fn = _fresh_state_and_steps(run)
  skipped_before = 0  # examples that stood in for unreadable records before this process started
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(state)
    _check_data_position(run, extra)
    skipped_before = int(
      extra.get("skipped_examples", 0)
    )  # absent in checkpoints from before the field
    print(f"Resumed from {workdir}/checkpoints at step {int(state.step)}", flush=True)
  elif config.model.init:
    _, loaded = load_vit(config.model.init, config)
    params, kept, unused = init_from_pretrained(
      jax.device_get(state.params), loaded, run.model.scan
    )
    state = jax.jit(lambda p, r: train_step.new_state(p, run.tx, r), out_shardings=shardings)(
      params, state.rng
    )
    print(
      f"Initialised from {config.model.init}; kept fresh: {kept or 'none'}; unused: {unused or 'none'}",
      flush=True,
    )

  writer = metrics.MetricWriter(workdir)
  start = int(jax.device_get(state.step))
  s = config.schedule
  name = "mae" if config.task == "mae" else run.t.mode
  progress = metrics.Progress(
    f"train[{name}]", run.total_steps, start=start, unit_per_step=config.data.batch_size
  )
  _describe(run, start)
  batches = _train_iter(run, start)
  pending = None  # (step, metrics) of the step before, fetched after the next one is dispatched
  skipped = (
    0  # examples of this process's batches that stood in for unreadable ones, since (re)start
  )
  skipped_total = (
    skipped_before  # the run's count over all processes, as of the last step that summed it
  )
  sigterm = _SigtermFlag()
  try:
    for step in range(start + 1, run.total_steps + 1):
      batch = next(batches)
      skipped += int(batch.pop("skipped").sum())  # a host-side count, not an input of the step
      state, step_metrics = train_fn(
        state, sharding.global_batch(batch, run.mesh), run.teacher_params
      )
      if pending is not None:
        _log(pending, writer, progress, ckpt)
      pending = None
      log_now = step % s.log_every_steps == 0 or step == run.total_steps
      preempted = sigterm.raised or ckpt.reached_preemption(step)
      if log_now or preempted or step % config.ckpt.every_steps == 0 or jax.process_count() == 1:
        # Summed over processes where it is logged or may be saved: every process reaches those steps
        # together, so the gather lines up; on other steps no save happens and the stale value is unused.
        skipped_total = skipped_before + sharding.process_sum(skipped)
      if log_now:
        pending = (step, {**step_metrics, "skipped_examples": skipped_total})
      ckpt.save(step, state, extra=_data_position(run, step, skipped_total), force=preempted)
      if preempted:
        ckpt.wait()
        ckpt.close()
        writer.close()
        raise Preempted(
          f"preempted at step {step}: checkpoint saved in {ckpt.directory}; relaunch with the "
          "same workdir to resume exactly"
        )
      if (
        config.evals.every_steps
        and step % config.evals.every_steps == 0
        and step != run.total_steps
      ):
        writer.write(step, {f"eval/{k}": v for k, v in evaluate_run(run, eval_fn, state).items()})
  finally:
    sigterm.restore()
  if pending is not None:
    _log(pending, writer, progress, ckpt)
  ckpt.save(
    run.total_steps, state, extra=_data_position(run, run.total_steps, skipped_total), force=True
  )
  ckpt.wait()
  evals = evaluate_run(run, eval_fn, state)
  writer.write(run.total_steps, {f"eval/{k}": v for k, v in evals.items()})
  writer.close()
  ckpt.close()
  # Params may be sharded across processes: every process gathers the full values before the export.
  export_config, export_params = run.export(
    multihost_utils.process_allgather(state.params, tiled=True)
  )
  checkpoint.save_params(os.path.join(workdir, EXPORT_DIR), export_params, export_config)
  print("eval " + "  ".join(f"{k} {v:.2f}" for k, v in evals.items()), flush=True)
  return evals


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, float]:
  """Evaluates <workdir>/checkpoints at `step` (default: the latest) exactly as training evaluated it."""
  run = setup(config, workdir, check_targets=False)  # evaluation reads no stored teacher targets
  state, _, ckpt, _, eval_fn = _fresh_state_and_steps(run)
  state, _ = ckpt.restore(state, step)
  ckpt.close()
  return evaluate_run(run, eval_fn, state)


def _log(pending, writer: metrics.MetricWriter, progress: metrics.Progress, ckpt) -> None:
  step, device_metrics = pending
  values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  if not math.isfinite(values["loss"]):
    last = ckpt.latest_step()
    raise FloatingPointError(
      f"non-finite loss {values['loss']} at step {step}; the last good checkpoint "
      f"(step {last}) is intact in {ckpt.directory}"
    )
  writer.write(step, {f"train/{k}": v for k, v in values.items()})
  progress.update(
    step, {k: values[k] for k in ("loss", "distill_loss", "train_acc") if k in values}
  )


def _describe(run: Run, start: int) -> None:
  if jax.process_index() != 0:
    return
  m, t = run.model, run.t
  what = (
    ""
    if not t.active
    else (
      f" | {t.mode} {t.what}, layers {transfer.selected(t.layers)}, heads "
      f"{transfer.selected(t.heads)}, weight {t.weight}"
    )
  )
  print(
    f"ViT width {m.width} depth {m.depth} heads {m.num_heads} patch {m.patch_size}{what} | "
    f"{run.total_steps} steps of {run.config.data.batch_size} on mesh {dict(run.mesh.shape)}"
    + (f" | resuming at {start}" if start else ""),
    flush=True,
  )


def ensure_teacher(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float] | None:
  """Trains `teacher.pretrain` into <workdir>/teacher when the config says how and it isn't there yet.

  Returns the teacher's evals, or None when the config names its teacher (`teacher.init`) or needs none.
  """
  if config.transfer.mode == "none" or config.teacher.init or config.teacher.pretrain is None:
    return None
  teacher_dir = os.path.join(workdir, TEACHER_DIR)
  results_file = os.path.join(teacher_dir, "results.json")
  if not os.path.exists(os.path.join(teacher_dir, EXPORT_DIR, "model_config.json")):
    print(f"== No teacher in {teacher_dir}: training one ==", flush=True)
    evals = train_and_evaluate(config.teacher.pretrain, teacher_dir)
    if jax.process_index() == 0:
      with open(results_file, "w") as f:
        json.dump(evals, f)
  with open(results_file) as f:
    return json.load(f)


def run_with_teacher(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, dict[str, float]]:
  """Trains the teacher first when the config says how and it isn't there yet, then the student.

  Returns {"teacher": evals or {}, "student": evals}, and prints them as a table.
  """
  results: dict[str, dict[str, float]] = {}
  validate(
    config, workdir
  )  # a typo in the student's config must not cost a teacher's training first
  teacher_evals = ensure_teacher(config, workdir)
  if teacher_evals is not None:
    results["teacher"] = teacher_evals
  name = "student" if config.transfer.mode != "none" else config.task
  print(
    f"== {name.capitalize()}: {config.transfer.mode if name == 'student' else 'training'} ==",
    flush=True,
  )
  results[name] = train_and_evaluate(config, workdir)
  rows = [
    {"model": name, **{k: round(v, 4 if "loss" in k else 2) for k, v in r.items()}}
    for name, r in results.items()
  ]
  columns = [
    c
    for c in ("top1", "ema_top1", "top5", "ema_top5", "loss", "ema_loss")
    if any(c in r for r in rows)
  ]
  table = metrics.format_table(rows, ["model"] + columns)
  if jax.process_index() == 0:
    print(table, flush=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    if config.transfer.mode != "none" and config.transfer.source == "jointly":
      attention_report(config, workdir)
  return results


def attention_report(config: ml_collections.ConfigDict, workdir: str, num_images: int = 4) -> None:
  """Writes <workdir>/attention.png (teacher vs student maps) and prints their per-layer agreement."""
  d = config.data
  source = data.make_source(d.name, d.eval_split, d.dir or None)
  images = next(
    data.eval_iterator(
      source,
      global_batch_size=num_images,
      image_size=d.image_size,
      crop_pct=d.crop_pct,
      normalization=d.normalization,
      num_threads=0,
    )
  )["image"]
  models = {}
  paths = (
    ("teacher", teacher_path(config, workdir)),
    ("student", os.path.join(workdir, EXPORT_DIR)),
  )
  for name, path in paths:
    model_config, params = checkpoint.load_params(path)
    models[name] = (vit.build(model_config), params)
  png = os.path.join(workdir, "attention.png")
  agreement = evaluate.compare_attention(models, images, png)
  print(evaluate.format_agreement(agreement, "teacher") + f"\nattention maps: {png}", flush=True)
