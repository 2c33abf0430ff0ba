"""Every check of a config and its inputs, once, before anything is compiled or any teacher is trained.

`validate` calls the same check functions the library pieces run on their own arguments
(`optim.check_hparams`, `checkpoint.check_options`, the data pipeline's and mixup's checks,
`sharding.check_batch`, `transfer.resolve`, the stored targets' `check`), so a colab calling one piece
directly gets the same error as a launch. Nothing here compiles: shapes are evaluated abstractly.
"""

import math
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from at_jax import checkpoint, optim, sharding, storage
from at_jax.data import mixup, options, pipeline, sources, target_store
from at_jax.errors import ConfigError
from at_jax.experiment import build, memory, profiling, teachers
from at_jax.models import vit
from at_jax.training import state as train_state
from at_jax.transfer import spec as transfer_spec
from at_jax.transfer.spec import Transfer


class Validated(NamedTuple):
  model: vit.ViT
  mesh: jax.sharding.Mesh
  train_source: sources.Source
  eval_source: sources.Source
  memory: str  # the per-device memory estimate, as checked against the device (one line)


def validate(
  config: ml_collections.ConfigDict, workdir: str, *, check_targets: bool = True
) -> Validated:
  """Checks the config and everything it names; raises ConfigError naming the field or file to fix.

  With `transfer.source = "precomputed"` (and `check_targets`) also the stored teacher targets against
  the config (launch/precompute.py skips this check: it is about to write them). The teacher is read
  for its architecture only (a checkpoint file is converted once and cached), so a student that cannot
  use it is refused before the teacher is trained or loaded onto devices.
  """
  # A bucket that does not exist fails here, not at the first checkpoint after compiling.
  storage.check_bucket(workdir, "--workdir")
  for field in ("teacher.init", "model.init", "transfer.targets_dir", "data.dir"):
    group, name = field.split(".")
    storage.check_bucket(config[group][name] or "", field)
  _check_finite(config.to_dict())
  _check_scalars(config)
  model = vit.build(teachers.model_config(config, workdir))
  _check_model(config, model)
  image_size = config.data.image_size
  spec = transfer_spec.resolve(config.transfer.to_dict(), model, None, image_size)
  _check_task(config, spec)
  _check_data_args(config, model, spec)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  d = config.data
  train_source, eval_source = _sources(d, workdir)
  if config.task == "classify":
    _check_labels(d, model, train_source, eval_source)
  pipeline.check_batch_sizes(
    batch_size=d.batch_size,
    eval_batch_size=d.eval_batch_size,
    num_train_examples=len(train_source),
    process_count=jax.process_count(),
  )  # positive, split over processes, and (batch_size) no more than the training split
  sharding.check_batch(d.batch_size, mesh, "data.batch_size")
  sharding.check_batch(d.eval_batch_size, mesh, "data.eval_batch_size")
  _check_micro_batches(config, mesh)
  # Last of the inputs: the teacher, read for its architecture and checked against the student.
  teacher = _teacher_architecture(config, workdir, model)
  if teacher is not None:
    spec = transfer_spec.resolve(
      config.transfer.to_dict(),
      model,
      teacher,
      image_size,
      teacher_image_size=teachers.teacher_image_size(config),
    )
  if spec.active and spec.source == "precomputed" and check_targets:
    _check_stored_targets(
      config, workdir, model, spec, len(train_source), sources.fingerprint(train_source)
    )
  memory_line = _check_memory(config, workdir, mesh, model, teacher, spec, len(train_source))
  return Validated(model, mesh, train_source, eval_source, memory_line)


def _sources(d: ml_collections.ConfigDict, workdir: str) -> tuple[sources.Source, sources.Source]:
  """The training and eval sources. An image folder is listed by process 0 alone, which caches the
  list in the (shared) workdir or data.file_list_dir for the others to read after a barrier."""

  def build() -> tuple[sources.Source, sources.Source]:
    train = sources.from_config(d, "data.train_split", workdir)
    return train, sources.from_config(d, "data.eval_split", workdir)

  if d.name != "imagefolder" or jax.process_count() == 1:
    return build()
  built = build() if jax.process_index() == 0 else None  # process 0 keeps what it listed
  multihost_utils.sync_global_devices("at_jax: image folder file lists cached")
  return built or build()


def _check_finite(fields: dict, prefix: str = "") -> None:
  """Every number of the config is finite: a NaN passes most range checks unnoticed (every comparison
  with it is False) and an infinity breaks the step count or the loss only after compiling."""
  for name, value in fields.items():
    field = f"{prefix}{name}"
    # The teacher's run (teacher.pretrain) is checked as its own config.
    if isinstance(value, dict) and field != "teacher.pretrain":
      _check_finite(value, f"{field}.")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(field, f"must be a finite number, got {value}")


