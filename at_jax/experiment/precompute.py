"""Teacher targets computed once and stored, for `transfer.source = "precomputed"` (issue #7).

The teacher runs once over the training split and its transferred quantity in the teacher layers the
selected student layers read (`transfer.layer_map`), at the teacher's own heads and tokens, is
written to disk; distillation then trains without the teacher in the step, reading each example's targets
with its pixels (`target_store.TeacherTargets`). The teacher sees one fixed view per image, the eval preprocessing
(shorter side resized to round(image_size / crop_pct), centre image_size crop: `transforms.eval_example`), so the
training run must read that same view (`pipeline.train_iterator(fixed_view=True)`): no random crop or flip,
RandAugment, erasing, mixup or cutmix, and the teacher runs without the student's drop-path masks.

Layout of `transfer.targets_dir` (default <workdir>/teacher_targets):

  metadata.json   what was computed from what (`describe`), the layout (format, shard_examples) and the
                  progress (done_examples, complete)
  <key>/          one zarr v3 array per stored key (tensorstore), bfloat16, [num_examples, ...], one chunk
                  per example, sharded (`target_store`), S = those teacher layers in order:
                    attn_logits  [S, H, N, N]   what="attn", precompute.store="logits"
                    q, k         [S, N, H, Dh]  what="attn", precompute.store="qk": logits = q.k / sqrt(Dh)
                    q | k | v    [S, N, H, Dh]  what="q" | "k" | "v"

Every JAX process computes its slice of each global batch and writes those examples, one transaction per
batch and key: a shard is a divisor of the process's slice (`target_store.shard_examples`), so no two
processes write the same object. Progress is committed to metadata.json every
`COMMIT_EVERY` global batches, and a rerun resumes from there.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils

from at_jax import metrics, sharding, storage
from at_jax.data import options, pipeline, sources, target_store
from at_jax.data.sources import Source
from at_jax.errors import ConfigError
from at_jax.experiment import job, teachers, validation
from at_jax.experiment import workdir as workdir_claim
from at_jax.models import vit
from at_jax.transfer import spec, targets

STORES = ("logits", "qk")
# Global batches between commits of the progress; each commit is a barrier across processes.
COMMIT_EVERY = 20
# Metadata fields that record progress; all others identify the targets.
_PROGRESS = ("done_examples", "complete", "skipped", "batch_size")
# How the store is laid out: fixed when it is created, carried over when a precompute resumes.
_LAYOUT = ("format", "shard_examples")


def stored_keys(what: str, store: str) -> tuple[str, ...]:
  """The teacher outputs stored for `transfer.what` and `precompute.store` (which only matters for 'attn')."""
  if store not in STORES:
    raise ConfigError(
      "precompute.store",
      f"unknown {store!r}; use 'logits' (H*N*N values per layer and "
      "image) or 'qk' (2*N*H*Dh, fewer when N > 2*Dh)",
    )
  if what != "attn":
    return (what,)
  return ("attn_logits",) if store == "logits" else ("q", "k")


def _targets_fn(teacher: vit.ViT, layers: Sequence[int], keys: Sequence[str]):
  """(params, {"image", "index"}) -> {key: bfloat16 [B, S, ...] (example-major, as stored), "index"}."""

  def fn(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    outputs = targets.teacher_outputs(teacher, params, batch["image"], layers, keys)
    stored = {k: jnp.swapaxes(v, 0, 1).astype(jnp.bfloat16) for k, v in outputs.items()}
    # The index travels with the rows, so each device's rows are written where they belong.
    return {**stored, "index": batch["index"]}

  return fn


def describe(
  teacher: vit.ViT,
  *,
  what: str,
  store: str,
  layers: Sequence[int],
  image_size: int,
  crop_pct: float,
  normalization: str,
  dataset: str,
  split: str,
  num_examples: int,
  fingerprint: str,
  jpeg_downscale: bool,
  teacher_path: str,
  teacher_config: Mapping[str, Any],
) -> dict[str, Any]:
  """The metadata identifying a set of targets; `target_store.TeacherTargets.check` compares a run against it.

  Args:
    teacher: the teacher ViT (its heads, tokens and the stored shapes come from it).
    what, store: `transfer.what` and `precompute.store`, see `stored_keys`.
    layers: the teacher layers read (`Transfer.teacher_layers`, sorted, once each), stored in this order.
    image_size, crop_pct, normalization: the fixed view (`pipeline.eval_iterator`'s preprocessing).
    dataset, split, num_examples, fingerprint: the training source (`data.name`, `data.train_split`,
      its length, `sources.fingerprint`).
    jpeg_downscale: `data.jpeg_downscale`, part of the view.
    teacher_path, teacher_config: where the teacher came from, and its architecture.

  Returns:
    The metadata, with no progress yet (done_examples 0, complete False), as JSON would read it back.
  """
  keys = stored_keys(what, store)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(
    lambda: _targets_fn(teacher, layers, keys)(
      teacher.init(jax.random.key(0), images, train=False)["params"],
      {"image": images, "index": jnp.zeros((1,), jnp.int32)},
    )
  )
  metadata = dict(
    format=target_store.FORMAT,
    what=what,
    store=store if what == "attn" else what,
    keys=list(keys),
    shapes={k: list(shapes[k].shape[1:]) for k in keys},
    dtype="bfloat16",
    layers=list(layers),
    num_heads=teacher.num_heads,
    tokens=teacher.tokens_for(image_size),
    head_dim=teacher.width // teacher.num_heads,
    image_size=image_size,
    crop_pct=crop_pct,
    normalization=normalization,
    jpeg_downscale=jpeg_downscale,
    view=target_store.TARGETS_VIEW,
    dataset=dataset,
    split=split,
    num_examples=num_examples,
    fingerprint=fingerprint,
    teacher=teacher_path,
    teacher_config=dict(teacher_config),
    done_examples=0,
    complete=False,
    skipped=0,
  )
  return json.loads(json.dumps(metadata))  # as it reads back: lists, not tuples


def write_targets(
  teacher: vit.ViT,
  teacher_params: Any,
  source: Source,
  directory: str,
  metadata: Mapping[str, Any],
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  num_threads: int = 2,
) -> dict[str, Any]:
  """Runs the teacher over `source` in the fixed view and stores its targets; resumes an unfinished run.

  Args:
    teacher: the frozen teacher.
    teacher_params: its params (placed on `mesh`, or numpy).
    source: the training split; example i's targets go to row i.
    directory: the targets folder (created).
    metadata: from `describe`: what to compute, with which view.
    batch_size: the global batch size of the teacher's forward passes (a multiple of the mesh size).
    mesh: the device mesh; batches are split over all of it.
    num_threads: grain threads decoding and preprocessing examples.

  Returns:
    The final metadata (complete, with the count of examples skipped as unreadable).

  Raises:
    ConfigError: `directory` holds targets of another setting.
  """
  metadata = dict(metadata)
  old = target_store.read_targets_metadata(directory)
  start_batch = _resume_point(directory, old, metadata, batch_size)
  if start_batch is None:
    return old
  metadata["batch_size"] = batch_size
  if old is None:
    metadata.update(target_store.new_layout(metadata["shapes"], batch_size // jax.process_count()))
  arrays = _open_store(directory, metadata, create=old is None)
  keys, n = metadata["keys"], metadata["num_examples"]
  fn = _jit_targets_fn(teacher, metadata["layers"], keys, teacher_params, mesh)
  p, process_count = jax.process_index(), jax.process_count()
  num_batches = -(-n // batch_size)
  batches = pipeline.eval_iterator(
    source,
    global_batch_size=batch_size,
    **options.eval_view(metadata),
    process_index=p,
    process_count=process_count,
    num_threads=num_threads,
    start_batch=start_batch,
  )
  progress = metrics.Progress(
    "precompute", num_batches, start=start_batch, unit_per_step=batch_size
  )
  log_every = max(1, num_batches // 20)
  base_skipped, skipped = metadata["skipped"], 0
  pending: list[ts.Future] = []
  for s, batch in enumerate(batches, start_batch):
    index = pipeline.eval_example_indices(
      s, batch["mask"], global_batch_size=batch_size, process_index=p, process_count=process_count
    )
    skipped += int(batch["skipped"].sum())
    out = fn(teacher_params, sharding.global_batch({"image": batch["image"], "index": index}, mesh))
    for w in pending:  # the previous batch's writes overlapped this batch's forward pass
      w.result()
    pending = _write_rows(out, keys, arrays)
    done = s + 1
    if done % COMMIT_EVERY == 0 or done == num_batches:
      for w in pending:
        w.result()
      pending = []
      progress_now = dict(done_examples=min(done * batch_size, n), complete=done == num_batches)
      _commit(
        directory, metadata, skipped=base_skipped + sharding.process_sum(skipped), **progress_now
      )
    if done % log_every == 0 or done == num_batches:
      progress.update(done, {"skipped": base_skipped + skipped})  # this process's count
  return metadata


def _jit_targets_fn(
  teacher: vit.ViT, layers: Sequence[int], keys: Sequence[str], teacher_params: Any, mesh: Any
) -> Any:
  """`_targets_fn` jitted over `mesh`: teacher params by the fsdp rule, batch and outputs split."""
  return jax.jit(
    _targets_fn(teacher, layers, keys),
    in_shardings=(sharding.tree_shardings(mesh, teacher_params), sharding.batch_sharding(mesh)),
    out_shardings=sharding.batch_sharding(mesh),
  )


def _commit(directory: str, metadata: dict[str, Any], **progress: Any) -> None:
  """Records `progress` in metadata.json once every process's writes of it are done (a barrier)."""
  metadata.update(progress)
  multihost_utils.sync_global_devices(f"precompute: {metadata['done_examples']} examples written")
  if jax.process_index() == 0:
    target_store.write_metadata(directory, metadata)


def _resume_point(
  directory: str,
  old: Mapping[str, Any] | None,
  metadata: dict[str, Any],
  batch_size: int,
) -> int | None:
  """The global batch to start at (0 for a new folder), or None when `old` is already complete.

  Carries the old skipped count into `metadata`; refuses a folder of another setting, or an unfinished
  one that ran other batch sizes (progress is counted in whole batches).
  """
  if old is None:
    return 0
  skip = _PROGRESS + _LAYOUT
  differ = sorted(
    k for k in set(old) | set(metadata) if k not in skip and old.get(k) != metadata.get(k)
  )
  if differ:
    raise ConfigError(
      "transfer.targets_dir",
      f"{directory} holds teacher targets of another setting "
      f"(differing: {', '.join(differ)}); delete it or set transfer.targets_dir elsewhere",
    )
  if old["complete"]:
    metrics.say(f"Teacher targets in {directory} are complete; nothing to do")
    return None
  if old["batch_size"] != batch_size:
    raise ConfigError(
      "data.eval_batch_size",
      f"the unfinished precompute in {directory} ran batches of "
      f"{old['batch_size']}; resume it with that batch size, or delete {directory}",
    )
  metadata["skipped"] = old["skipped"]
  metadata.update({k: old[k] for k in _LAYOUT if k in old})
  local = batch_size // jax.process_count()
  if local % metadata["shard_examples"]:
    # Laid out for another process count: a shard would straddle two processes' rows (two writers).
    raise ConfigError(
      "transfer.targets_dir",
      f"the unfinished precompute in {directory} was laid out in shards of "
      f"{metadata['shard_examples']} examples, which do not divide this launch's {local} per "
      f"process ({batch_size} over {jax.process_count()}): resume it on as many processes as "
      f"started it, or delete {directory}",
    )
  metrics.say(f"Resuming the precompute in {directory} at example {old['done_examples']}")
  return old["done_examples"] // batch_size


def _open_store(directory: str, metadata: Mapping[str, Any], *, create: bool) -> dict[str, Any]:
  """Every process's handles on the arrays; process 0 creates them (and the metadata) first."""
  # Every process reads the old metadata before process 0 rewrites it, and opens arrays after they exist.
  multihost_utils.sync_global_devices("precompute: metadata read")
  if jax.process_index() == 0:
    storage.makedirs(directory)
    arrays = target_store.open_arrays(directory, metadata, create=create)
    if create:
      target_store.write_metadata(directory, metadata)
  multihost_utils.sync_global_devices("precompute: arrays created")
  if jax.process_index() != 0:
    arrays = target_store.open_arrays(directory, metadata, create=False)
  return arrays


def _write_rows(
  out: Mapping[str, jax.Array], keys: Sequence[str], arrays: Mapping[str, Any]
) -> list[ts.Future]:
  """Starts writing this process's rows of `out` (each device's shard, at its examples' indices): one
  transaction per key."""
  pending = []
  for key in keys:
    indices, rows = [], []
    for shard, ids in zip(out[key].addressable_shards, out["index"].addressable_shards):
      assert shard.device == ids.device
      for row, i in zip(np.asarray(shard.data), np.asarray(ids.data)):
        if i >= 0:  # not padding, not an unreadable example
          indices.append(i)
          rows.append(row)
    pending.append(target_store.write_rows(arrays[key], indices, rows))
  return pending


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Precomputes `config`'s teacher targets over its training split (launch/precompute.py).

  Writes to `transfer.targets_dir` (default <workdir>/teacher_targets), where a training run of the same
  config with `transfer.source = "precomputed"` reads them. Batches of `data.eval_batch_size`.

  Holds the workdir's lock (`workdir.claimed`), as a training run in it does.

  Returns:
    The metadata written.
  """
  with workdir_claim.claimed(workdir):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  model, mesh, train_source, _, _ = validation.validate(config, workdir, check_targets=False)
  if config.transfer.mode != "distill":
    raise ConfigError(
      "transfer.mode",
      f"precomputed teacher targets serve distillation; "
      f"{config.transfer.mode!r} needs none (copy runs the teacher at evaluation too)",
    )
  job.ensure_teacher(config, workdir)  # as launch/main.py would, so precomputing can come first
  teacher, params, t = teachers.teacher_on_mesh(config, workdir, model, mesh)
  # The teacher's own layers, heads and tokens: a run maps them onto the student as it reads them.
  layers = tuple(sorted(set(t.teacher_layers)))
  teacher_config = teachers.teacher_model_config(config, workdir)
  d = config.data
  metadata = describe(
    teacher,
    what=t.what,
    store=config.precompute.store,
    layers=layers,
    image_size=d.image_size,
    crop_pct=d.crop_pct,
    normalization=d.normalization,
    dataset=d.name,
    split=d.train_split,
    num_examples=len(train_source),
    fingerprint=sources.fingerprint(train_source),
    jpeg_downscale=d.jpeg_downscale,
    teacher_path=teachers.teacher_path(config, workdir),
    teacher_config=teacher_config,
  )
  directory = target_store.targets_dir(config.transfer.targets_dir, workdir)
  metrics.say(
    f"Precomputing teacher targets ({', '.join(metadata['keys'])} of teacher layers {spec.selected(layers)}, "
    f"{metadata['num_examples']} examples of {d.name} {d.train_split}) into {directory}"
  )
  return write_targets(
    teacher,
    params,
    train_source,
    directory,
    metadata,
    batch_size=d.eval_batch_size,
    mesh=mesh,
    num_threads=d.num_threads,
  )
