"""The Pallas kernels called directly, compiled where the backend is a GPU and interpreted on a CPU: against
the blockwise loop and the direct formula (head dims that need padding, bf16 inputs, block sizes), the
automatic block size, and the per-device wrapper on a mesh.

Imports only jax, numpy, pytest and at_jax: this file also runs on a GPU image without the data stack.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import sharding
from at_jax.ops import attn_ce, attn_ce_pallas
from at_jax.ops import attn_ce_tiles as tiles
from tests.ops.conftest import TOL, assert_close_bf16, prefix_mask, qk_inputs, row_weights

# Compiled (Triton) on a GPU, the Pallas interpreter on a CPU.
INTERPRET = jax.default_backend() == "cpu"
SCALES = dict(scale_teacher=16**-0.5, scale_student=8**-0.5)
BLOCKS = dict(block_q=16, block_k=16)


def _pallas(*qk: jax.Array, **kw) -> jax.Array:
  return attn_ce_pallas.ce_pallas(*qk, interpret=INTERPRET, **kw)


def _value_and_grads(fn, qk, mask, weights, **kw):
  """sum(weights * CE) of `fn` and its gradients w.r.t. the student's q and k, jitted.

  Traced at full float32 matmul precision: a GPU would otherwise run the float32 dots (the reference's,
  and the kernels' on float32 inputs) as TF32, 2**-11 relative, far outside TOL. bf16 dots stay bf16.
  """
  value = lambda q_s, k_s: (weights * fn(*qk[:2], q_s, k_s, key_mask_BN=mask, **kw)).sum()
  with jax.default_matmul_precision("float32"):
    return jax.jit(jax.value_and_grad(value, argnums=(0, 1)))(*qk[2:])


def _assert_same(got, want, **tol):
  np.testing.assert_allclose(got[0], want[0], **tol)
  for name, g, g_ref in zip(("q_s", "k_s"), got[1], want[1]):
    assert g.shape == g_ref.shape, name
    np.testing.assert_allclose(g, g_ref, **tol, err_msg=name)


def test_kernels_match_the_blockwise_loop():
  """Same tiles, same online softmax: the kernels' CE and student gradients are the pure-JAX loop's."""
  b, n, h = 2, 50, 2
  qk, mask, weights = qk_inputs(7, b, n, h, 16, 8), prefix_mask(b, n), row_weights(b, h, n)
  got = _value_and_grads(_pallas, qk, mask, weights, **SCALES, **BLOCKS)
  want = _value_and_grads(attn_ce.ce_blockwise, qk, mask, weights, **SCALES, **BLOCKS)
  _assert_same(got, want, **TOL)


def test_head_dims_are_padded_to_powers_of_two():
  """Teacher 80 (ViT-H/14) and student 8: zero-padded to 128 and 16 for Triton, which changes neither the
  CE nor the gradients (sliced back to 80 and 8); the automatic block fits the 20 tokens (32, not 128)."""
  b, n, h, dt, ds = 2, 20, 2, 80, 8
  qk, mask, weights = qk_inputs(9, b, n, h, dt, ds), prefix_mask(b, n), row_weights(b, h, n)
  scales = dict(scale_teacher=dt**-0.5, scale_student=ds**-0.5)
  jaxpr = str(jax.make_jaxpr(lambda *a: _pallas(*a, key_mask_BN=mask, **scales))(*qk))
  assert "f32[2,32,2,128]" in jaxpr and "f32[2,32,2,16]" in jaxpr
  got = _value_and_grads(_pallas, qk, mask, weights, **scales)
  _assert_same(got, _value_and_grads(attn_ce.ce_direct, qk, mask, weights, **scales), **TOL)


def test_bfloat16_inputs_match_the_float32_reference():
  """bf16 q and k go into the kernels' dots as they are. Products of bf16 numbers are exact in float32 and
  accumulate in float32, so the CE is the float32 reference's (direct, on the same values upcast) to
  TOL. The gradients pass through bf16 twice (ds rounded before the dq/dk dots, the result returned in
  the inputs' dtype): within `assert_close_bf16`."""
  b, n, h = 2, 50, 2
  qk = qk_inputs(1, b, n, h, 16, 8, jnp.bfloat16)
  mask, weights = prefix_mask(b, n), row_weights(b, h, n)
  got = _value_and_grads(_pallas, qk, mask, weights, **SCALES, **BLOCKS)
  qk_f32 = [x.astype(jnp.float32) for x in qk]
  want = _value_and_grads(attn_ce.ce_direct, qk_f32, mask, weights, **SCALES)
  np.testing.assert_allclose(got[0], want[0], **TOL)
  for name, g, g_ref in zip(("q_s", "k_s"), got[1], want[1]):
    assert g.dtype == jnp.bfloat16, name
    assert_close_bf16(g, g_ref, err_msg=name)


def test_explicit_blocks_give_the_same_values():
  """16, 32 and 64 split 50 tokens into 4, 2 and 1 blocks (ragged last ones): the same CE."""
  b, n, h = 2, 50, 2
  qk, mask = qk_inputs(10, b, n, h, 16, 8), prefix_mask(b, n)
  with jax.default_matmul_precision("float32"):
    want = jax.jit(lambda *a: attn_ce.ce_direct(*a, key_mask_BN=mask, **SCALES))(*qk)
    for block in (16, 32, 64):
      ce = jax.jit(
        lambda *a, block=block: _pallas(
          *a, key_mask_BN=mask, block_q=block, block_k=block, **SCALES
        )
      )(*qk)
      np.testing.assert_allclose(ce, want, **TOL, err_msg=f"block {block}")


# jax 0.11 deprecates Pallas's Triton backend (see attn_ce_pallas); its lowering warns.
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton_anywhere(dtype):
  """Forward and backward lower for CUDA (an abstract H200) on any machine, so that a CPU run catches
  what only Triton refuses, e.g. head dims that are not powers of two (80 and 8 here)."""
  dt, ds = 80, 8
  qk = qk_inputs(11, 2, 20, 2, dt, ds, dtype)
  scales = dict(scale_teacher=dt**-0.5, scale_student=ds**-0.5)
  loss = lambda q_s, k_s: attn_ce_pallas.ce_pallas(*qk[:2], q_s, k_s, **scales).sum()
  h200 = jax.sharding.AbstractDevice("NVIDIA H200", 132, "gpu")
  with jax.sharding.use_abstract_mesh(
    jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h200)
  ):
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*qk[2:])
    hlo = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk


