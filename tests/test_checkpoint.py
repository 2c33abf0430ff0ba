"""Tests for at_jax.checkpoint: real orbax checkpoints on disk, sharded arrays."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from at_jax import checkpoint
from at_jax.errors import ConfigError

# After a failed read of a corrupt checkpoint, tensorstore may still call back
# into orbax's closed asyncio loop; harmless, but pytest reports it during
# whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@struct.dataclass
class _State:
  step: jax.Array
  params: dict
  key: jax.Array
  raw_key: jax.Array
  lr: float


def _state(seed: int = 0) -> _State:
  params = {
    "dense": {
      "kernel": jnp.arange(32.0).reshape(4, 8) + seed,
      "bias": jnp.full((8,), seed, jnp.bfloat16),
    },
    "count": jnp.array([seed, 2, 3], jnp.int32),
  }
  return _State(
    step=jnp.array(seed, jnp.int32),
    params=params,
    key=jax.random.key(seed),
    raw_key=jax.random.PRNGKey(seed),
    lr=0.5,
  )


def _assert_state_equal(got: _State, want: _State):
  assert isinstance(got, _State)
  np.testing.assert_array_equal(got.step, want.step)
  for g, w in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(g, w)
  assert jax.dtypes.issubdtype(got.key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(want.key))
  assert got.raw_key.dtype == jnp.uint32
  np.testing.assert_array_equal(got.raw_key, want.raw_key)
  assert float(got.lr) == want.lr


def _mesh(shape):
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(shape, ("data", "fsdp"), axis_types=auto)


def test_round_trip_with_dataclass_keys_and_extra(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=1)
  state = _state(seed=7)
  extra = {"data_position": 1234, "config": {"name": "vit", "lr": 0.1}}
  assert ckpt.save(7, state, extra=extra)
  assert ckpt.latest_step() == 7
  # Restore into abstract and into concrete targets.
  for target in (jax.eval_shape(lambda: state), _state(seed=0)):
    got, got_extra = ckpt.restore(target)
    _assert_state_equal(got, state)
    assert got_extra == extra
  ckpt.close()


def test_relative_directory_and_reopen(tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.Checkpointer("rel/ckpt", save_every=2)
  assert ckpt.save(2, _state(2))  # No `extra`: restores as {}.
  ckpt.close()
  reopened = checkpoint.Checkpointer(str(tmp_path / "rel/ckpt"), save_every=2)
  assert reopened.latest_step() == 2
  with caplog.at_level("WARNING"):
    got, extra = reopened.restore(jax.eval_shape(lambda: _state(2)))
  assert not caplog.records  # a resume, as a relaunch's: orbax says nothing alarming
  _assert_state_equal(got, _state(2))
  assert extra == {}
  reopened.close()


def test_restore_into_other_shardings(tmp_path):
  mesh = _mesh((4, 2))
  saved = {
    "w": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "fsdp"))),
    "b": jax.device_put(jnp.arange(8, dtype=jnp.bfloat16), NamedSharding(mesh, P("fsdp"))),
    "key": jax.device_put(jax.random.key(3), NamedSharding(mesh, P())),
  }
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1)
  ckpt.save(1, saved)
  ckpt.wait()

  other = _mesh((2, 4))
  for shardings in (
    jax.tree.map(lambda _: NamedSharding(mesh, P()), saved),  # Replicated.
    {
      "w": NamedSharding(other, P("fsdp", "data")),
      "b": NamedSharding(other, P("fsdp")),
      "key": NamedSharding(other, P()),
    },
  ):
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, shardings
    )
    got, _ = ckpt.restore(target)
    for name in ("w", "b"):
      assert got[name].sharding == shardings[name]
      assert got[name].dtype == saved[name].dtype
      np.testing.assert_array_equal(got[name], saved[name])
    assert got["key"].sharding == shardings["key"]
    np.testing.assert_array_equal(
      jax.random.key_data(got["key"]), jax.random.key_data(saved["key"])
    )
  ckpt.close()


def test_keep_last_n_and_save_every(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=2, keep=2)
  started = [ckpt.save(step, {"x": jnp.full((2,), step)}) for step in (1, 2, 3)]
  assert started == [False, True, False]
  assert ckpt.save(3, {"x": jnp.full((2,), 3)}, force=True)
  # Already saved: a forced save of the same step is a no-op, not an error.
  assert not ckpt.save(3, {"x": jnp.full((2,), 3)}, force=True)
  assert ckpt.save(4, {"x": jnp.full((2,), 4)})
  assert ckpt.save(5, {"x": jnp.full((2,), 5)}, force=True)
  ckpt.wait()
  assert ckpt.latest_step() == 5
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [4, 5]
  target = {"x": jax.ShapeDtypeStruct((2,), jnp.int32)}
  got, _ = ckpt.restore(target, step=4)
  np.testing.assert_array_equal(got["x"], [4, 4])
  with pytest.raises(ConfigError, match="step 2"):
    ckpt.restore(target, step=2)  # Deleted by keep=2.
  ckpt.close()


def _truncate(files):
  for name in files:  # As a copy killed midway, or a torn write, would leave them.
    with open(name, "rb") as f:
      data = f.read()
    with open(name, "wb") as f:
      f.write(data[: len(data) // 2])


def test_torn_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), extra={"step": step})
  ckpt.wait()
  files = glob.glob(
    os.path.join(str(tmp_path), "3", "state", "**", "manifest.ocdbt"), recursive=True
  )
  files += glob.glob(os.path.join(str(tmp_path), "3", "state", "_METADATA"))
  assert files
  _truncate(files)
  state, extra = ckpt.restore(_state(0))
  _assert_state_equal(state, _state(2))
  assert extra == {"step": 2}
  assert "resumed from step 2" in capsys.readouterr().out
  with pytest.raises(Exception):  # noqa: B017 - an explicit step restores as asked, or fails
    ckpt.restore(_state(0), step=3)
  # The run retrains step 3 from step 2: its save replaces the damaged one, so a second interruption
  # resumes from it rather than falling back to step 2 again.
  capsys.readouterr()
  assert ckpt.save(3, _state(33), extra={"step": 3})
  state, extra = ckpt.restore(_state(0))
  _assert_state_equal(state, _state(33))
  assert extra == {"step": 3} and "unreadable" not in capsys.readouterr().out
  for step in (1, 2, 3):
    _truncate(glob.glob(os.path.join(str(tmp_path), str(step), "state", "_METADATA")))
  with pytest.raises(ConfigError, match="no readable checkpoint"):
    ckpt.restore(_state(0))
  ckpt.close()


def test_two_damaged_steps_make_way_for_the_retrained_ones(tmp_path):
  """Steps 2 and 3 unreadable: resumed from 1, the run's save of 2 replaces 2 and drops 3 (orbax saves
  no step below its latest), so the next resume starts from the retrained 2."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=4)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), extra={"step": step})
  ckpt.wait()
  for step in (2, 3):
    _truncate(glob.glob(os.path.join(str(tmp_path), str(step), "state", "_METADATA")))
  _assert_state_equal(ckpt.restore(_state(0))[0], _state(1))
  assert ckpt.save(2, _state(22), extra={"step": 2})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  _assert_state_equal(ckpt.restore(_state(0))[0], _state(22))
  ckpt.close()


