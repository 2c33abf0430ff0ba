"""Tests for at_jax.sharding: the mesh, the fsdp shape rule, batch checks and global batches."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from at_jax import sharding
from at_jax.errors import ConfigError
from at_jax.models import vit


def _fsdp_axis(spec: P) -> int | None:
  """The one axis a spec shards over 'fsdp' (None if replicated); fails on anything else."""
  axes = [i for i, name in enumerate(spec) if name is not None]
  assert len(axes) <= 1, spec
  if not axes:
    return None
  assert spec[axes[0]] == "fsdp", spec
  return axes[0]


# -------------------------------------------------------------------- make_mesh


@pytest.mark.parametrize(
  "data, fsdp, shape",
  [
    (4, 2, (4, 2)),
    (-1, 2, (4, 2)),
    (2, -1, (2, 4)),
    (8, 1, (8, 1)),
    (1, -1, (1, 8)),
  ],
)
def test_make_mesh_shapes(data, fsdp, shape):
  mesh = sharding.make_mesh(data, fsdp)
  assert mesh.axis_names == ("data", "fsdp")
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize(
  "devices, data, fsdp, shape",
  [
    (slice(0, 1), 1, 1, (1, 1)),
    (slice(0, 1), -1, 1, (1, 1)),
    (slice(4, 8), -1, 2, (2, 2)),
    (slice(0, 4), 4, -1, (4, 1)),
  ],
)
def test_make_mesh_over_some_devices(devices, data, fsdp, shape):
  chosen = jax.devices()[devices]
  mesh = sharding.make_mesh(data, fsdp, devices=chosen)
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in chosen)


@pytest.mark.parametrize(
  "data, fsdp",
  [
    (3, 2),
    (-1, -1),
    (-1, 3),
    (3, -1),
    (0, -1),
    (-1, 0),
    (4, 4),
    (2, 2),
    (-2, 4),
    (8, 0),
  ],
)
def test_make_mesh_rejects_bad_sizes(data, fsdp):
  with pytest.raises(ConfigError) as e:
    sharding.make_mesh(data, fsdp)
  assert e.value.field == "mesh"


def test_make_mesh_rejects_sizes_of_a_subset():
  with pytest.raises(ConfigError) as e:
    sharding.make_mesh(4, 2, devices=jax.devices()[:4])
  assert e.value.field == "mesh"


# --------------------------------------------------------------------- spec_for


@pytest.mark.parametrize(
  "shape, fsdp, spec",
  [
    ((128,), 2, P("fsdp")),
    ((32, 128), 2, P(None, "fsdp")),  # Largest divisible axis.
    ((128, 10), 2, P("fsdp")),
    ((10, 7), 4, P()),  # Nothing divisible: replicated.
    ((6, 128, 4, 32), 4, P(None, "fsdp")),
    ((1, 65, 128), 2, P(None, None, "fsdp")),  # The largest axis (65) is not divisible.
    ((1, 65, 3), 2, P()),
    ((3,), 4, P()),
    ((2,), 4, P()),  # Smaller than the fsdp axis.
    ((0, 8), 2, P(None, "fsdp")),  # An empty axis is never picked.
    ((0,), 2, P()),
    ((), 2, P()),  # Scalars.
    ((), 1, P()),
    ((128, 64), 1, P()),  # fsdp == 1: everything replicated.
    ((64, 64), 2, P(None, "fsdp")),  # Ties: the later axis.
    ((8, 8, 8), 4, P(None, None, "fsdp")),
    ((16, 4, 16), 4, P(None, None, "fsdp")),
    ((16, 4, 8), 4, P("fsdp")),
  ],
)
def test_spec_for(shape, fsdp, spec):
  assert sharding.spec_for(shape, fsdp) == spec


# ---------------------------------------------------------------- tree_shardings


@pytest.fixture(scope="module")
def mu_params():
  """Mu/4's params for 32 px images: the model's own tree and shapes, filled with distinct values.

  (eval_shape + numpy, since compiling the init would take most of this file's time budget.)
  """
  model = vit.build({"variant": "Mu/4", "num_classes": 10})
  images = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, images, train=False)["params"], jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _assert_follows_rule(shape, spec, fsdp):
  axis = _fsdp_axis(spec)
  divisible = [i for i, n in enumerate(shape) if n >= fsdp and n % fsdp == 0]
  if fsdp == 1 or not divisible:
    assert axis is None, (shape, spec)
    return
  assert axis in divisible, (shape, spec)
  largest = max(shape[i] for i in divisible)
  assert shape[axis] == largest, (shape, spec)
  assert axis == max(i for i in divisible if shape[i] == largest), (shape, spec)  # Ties: later.


def test_tree_shardings_on_vit_params(mu_params):
  mesh = sharding.make_mesh(4, 2)
  shardings = sharding.tree_shardings(mesh, mu_params)
  assert jax.tree.structure(shardings) == jax.tree.structure(mu_params)
  # Abstract params (as the train step passes) get the same shardings.
  assert shardings == sharding.tree_shardings(mesh, jax.eval_shape(lambda: mu_params))

  for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    leaf = mu_params
    for k in path:
      leaf = leaf[k.key]
    assert isinstance(s, NamedSharding) and s.mesh == mesh
    _assert_follows_rule(leaf.shape, s.spec, 2)

  enc = shardings["Transformer"]["encoderblock_3"]
  assert shardings["embedding"]["kernel"].spec == P(None, None, None, "fsdp")  # [4, 4, 3, 128]
  assert shardings["pos_embedding"].spec == P(None, None, "fsdp")  # [1, 65, 128]
  assert shardings["head"]["kernel"].spec == P("fsdp")  # [128, 10]
  assert shardings["head"]["bias"].spec == P("fsdp")  # [10]
  assert enc["MultiHeadDotProductAttention_0"]["query"]["kernel"].spec == P("fsdp")  # [128, 4, 32]
  assert enc["MultiHeadDotProductAttention_0"]["query"]["bias"].spec == P(None, "fsdp")  # [4, 32]
  assert enc["MultiHeadDotProductAttention_0"]["out"]["kernel"].spec == P(None, None, "fsdp")
  assert enc["MlpBlock_0"]["Dense_0"]["kernel"].spec == P(None, "fsdp")  # [128, 512]
  assert enc["LayerNorm_0"]["scale"].spec == P("fsdp")  # [128]


def test_tree_shardings_device_put(mu_params):
  mesh = sharding.make_mesh(4, 2)
  shardings = sharding.tree_shardings(mesh, mu_params)
  placed = jax.device_put(mu_params, shardings)

  def check(x, s, placed_x):
    assert placed_x.sharding.is_equivalent_to(s, x.ndim)
    axis = _fsdp_axis(s.spec)
    want = list(x.shape)
    if axis is not None:
      want[axis] //= 2
    shards = placed_x.addressable_shards
    assert len(shards) == 8
    for shard in shards:
      assert shard.data.shape == tuple(want)
      np.testing.assert_array_equal(shard.data, np.asarray(x)[shard.index])
    np.testing.assert_array_equal(placed_x, x)

  jax.tree.map(check, mu_params, shardings, placed)


def test_tree_shardings_scan_layout_and_scalars(mu_params):
  mesh = sharding.make_mesh(2, 4)
  tree = {"params": vit.loop_to_scan(mu_params), "count": jnp.zeros((), jnp.int32)}
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(lambda: tree))
  assert shardings["count"].spec == P()
  block = shardings["params"]["Transformer"]["encoderblock"]
  assert block["LayerNorm_0"]["scale"].spec == P(None, "fsdp")  # [6, 128]
  assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"].spec == P(
    None, "fsdp"
  )  # [6,128,4,32]
  assert block["MultiHeadDotProductAttention_0"]["query"]["bias"].spec == P(
    None, None, "fsdp"
  )  # [6,4,32]
  assert shardings["params"]["head"]["bias"].spec == P()  # [10]: 4 does not divide it.


# -------------------------------------------------------------------- check_batch


def test_check_batch():
  mesh = sharding.make_mesh(4, 2)
  sharding.check_batch(16, mesh)
  sharding.check_batch(8, mesh, "data.eval_batch_size")
  with pytest.raises(ConfigError) as e:
    sharding.check_batch(12, mesh, "data.eval_batch_size")
  assert e.value.field == "data.eval_batch_size"
  with pytest.raises(ConfigError) as e:
    sharding.check_batch(4, mesh)
  assert e.value.field == "data.batch_size"
  sharding.check_batch(3, sharding.make_mesh(1, 1, devices=jax.devices()[:1]))


# ------------------------------------------------------------------- global_batch


def test_global_batch():
  mesh = sharding.make_mesh(4, 2)
  local = {
    "image": np.arange(16 * 4 * 4 * 3, dtype=np.uint8).reshape(16, 4, 4, 3),
    "label": np.arange(16, dtype=np.int32) * 3,
  }
  batch = sharding.global_batch(local, mesh)
  assert set(batch) == {"image", "label"}
  want_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  for k, x in batch.items():
    assert isinstance(x, jax.Array)
    assert x.shape == local[k].shape and x.dtype == local[k].dtype
    assert x.sharding.is_equivalent_to(want_sharding, x.ndim)
    np.testing.assert_array_equal(x, local[k])
    # Split over all 8 devices, two examples each, data-major.
    positions = {d.id: idx for idx, d in np.ndenumerate(mesh.devices)}
    for shard in x.addressable_shards:
      i, j = positions[shard.device.id]
      start = (i * 2 + j) * 2
      assert shard.data.shape == (2,) + local[k].shape[1:]
      np.testing.assert_array_equal(shard.data, local[k][start : start + 2])
  # The arrays go straight into a jitted function over the mesh.
  total = jax.jit(lambda b: b["label"].sum())(batch)
  assert int(total) == int(local["label"].sum())


class _FakeDevice:
  device_kind = "FakeAccelerator"

  def __init__(self, limit):
    self._limit = limit

  def memory_stats(self):
    return {"bytes_limit": self._limit}


def test_bytes_per_device_follows_shardings():
  mesh = sharding.make_mesh(4, 2)
  tree = {
    "w": jax.ShapeDtypeStruct((16, 8), jnp.float32),
    "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16),
  }
  got = sharding.bytes_per_device(tree, sharding.tree_shardings(mesh, tree))
  assert got == 16 * 8 * 4 // 2 + 3 * 2  # w split over fsdp=2, b replicated


def test_activation_estimate_and_fit_check():
  kw = dict(tokens=197, width=1024, mlp_dim=4096, heads=16, depth=24, mm_bytes=2, maps_kept=0)
  none, dots, full = (
    sharding.activation_bytes(examples=32, remat_policy=p, **kw) for p in ("none", "dots", "full")
  )
  assert full < dots < none
  assert sharding.activation_bytes(examples=64, remat_policy="none", **kw) == 2 * none
  assert (
    sharding.activation_bytes(examples=32, remat_policy="none", **{**kw, "maps_kept": 18}) > none
  )
  estimate = {"params": 2**30, "activations": 2**30}
  assert "2.00 GiB of 4.00 GiB" in sharding.check_fits(estimate, _FakeDevice(4 * 2**30))
  with pytest.raises(ConfigError, match="will not fit") as e:
    sharding.check_fits(estimate, _FakeDevice(2 * 2**30))
  assert e.value.field == "data.batch_size"
  # CPU: the host's RAM, shared by the local CPU devices, is the limit (it used to be no limit at all).
  ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  per_device = ram // len(jax.local_devices())
  line = sharding.check_fits({"params": per_device // 2})
  assert f"of {per_device / 2**30:.2f} GiB (host RAM / 8 CPU devices)" in line
  with pytest.raises(ConfigError, match="will not fit") as e:
    sharding.check_fits({"activations": per_device})
  assert e.value.field == "data.batch_size"


# -------------------------------------------------------------- activation constraints


@pytest.mark.parametrize("data, fsdp", [(1, 8), (2, 4)])
def test_attention_maps_stay_sharded_along_the_batch(data, fsdp):
  """Traced under `on_mesh`, every layer pins its [B, H, N, N] maps to the batch axes (the annotation is in
  the program, one per layer), and the maps come out split along the batch under pure FSDP too."""
  model = vit.build({"variant": "Mu/4", "num_classes": 10, "num_heads": 8, "depth": 3})
  mesh = sharding.make_mesh(data, fsdp)
  images = jnp.zeros((8, 28, 28, 3))
  params = model.init(jax.random.key(0), images[:1], train=False)["params"]
  params = jax.device_put(params, sharding.tree_shardings(mesh, params))
  images = jax.device_put(images, sharding.batch_sharding(mesh))
  maps = lambda p, x: model.apply({"params": p}, x, train=False)[1]["attn_logits"]
  program = jax.jit(sharding.on_mesh(maps, mesh)).lower(params, images).as_text()
  pinned = [line for line in program.splitlines() if "sharding_constraint" in line]
  assert len(pinned) == model.depth and all(
    '[{"data", "fsdp"}, {}, {}, {}]' in line and "8x8x50x50" in line for line in pinned
  ), pinned
  out = jax.jit(sharding.on_mesh(maps, mesh))(params, images)
  assert out.sharding.spec == P(None, sharding.BATCH_AXES if data > 1 else "fsdp")
  # Outside a mesh context (a plain model.apply) the call is a no-op; the values agree to float rounding.
  np.testing.assert_allclose(
    out, maps(jax.device_get(params), np.zeros((8, 28, 28, 3), np.float32)), rtol=1e-5, atol=1e-6
  )