# Numbers no other check bounds: (field, within, what to say); each is also finite (`_check_finite`).
_RANGES = (
  ("model.drop_path", lambda x: 0 <= x < 1, "a probability in [0, 1)"),
  (
    "data.num_threads",
    lambda x: x >= 0 and int(x) == x,
    "a whole number >= 0 (0: in the main thread)",
  ),
  ("schedule.epochs", lambda x: x >= 0, ">= 0"),
  ("schedule.warmup_epochs", lambda x: x >= 0, ">= 0"),
  (
    "teacher.image_size",
    lambda x: x >= 0 and int(x) == x,
    "a whole number >= 0 (0: data.image_size)",
  ),
)
_CHOICES = (
  ("model.dtype_mm", ("float32", "bfloat16", "float16")),
  ("precompute.store", ("logits", "qk")),
)


def _check_labels(d: ml_collections.ConfigDict, model: vit.ViT, *splits: sources.Source) -> None:
  """model.num_classes against the labels the data holds: a head with fewer outputs can never predict
  the other classes, and would train without a word."""
  for field, source in zip(("data.train_split", "data.eval_split"), splits):
    n = sources.num_classes(source)
    if n is not None and n > model.num_classes:
      where = f"the class folders of {d.dir}" if d.name == "imagefolder" else f"{d.name}'s labels"
      raise ConfigError(
        "model.num_classes",
        f"{model.num_classes}, but {field}={d[field.removeprefix('data.')]!r} has {n} classes "
        f"(labels 0..{n - 1}, from {where}): set model.num_classes={n}",
      )


def _check_scalars(config: ml_collections.ConfigDict) -> None:
  """The optimizer's, schedule's and checkpointing's numbers: each within what it means."""
  for field, within, what in _RANGES:
    section, name = field.split(".")
    if not within(config[section][name]):
      raise ConfigError(field, f"must be {what}, got {config[section][name]!r}")
  for field, choices in _CHOICES:
    section, name = field.split(".")
    if config[section][name] not in choices:
      raise ConfigError(field, f"{config[section][name]!r} is not one of {choices}")
  o, s = config.optim, config.schedule
  optim.check_hparams(**{name: o[name] for name in optim.HPARAM_RANGES})
  optim.check_decay_rule(o.decay_rule)
  # A negative `steps` would fall back to `epochs`; log_every_steps 0 fails after compilation.
  if not s.steps >= 0:
    raise ConfigError(
      "schedule.steps", f"must be >= 0 (0: train for schedule.epochs), got {s.steps!r}"
    )
  if not s.log_every_steps >= 1:
    raise ConfigError("schedule.log_every_steps", f"must be >= 1, got {s.log_every_steps!r}")
  checkpoint.check_options(every_steps=config.ckpt.every_steps, keep=config.ckpt.keep)
  profiling.parse_window(config.profile)
  e = config.evals
  if not e.every_steps >= 0:
    raise ConfigError(
      "evals.every_steps", f"must be >= 0 (0: only at the end), got {e.every_steps!r}"
    )
  if not (e.every_epochs >= 0 and math.isfinite(e.every_epochs)):
    raise ConfigError(
      "evals.every_epochs", f"must be >= 0 (0: only at the end), got {e.every_epochs!r}"
    )
  if e.every_steps and e.every_epochs:
    raise ConfigError(
      "evals.every_epochs",
      f"set either evals.every_steps ({e.every_steps}) or evals.every_epochs ({e.every_epochs}), "
      "not both: set the other to 0",
    )


def _check_model(config: ml_collections.ConfigDict, model: vit.ViT) -> None:
  if config.model.init and teachers.is_checkpoint_file(config.model.init):
    # Converted now (and cached for the run's start), so that a file it cannot use or a `#selector` that
    # does not match the file fails before compiling.
    teachers.load_vit(config.model.init, config)
  elif config.model.init:
    teachers.check_exists(config.model.init, "model.init")
  image_size = config.data.image_size
  if image_size % model.patch_size:
    raise ConfigError(
      "data.image_size",
      f"{image_size} is not divisible by the patch size "
      f"{model.patch_size} (model.variant / model.patch_size)",
    )


def _teacher_architecture(
  config: ml_collections.ConfigDict, workdir: str, model: vit.ViT
) -> vit.ViT | None:
  """The teacher the step will run (or whose stored targets it reads), built from its architecture
  alone; None without one."""
  if config.transfer.source == "precomputed":
    return teachers.stored_teacher(config, workdir)
  if config.transfer.mode == "none":
    return None
  teacher_config = teachers.teacher_model_config(config, workdir)
  return vit.build({**teacher_config, "attention_impl": model.attention_impl})


def _check_task(config: ml_collections.ConfigDict, spec: Transfer) -> None:
  if config.task not in build.TASKS:
    raise ConfigError("task", f"unknown task {config.task!r}; use one of {list(build.TASKS)}")
  if config.task != "mae":
    return
  if spec.active:
    raise ConfigError(
      "transfer.mode",
      "MAE pre-training (task='mae') learns without labels or teacher; set transfer.mode='none'",
    )
  if config.optim.layer_decay != 1:
    # MAE's params sit under "encoder"/"decoder*", which optim.layer_decay_scales gives no layer ids:
    # every multiplier would be 1. Layer decay is a fine-tuning setting (MAE pre-trains without it).
    raise ConfigError(
      "optim.layer_decay",
      f"{config.optim.layer_decay} would be ignored by MAE pre-training "
      "(task='mae'), which uses no layer-wise lr decay; set optim.layer_decay=1",
    )