def test_a_checkpoint_of_another_model_is_named_as_such(tmp_path):
  """Arrays of other shapes are another run's state, not a damaged file: one error naming the first
  that differs, rather than 'unreadable' for every step and a fallback that cannot help."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}, force=True)
  ckpt.wait()
  with pytest.raises(
    ConfigError, match=r"holds another model: \['w'\] is \(3, 4\) there, \(3, 8\)"
  ) as e:
    ckpt.restore({"w": jnp.ones((3, 8)), "b": jnp.zeros(4)})
  assert e.value.field == "model"
  state, _ = ckpt.restore({"w": jnp.zeros((3, 4)), "b": jnp.ones(4)})  # the control: same shapes
  np.testing.assert_array_equal(state["w"], np.ones((3, 4)))
  ckpt.close()


def test_empty_directory(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "none"), save_every=10)
  assert ckpt.latest_step() is None
  with pytest.raises(ConfigError, match="no checkpoint") as e:
    ckpt.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
  assert e.value.field == str(tmp_path / "none")
  ckpt.close()


def test_bad_options(tmp_path):
  """The Checkpointer's save_every and keep are ckpt.every_steps and ckpt.keep: errors name those."""
  with pytest.raises(ConfigError, match="must be >= 1, got 0") as e:
    checkpoint.Checkpointer(str(tmp_path), save_every=0)
  assert e.value.field == "ckpt.every_steps"
  with pytest.raises(ConfigError, match="must be >= 1, got 0") as e:
    checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=0)
  assert e.value.field == "ckpt.keep"


