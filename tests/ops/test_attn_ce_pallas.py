"""The Pallas kernels called directly (interpreted on CPU), and their per-device wrapper on a mesh."""

import jax
import numpy as np
import pytest

from at_jax import sharding
from at_jax.ops import attn_ce, attn_ce_pallas
from tests.ops.conftest import TOL, prefix_mask, qk_inputs, row_weights

SCALES = dict(scale_teacher=16**-0.5, scale_student=8**-0.5)
BLOCKS = dict(block_q=16, block_k=16)


def test_kernels_match_the_blockwise_loop():
  """Same tiles, same online softmax: the kernels' CE and student gradients are the pure-JAX loop's."""
  b, n, h = 2, 50, 2
  qk, mask, weights = qk_inputs(7, b, n, h, 16, 8), prefix_mask(b, n), row_weights(b, h, n)

  def weighted(fn, **kw):
    value = lambda q_s, k_s: (weights * fn(*qk[:2], q_s, k_s, key_mask_BN=mask, **kw)).sum()
    return jax.jit(jax.value_and_grad(value, argnums=(0, 1)))(*qk[2:])

  got = weighted(attn_ce_pallas.ce_pallas, interpret=True, **SCALES, **BLOCKS)
  want = weighted(attn_ce.ce_blockwise, **SCALES, **BLOCKS)
  np.testing.assert_allclose(got[0], want[0], **TOL)
  for g, g_ref in zip(got[1], want[1]):
    np.testing.assert_allclose(g, g_ref, **TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_sharded_wrapper_runs_each_device_on_its_examples(masked):
  """Traced under `on_mesh`, the kernels run inside a shard_map over the batch, with the same result."""
  mesh = sharding.make_mesh(-1, 1)
  b, n, h = jax.device_count(), 24, 2
  qk = qk_inputs(8, b, n, h, 16, 8)
  mask = prefix_mask(b, n) if masked else None
  kw = dict(key_mask_BN=mask, interpret=True, **SCALES, **BLOCKS)
  sharded = sharding.on_mesh(lambda *a: attn_ce_pallas.ce_pallas_sharded(*a, **kw), mesh)
  assert "shard_map" in str(jax.make_jaxpr(sharded)(*qk))
  assert "shard_map" not in str(
    jax.make_jaxpr(lambda *a: attn_ce_pallas.ce_pallas_sharded(*a, **kw))(*qk)
  )
  batch = sharding.batch_sharding(mesh)
  got = jax.jit(sharded, in_shardings=(batch,) * 4, out_shardings=batch)(*qk)
  np.testing.assert_allclose(got, attn_ce_pallas.ce_pallas(*qk, **kw), **TOL)
