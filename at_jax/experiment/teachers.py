"""The teacher and pretrained weights a config names: where they are, their architecture, loading them (params exports or checkpoint files), the student's architecture when it mirrors the teacher, and the teacher placed on the mesh."""

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from at_jax import checkpoint, metrics, sharding, storage
from at_jax.convert import hf_folder, posemb, selection
from at_jax.convert import load as convert
from at_jax.data import target_store
from at_jax.errors import ConfigError
from at_jax.experiment.paths import EXPORT_DIR, TEACHER_DIR
from at_jax.models import vit
from at_jax.transfer import pairing, spec


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


def is_checkpoint_file(path: str) -> bool:
  """Whether `path` names a checkpoint to convert, not a params export: a file (with or without a
  `#selector`) or a Hugging Face folder (config.json; an export has model_config.json instead)."""
  file = selection.split(path)[0]
  return storage.isfile(file) or hf_folder.is_hf_folder(file)


def teacher_image_size(config: ml_collections.ConfigDict) -> int:
  """The size the teacher sees the training images at: teacher.image_size, else data.image_size."""
  return config.teacher.get("image_size", 0) or config.data.image_size


def load_vit(
  path: str,
  config: ml_collections.ConfigDict,
  default_tower: str | None = "student",
  image_size: int = 0,
) -> tuple[dict, Any]:
  """(model_config, numpy params, read-only) of a ViT fitted to data.image_size, from our params export (a
  directory with model_config.json), a PyTorch/timm/big_vision checkpoint file or a Hugging Face folder
  (converted by at_jax.convert; `FILE#SELECTOR` picks the weights of a training checkpoint, see
  at_jax.convert.selection).

  The teacher.* conversion fields apply: resample_posemb (bicubic resampling of a position table made for
  another image size; otherwise that is an error), and for files num_heads and family. `default_tower`:
  the tower of the reference's dual checkpoints when the path names none -- the student for model.init
  and evaluation; None (teacher.init) makes the path name it.

  Read once per process for each version of the files and setting (`_load`): the run places the teacher
  on its mesh and the end-of-run report compares with it, and a ViT-L is over a gigabyte.
  """
  size, t = image_size or config.data.image_size, config.teacher
  files = selection.split(path)[0] if is_checkpoint_file(path) else path
  return _load(
    storage.absolute(path),
    _version(files),
    size,
    t.resample_posemb,
    t.family or None,
    t.num_heads or None,
    default_tower,
  )


def _version(path: str) -> int | None:
  """The newest mtime of a file, or of a folder and the entries in it (a folder rewritten in place keeps
  its own mtime; its files do not); None in a bucket, where an entry is then read once per process."""
  if not storage.isdir(path):
    return storage.mtime_ns(path)
  if not storage.is_remote(path) and hf_folder.is_hf_folder(path):
    return hf_folder.mtime_ns(path)  # a hub cache's snapshot: its files live elsewhere
  return storage.newest_mtime_ns(path)


@functools.lru_cache(maxsize=2)
def _load(
  path: str,
  version: int | None,
  image_size: int,
  resample: bool,
  family: str | None,
  num_heads: int | None,
  default_tower: str | None,
) -> tuple[dict, Any]:
  """One read (and conversion) per version and setting; the params are made read-only, since every
  caller shares them. `version` makes a rewritten export or file a new entry."""
  del version
  if is_checkpoint_file(path):
    try:
      model_config, params = convert.load_checkpoint(
        path,
        image_size=image_size,
        resample_posemb=resample,
        family=family,
        num_heads=num_heads,
        default_tower=default_tower,
      )
    except ConfigError as e:
      if e.field in ("num_heads", "family"):  # the converter's own names: here they are teacher.*
        message = e.message.replace(f"pass {e.field} (--{e.field})", f"set teacher.{e.field}")
        raise ConfigError(f"teacher.{e.field}", message) from None
      raise
  else:
    model_config, params = checkpoint.load_params(path)
    posemb.fit_posemb(params, model_config, path, image_size, resample)
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, np.ndarray):
      leaf.setflags(write=False)
  return model_config, params