_CONFIG = {"depth": 2, "width": 8, "num_heads": 2, "patch_size": 4}


def _params():
  return {
    "embed": {"kernel": jnp.arange(48.0).reshape(6, 8)},
    "blocks": {"0": {"scale": jnp.ones((8,), jnp.bfloat16)}},
  }


def test_params_round_trip_and_overwrite(tmp_path):
  path = str(tmp_path / "teacher")
  checkpoint.save_params(path, {"old": jnp.zeros(3)}, {"depth": 99})
  checkpoint.save_params(path, _params(), _CONFIG)  # Overwrites.
  config, params = checkpoint.load_params(path)
  assert config == _CONFIG
  want = _params()
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for got, exp in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert got.dtype == exp.dtype
    np.testing.assert_array_equal(got, exp)


def test_load_params_with_shardings(tmp_path):
  path = str(tmp_path / "teacher")
  mesh = _mesh((4, 2))
  params = jax.device_put(_params(), NamedSharding(mesh, P()))
  checkpoint.save_params(path, params, _CONFIG)
  other = _mesh((2, 4))
  shardings = {
    "embed": {"kernel": NamedSharding(other, P("data", "fsdp"))},
    "blocks": {"0": {"scale": NamedSharding(other, P())}},
  }
  _, got = checkpoint.load_params(path, shardings)
  assert got["embed"]["kernel"].sharding == shardings["embed"]["kernel"]
  np.testing.assert_array_equal(got["embed"]["kernel"], _params()["embed"]["kernel"])


def _assert_teacher_error(path: str, match: str):
  with pytest.raises(ConfigError, match=match) as e:
    checkpoint.load_params(path)
  assert e.value.field == path
  # every reader of exports is named, not only the teacher's (evaluate.py --models reads them too)
  assert all(name in str(e.value) for name in ("teacher.init", "model.init", "--models"))


def test_load_params_missing_path(tmp_path):
  _assert_teacher_error(str(tmp_path / "nope"), "does not exist")


def test_load_params_missing_config(tmp_path):
  path = str(tmp_path / "teacher")
  checkpoint.save_params(path, _params(), _CONFIG)
  os.remove(os.path.join(path, "model_config.json"))
  _assert_teacher_error(path, "model_config.json")


@pytest.mark.parametrize("victim", ["_METADATA", "manifest.ocdbt", "d/*"])
def test_load_params_corrupt_checkpoint(tmp_path, victim):
  path = str(tmp_path / "teacher")
  checkpoint.save_params(path, _params(), _CONFIG)
  files = glob.glob(os.path.join(path, "params", victim))
  assert files
  for name in files:  # Truncate, as a copy killed midway would.
    with open(name, "rb") as f:
      data = f.read()
    with open(name, "wb") as f:
      f.write(data[: len(data) // 2])
  _assert_teacher_error(path, "unreadable params checkpoint")


def test_load_params_corrupt_config(tmp_path):
  path = str(tmp_path / "teacher")
  checkpoint.save_params(path, _params(), _CONFIG)
  with open(os.path.join(path, "model_config.json"), "w") as f:
    f.write(json.dumps(_CONFIG)[:10])
  _assert_teacher_error(path, "unreadable model_config.json")