@pytest.mark.parametrize(
  "tokens, head_dim, block",
  [
    (197, 64, 128),  # ViT-B/16 at 224 px
    (257, 16, 128),
    (257, 80, 64),  # ViT-H/14: 80 pads to 128, whose 128-row tiles would not fit in shared memory
    (197, 128, 64),
    (50, 64, 64),  # few tokens: the next power of two, not a whole 128-row block
    (20, 80, 32),
    (5, 8, 16),  # never below Triton's 16
  ],
)
def test_auto_block(tokens, head_dim, block):
  assert tiles.auto_block(tokens, head_dim) == block


@pytest.mark.parametrize("masked", [False, True])
def test_sharded_wrapper_runs_each_device_on_its_examples(masked):
  """Traced under `on_mesh`, the kernels run inside a shard_map over the batch, with the same result."""
  mesh = sharding.make_mesh(-1, 1)
  b, n, h = jax.device_count(), 24, 2
  qk = qk_inputs(8, b, n, h, 16, 8)
  mask = prefix_mask(b, n) if masked else None
  kw = dict(key_mask_BN=mask, interpret=INTERPRET, **SCALES, **BLOCKS)
  sharded = sharding.on_mesh(lambda *a: attn_ce_pallas.ce_pallas_sharded(*a, **kw), mesh)
  assert "shard_map" in str(jax.make_jaxpr(sharded)(*qk))
  assert "shard_map" not in str(
    jax.make_jaxpr(lambda *a: attn_ce_pallas.ce_pallas_sharded(*a, **kw))(*qk)
  )
  batch = sharding.batch_sharding(mesh)
  with jax.default_matmul_precision("float32"):
    got = jax.jit(sharded, in_shardings=(batch,) * 4, out_shardings=batch)(*qk)
    want = jax.jit(lambda *a: attn_ce_pallas.ce_pallas(*a, **kw))(*qk)
  np.testing.assert_allclose(got, want, **TOL)