def load_teacher(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, Any]:
  """The frozen teacher: `teacher.init` (an export or a checkpoint file), or its pretrain run's export.
  A dual checkpoint of the reference must name its tower here: both are plausible teachers (the frozen one
  it trained with, the student it trained), and a wrong guess would run a different experiment."""
  path = teacher_path(config, workdir)
  if config.teacher.init:
    checkpoint.check_standalone(path, "teacher.init", "a teacher")
  return load_vit(path, config, default_tower=None, image_size=teacher_image_size(config))


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


def check_exists(path: str, field: str) -> None:
  """ConfigError(`field`) when `path` (teacher.init, model.init) is not there at all."""
  if not storage.exists(path):
    raise ConfigError(
      field,
      f"{path} does not exist; it should be a params export (a run's params/ folder), a Hugging "
      "Face folder or a PyTorch/timm/big_vision checkpoint file",
    )


def teacher_model_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The teacher's architecture, read without its weights where possible."""
  if config.teacher.init and is_checkpoint_file(config.teacher.init):
    return load_teacher(config, workdir)[0]
  if config.teacher.init:
    check_exists(config.teacher.init, "teacher.init")
    checkpoint.check_standalone(config.teacher.init, "teacher.init", "a teacher")
    return checkpoint.read_model_config(config.teacher.init)
  if config.teacher.pretrain is not None:
    # Its architecture: not the recipe fields of its own run (arch, init), which no ViT has.
    fields = config.teacher.pretrain.model.to_dict()
    return {k: v for k, v in fields.items() if k not in ("arch", "init")}
  return checkpoint.read_model_config(teacher_path(config, workdir))  # raises, naming the path


def stored_teacher(config: ml_collections.ConfigDict, workdir: str) -> vit.ViT | None:
  """The architecture of the teacher whose targets a "precomputed" run reads (from the store's
  metadata, what launch/precompute.py ran); None for other runs or before anything is stored."""
  if config.transfer.mode == "none" or config.transfer.get("source") != "precomputed":
    return None
  directory = target_store.targets_dir(config.transfer.targets_dir, workdir)
  metadata = target_store.read_targets_metadata(directory)
  return None if metadata is None else vit.build(metadata["teacher_config"])


def _projected(config: ml_collections.ConfigDict) -> str | None:
  """What a width-mapping head (`ViT.feature_dim`) may project: the distilled features, q, k or v."""
  what = config.transfer.get("what", "attn")
  return what if config.transfer.mode == "distill" and what != "attn" else None


def _with_feature_head(config: ml_collections.ConfigDict, workdir: str, fields: dict) -> dict:
  """`fields` with the width map (`ViT.feature_dim`, `projected`) where distilling features, q, k or v
  needs one (the widths differ and model.feature_dim is 0); an explicit one is checked by `spec.resolve`."""
  projected = _projected(config)
  if fields.get("feature_dim", 0) and projected is None:
    raise ConfigError(
      "model.feature_dim",
      f"{fields['feature_dim']}: the width map serves transfer.what 'features', 'q', 'k' or 'v' in "
      "distill mode only; set model.feature_dim=0",
    )
  if config.transfer.get("head_map", "same") == "learned":
    fields = {**fields, "head_mix": _head_mix_shape(config, workdir, fields)}
  if projected is None:
    return fields
  fields = {**fields, "projected": projected}
  if fields.get("feature_dim", 0):
    return fields
  teacher_width = vit.build(teacher_model_config(config, workdir)).width
  student_width = vit.build(fields).width
  return fields if teacher_width == student_width else {**fields, "feature_dim": teacher_width}


# What makes a ViT's size rather than its kind: `model.arch = "teacher_components"` keeps the student's.
SHAPE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