def _check_data_args(config: ml_collections.ConfigDict, model: vit.ViT, spec: Transfer) -> None:
  """What the iterators and the step's mixing check on their own arguments, up front."""
  d = config.data
  precomputed = spec.active and spec.source == "precomputed"
  if precomputed:
    _check_fixed_view_recipe(d, spec)
  options.check_train_args(
    image_size=d.image_size,
    normalization=d.normalization,
    seed=config.seed,
    rrc_scale=tuple(d.rrc_scale),
    randaugment=d.randaugment,
    random_erase=d.random_erase,
    fixed_view=precomputed,
    crop_pct=d.crop_pct,
  )
  options.check_eval_args(
    image_size=d.image_size, crop_pct=d.crop_pct, normalization=d.normalization
  )
  if config.task == "classify":
    mixup.check_mix_args(
      num_classes=model.num_classes,
      mixup_alpha=d.mixup,
      cutmix_alpha=d.cutmix,
      switch_prob=d.mixup_switch_prob,
      prob=d.mixup_prob,
      label_smoothing=config.optim.label_smoothing,
    )


def _check_micro_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """optim.accum_steps against the batch and the mesh, and (classify) data.mix_group_size against the
  micro-batch, as the step checks them when it is traced."""
  d, k = config.data, config.optim.accum_steps
  train_state.check_accum_steps(k, d.batch_size, mesh.size)
  if config.task == "classify":
    what = "the global batch" if k == 1 else "the micro-batch (data.batch_size / optim.accum_steps)"
    mixing = (d.mixup > 0 or d.cutmix > 0) and d.mixup_prob > 0
    mixup.check_group_size(d.mix_group_size, d.batch_size // k, what, mixes=mixing)


def _check_fixed_view_recipe(d: ml_collections.ConfigDict, spec: Transfer) -> None:
  # Stored targets describe one fixed view of each unmixed image. Random crop and flip are the base
  # geometry of every config, so the fixed view replaces them (the loop says so); the opt-in
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
  if spec.average != "none":
    raise ConfigError(
      "transfer.average",
      "averages the targets over each batch's images, which needs the "
      "teacher in the step; use transfer.source='jointly'",
    )


def _check_stored_targets(
  config: ml_collections.ConfigDict,
  workdir: str,
  model: vit.ViT,
  spec: Transfer,
  num_examples: int,
  fingerprint: str,
) -> None:
  d = config.data
  directory = target_store.targets_dir(config.transfer.targets_dir, workdir)
  stored = target_store.TeacherTargets(directory, spec.teacher_layers)
  expected = dict(
    what=spec.what,
    image_size=d.image_size,
    crop_pct=d.crop_pct,
    normalization=d.normalization,
    dataset=d.name,
    split=d.train_split,
    num_examples=num_examples,
    fingerprint=fingerprint,
    jpeg_downscale=d.jpeg_downscale,
  )
  stored.check(
    **expected
  )  # the stored teacher's shape went through `spec.resolve` (its heads, tokens)
  teachers.check_stored_teacher(config, workdir, directory, stored.metadata)
  if spec.loss_impl != "direct" and "q" not in stored.metadata["keys"]:
    raise ConfigError(
      "transfer.loss_impl",
      f"{spec.loss_impl!r} streams the teacher's maps from its q and k, but {directory} holds its "
      "attention logits (precompute.store='logits'): precompute q and k "
      "(--config.precompute.store=qk) or use 'direct'",
    )


def _check_memory(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: jax.sharding.Mesh,
  model: vit.ViT,
  teacher: vit.ViT | None,
  spec: Transfer,
  num_examples: int,
) -> str:
  """The start-up memory estimate against one device's memory (host RAM on CPU), from shapes. A
  precomputed run holds no teacher (`teacher` is its stored targets' architecture) but its batches
  carry the stored targets."""
  precomputed = config.transfer.source == "precomputed"
  lr, total = build.schedule(config, num_examples)
  task = build.task(config, model, None if precomputed else teacher, spec, lr, total)
  tx = build.optimizer(config, task, lr, model.depth)
  teacher_params, stored_target_bytes = None, 0
  if precomputed:
    directory = target_store.targets_dir(config.transfer.targets_dir, workdir)
    metadata = target_store.read_targets_metadata(directory)
    if metadata:
      stored_target_bytes = target_store.example_bytes(metadata, spec.teacher_layers)
  elif teacher is not None:  # as teachers.teacher_on_mesh will place it: cut after its last layer
    size = teachers.teacher_image_size(config)
    images = np.zeros((1, size, size, 3), np.float32)
    teacher_params = jax.eval_shape(
      lambda: vit.truncate(
        teacher,
        teacher.init(jax.random.key(0), images, train=False)["params"],
        spec.teacher_depth,
      )[1]
    )
  return memory.check(
    config, mesh, model, spec, build.init_fn(task, tx), teacher_params, stored_target_bytes
  )
