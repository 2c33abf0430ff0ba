"""The whole job a config describes: its teacher first when the config says how to train one, then the
student, the results table and the attention figure."""

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from at_jax import checkpoint, metrics, storage
from at_jax.data import options, pipeline, sources
from at_jax.errors import ConfigError
from at_jax.evaluate import attention as evaluate
from at_jax.experiment import teachers
from at_jax.experiment import workdir as workdir_claim
from at_jax.experiment.loop import train_and_evaluate
from at_jax.experiment.paths import CHECKPOINT_DIR, EXPORT_DIR, RESULTS_FILE, TEACHER_DIR
from at_jax.experiment.teachers import load_teacher
from at_jax.experiment.validation import validate
from at_jax.models import vit
from at_jax.transfer import pairing, targets
from at_jax.transfer import spec as transfer_spec


def ensure_teacher(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float] | None:
  """Trains `teacher.pretrain` into <workdir>/teacher when the config says how and it isn't there yet.

  Returns the teacher's evals, or None when the config names its teacher (`teacher.init`), needs none,
  or finds an export put in <workdir>/teacher by hand (no run beside it: used as it is).
  """
  if not _pretrains_teacher(config):
    return None
  teacher_dir = os.path.join(workdir, TEACHER_DIR)
  results_file = os.path.join(teacher_dir, RESULTS_FILE)
  if not _will_train_teacher(config, workdir):
    if not storage.exists(results_file):  # an export put there by hand, without its run
      metrics.say(f"Note: {teacher_dir} holds an export without its run: its evals are not known")
      return None
    with storage.open_file(results_file) as f:
      return json.load(f)
  if checkpoint.is_export(os.path.join(teacher_dir, EXPORT_DIR)):
    metrics.say(f"== The teacher in {teacher_dir} stopped before its results: finishing it ==")
  else:
    metrics.say(f"== No teacher in {teacher_dir}: training one ==")
  with _named_as_teacher():
    evals = train_and_evaluate(config.teacher.pretrain, teacher_dir)
  if jax.process_index() == 0:
    storage.write_atomic(results_file, json.dumps(evals))
  return evals  # every process's own: none waits for process 0's file


@contextlib.contextmanager
def _named_as_teacher() -> Iterator[None]:
  """Errors about the teacher's own run config named in full (teacher.pretrain.<field>)."""
  try:
    yield
  except ConfigError as e:
    raise e.under("teacher.pretrain") from None


def _say_teacher_data(config: ml_collections.ConfigDict) -> None:
  """Says so when the teacher pre-trained here sees other data than its student (a deliberate shift
  setting, or a config pointed at new data whose teacher section still names the old)."""
  student, teacher = config.data, config.teacher.pretrain.data
  keys = ("name", "dir", "train_split", "image_size")
  if any(student[k] != teacher[k] for k in keys):
    differ = ", ".join(
      f"{k} {teacher[k]!r} vs {student[k]!r}" for k in keys if student[k] != teacher[k]
    )
    metrics.say(
      f"Note: the teacher is pre-trained on other data than the student (teacher.pretrain.data vs "
      f"data: {differ}); set teacher.pretrain.data.* to pre-train it on the student's data"
    )


def _will_train_teacher(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether `ensure_teacher` has a teacher to train: the config says how, and none is there yet, or
  its run was stopped between its export and its results (the relaunch then evaluates its last step
  again). An export without checkpoints beside it (put there by hand) is used as it is."""
  teacher_dir = os.path.join(workdir, TEACHER_DIR)
  if not checkpoint.is_export(os.path.join(teacher_dir, EXPORT_DIR)):
    return _pretrains_teacher(config)
  stopped = not storage.exists(os.path.join(teacher_dir, RESULTS_FILE)) and storage.isdir(
    os.path.join(teacher_dir, CHECKPOINT_DIR)
  )
  return _pretrains_teacher(config) and stopped


def _pretrains_teacher(config: ml_collections.ConfigDict) -> bool:
  """Whether the teacher comes from `teacher.pretrain` (a transfer mode, no `teacher.init`)."""
  return (
    config.transfer.mode != "none"
    and not config.teacher.init
    and config.teacher.pretrain is not None
  )


def run_with_teacher(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, dict[str, float]]:
  """Trains the teacher first when the config says how and it isn't there yet, then the student.

  Holds the workdir's lock for the whole job. Returns {"teacher": evals or {}, "student": evals}, and
  prints them as a table.
  """
  with workdir_claim.claimed(workdir):
    return _run_with_teacher(config, workdir)


def _run_with_teacher(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, dict[str, float]]:
  results: dict[str, dict[str, float]] = {}
  # A typo in either config, or a relaunch that changes either run, must not cost a teacher's training
  # first: both are checked up front.
  teacher_dir = os.path.join(workdir, TEACHER_DIR)
  if _will_train_teacher(config, workdir):
    with _named_as_teacher():
      validate(config.teacher.pretrain, teacher_dir)
  validated = validate(config, workdir)  # once: the student's run takes it as it is
  if _pretrains_teacher(config):
    # An existing teacher of another recipe would be reused without a word.
    workdir_claim.check(config.teacher.pretrain, teacher_dir, prefix="teacher.pretrain.")
    _say_teacher_data(config)
  workdir_claim.check(config, workdir)
  teacher_evals = ensure_teacher(config, workdir)
  if teacher_evals is not None:
    results["teacher"] = teacher_evals
  name = "student" if config.transfer.mode != "none" else config.task
  metrics.say(
    f"== {name.capitalize()}: {config.transfer.mode if name == 'student' else 'training'} =="
  )
  results[name] = train_and_evaluate(config, workdir, validated)
  rows = [
    {"model": name, **{k: round(v, 4 if "loss" in k else 2) for k, v in r.items()}}
    for name, r in results.items()
  ]
  columns = [
    c
    for c in (
      "top1",
      "ema_top1",
      "best_top1",
      "best_ema_top1",
      "top5",
      "ema_top5",
      "loss",
      "ema_loss",
      "best_loss",
      "best_ema_loss",
    )
    if any(c in r for r in rows)
  ]
  table = metrics.format_table(rows, ["model"] + columns)
  if jax.process_index() == 0:
    print(table, flush=True)
    storage.write_atomic(os.path.join(workdir, RESULTS_FILE), json.dumps(results, indent=1))
    attention_report(config, workdir)
  return results


def attention_report(config: ml_collections.ConfigDict, workdir: str, num_images: int = 4) -> None:
  """Writes <workdir>/attention.png (teacher vs student maps) and prints their per-layer agreement, for
  a run with a teacher: run jointly, or whose stored targets' teacher is at hand (its export named by
  teacher.init, loaded for the report alone)."""
  if config.transfer.mode == "none":
    return
  if config.transfer.source == "precomputed" and not (
    config.teacher.init and storage.exists(config.teacher.init)
  ):
    metrics.say(
      "Note: no attention report: it runs the teacher of the stored targets, which teacher.init "
      "does not name here"
    )
    return
  png = os.path.join(workdir, "attention.png")
  agreement = attention_agreement(config, workdir, eval_images(config, workdir, num_images), png)
  print(evaluate.format_agreement(agreement, "teacher") + f"\nattention maps: {png}", flush=True)


def eval_images(
  config: ml_collections.ConfigDict, workdir: str, num_images: int, split: str = "data.eval_split"
) -> Any:
  """The first `num_images` images of the `split` field's split (data.eval_split), in the eval view."""
  d = config.data
  source = sources.from_config(d, split, workdir)
  view = options.eval_view(d)
  batches = pipeline.eval_iterator(source, global_batch_size=num_images, **view, num_threads=0)
  return next(batches)["image"]


