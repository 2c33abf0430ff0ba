"""Shared by the attention-CE tests: random teacher/student q and k, key masks, row weights, and the CE with
its gradients by any implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.ops import attn_ce

# float32 throughout; the streamed sums run in a different order (online rescaling, block by block) from
# the direct ones, which moves results by a few float32 ulps of values of order 1-10.
TOL = dict(rtol=1e-5, atol=1e-5)


def qk_inputs(seed: int, b: int, n: int, h: int, dt: int, ds: int, dtype=jnp.float32):
  """Teacher and student q, k [B, N, H, K]; logits of order a few units, so softmaxes are far from flat."""
  # numpy, not jax.random: no per-shape compiles in the tests' budget
  rng = np.random.default_rng(seed)
  shapes = [(b, n, h, dt)] * 2 + [(b, n, h, ds)] * 2
  return [jnp.asarray(2 * rng.standard_normal(s, np.float32), dtype) for s in shapes]


def prefix_mask(b: int, n: int) -> jax.Array:
  """[B, N]: element i keeps its first max(n - 7 i, 1) keys, like right-padded token sequences."""
  return jnp.asarray(np.arange(n)[None, :] < np.maximum(n - 7 * np.arange(b), 1)[:, None])


def row_weights(b: int, h: int, n: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(99).uniform(0.5, 1.5, (b, h, n)), jnp.float32)


@functools.partial(jax.jit, static_argnames=("impl", "block_q", "block_k"))
def value_and_grads(impl, q_t, k_t, q_s, k_s, key_mask, weights, block_q=0, block_k=0):
  """Per-query CE and the gradients of sum(weights * CE) w.r.t. all four inputs.

  Non-uniform weights make the per-row cotangent g_i differ between rows, as the backward must honour.
  Blocks of 0 are `attn_ce_tiles.auto_block`'s.
  """

  def weighted_sum(*qk):
    ce = attn_ce.attention_ce(
      impl,
      *qk,
      scale_teacher=q_t.shape[-1] ** -0.5,
      scale_student=q_s.shape[-1] ** -0.5,
      key_mask_BN=key_mask,
      block_q=block_q,
      block_k=block_k,
    )
    return jnp.sum(weights * ce), ce

  grad_fn = jax.value_and_grad(weighted_sum, argnums=(0, 1, 2, 3), has_aux=True)
  (_, ce), grads = grad_fn(q_t, k_t, q_s, k_s)
  return ce, grads


def assert_same(got, want, **tol):
  """(ce, grads) pairs agree, in the CE and the student's gradients."""
  (ce, grads), (ce_ref, grads_ref) = got, want
  np.testing.assert_allclose(ce, ce_ref, **tol)
  for name, g, g_ref in zip(("q_s", "k_s"), grads[2:], grads_ref[2:]):
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(g_ref, np.float32), **tol, err_msg=name
    )


def assert_close_bf16(got, want, err_msg: str = "") -> None:
  """bf16 gradients against a float32 reference: within 2**-6 of the reference's largest entry.

  bf16's unit roundoff is 2**-8. The Pallas gradients are rounded twice: each ds tile before the dq/dk
  dots (errors that do not cancel where the sum over keys does, hence a bound relative to the largest
  entry, not elementwise) and the result, returned in the inputs' dtype. Measured on these inputs: under
  2**-8 of the largest entry; 2**-6 leaves a factor 4 for other summation orders (a GPU's).
  """
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=0, atol=2**-6 * np.abs(want).max(), err_msg=err_msg)
