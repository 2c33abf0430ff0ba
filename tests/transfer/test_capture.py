"""Attention distillation into a user's own flax model (`transfer.capture`): the captured logits are
q.k / sqrt(d) of the user's attention params, the loss is the numpy reference, its gradient reaches the
user's attention under jit, for linen (loop, scan, remat) and NNX models; what it cannot read it refuses.

The user models are small ViT-likes on flax's attention modules, shaped as the shared teacher (Pico/4,
depth 4, 16 px: 2 heads over 17 tokens)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from at_jax.transfer import capture
from tests.transfer.conftest import B, S

WIDTH, HEADS, PATCH = 32, 2, 4
TOKENS = (S // PATCH) ** 2 + 1
PAIRS = {0: 1, 1: 3}  # user layer -> teacher layer


def _patches(images_BYXC: jax.Array) -> jax.Array:
  b, size, _, c = images_BYXC.shape
  grid = size // PATCH
  x = images_BYXC.reshape(b, grid, PATCH, grid, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * grid, PATCH * PATCH * c)


class Block(nn.Module):
  attention_fn: object = nn.dot_product_attention

  @nn.compact
  def __call__(self, x_BND, _=None):
    attn = nn.MultiHeadDotProductAttention(HEADS, attention_fn=self.attention_fn)
    return x_BND + attn(nn.LayerNorm()(x_BND)), None


class LinenUser(nn.Module):
  """Patches, a cls token, two blocks (unrolled, scanned or rematerialised) and a classifier."""

  layers: str = "loop"
  attention_fn: object = nn.dot_product_attention
  scan_collections: tuple = (capture.COLLECTION,)

  @nn.compact
  def __call__(self, images_BYXC):
    x_BND = nn.Dense(WIDTH)(_patches(images_BYXC))
    cls_BND = self.param("cls", nn.initializers.normal(1.0), (1, 1, WIDTH))
    x_BND = jnp.concatenate([jnp.tile(cls_BND, (x_BND.shape[0], 1, 1)), x_BND], axis=1)
    if self.layers == "scan":
      axes = {"params": 0, **dict.fromkeys(self.scan_collections, 0)}
      scanned = nn.scan(Block, variable_axes=axes, split_rngs={"params": True}, length=2)
      x_BND, _ = scanned(self.attention_fn, name="blocks")(x_BND, None)
    else:
      block = nn.remat(Block) if self.layers == "remat" else Block
      for i in range(2):
        x_BND, _ = block(self.attention_fn, name=f"block{i}")(x_BND)
    return nn.Dense(10)(x_BND.mean(axis=1))


class NNXBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)

  def __call__(self, x_BND):
    return x_BND + self.attn(self.norm(x_BND))


class NNXUser(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, remat: bool = False):
    self.remat = remat
    self.embed = nnx.Linear(PATCH * PATCH * 3, WIDTH, rngs=rngs)
    self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, WIDTH)))
    self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])
    self.head = nnx.Linear(WIDTH, 10, rngs=rngs)

  def tokens(self, images_BYXC):
    x_BND = self.embed(_patches(images_BYXC))
    return jnp.concatenate([jnp.tile(self.cls[...], (x_BND.shape[0], 1, 1)), x_BND], axis=1)

  def __call__(self, images_BYXC):
    x_BND = self.tokens(images_BYXC)
    for block in self.blocks:
      x_BND = nnx.remat(lambda b, x: b(x))(block, x_BND) if self.remat else block(x_BND)
    return self.head(x_BND.mean(axis=1))


@pytest.fixture(scope="module")
def user(setup):
  _, teacher, _, tp, images = setup
  model = LinenUser()
  params = model.init(jax.random.key(3), images)["params"]
  teacher_LBHNN = capture.teacher_attention(teacher, tp, images)
  return model, params, images, teacher_LBHNN


def _qk_by_hand(x_BND, query, key):
  """q.k / sqrt(d) of DenseGeneral/LinearGeneral params ({kernel [D, H, K], bias [H, K]}), float64."""
  x = np.asarray(x_BND, np.float64)
  q = np.einsum("bnd,dhk->bnhk", x, np.asarray(query["kernel"], np.float64)) + query["bias"]
  k = np.einsum("bnd,dhk->bnhk", x, np.asarray(key["kernel"], np.float64)) + key["bias"]
  return np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])


def _ce_reference(teacher_BHNN, student_BHNN) -> float:
  t = np.asarray(teacher_BHNN, np.float64)
  s = np.asarray(student_BHNN, np.float64)
  p = np.exp(t - t.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  log_q = s - s.max(-1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
  return float(np.mean(-(p * log_q).sum(-1)))


def test_linen_capture_is_qk_of_the_users_attention_params(user):
  model, params, images, _ = user
  out, captured = capture.apply_linen(model, {"params": params}, images)
  np.testing.assert_array_equal(out, model.apply({"params": params}, images))  # output untouched
  assert captured.names == (
    "block0/MultiHeadDotProductAttention_0",
    "block1/MultiHeadDotProductAttention_0",
  )
  # The attention's input, each block's LayerNorm output, from linen's own intermediates.
  _, state = model.apply(
    {"params": params},
    images,
    capture_intermediates=lambda m, _: isinstance(m, nn.LayerNorm),
    mutable=["intermediates"],
  )
  for i, logits_BHNN in enumerate(captured.logits):
    assert logits_BHNN.shape == (B, HEADS, TOKENS, TOKENS) and logits_BHNN.dtype == jnp.float32
    x_BND = state["intermediates"][f"block{i}"]["LayerNorm_0"]["__call__"][0]
    attn = params[f"block{i}"]["MultiHeadDotProductAttention_0"]
    expected = _qk_by_hand(x_BND, attn["query"], attn["key"])
    np.testing.assert_allclose(logits_BHNN, expected, rtol=1e-4, atol=1e-4)


def test_a_subclass_of_flax_attention_is_captured_once():
  """nn.SelfAttention's __call__ calls its base's: the interceptor sees the module twice per call."""

  class SelfAttentionUser(nn.Module):
    @nn.compact
    def __call__(self, x_BND):
      return nn.SelfAttention(HEADS)(x_BND)

  x_BND = jax.random.normal(jax.random.key(0), (B, TOKENS, WIDTH))
  model = SelfAttentionUser()
  params = model.init(jax.random.key(1), x_BND)["params"]
  out, captured = capture.apply_linen(model, {"params": params}, x_BND)
  np.testing.assert_array_equal(out, model.apply({"params": params}, x_BND))
  assert captured.names == ("SelfAttention_0",)
  attn = params["SelfAttention_0"]
  expected = _qk_by_hand(x_BND, attn["query"], attn["key"])
  np.testing.assert_allclose(captured.logits[0], expected, rtol=1e-4, atol=1e-4)


def test_loss_equals_the_numpy_reference(user):
  model, params, images, teacher_LBHNN = user
  _, captured = capture.apply_linen(model, {"params": params}, images)
  value = capture.distill_loss(captured, teacher_LBHNN, PAIRS)
  expected = sum(_ce_reference(teacher_LBHNN[t], captured.logits[u]) for u, t in PAIRS.items())
  np.testing.assert_allclose(value, 3.0 * expected, rtol=1e-5)
  # Pairs by name mean the same; the weight scales it.
  by_name = {captured.names[u]: t for u, t in PAIRS.items()}
  halved = capture.distill_loss(captured, teacher_LBHNN, by_name, weight=1.5)
  np.testing.assert_allclose(halved, 1.5 * expected, rtol=1e-5)
  # A user model that *is* the teacher in those layers scores the teacher's entropy, the minimum.
  same = capture.Captured(("a", "b"), (teacher_LBHNN[1], teacher_LBHNN[3]))
  entropy = sum(_ce_reference(teacher_LBHNN[t], teacher_LBHNN[t]) for t in (1, 3))
  np.testing.assert_allclose(capture.distill_loss(same, teacher_LBHNN, {0: 1, 1: 3}), 3 * entropy)


def _attention_grads(grads, names=("block0", "block1")):
  return [grads[n]["MultiHeadDotProductAttention_0"] for n in names]


def test_gradient_reaches_the_users_attention_under_jit(user):
  model, params, images, teacher_LBHNN = user

  def loss_fn(params):
    _, captured = capture.apply_linen(model, {"params": params}, images)
    return capture.distill_loss(captured, teacher_LBHNN, PAIRS)

  value, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  np.testing.assert_allclose(value, loss_fn(params), rtol=1e-5)
  for attn in _attention_grads(grads):
    assert float(jnp.abs(attn["query"]["kernel"]).sum()) > 0
    assert float(jnp.abs(attn["key"]["kernel"]).sum()) > 0
  # The loss reads attention only: the classifier gets nothing.
  assert float(jnp.abs(grads["Dense_1"]["kernel"]).sum()) == 0


def test_scan_and_remat_capture_the_same_layers(user):
  model, params, images, _ = user
  _, looped = capture.apply_linen(model, {"params": params}, images)
  remat = LinenUser(layers="remat")
  _, rematted = capture.apply_linen(remat, {"params": params}, images)
  scan = LinenUser(layers="scan")
  stacked = jax.tree.map(lambda *a: jnp.stack(a), params["block0"], params["block1"])
  scan_params = {k: v for k, v in params.items() if not k.startswith("block")}
  _, scanned = capture.apply_linen(scan, {"params": {**scan_params, "blocks": stacked}}, images)
  assert scanned.names == tuple(f"blocks/MultiHeadDotProductAttention_0[{i}]" for i in range(2))
  for a, b, c in zip(looped.logits, rematted.logits, scanned.logits):
    np.testing.assert_allclose(b, a, rtol=1e-6)
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
  # A scan that does not carry the collection out is named, not silently skipped.
  undeclared = LinenUser(layers="scan", scan_collections=())
  with pytest.raises(ValueError, match="variable_axes"):
    capture.apply_linen(undeclared, {"params": {**scan_params, "blocks": stacked}}, images)


def test_nnx_user_model(user):
  _, _, images, teacher_LBHNN = user
  model = NNXUser(nnx.Rngs(0))
  out, captured = capture.call_nnx(model, images)
  np.testing.assert_array_equal(out, model(images))
  assert captured.names == ("blocks/0/attn", "blocks/1/attn")
  x_BND = model.tokens(images)
  for block, logits_BHNN in zip(model.blocks, captured.logits):
    attn = block.attn
    params = {n: nnx.to_pure_dict(nnx.state(getattr(attn, n))) for n in ("query", "key")}
    expected = _qk_by_hand(block.norm(x_BND), params["query"], params["key"])
    np.testing.assert_allclose(logits_BHNN, expected, rtol=1e-4, atol=1e-4)
    x_BND = block(x_BND)
    assert attn.attention_fn is nnx.dot_product_attention  # left as it came

  def loss_fn(model):
    _, captured = capture.call_nnx(model, images)
    return capture.distill_loss(captured, teacher_LBHNN, PAIRS)

  value, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  expected = sum(_ce_reference(teacher_LBHNN[t], captured.logits[u]) for u, t in PAIRS.items())
  np.testing.assert_allclose(value, 3.0 * expected, rtol=1e-5)
  for i in range(2):
    assert float(jnp.abs(grads["blocks"][i]["attn"]["query"]["kernel"][...]).sum()) > 0
  # jax.jit over the split model works too.
  graphdef, state = nnx.split(model)
  pure = jax.jit(lambda state: loss_fn(nnx.merge(graphdef, state)))
  np.testing.assert_allclose(pure(state), value, rtol=1e-5)


class HandWritten(nn.Module):
  @nn.compact
  def __call__(self, images_BYXC):
    x_BND = nn.Dense(WIDTH)(_patches(images_BYXC))
    q_BND, k_BND = nn.Dense(WIDTH)(x_BND), nn.Dense(WIDTH)(x_BND)
    weights_BNN = jax.nn.softmax(q_BND @ k_BND.transpose(0, 2, 1) / np.sqrt(WIDTH))
    return (weights_BNN @ x_BND).mean(axis=1)


def test_refuses_what_it_cannot_read(user):
  _, params, images, teacher_LBHNN = user
  custom = LinenUser(attention_fn=functools.partial(nn.dot_product_attention))
  with pytest.raises(ValueError, match="block0/MultiHeadDotProductAttention_0: its attention_fn"):
    capture.apply_linen(custom, {"params": params}, images)
  hand = HandWritten()
  hand_params = hand.init(jax.random.key(0), images)["params"]
  with pytest.raises(ValueError, match="no flax attention module ran"):
    capture.apply_linen(hand, {"params": hand_params}, images)
  nnx_model = NNXUser(nnx.Rngs(0))
  nnx_model.blocks[1].attn.attention_fn = functools.partial(nnx.dot_product_attention)
  with pytest.raises(ValueError, match="blocks/1/attn: its attention_fn"):
    capture.call_nnx(nnx_model, images)
  # nnx.capture does not reach into an nnx.remat inside the model: named, never a shorter list.
  with pytest.raises(
    ValueError, match="blocks/0/attn ran but its attention logits did not come back"
  ):
    capture.call_nnx(NNXUser(nnx.Rngs(0), remat=True), images)


def test_refuses_mismatched_layers_heads_and_tokens(user):
  model, params, images, teacher_LBHNN = user
  _, captured = capture.apply_linen(model, {"params": params}, images)
  with pytest.raises(ValueError, match="2 attention layers .* teacher's stack 4: pass pairs"):
    capture.distill_loss(captured, teacher_LBHNN)
  with pytest.raises(ValueError, match="differ in heads"):
    capture.distill_loss(captured, teacher_LBHNN[:, :, :1], PAIRS)
  with pytest.raises(ValueError, match="differ in tokens"):
    capture.distill_loss(captured, teacher_LBHNN[..., 1:, 1:], PAIRS)
  with pytest.raises(ValueError, match="differ in batch"):
    capture.distill_loss(captured, teacher_LBHNN[:, :1], PAIRS)
  with pytest.raises(ValueError, match="no attention layer 'block9'"):
    capture.distill_loss(captured, teacher_LBHNN, {"block9": 0})
  with pytest.raises(ValueError, match="teacher layer 4 is not in"):
    capture.distill_loss(captured, teacher_LBHNN, {0: 4})
  with pytest.raises(ValueError, match="appears twice"):
    capture.distill_loss(captured, teacher_LBHNN, {0: 1, captured.names[0]: 2})
