"""Device mesh from the config, sharding rules for params and batches, global batches across hosts.

Params, optimizer state, EMA and teacher are sharded by one shape rule (as big_vision's `fsdp` strategy):
each array is split along its largest axis that the `fsdp` mesh axis divides, and replicated over `data`;
arrays with no such axis (scalars, small biases) are replicated. The rule needs no per-module
annotations, so it covers any pytree (optax state, converted teachers) alike. Batches are split over
both axes.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
    raise ConfigError("mesh", f"mesh.data x mesh.fsdp must equal the {n} available devices "
                      f"(got data={data}, fsdp={fsdp}); -1 fills one axis")
  return jax.make_mesh((data, fsdp), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def spec_for(shape: tuple[int, ...], fsdp: int) -> P:
  """The largest axis divisible by `fsdp` is sharded over 'fsdp' (ties: the later axis)."""
  if fsdp == 1 or not shape:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
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


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, field: str = "data.batch_size") -> None:
  if global_batch % mesh.size:
    raise ConfigError(field, f"{global_batch} is not divisible by the {mesh.size} devices of the mesh")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a global batch -> global arrays sharded over ('data', 'fsdp')."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
