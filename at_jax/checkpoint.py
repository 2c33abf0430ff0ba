"""Train-state checkpoints and params-only exports, on orbax.

This is the only module that imports orbax, so an orbax API change is fixed
here and nowhere else. All functions must be called by every process (orbax
synchronizes processes internally).
"""

import json
import os
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from orbax import checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from at_jax import storage
from at_jax.errors import ConfigError

_MODEL_CONFIG_FILE = "model_config.json"
_COPY_STUDENT_FILE = "copy_student.json"  # `save_params(copies_attention_of=...)`
_PARAMS_SUBDIR = "params"


def check_options(*, every_steps: int, keep: int) -> None:
  """ConfigError naming ``ckpt.every_steps`` or ``ckpt.keep`` (what `Checkpointer` takes as
  `save_every` and `keep`) unless each is >= 1."""
  if not every_steps >= 1:
    raise ConfigError("ckpt.every_steps", f"must be >= 1, got {every_steps!r}")
  if not keep >= 1:
    raise ConfigError("ckpt.keep", f"must be >= 1, got {keep!r}")


class Checkpointer:
  """Train-state checkpoints in `directory` (orbax CheckpointManager).

  Saves are asynchronous: `save` returns once the arrays are copied off the
  devices and the write continues in a background thread. Only the last `keep`
  checkpoints are kept.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int = 3):
    check_options(every_steps=save_every, keep=keep)
    # orbax rejects relative paths.
    self.directory = storage.absolute(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
      # Not `save_interval_steps`: its default policy also saves the first
      # step of every run (InitialSavePolicy), whatever the interval.
      save_decision_policy=ocp_policies.AnySavePolicy(
        [
          ocp_policies.FixedIntervalPolicy(save_every),
          ocp_policies.PreemptionCheckpointingPolicy(),
        ]
      ),
      max_to_keep=keep,
      enable_async_checkpointing=True,
      create=True,
    )
    # Handlers named up front, not inferred from the first save's args: a manager that restores first
    # (a resume) otherwise reads metadata without them, and orbax warns that each item "could not be
    # restored" although it then restores them.
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "extra": ocp.JsonCheckpointHandler(),
      },
    )
    # Steps a restore of "the latest" fell back past: damaged, so the resumed run saves them again.
    self._unreadable: set[int] = set()

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first (in a bucket, a step still uploading has no commit marker)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Returns the newest saved step, or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, extra: dict | None = None, force: bool = False) -> bool:
    """Starts an async save if the step is due.

    A step is due if `step % save_every == 0`, or `force`, or orbax reports a
    preemption at this step. A step that is already saved is never saved again
    (so a forced final save may follow a periodic one at the same step), unless
    `restore` found it unreadable: then the new save replaces it.

    Args:
      step: the training step the state belongs to.
      state: any pytree of (possibly sharded) jax arrays, e.g. a
        flax.struct.dataclass TrainState. Must not be donated or modified in
        place until the device-to-host copy is done; `save` returns after it.
      extra: a small JSON-able dict saved alongside (data iterator position,
        config snapshot).
      force: save even if the step is not due.

    Returns:
      Whether a save was started.
    """
    # The run was resumed from before its damaged steps and retrains them: all make way at its first
    # save (orbax saves no step below its latest, so a damaged later one would keep blocking).
    for damaged in sorted(self._unreadable):
      self._manager.delete(damaged)
    self._unreadable.clear()
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {})
    )
    return self._manager.save(step, args=args, force=force)

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, extra) at `step` (default: the latest).

    Args:
      target: pytree with the structure of the saved state, of
        jax.ShapeDtypeStruct carrying `.sharding` (as from jax.eval_shape plus
        shardings) or of concrete arrays. Arrays come back with the target's
        shardings, also when they were saved under another sharding or mesh.
      step: the step to restore; None for the latest.

    Returns:
      (state, extra): state with the structure of `target`, and the `extra`
      dict given to `save`.

    Raises:
      ConfigError: there is no checkpoint at `step` (or none at all).
    """
    # A save still in flight is not readable yet; it may be the one wanted.
    self.wait()
    steps = sorted(self._manager.all_steps())
    if step is not None and step not in steps:
      raise ConfigError(self.directory, f"no checkpoint at step {step}; saved steps: {steps}")
    if not steps:
      raise ConfigError(self.directory, "no checkpoint to restore from")
    self._check_shapes(steps[-1] if step is None else step, target)
    # An explicit step must restore as asked; "the latest" falls back past damaged checkpoints (a torn
    # write, a truncated file) to the newest one that reads, and says so.
    candidates = [step] if step is not None else steps[::-1]
    errors = []
    for candidate in candidates:
      try:
        restored = self._manager.restore(
          candidate,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # pylint: disable=broad-exception-caught
        # orbax/tensorstore raise many types for damaged files; the shape/structure errors of a wrong
        # target would repeat on every step, so they surface below with the rest.
        errors.append(f"step {candidate}: {type(e).__name__}: {str(e)[:300]}")
        print(
          f"WARNING: checkpoint step {candidate} in {self.directory} is unreadable "
          f"({type(e).__name__}); trying an older one",
          flush=True,
        )
        continue
      if errors:
        print(f"WARNING: resumed from step {candidate}, the newest readable checkpoint", flush=True)
        self._unreadable.update(s for s in steps if s > candidate)
      return restored.state, restored.extra
    raise ConfigError(self.directory, "no readable checkpoint: " + "; ".join(errors))

  def _check_shapes(self, step: int, target: Any) -> None:
    """ConfigError if the checkpoint at `step` holds arrays of other shapes than `target`: another
    model (width, depth, heads, patch) or optimizer, not a damaged file, so no older step would do."""
    try:
      saved = self._manager.item_metadata(step)["state"].tree
      saved_shapes = {
        jax.tree_util.keystr(k): tuple(m.shape)
        for k, m in jax.tree_util.tree_leaves_with_path(saved)
      }
    except Exception:  # pylint: disable=broad-exception-caught  # unreadable metadata: restore says
      return
    for path, leaf in jax.tree_util.tree_leaves_with_path(target):
      key = jax.tree_util.keystr(path)
      dtype = getattr(leaf, "dtype", None)
      if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        continue  # a typed key is stored as its key data, of another shape
      if key in saved_shapes and saved_shapes[key] != tuple(np.shape(leaf)):
        raise ConfigError(
          "model",
          f"the checkpoint at step {step} in {self.directory} holds another model: {key} is "
          f"{saved_shapes[key]} there, {tuple(np.shape(leaf))} in this run. Relaunch with that "
          "run's model settings or use a new --workdir",
        )

  def wait(self) -> None:
    """Blocks until all async saves are written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases orbax's threads and files."""
    self._manager.close()


def save_params(
  path: str, params: Any, model_config: dict, *, copies_attention_of: str = ""
) -> None:
  """Exports params for use as a teacher (`teacher.init` points at `path`).

  Writes `params` with orbax under path/params and `model_config` as
  path/model_config.json. Synchronous; overwrites an existing export.

  Args:
    path: export directory.
    params: nested dict of (possibly sharded) arrays.
    model_config: JSON-able dict of the ViT's constructor kwargs.
    copies_attention_of: the student of an attention-copy run: the teacher it attends with, recorded
      in path/copy_student.json, so that nothing uses it as a model on its own (`check_standalone`).
  """
  path = storage.absolute(path)
  config_file = os.path.join(path, _MODEL_CONFIG_FILE)
  marker = os.path.join(path, _COPY_STUDENT_FILE)
  config_json = json.dumps(model_config, indent=2, sort_keys=True)
  is_writer = jax.process_index() == 0
  # Drop the old config first: an export interrupted from here on then reads
  # as incomplete instead of as new params with a stale config.
  if is_writer and storage.exists(config_file):
    storage.remove(config_file)
  if is_writer and storage.exists(marker):
    storage.remove(marker)
  checkpointer = ocp.PyTreeCheckpointer()  # Synchronous.
  checkpointer.save(
    os.path.join(path, _PARAMS_SUBDIR), args=ocp.args.PyTreeSave(params), force=True
  )  # Overwrite.
  if is_writer:
    if copies_attention_of:
      storage.write_atomic(marker, json.dumps({"teacher": copies_attention_of}))
    storage.write_atomic(config_file, config_json)
  if jax.process_count() > 1:
    # Orbax's last barrier came before process 0's config write: without this one another process
    # could read the export (a job's teacher, just trained) before it is complete.
    multihost_utils.sync_global_devices(f"at_jax: params exported to {path}")


def check_standalone(path: str, field: str, use: str) -> None:
  """Raises ConfigError(`field`) when the export `path` is the student of an attention-copy run:
  it attends with its teacher's maps at test time too, and its own queries and keys in the copied
  layers never trained, so on its own it is not the model its run evaluated. `use`: what it was
  given to (named in the message)."""
  marker = os.path.join(storage.absolute(path), _COPY_STUDENT_FILE)
  if not storage.exists(marker):
    return
  with storage.open_file(marker) as f:
    teacher = json.load(f).get("teacher", "?")
  raise ConfigError(
    field,
    f"{path} is the student of an attention-copy run: it takes its attention from its teacher "
    f"({teacher}) at test time too, so on its own it is not the model its run evaluated; {use} "
    "needs a model on its own (evaluate the copy run with its teacher: launch/evaluate.py --workdir)",
  )


def is_export(path: str) -> bool:
  """Whether `path` holds a finished export: `save_params` writes model_config.json last."""
  return storage.exists(os.path.join(storage.absolute(path), _MODEL_CONFIG_FILE))


# Exports are read for teacher.init, model.init, ensemble members and evaluate.py's --models: the hint
# names them all, the error's field names the path.
_HINT = (
  "an export is a directory written by at_jax.checkpoint.save_params (what teacher.init, model.init, "
  "ensemble members and --models take), or a PyTorch/timm/big_vision file that at_jax.convert reads"
)


def read_model_config(path: str) -> dict:
  """The model_config.json of an export, without reading its params (cheap start-up checks)."""
  path = storage.absolute(path)
  if not storage.isdir(path):
    what = "not a directory" if storage.exists(path) else "does not exist"
    raise ConfigError(path, f"{what}; {_HINT}")
  config_file = os.path.join(path, _MODEL_CONFIG_FILE)
  if not storage.isfile(config_file):
    raise ConfigError(path, f"no {_MODEL_CONFIG_FILE} (incomplete export?); {_HINT}")
  try:
    with storage.open_file(config_file) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(path, f"unreadable {_MODEL_CONFIG_FILE} ({e}); {_HINT}") from e


def load_params(path: str, shardings: Any = None) -> tuple[dict, Any]:
  """Loads an export written by `save_params`.

  Args:
    path: export directory (what `teacher.init` points at).
    shardings: optional pytree of jax.sharding.Sharding matching the params,
      to restore straight into. If None, leaves come back as numpy arrays with
      the saved dtypes: they fit any mesh and any device count.

  Returns:
    (model_config, params).

  Raises:
    ConfigError: `path` is missing, has no model_config.json, or holds an
      unreadable checkpoint.
  """
  path = storage.absolute(path)
  model_config = read_model_config(path)
  params_dir = os.path.join(path, _PARAMS_SUBDIR)
  # orbax and tensorstore raise many exception types for damaged files
  # (JSON, tensorstore status, missing commit marker), hence the broad except.
  try:
    # The handler, not the Checkpointer: Checkpointer.metadata() only logs a
    # warning when the metadata is unreadable.
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(params_dir))
    if shardings is None:
      # No sharding -> orbax restores numpy arrays.
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata.tree)
    else:
      target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), metadata.tree, shardings
      )
    params = ocp.PyTreeCheckpointer().restore(
      params_dir,
      args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
      ),
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ConfigError(
      path, f"unreadable params checkpoint in {params_dir} ({type(e).__name__}: {e}); {_HINT}"
    ) from e
  return model_config, params
