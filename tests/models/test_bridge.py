"""Our ViT from NNX (`models.bridge`): the same numbers as linen's `apply` from the same params (logits,
every layer's attention logits, an attention-copy override), gradients through `nnx.grad`, a params
export loaded, and an `nnx.Optimizer` step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from at_jax import checkpoint
from at_jax.errors import ConfigError
from at_jax.models import bridge, vit
from tests.models.conftest import B, S


def _fields(model: vit.ViT) -> dict:
  return vit.model_fields(model)


def _assert_same(nnx_result, linen_result):
  (a, out_a), (b, out_b) = nnx_result, linen_result
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert set(out_a) == set(out_b)
  for key in out_b:
    np.testing.assert_allclose(out_a[key], out_b[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_nnx_equals_linen_apply(setup):
  model, params, images = setup
  nnx_model = bridge.from_params(_fields(model), params)
  assert isinstance(nnx_model, nnx.Module) and nnx_model.linen.depth == model.depth
  result = nnx_model(images, train=False, want_qkv=True)
  expected = model.apply({"params": params}, images, train=False, want_qkv=True)
  _assert_same(result, expected)
  logits, out = result
  n = (S // 4) ** 2 + 1
  assert logits.shape == (B, 10) and out["attn_logits"].shape == (model.depth, B, 2, n, n)
  for layer in range(model.depth):  # every layer's maps, not just the stack's shape
    np.testing.assert_allclose(out["attn_logits"][layer], expected[1]["attn_logits"][layer])
  # The params are the linen tree, as given.
  assert jax.tree.structure(bridge.linen_params(nnx_model)) == jax.tree.structure(params)


def test_fresh_nnx_model_is_the_linen_model_on_its_own_params():
  model = vit.build({"variant": "Pico/7", "num_classes": 0, "drop_path": 0.5})
  nnx_model = bridge.to_nnx(model, 28, rngs=3)
  images = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  params = bridge.linen_params(nnx_model)
  assert params["pos_embedding"].shape == (1, 17, 32)
  _assert_same(nnx_model(images, train=False), model.apply({"params": params}, images, train=False))
  # train=True draws drop-path masks from the module's own "dropout" stream, a new one per call.
  first, _ = nnx_model(images, train=True)
  second, _ = nnx_model(images, train=True)
  assert first.shape == (2, 32) and not np.allclose(first, second)


def test_attention_copy_override_gives_the_same_result_through_both(setup):
  model, params, images = setup
  teacher_params = model.init(jax.random.key(9), images, train=False)["params"]
  _, teacher_out = model.apply({"params": teacher_params}, images, train=False)
  override = {
    "mask": np.ones((model.depth, model.num_heads), bool),
    "logits": teacher_out["attn_logits"],
  }
  nnx_model = bridge.from_params(_fields(model), params)
  result = nnx_model(images, train=False, override=override)
  _assert_same(result, model.apply({"params": params}, images, train=False, override=override))
  # The student attended with the teacher's maps.
  np.testing.assert_allclose(result[1]["attn_logits"], teacher_out["attn_logits"], rtol=1e-6)


def _loss(nnx_model: bridge.ViTNNX, images: jax.Array, labels: jax.Array) -> jax.Array:
  logits, out = nnx_model(images, train=False)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return ce + 1e-3 * jnp.mean(out["attn_logits"] ** 2)


def test_gradients_flow_through_nnx_grad(setup):
  model, params, images = setup
  labels = jnp.arange(B) % 10
  nnx_model = bridge.from_params(_fields(model), params)
  value, grads = nnx.jit(nnx.value_and_grad(_loss))(nnx_model, images, labels)
  plain = nnx.jit(nnx.grad(_loss))(nnx_model, images, labels)

  def linen_loss(p):
    logits, out = model.apply({"params": p}, images, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + 1e-3 * jnp.mean(out["attn_logits"] ** 2)

  expected_value, expected = jax.jit(jax.value_and_grad(linen_loss))(params)
  np.testing.assert_allclose(value, expected_value, rtol=1e-6)
  grads = nnx.to_pure_dict(grads)
  assert jax.tree.structure(grads) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, expected)
  jax.tree.map(np.testing.assert_allclose, nnx.to_pure_dict(plain), grads)
  query = grads["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]
  assert float(jnp.abs(query["kernel"]).sum()) > 0  # reaches the attention, not just the head


def test_params_export_loads(setup, tmp_path):
  model, params, images = setup
  path = str(tmp_path / "export")
  checkpoint.save_params(path, params, _fields(model))
  nnx_model = bridge.from_export(path)
  _assert_same(nnx_model(images, train=False), model.apply({"params": params}, images, train=False))
  jax.tree.map(np.testing.assert_array_equal, bridge.linen_params(nnx_model), params)
  with pytest.raises(ConfigError, match="does not exist"):
    bridge.from_export(str(tmp_path / "missing"))


def test_params_that_are_not_the_configs_vit_are_refused(setup):
  """Other shapes (a wider config), and params the config does not use (a deeper model's blocks and
  a head into a shallower, headless config: linen would run them truncated, silently)."""
  model, params, _ = setup
  fields = _fields(model)
  for config, says in [
    ({**fields, "width": 64, "mlp_dim": 128}, r"LayerNorm_0/bias: \(32,\) vs \(64,\)"),
    ({**fields, "depth": fields["depth"] - 1}, r"encoderblock_1/LayerNorm_0/bias: \(32,\) vs None"),
    ({**fields, "num_classes": 0}, r"head/kernel: \(32, 10\) vs None"),
  ]:
    with pytest.raises(ConfigError, match=says) as e:
      bridge.from_params(config, params)
    assert e.value.field == "params"


def test_one_optax_step_through_nnx_optimizer(setup):
  model, params, images = setup
  labels = jnp.arange(B) % 10
  nnx_model = bridge.from_params(_fields(model), params)
  optimizer = nnx.Optimizer(nnx_model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(nnx_model, optimizer, images, labels):
    value, grads = nnx.value_and_grad(_loss)(nnx_model, images, labels)
    optimizer.update(nnx_model, grads)
    return value

  before = step(nnx_model, optimizer, images, labels)
  after = _loss(nnx_model, images, labels)
  assert np.isfinite(after) and after < before
  moved = bridge.linen_params(nnx_model)["head"]["kernel"]
  assert not np.allclose(moved, params["head"]["kernel"])
  assert int(optimizer.step[...]) == 1
