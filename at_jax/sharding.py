"""Device mesh from the config, sharding rules for params and batches, global batches across hosts.

Params, optimizer state, EMA and teacher are sharded by one shape rule (as big_vision's `fsdp` strategy):
each array is split along its largest axis that the `fsdp` mesh axis divides, and replicated over `data`;
arrays with no such axis (scalars, small biases) are replicated. The rule needs no per-module
annotations, so it covers any pytree (optax state, converted teachers) alike. Batches are split over
both axes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from at_jax.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int, fsdp: int, devices: list | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh; one of the sizes may be -1 ("all remaining devices")."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ConfigError("mesh", "at most one of mesh.data, mesh.fsdp may be -1")
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise ConfigError(
      "mesh",
      f"mesh.data x mesh.fsdp must equal the {n} available devices "
      f"(got data={data}, fsdp={fsdp}); -1 fills one axis",
    )
  return jax.make_mesh(
    (data, fsdp), AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2
  )


def spec_for(shape: tuple[int, ...], fsdp: int) -> P:
  """The largest axis divisible by `fsdp` is sharded over 'fsdp' (ties: the later axis)."""
  if fsdp == 1 or not shape:
    return P()
  candidates = [
    (size, axis) for axis, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp
  ]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + ["fsdp"]))


def tree_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs, by the fsdp shape rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda a: NamedSharding(mesh, spec_for(tuple(a.shape), fsdp)), abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def _traced_on_mesh() -> bool:
  """Whether the code is being traced under `on_mesh` (an abstract mesh with the batch axes in context)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and set(BATCH_AXES) <= set(mesh.axis_names)


def process_sum(value: int) -> int:
  """`value` summed over all processes (a collective: every process must call it at the same point)."""
  if jax.process_count() == 1:
    return value
  return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins `x`'s leading (batch) axis to ('data', 'fsdp') inside a step traced under `on_mesh`; else a no-op.

  Activations follow the batch by default, but GSPMD may instead follow an fsdp-sharded weight (sharding
  heads or features, then gathering the batch): for the [B, H, N, N] attention maps that would multiply
  their per-device size. Model code calls this without knowing the mesh; `on_mesh` supplies it.
  """
  if not _traced_on_mesh():
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def per_batch_shard(fn: Callable) -> Callable:
  """`fn` run on each device's slice of the batch (the leading axis of every argument and of the result)
  inside a step traced under `on_mesh`; plain `fn` elsewhere. For ops XLA cannot partition, such as Pallas
  kernels, which it would otherwise run whole on every device after gathering the batch."""

  @functools.wraps(fn)
  def mapped(*args):
    if not _traced_on_mesh():
      return fn(*args)
    spec = P(BATCH_AXES)
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(*args)

  return mapped


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with `mesh` as the abstract mesh in context, so that `constrain_batch` applies."""

  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, field: str = "data.batch_size") -> None:
  """A global batch must split evenly over the mesh's devices (data.pipeline.check_batch_size checks
  that it is positive)."""
  if global_batch % mesh.size:
    raise ConfigError(
      field, f"{global_batch} is not divisible by the {mesh.size} devices of the mesh"
    )


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a global batch -> global arrays sharded over ('data', 'fsdp')."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of a pytree of arrays/ShapeDtypeStructs laid out by `shardings`."""

  def one(leaf, s):
    shard = s.shard_shape(tuple(leaf.shape)) if s is not None else tuple(leaf.shape)
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize

  return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def activation_bytes(
  *,
  examples: int,
  tokens: int,
  width: int,
  mlp_dim: int,
  heads: int,
  depth: int,
  mm_bytes: int,
  remat_policy: str,
  maps_kept: int,
) -> int:
  """A rough count of the activations a training step keeps alive for the backward pass, per device.

  Per layer and example without remat: the float32 residual input and two LayerNorm outputs, q/k/v and
  the attention output in the matmul dtype, float32 logits and probabilities (H x N^2 each), and the MLP's
  hidden pre/post activation. `full` remat keeps only each layer's input; `dots` keeps the matmul
  outputs (about everything but the elementwise intermediates); either way one more layer's worth is
  alive in the backward pass (recomputed, or its cotangents). `maps_kept` layers of [H, N, N] float32
  maps (teacher targets, student logits for the distillation loss) come on top. On XLA:CPU the compiled
  step needs 0.8-1.8x the whole estimate (tests/experiment/test_memory.py): a count of what must be
  alive, not of XLA's temporaries.
  """
  n, d = tokens, width
  per_layer = (
    4 * 3 * n * d + mm_bytes * 4 * n * d + 4 * 2 * heads * n * n + (4 + mm_bytes) * n * mlp_dim
  )
  if remat_policy == "full":
    kept = depth * 4 * n * d + per_layer
  elif remat_policy == "dots":
    kept = (
      depth * (mm_bytes * 4 * n * d + 4 * heads * n * n + mm_bytes * n * mlp_dim + 4 * n * d)
      + per_layer
    )
  else:
    kept = (depth + 1) * per_layer
  return examples * (kept + maps_kept * 4 * heads * n * n)


def device_memory(device: Any) -> tuple[int | None, str]:
  """(bytes one device may use, where they are): an accelerator's own memory, or on CPU the host's RAM
  shared by its local CPU devices (each emulated device gets an equal part). None when unknown."""
  if getattr(device, "platform", None) == "cpu":
    try:
      ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
      return None, ""
    count = len(jax.local_devices(backend="cpu"))
    return ram // count, f"(host RAM / {count} CPU devices)"
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("bytes_limit"), f"on {device.device_kind}"


def check_fits(estimate: dict[str, int], device: Any = None) -> str:
  """Formats a per-device memory estimate; raises ConfigError before compiling when it cannot fit."""
  device = device or jax.local_devices()[0]
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  total = sum(estimate.values())
  line = "per-device memory estimate: " + ", ".join(f"{k} {gib(v)}" for k, v in estimate.items())
  line += f" = {gib(total)}"
  limit, where = device_memory(device)
  if limit:
    line += f" of {gib(limit)} {where}"
    if total > 0.95 * limit:
      raise ConfigError(
        "data.batch_size",
        f"{line}: will not fit. Lower data.batch_size, raise mesh.fsdp "
        "(shards params/optimizer/EMA/teacher), set model.remat_policy=full or dots (with "
        "model.scan=True), or "
        "model.dtype_mm=bfloat16",
      )
  return line
