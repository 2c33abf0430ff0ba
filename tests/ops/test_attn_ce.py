"""Attention-distillation CE: the streamed implementations (blockwise, Pallas) against the direct formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from at_jax.errors import ConfigError
from at_jax.ops import attn_ce as attn_loss
from at_jax.transfer import spec as transfer

STREAMED = ("blockwise", "pallas")
# float32 throughout; the streamed sums run in a different order (online rescaling, block by block) from
# the direct ones, which moves results by a few float32 ulps of values of order 1-10.
TOL = dict(rtol=1e-5, atol=1e-5)


def _qk(seed: int, b: int, n: int, h: int, dt: int, ds: int, dtype=jnp.float32):
  """Teacher and student q, k [B, N, H, D]; logits of order a few units, so softmaxes are far from flat."""
  rng = np.random.default_rng(
    seed
  )  # numpy, not jax.random: no per-shape compiles in the tests' budget
  shapes = [(b, n, h, dt)] * 2 + [(b, n, h, ds)] * 2
  return [jnp.asarray(2 * rng.standard_normal(s, np.float32), dtype) for s in shapes]


def _prefix_mask(b: int, n: int) -> jax.Array:
  """[B, N]: element i keeps its first max(n - 7 i, 1) keys, like right-padded token sequences."""
  return jnp.asarray(np.arange(n)[None, :] < np.maximum(n - 7 * np.arange(b), 1)[:, None])


@functools.partial(jax.jit, static_argnames=("impl", "block_q", "block_k"))
def _value_and_grads(impl, q_t, k_t, q_s, k_s, key_mask, weights, block_q=128, block_k=128):
  """Per-query CE and the gradients of sum(weights * CE) w.r.t. all four inputs.

  Non-uniform weights make the per-row cotangent g_i differ between rows, as the backward must honour.
  """

  def loss(*qk):
    ce = attn_loss.attention_ce(
      impl,
      *qk,
      scale_t=q_t.shape[-1] ** -0.5,
      scale_s=q_s.shape[-1] ** -0.5,
      key_mask=key_mask,
      block_q=block_q,
      block_k=block_k,
    )
    return jnp.sum(weights * ce), ce

  (_, ce), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q_t, k_t, q_s, k_s)
  return ce, grads


def _weights(b: int, h: int, n: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(99).uniform(0.5, 1.5, (b, h, n)), jnp.float32)


def _assert_same(got, want, **tol):
  (ce, grads), (ce_ref, grads_ref) = got, want
  np.testing.assert_allclose(ce, ce_ref, **tol)
  for name, g, g_ref in zip(("q_s", "k_s"), grads[2:], grads_ref[2:]):
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(g_ref, np.float32), **tol, err_msg=name
    )


@pytest.mark.parametrize("impl", STREAMED)
@pytest.mark.parametrize(
  "n, block_q, block_k, masked, dt, ds",
  [
    (197, 64, 64, False, 16, 16),  # ViT-B/16 at 224 px: 197 tokens, 4 blocks with a ragged last one
    (50, 16, 16, True, 16, 8),  # padding keys masked; teacher and student head dims differ
    (50, 32, 16, True, 8, 16),  # unequal blocks: queries and keys padded to different lengths
  ],
)
def test_streamed_matches_direct(impl, n, block_q, block_k, masked, dt, ds):
  b, h = 2, 2
  qk = _qk(0, b, n, h, dt, ds)
  mask = _prefix_mask(b, n) if masked else None
  args = (*qk, mask, _weights(b, h, n))
  got = _value_and_grads(impl, *args, block_q=block_q, block_k=block_k)
  want = _value_and_grads("direct", *args)
  assert got[0].shape == (b, h, n) and got[0].dtype == jnp.float32
  _assert_same(got, want, **TOL)
  for g in got[1][:2]:  # the frozen teacher gets exactly nothing
    assert not np.any(np.asarray(g))
  for g in want[1][:2]:
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("impl", STREAMED)
def test_streamed_bfloat16_inputs(impl):
  """bf16 q/k are upcast before any math, so the CE matches direct to float32 tolerance; the gradients
  come back in bf16 (the inputs' dtype), so they match to one bf16 rounding (2**-8 relative)."""
  b, n, h = 2, 50, 2
  args = (*_qk(1, b, n, h, 16, 8, jnp.bfloat16), _prefix_mask(b, n), _weights(b, h, n))
  got = _value_and_grads(impl, *args, block_q=16, block_k=16)
  want = _value_and_grads("direct", *args)
  assert got[1][2].dtype == jnp.bfloat16
  np.testing.assert_allclose(got[0], want[0], **TOL)
  _assert_same(got, want, rtol=2**-7, atol=1e-3)


def test_direct_matches_transfer_cross_entropy():
  @jax.jit  # one compile instead of an eager dispatch per op
  def all_three(q_t, k_t, q_s, k_s):
    t = jnp.einsum("bqhd,bkhd->bhqk", q_t, k_t) * 8**-0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q_s, k_s) * 4**-0.5
    return (
      transfer.attention_cross_entropy(t, s),
      attn_loss.ce_from_logits(t, s),
      attn_loss.ce_direct(q_t, k_t, q_s, k_s, scale_t=8**-0.5, scale_s=4**-0.5),
    )

  want, from_logits, direct = all_three(*_qk(2, 2, 20, 3, 8, 4))
  np.testing.assert_allclose(from_logits, want, **TOL)
  np.testing.assert_allclose(direct, want, **TOL)


