"""The per-device memory a run will need, from shapes alone, checked against the device before compiling."""

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from at_jax import sharding
from at_jax.models import encoder, vit
from at_jax.transfer.spec import Transfer


def estimate(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  model: vit.ViT,
  spec: Transfer,
  init_fn: Callable[[jax.Array], Any],
  teacher_params: Any,
  stored_target_bytes: int = 0,
) -> dict[str, int]:
  """Bytes per device of params, their gradients, optimizer state, EMA, the teacher's params, stored
  targets and the activations.

  The activations are those of one micro-batch (data.batch_size / optim.accum_steps examples: the step
  runs them one after another); accumulating adds "grad_accum", the running sum of the grads kept beside
  each micro-batch's own. On a CPU, remat without `model.scan` is counted as none: XLA:CPU keeps an
  unrolled loop's recomputed layers (benchmarks/RESULTS.md).

  Args:
    config: the run's config (batch size, gradient accumulation, image size).
    mesh: the device mesh; the state and teacher are laid out by the fsdp shape rule.
    model: the student.
    spec: the transfer setting (how many layers' maps the step keeps).
    init_fn: key -> TrainState, evaluated abstractly.
    teacher_params: the teacher's params (arrays or ShapeDtypeStructs), or None.
    stored_target_bytes: one example's stored teacher targets (a precomputed run's batches carry them).
  """
  abstract = jax.eval_shape(lambda: init_fn(jax.random.key(0)))  # traced: compiles nothing
  shardings = sharding.tree_shardings(mesh, abstract)
  bytes_of = {
    "params": sharding.bytes_per_device(abstract.params, shardings.params),
    # The step's gradients: the params' shapes, dtypes and layout, alive beside the optimizer update.
    "grads": sharding.bytes_per_device(abstract.params, shardings.params),
    "optimizer": sharding.bytes_per_device(abstract.opt_state, shardings.opt_state),
    "ema": sharding.bytes_per_device(abstract.ema_params, shardings.ema_params),
  }
  if teacher_params is not None:
    teacher_shardings = sharding.tree_shardings(mesh, teacher_params)
    bytes_of["teacher"] = sharding.bytes_per_device(teacher_params, teacher_shardings)
  accum_steps = config.optim.accum_steps
  if accum_steps > 1:
    # The grads have the params' shapes, dtypes and layout.
    bytes_of["grad_accum"] = sharding.bytes_per_device(abstract.params, shardings.params)
  if stored_target_bytes:  # the whole batch's, not a micro-batch's: it arrives with the batch
    bytes_of["stored_targets"] = max(1, config.data.batch_size // mesh.size) * stored_target_bytes
  examples = max(1, config.data.batch_size // accum_steps // mesh.size)
  remat = model.remat_policy
  if not model.scan and mesh.devices.flat[0].platform == "cpu":
    remat = "none"
  tokens = model.tokens_for(config.data.image_size)
  teacher_maps = spec.teacher_map_bytes(tokens)  # a teacher of another head count or grid: its own
  if teacher_maps:
    bytes_of["teacher_maps"] = examples * teacher_maps
  bytes_of["activations"] = sharding.activation_bytes(
    examples=examples,
    tokens=tokens,
    width=model.width,
    mlp_dim=model.mlp_dim * (2 if model.mlp_act in encoder.GATED else 1),  # SwiGLU's [gate | value]
    heads=model.num_heads,
    depth=model.depth,
    mm_bytes=jax.numpy.dtype(model.dtype_mm).itemsize,
    remat_policy=remat,
    maps_kept=spec.maps_kept,
  )
  return bytes_of


def check(*args: Any) -> str:
  """`estimate(*args)` as one line, compared with one device's memory; raises ConfigError
  (data.batch_size) when it cannot fit."""
  return sharding.check_fits(estimate(*args))
