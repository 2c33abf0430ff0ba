"""Attention-distillation CE: the streamed implementations (blockwise, Pallas) against the direct formula,
through the `attention_ce` dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from at_jax.errors import ConfigError
from at_jax.ops import attn_ce
from at_jax.transfer import loss
from tests.ops.conftest import (
  TOL,
  assert_close_bf16,
  assert_same,
  prefix_mask,
  qk_inputs,
  row_weights,
  value_and_grads,
)

STREAMED = ("blockwise", "pallas")


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
  qk = qk_inputs(0, b, n, h, dt, ds)
  mask = prefix_mask(b, n) if masked else None
  args = (*qk, mask, row_weights(b, h, n))
  got = value_and_grads(impl, *args, block_q=block_q, block_k=block_k)
  want = value_and_grads("direct", *args)
  assert got[0].shape == (b, h, n) and got[0].dtype == jnp.float32
  assert_same(got, want, **TOL)
  for g in got[1][:2]:  # the frozen teacher gets exactly nothing
    assert not np.any(np.asarray(g))
  for g in want[1][:2]:
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("impl", STREAMED)
def test_streamed_bfloat16_inputs(impl):
  """The CE matches direct to float32 tolerance: blockwise upcasts bf16 q/k before any math, and the
  kernels' bf16 dots form exact products that accumulate in float32. The gradients come back in bf16
  (the inputs' dtype): blockwise's match to one bf16 rounding (2**-8 relative); the kernels also round
  their ds tiles to bf16 before the dq/dk dots (`assert_close_bf16`)."""
  b, n, h = 2, 50, 2
  args = (*qk_inputs(1, b, n, h, 16, 8, jnp.bfloat16), prefix_mask(b, n), row_weights(b, h, n))
  got = value_and_grads(impl, *args, block_q=16, block_k=16)
  want = value_and_grads("direct", *args)
  assert got[1][2].dtype == jnp.bfloat16
  np.testing.assert_allclose(got[0], want[0], **TOL)
  if impl == "blockwise":
    assert_same(got, want, rtol=2**-7, atol=1e-3)
  else:
    for name, g, g_ref in zip(("q_s", "k_s"), got[1][2:], want[1][2:]):
      assert_close_bf16(g, g_ref, err_msg=name)


def test_direct_and_from_logits_equal_the_cross_entropy_in_float64():
  """-sum_k softmax(t)_k log_softmax(s)_k per (batch, head, query), from the q and k, in numpy."""

  @jax.jit  # one compile instead of an eager dispatch per op
  def both(q_t, k_t, q_s, k_s):
    teacher_logits = jnp.einsum("bqhd,bkhd->bhqk", q_t, k_t) * 8**-0.5
    student_logits = jnp.einsum("bqhd,bkhd->bhqk", q_s, k_s) * 4**-0.5
    return (
      attn_ce.ce_from_logits(teacher_logits, student_logits),
      attn_ce.ce_direct(q_t, k_t, q_s, k_s, scale_teacher=8**-0.5, scale_student=4**-0.5),
    )

  inputs = qk_inputs(2, 2, 20, 3, 8, 4)
  q_t, k_t, q_s, k_s = (np.asarray(x, np.float64) for x in inputs)
  t = np.einsum("bqhd,bkhd->bhqk", q_t, k_t) / np.sqrt(8)
  s = np.einsum("bqhd,bkhd->bhqk", q_s, k_s) / np.sqrt(4)
  p = np.exp(t - t.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  log_q = s - s.max(-1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
  want = -(p * log_q).sum(-1)
  from_logits, direct = both(*inputs)
  assert from_logits.shape == want.shape == (2, 3, 20)
  np.testing.assert_allclose(from_logits, want, **TOL)
  np.testing.assert_allclose(direct, want, **TOL)


def test_masked_keys_are_dropped():
  """Masking keys equals cutting them off: the reference's mask semantics, which the others must match."""
  teacher, student = np.random.default_rng(3).normal(size=(2, 1, 2, 9, 12)).astype(np.float32)
  keep = 8
  mask = np.arange(12)[None, :] < keep
  got = jax.jit(attn_ce.ce_from_logits)(teacher, student, mask)
  np.testing.assert_allclose(
    got, loss.attention_cross_entropy(teacher[..., :keep], student[..., :keep]), **TOL
  )


@jax.jit
def _entropy(q, k, mask, scale):
  logits = jnp.where(mask[:, None, None, :], jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1)


@pytest.mark.parametrize("impl", attn_ce.IMPLS)
def test_minimum_is_teacher_entropy(impl):
  """Student == teacher: CE equals the teacher's attention entropy and the gradient vanishes there."""
  b, n, h = 2, 50, 2
  q, k, _, _ = qk_inputs(4, b, n, h, 16, 16)
  mask = prefix_mask(b, n)
  ce, grads = value_and_grads(impl, q, k, q, k, mask, row_weights(b, h, n), block_q=16, block_k=16)
  entropy = _entropy(q, k, mask, 16**-0.5)
  np.testing.assert_allclose(ce, entropy, **TOL)
  for g in grads[2:]:
    np.testing.assert_allclose(g, 0.0, atol=1e-5)
  # Any other student does worse.
  q_s, k_s = q + 0.1 * np.random.default_rng(5).standard_normal(q.shape, np.float32), k
  worse, _ = value_and_grads(
    impl, q, k, q_s, k_s, mask, row_weights(b, h, n), block_q=16, block_k=16
  )
  assert np.all(np.asarray(worse) >= np.asarray(entropy) - 1e-5)
  assert np.mean(np.asarray(worse) - np.asarray(entropy)) > 1e-3


@pytest.mark.parametrize("impl", attn_ce.IMPLS)
def test_jit_sharded_over_batch_matches_unsharded(impl):
  """Inputs split along batch over the 8 emulated devices give the unsharded result."""
  b, n, h = jax.device_count(), 40, 2
  q_t, k_t, q_s, k_s = qk_inputs(6, b, n, h, 16, 8)
  mask, weights = prefix_mask(b, n), row_weights(b, h, n)
  want = value_and_grads(impl, q_t, k_t, q_s, k_s, mask, weights, block_q=16, block_k=16)
  batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  sharded = [jax.device_put(x, batch) for x in (q_t, k_t, q_s, k_s, mask, weights)]
  assert len(sharded[0].sharding.device_set) == b
  got = value_and_grads(impl, *sharded, block_q=16, block_k=16)
  assert_same(got, want, **TOL)


def test_unknown_impl_names_the_config_field():
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ConfigError, match="transfer.loss_impl") as e:
    attn_ce.attention_ce("flash", q, q, q, q, scale_teacher=1.0, scale_student=1.0)
  assert e.value.field == "transfer.loss_impl"


def test_shape_mismatch_is_an_error():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="heads"):
    attn_ce.ce_blockwise(
      q, q, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)), scale_teacher=1.0, scale_student=1.0
    )
