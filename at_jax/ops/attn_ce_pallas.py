"""The attention-distillation CE as Pallas kernels (forward, dq, dk), and its per-device wrapper.

The same algorithm as `attn_ce.ce_blockwise` (see `attn_ce` for the formula), one program per (batch,
head, block of query or key rows). Refs keep the [B, N, H, K] layout, so no transposes are needed, and each
program walks the other axis in a fori_loop. Dots run in the inputs' dtype and accumulate in float32; the
softmax and CE math is float32. Compiled on GPU this lowers to Triton, which wants arrays whose sizes are
powers of two (dots: at least 16 along each axis) and lowers only 2-D dots without batch axes:
`ce_pallas` pads head dims and tokens to such sizes, and the kernels form their [bq, bk] tiles of logits
with `_tile_logits`, the 2-D form of `attn_ce.qk_logits`. `interpret=True` runs the kernels anywhere
(tests run them on CPU).

Triton, not Mosaic GPU, through jax 0.11.x (checked against jax 0.11.2's sources):
- 0.11 deprecates Pallas's Triton backend: lowering a kernel warns (DeprecationWarning
  "jax-pallas-triton", jax/_src/pallas/triton/pallas_call_registration.py:66-72; an error only once jax
  accelerates the deprecation, jax/_src/deprecations.py:117-125) and names no release that removes it
  ("a future JAX version").
- Yet in 0.11.2 Triton is the only GPU backend of `pl.pallas_call` (jax/_src/pallas/pallas_call.py:906-926
  and triton/pallas_call_registration.py:170: without compiler params it picks Triton's; the
  `jax_pallas_use_mosaic_gpu` switch of 0.10 is gone). Mosaic GPU is reached only through
  `plgpu.kernel` (0.10.2 already warned "jax-pallas-call-mgpu" for pallas_calls sent to it), another
  programming model (explicit shared-memory pipelines, warpgroup layouts): a rewrite, not a flag.
- Everything used here (`pl.BlockSpec` with None dims, `pl.ds`, `pltriton.CompilerParams(num_warps,
  num_stages)`, `pallas_call`'s `compiler_params`, `name`, `interpret`) has the same signature in 0.10.2
  and 0.11.2, and the kernels lower for CUDA under both (tests/ops/test_attn_ce_pallas.py).
So the kernels stay on Triton while jax ships `jax.experimental.pallas.triton`; re-check at every jax
minor release (0.12 first), and port to `plgpu.kernel` (or jax_triton) when a release drops it.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from at_jax import sharding
from at_jax.ops import attn_ce_tiles as tiles

Array = jax.Array

# Triton, named explicitly: without compiler params jax 0.10 sends GPU pallas_calls to Mosaic GPU, whose
# loads want 128-element multiples (it rejects these kernels' 64-row blocks of per-row vectors); jax 0.11.2
# picks Triton by default, so naming it works under both.
_TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)


def _tile_logits(q_NK: Array, k_NK: Array, valid: Array, scale: float) -> Array:
  """Masked float32 logits [bq, bk] of one head's q [bq, K] against its k [bk, K].

  The dot runs in the operands' dtype (bf16 at the tensor cores' full rate, not upcast to f32, which
  Triton would run as TF32 at half of it from twice the shared memory) and accumulates in float32.
  """
  logits = jnp.einsum("qd,kd->qk", q_NK, k_NK, preferred_element_type=jnp.float32) * scale
  return tiles.masked(logits, valid)


def _fwd_kernel(
  qt_ref,
  kt_ref,
  qs_ref,
  ks_ref,
  valid_ref,
  ce_ref,
  lse_t_ref,
  lse_s_ref,
  *,
  scale_teacher: float,
  scale_student: float,
  block_k: int,
):
  """Refs: `t` the teacher's, `s` the student's; one block of query rows [bq, K], all keys [Nk, K]."""
  qt, qs = qt_ref[...], qs_ref[...]

  def k_block(j, carry):
    keys = pl.ds(j * block_k, block_k)
    valid = valid_ref[keys][None, :] != 0
    logits_teacher = _tile_logits(qt, kt_ref[keys, :], valid, scale_teacher)
    logits_student = _tile_logits(qs, ks_ref[keys, :], valid, scale_student)
    return tiles.ce_step(carry, logits_teacher, logits_student, valid)

  carry = lax.fori_loop(0, kt_ref.shape[0] // block_k, k_block, tiles.ce_init(qt.shape[:1]))
  ce_ref[...], lse_t_ref[...], lse_s_ref[...] = tiles.ce_finish(carry)


def _dq_kernel(
  qt_ref,
  qs_ref,
  lse_t_ref,
  lse_s_ref,
  g_ref,
  kt_ref,
  ks_ref,
  valid_ref,
  dq_ref,
  *,
  scale_teacher: float,
  scale_student: float,
  block_k: int,
):
  qt, qs = qt_ref[...], qs_ref[...]
  lse_teacher, lse_student, g = lse_t_ref[...], lse_s_ref[...], g_ref[...]

  def k_block(j, dq):
    keys = pl.ds(j * block_k, block_k)
    valid = valid_ref[keys][None, :] != 0
    ks = ks_ref[keys, :]
    logits_teacher = _tile_logits(qt, kt_ref[keys, :], valid, scale_teacher)
    logits_student = _tile_logits(qs, ks, valid, scale_student)
    ds = tiles.dlogits(
      logits_teacher, logits_student, valid, lse_teacher, lse_student, g, scale_student
    )
    # The float32 ds tile goes into the dot in k's dtype, as FlashAttention's backward does with its
    # dS: one more rounding (2**-8 relative in bf16), the size of the error bf16 q and k already carry.
    return dq + jnp.dot(ds.astype(ks.dtype), ks, preferred_element_type=jnp.float32)

  dq_ref[...] = lax.fori_loop(
    0, kt_ref.shape[0] // block_k, k_block, jnp.zeros(qs.shape, jnp.float32)
  )


def _dk_kernel(
  kt_ref,
  ks_ref,
  valid_ref,
  qt_ref,
  qs_ref,
  lse_t_ref,
  lse_s_ref,
  g_ref,
  dk_ref,
  *,
  scale_teacher: float,
  scale_student: float,
  block_q: int,
):
  kt, ks = kt_ref[...], ks_ref[...]
  valid = valid_ref[...][None, :] != 0

  def q_block(i, dk):
    rows = pl.ds(i * block_q, block_q)
    qs = qs_ref[rows, :]
    logits_teacher = _tile_logits(qt_ref[rows, :], kt, valid, scale_teacher)
    logits_student = _tile_logits(qs, ks, valid, scale_student)
    ds = tiles.dlogits(
      logits_teacher,
      logits_student,
      valid,
      lse_t_ref[rows],
      lse_s_ref[rows],
      g_ref[rows],
      scale_student,
    )
    # ds in q's dtype before the dot, as in `_dq_kernel`.
    return dk + jnp.einsum("qk,qd->kd", ds.astype(qs.dtype), qs, preferred_element_type=jnp.float32)

  dk_ref[...] = lax.fori_loop(
    0, qt_ref.shape[0] // block_q, q_block, jnp.zeros(ks.shape, jnp.float32)
  )


def _row_spec(block: int, d: int) -> pl.BlockSpec:
  """One block of rows of one head of a [B, N, H, K] array, for a (b, h, block index) program."""
  return pl.BlockSpec((None, block, None, d), lambda b, h, i: (b, i, h, 0))


def _all_rows_spec(n: int, d: int) -> pl.BlockSpec:
  """All rows of one head of a [B, N, H, K] array."""
  return pl.BlockSpec((None, n, None, d), lambda b, h, i: (b, 0, h, 0))


def _vec_spec(block: int) -> pl.BlockSpec:
  """One block of a [B, H, N] per-row array."""
  return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def _all_vec_spec(n: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, None, n), lambda b, h, i: (b, h, 0))


def _keys_spec(block: int) -> pl.BlockSpec:
  """One block of the [B, Nk] key validity."""
  return pl.BlockSpec((None, block), lambda b, h, i: (b, i))


def _all_keys_spec(n: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, n), lambda b, h, i: (b, 0))


def _pallas_fwd_call(
  qt, kt, qs, ks, valid, scale_teacher, scale_student, block_q, block_k, interpret
):
  (batch, nq, heads, dt), nk, ds = qt.shape, kt.shape[1], qs.shape[-1]
  row = jax.ShapeDtypeStruct((batch, heads, nq), jnp.float32)
  kernel = functools.partial(
    _fwd_kernel, scale_teacher=scale_teacher, scale_student=scale_student, block_k=block_k
  )
  return pl.pallas_call(
    kernel,
    out_shape=(row, row, row),
    grid=(batch, heads, nq // block_q),
    in_specs=[
      _row_spec(block_q, dt),
      _all_rows_spec(nk, dt),
      _row_spec(block_q, ds),
      _all_rows_spec(nk, ds),
      _all_keys_spec(nk),
    ],
    out_specs=(_vec_spec(block_q),) * 3,
    interpret=interpret,
    compiler_params=_TRITON,
    name="attn_ce_fwd",
  )(qt, kt, qs, ks, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _pallas_core(qt, kt, qs, ks, valid, scale_teacher, scale_student, block_q, block_k, interpret):
  """CE [B, H, Nq_padded] from padded [B, N_padded, H, K] q/k and int32 key validity [B, Nk_padded]."""
  return _pallas_fwd_call(
    qt, kt, qs, ks, valid, scale_teacher, scale_student, block_q, block_k, interpret
  )[0]


def _pallas_fwd(qt, kt, qs, ks, valid, scale_teacher, scale_student, block_q, block_k, interpret):
  ce, lse_teacher, lse_student = _pallas_fwd_call(
    qt, kt, qs, ks, valid, scale_teacher, scale_student, block_q, block_k, interpret
  )
  return ce, (qt, kt, qs, ks, valid, lse_teacher, lse_student)


def _pallas_bwd(scale_teacher, scale_student, block_q, block_k, interpret, res, g):
  qt, kt, qs, ks, valid, lse_teacher, lse_student = res
  (batch, nq, heads, dt), nk, ds = qt.shape, kt.shape[1], qs.shape[-1]
  scales = dict(scale_teacher=scale_teacher, scale_student=scale_student)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, block_k=block_k, **scales),
    out_shape=jax.ShapeDtypeStruct(qs.shape, jnp.float32),
    grid=(batch, heads, nq // block_q),
    in_specs=[_row_spec(block_q, dt), _row_spec(block_q, ds)]
    + [_vec_spec(block_q)] * 3
    + [_all_rows_spec(nk, dt), _all_rows_spec(nk, ds), _all_keys_spec(nk)],
    out_specs=_row_spec(block_q, ds),
    interpret=interpret,
    compiler_params=_TRITON,
    name="attn_ce_dq",
  )(qt, qs, lse_teacher, lse_student, g, kt, ks, valid)
  dk = pl.pallas_call(
    functools.partial(_dk_kernel, block_q=block_q, **scales),
    out_shape=jax.ShapeDtypeStruct(ks.shape, jnp.float32),
    grid=(batch, heads, nk // block_k),
    in_specs=[
      _row_spec(block_k, dt),
      _row_spec(block_k, ds),
      _keys_spec(block_k),
      _all_rows_spec(nq, dt),
      _all_rows_spec(nq, ds),
    ]
    + [_all_vec_spec(nq)] * 3,
    out_specs=_row_spec(block_k, ds),
    interpret=interpret,
    compiler_params=_TRITON,
    name="attn_ce_dk",
  )(kt, ks, valid, qt, qs, lse_teacher, lse_student, g)
  return None, None, dq.astype(qs.dtype), dk.astype(ks.dtype), None


_pallas_core.defvjp(_pallas_fwd, _pallas_bwd)


def _pad_head_dim(x_BNHK: Array, dim: int) -> Array:
  """Pads the last axis (head dim) with zeros up to `dim`."""
  pad = dim - x_BNHK.shape[-1]
  return jnp.pad(x_BNHK, [(0, 0)] * 3 + [(0, pad)]) if pad else x_BNHK


def ce_pallas(
  q_teacher_BNHK: Array,
  k_teacher_BNHK: Array,
  q_student_BNHK: Array,
  k_student_BNHK: Array,
  *,
  scale_teacher: float,
  scale_student: float,
  key_mask_BN: Array | None = None,
  block_q: int = 0,
  block_k: int = 0,
  interpret: bool = False,
) -> Array:
  """Per-query CE [B, H, N] from Pallas kernels (forward, dq, dk); O(N) memory, as `ce_blockwise`.

  `block_q`, `block_k`: tile sizes, powers of two >= 16 when compiled; 0 picks `tiles.auto_block`.
  `interpret=True` runs the kernels through the Pallas interpreter (any backend, slow); otherwise they
  compile for the default backend (Triton on GPU).

  XLA cannot split a pallas_call: under jit with batch-sharded inputs it gathers them and every device
  computes the whole batch (correct, not parallel). `ce_pallas_sharded` hands each device its own examples.
  """
  tiles.check_shapes(q_teacher_BNHK, k_teacher_BNHK, q_student_BNHK, k_student_BNHK, key_mask_BN)
  batch, n, _, _ = q_teacher_BNHK.shape
  # Triton's dots want dims that are powers of two >= 16 (ViT-H/14 has 80): zero columns change no q.k
  # (the scales stay those of the true dims), and padded here, outside the custom VJP, autodiff slices
  # the gradients back. Teacher and student are padded separately.
  dim_teacher = tiles.next_pow2(q_teacher_BNHK.shape[-1])
  dim_student = tiles.next_pow2(q_student_BNHK.shape[-1])
  auto = tiles.auto_block(n, max(dim_teacher, dim_student))
  block_q, block_k = block_q or auto, block_k or auto
  # int32, not bool: kernels load the mask like any other array.
  valid_BN = tiles.valid_keys(key_mask_BN, batch, n, block_k).astype(jnp.int32)
  pad = lambda x, block, dim: _pad_head_dim(tiles.pad_tokens(x, block), dim)
  ce_BHN = _pallas_core(
    pad(q_teacher_BNHK, block_q, dim_teacher),
    pad(k_teacher_BNHK, block_k, dim_teacher),
    pad(q_student_BNHK, block_q, dim_student),
    pad(k_student_BNHK, block_k, dim_student),
    valid_BN,
    scale_teacher,
    scale_student,
    block_q,
    block_k,
    interpret,
  )
  return ce_BHN[:, :, :n]


def ce_pallas_sharded(
  q_teacher_BNHK: Array,
  k_teacher_BNHK: Array,
  q_student_BNHK: Array,
  k_student_BNHK: Array,
  *,
  key_mask_BN: Array | None = None,
  **kwargs: float | int | bool,
) -> Array:
  """`ce_pallas` on each device's slice of the batch inside a step traced under `sharding.on_mesh` (a
  kernel is opaque to XLA's partitioner), plain `ce_pallas` elsewhere. `kwargs`: those of `ce_pallas`."""
  arrays = (q_teacher_BNHK, k_teacher_BNHK, q_student_BNHK, k_student_BNHK)
  if key_mask_BN is None:
    return sharding.per_batch_shard(functools.partial(ce_pallas, **kwargs))(*arrays)

  def masked_ce(*inputs: Array) -> Array:
    *qk, mask_BN = inputs
    return ce_pallas(*qk, key_mask_BN=mask_BN, **kwargs)

  return sharding.per_batch_shard(masked_ce)(*arrays, key_mask_BN)