def attention_agreement(
  config: ml_collections.ConfigDict,
  workdir: str,
  images_BHWC: Any,
  png: str | None = None,
  head_mix: Any = None,
) -> dict[str, dict[str, Any]]:
  """{"student": per-layer agreement} of the run's exported student with its teacher on `images_BHWC`
  (`evaluate.attention_agreement`'s cross-entropy, teacher entropy and JSD): attention maps are compared
  with the maps each layer was taught (`evaluate.compare_with_teacher`), other transfers layer by layer.
  Draws the maps into `png` when given; `head_mix`: a learned mix's logits, which exports drop (e.g. a
  checkpoint's), so that each student head meets its own mix."""
  # The teacher as the run loaded it: an export or a (converted) checkpoint file, fitted to its size.
  loaded = {
    "teacher": load_teacher(config, workdir),
    "student": checkpoint.load_params(os.path.join(workdir, EXPORT_DIR)),
  }
  models = {name: (vit.build(mc), params) for name, (mc, params) in loaded.items()}
  if config.transfer.get("what", "attn") != "attn":
    return evaluate.compare_attention(models, images_BHWC, png)
  (teacher, teacher_params), (student, student_params) = models["teacher"], models["student"]
  transfer = transfer_spec.resolve(
    config.transfer.to_dict(),
    student,
    teacher,
    config.data.image_size,
    teacher_image_size=teachers.teacher_image_size(config),
  )
  taught = evaluate.compare_with_teacher(
    student, student_params, teacher, teacher_params, images_BHWC, transfer, png, head_mix
  )
  return {"student": taught}


def teacher_head_statistics(
  config: ml_collections.ConfigDict, workdir: str, num_images: int = 512
) -> tuple[dict[str, np.ndarray], tuple[int, ...], int]:
  """How each teacher head attends, for choosing `transfer.head_pick`: (the teacher's [L_t, H_t]
  `evaluate.head_statistics` on the first `num_images` training images in the eval view; the teacher
  layers the distilled student layers read, in order; the student's head count). The images reach the
  teacher as in training (`targets.teacher_view`)."""
  teacher_config, params = load_teacher(config, workdir)
  teacher, student = vit.build(teacher_config), vit.build(teachers.model_config(config, workdir))
  first = {**config.transfer.to_dict(), "head_map": "first", "head_pick": ""}  # layers, not heads
  size = teachers.teacher_image_size(config) or config.data.image_size
  transfer = transfer_spec.resolve(
    first, student, teacher, config.data.image_size, teacher_image_size=size
  )
  images = targets.teacher_view(
    eval_images(config, workdir, num_images, "data.train_split"), transfer
  )
  statistics = evaluate.head_statistics(teacher, params, images)
  return statistics, transfer.teacher_layers, student.num_heads


def sharpest_teacher_heads(
  config: ml_collections.ConfigDict, workdir: str, num_images: int = 512, *, flattest: bool = False
) -> str:
  """The `transfer.head_pick` (head_map "pick") that gives each distilled student head one of the
  sharpest heads of the teacher layer it reads: per layer, the student's head count of teacher heads
  with the lowest mean attention entropy (`teacher_head_statistics`), in the teacher's head order
  (`pairing.sharpest_heads`); `flattest`: the highest instead (a control). Deterministic for a teacher
  and data; write the string into the config, so that the run's identity holds it
  (launch/teacher_heads.py prints it)."""
  statistics, teacher_layers, heads = teacher_head_statistics(config, workdir, num_images)
  entropy_LH = statistics["entropy"]
  return pairing.sharpest_heads(-entropy_LH if flattest else entropy_LH, teacher_layers, heads)