def _head_mix_shape(
  config: ml_collections.ConfigDict, workdir: str, fields: dict
) -> tuple[int, ...]:
  """(distilled layers, student heads, teacher heads) of the student's learned head mix (`ViT.head_mix`)."""
  student = vit.build(fields)  # a module's description: nothing is initialised
  layers, _ = pairing.resolve_layer_map(config.transfer.to_dict(), student, None)
  teacher_heads = vit.expand(teacher_model_config(config, workdir))["num_heads"]
  return (len(layers), student.num_heads, teacher_heads)


def model_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The student's ViT fields; `model.arch = "teacher"` mirrors the teacher's architecture, and
  "teacher_components" the teacher's components (registers, LayerScale, QK-norm, stem pre-norm,
  activation, norm eps, position-table layout: what `vit.mirror` copies) at the student's own size
  (`SHAPE_FIELDS` from model.variant). Feature distillation from a teacher of another width adds the
  projection head (`ViT.feature_dim`)."""
  fields = config.model.to_dict()
  fields.pop("init", None)
  arch = fields.pop("arch", "own")
  if arch == "own":
    return _with_feature_head(config, workdir, fields)
  if arch == "teacher":
    return _with_feature_head(
      config, workdir, vit.mirror(teacher_model_config(config, workdir), fields)
    )
  if arch == "teacher_components":
    size = {k: v for k, v in vit.expand(fields).items() if k in SHAPE_FIELDS}
    mirrored = vit.mirror(teacher_model_config(config, workdir), fields)
    return _with_feature_head(config, workdir, {**mirrored, **size})
  raise ConfigError(
    "model.arch",
    f"{arch!r}: use 'own' (the fields of config.model), 'teacher' (the teacher's architecture, "
    f"freshly initialised, with this config's recipe fields {list(vit.RECIPE_FIELDS)}) or "
    "'teacher_components' (the teacher's components at the student's size, model.variant)",
  )


def teacher_on_mesh(
  config: ml_collections.ConfigDict, workdir: str, model: vit.ViT, mesh
) -> tuple[vit.ViT, Any, spec.Transfer]:
  """The frozen teacher, the transfer setting resolved against it, and the teacher cut after its last
  transferred layer (`vit.truncate`) with its params placed on `mesh`. It computes attention as the
  student does (`model.attention_impl`)."""
  model_config, params = load_teacher(config, workdir)
  teacher = vit.build({**model_config, "attention_impl": model.attention_impl})
  t = spec.resolve(
    config.transfer.to_dict(),
    model,
    teacher,
    config.data.image_size,
    teacher_image_size=teacher_image_size(config),
  )
  teacher, params = vit.truncate(teacher, params, t.teacher_depth)
  return teacher, jax.device_put(params, sharding.tree_shardings(mesh, params)), t


def check_stored_teacher(
  config: ml_collections.ConfigDict, workdir: str, directory: str, metadata: dict
) -> None:
  """A config that names its teacher (teacher.init, or teacher.pretrain's export) against the teacher
  whose targets are stored, which the run distils: another architecture is refused; the same one at
  another path (a store or export moved, or another checkpoint of that model) is said."""
  stored = metadata.get("teacher", "")
  if not (config.teacher.init or config.teacher.pretrain is not None) or not stored:
    return
  named = teacher_path(config, workdir)
  if storage.absolute(named) == storage.absolute(stored):
    return
  field = "teacher.init" if config.teacher.init else "teacher.pretrain"
  try:
    named_fields = vit.model_fields(vit.build(teacher_model_config(config, workdir)))
  except ConfigError:  # not readable from here (moved away): the stored one is all there is
    named_fields = None
  stored_fields = vit.model_fields(vit.build(metadata["teacher_config"]))
  if named_fields is not None and named_fields != stored_fields:
    differ = sorted(k for k in stored_fields if named_fields.get(k) != stored_fields[k])
    raise ConfigError(
      field,
      f"{directory} holds the targets of the teacher {stored}, of another architecture than "
      f"{named}, which this config names ({', '.join(differ[:5])} differ): precompute its targets "
      f"(launch/precompute.py) or name {stored}",
    )
  metrics.say(
    f"Note: this config names the teacher {named}; the stored targets are of {stored} (the same "
    "architecture), which the run distils"
  )