def test_masked_keys_are_dropped():
  """Masking keys equals cutting them off: the reference's mask semantics, which the others must match."""
  t, s = np.random.default_rng(3).normal(size=(2, 1, 2, 9, 12)).astype(np.float32)
  keep = 8
  mask = np.arange(12)[None, :] < keep
  got = jax.jit(attn_loss.ce_from_logits)(t, s, mask)
  np.testing.assert_allclose(
    got, transfer.attention_cross_entropy(t[..., :keep], s[..., :keep]), **TOL
  )


@jax.jit
def _entropy(q, k, mask, scale):
  logits = jnp.where(mask[:, None, None, :], jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1)


@pytest.mark.parametrize("impl", attn_loss.IMPLS)
def test_minimum_is_teacher_entropy(impl):
  """Student == teacher: CE equals the teacher's attention entropy and the gradient vanishes there."""
  b, n, h = 2, 50, 2
  q, k, _, _ = _qk(4, b, n, h, 16, 16)
  mask = _prefix_mask(b, n)
  ce, grads = _value_and_grads(impl, q, k, q, k, mask, _weights(b, h, n), block_q=16, block_k=16)
  entropy = _entropy(q, k, mask, 16**-0.5)
  np.testing.assert_allclose(ce, entropy, **TOL)
  for g in grads[2:]:
    np.testing.assert_allclose(g, 0.0, atol=1e-5)
  # Any other student does worse.
  q_s, k_s = q + 0.1 * np.random.default_rng(5).standard_normal(q.shape, np.float32), k
  worse, _ = _value_and_grads(impl, q, k, q_s, k_s, mask, _weights(b, h, n), block_q=16, block_k=16)
  assert np.all(np.asarray(worse) >= np.asarray(entropy) - 1e-5)
  assert np.mean(np.asarray(worse) - np.asarray(entropy)) > 1e-3


@pytest.mark.parametrize("impl", attn_loss.IMPLS)
def test_jit_sharded_over_batch_matches_unsharded(impl):
  """Inputs split along batch over the 8 emulated devices give the unsharded result."""
  b, n, h = jax.device_count(), 40, 2
  q_t, k_t, q_s, k_s = _qk(6, b, n, h, 16, 8)
  mask, weights = _prefix_mask(b, n), _weights(b, h, n)
  want = _value_and_grads(impl, q_t, k_t, q_s, k_s, mask, weights, block_q=16, block_k=16)
  batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  sharded = [jax.device_put(x, batch) for x in (q_t, k_t, q_s, k_s, mask, weights)]
  assert len(sharded[0].sharding.device_set) == b
  got = _value_and_grads(impl, *sharded, block_q=16, block_k=16)
  _assert_same(got, want, **TOL)


def test_unknown_impl_names_the_config_field():
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ConfigError, match="transfer.loss_impl") as e:
    attn_loss.attention_ce("flash", q, q, q, q, scale_t=1.0, scale_s=1.0)
  assert e.value.field == "transfer.loss_impl"


def test_shape_mismatch_is_an_error():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="heads"):
    attn_loss.ce_blockwise(
      q, q, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)), scale_t=1.0, scale_s=1.0
    )
