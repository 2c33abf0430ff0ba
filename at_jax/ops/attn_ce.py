"""Attention-distillation loss without N x N maps: per-query cross-entropy from q and k, block by block.

For one batch element and head, with teacher logits t_ij = scale_t q_t[i].k_t[j] and student logits
s_ij = scale_s q_s[i].k_s[j] over keys j, the per-query loss is

  CE_i = -sum_j softmax(t_i)_j log_softmax(s_i)_j = logsumexp_j(s_ij) - sum_j softmax(t_i)_j s_ij,

and its gradient with respect to s_ij is g_i (softmax(s_i)_j - softmax(t_i)_j). The teacher is frozen: it
gets no gradient.

Implementations (`IMPLS`), all returning float32 CE of shape [B, H, Nq]:
  direct     materialises both [B, H, N, N] logit maps of the layer; plain autodiff. Memory O(N^2).
  blockwise  pure JAX, flash-style: loops over query blocks and key blocks with an online (running max,
             running sum) softmax for both distributions; a custom VJP recomputes the blocks. No array
             larger than block_q x block_k per (batch, head) exists, so memory is O(N).
  pallas     the same algorithm as Pallas kernels (forward, dq and dk), one program per (batch, head,
             query or key block). `interpret=True` runs it anywhere (tests run it on CPU).

Layout follows the ViT: q, k are [B, N, H, D]. Teacher and student may differ in head dim (widths), not in
head count. Inputs may be bfloat16; all math is float32. `key_mask` [B, N] bool drops the False keys
(padding tokens) from both softmaxes; every batch element needs at least one True key. N need not divide
by the block sizes: inputs are padded to whole blocks, padded keys masked and padded query rows dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from at_jax.errors import ConfigError

Array = jax.Array
IMPLS = ("direct", "blockwise", "pallas")
# Masked logits get a finite stand-in for -inf: with -inf, a block whose keys are all masked would give
# exp(-inf - -inf) = NaN in the running-max update. Their probabilities are also zeroed explicitly.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------------------------
# Direct: materialised maps.


def ce_from_logits(
  t_logits_BHNN: Array,
  s_logits_BHNN: Array,
  key_mask_BN: Array | None = None,
  *,
  s_lse_BHN: Array | None = None,
) -> Array:
  """Per-query CE [B, H, Nq] from materialised teacher and student logits [B, H, Nq, Nk], in float32.

  Keys where `key_mask_BN` [B, Nk] is False are left out of both softmaxes. The teacher gets no gradient.
  `s_lse_BHN`: logsumexp of the student's logits over keys, if the caller has it (no key mask then).
  """
  t = lax.stop_gradient(t_logits_BHNN.astype(jnp.float32))
  s = s_logits_BHNN.astype(jnp.float32)
  if key_mask_BN is not None:
    valid = key_mask_BN[:, None, None, :]
    t = jnp.where(valid, t, _MASKED)
    s = jnp.where(valid, s, _MASKED)
  p_t = jax.nn.softmax(t, axis=-1)  # exactly 0 on masked keys, so they drop out of the sum below
  lse = jax.nn.logsumexp(s, axis=-1) if s_lse_BHN is None else s_lse_BHN
  return lse - jnp.sum(p_t * s, axis=-1)


def qk_logits(q_NHD: Array, k_NHD: Array, scale: float) -> Array:
  """float32 logits [..., H, Nq, Nk] = scale q.k of q [..., Nq, H, D] and k [..., Nk, H, D] (any leading dims)."""
  return (
    jnp.einsum("...qhd,...khd->...hqk", q_NHD.astype(jnp.float32), k_NHD.astype(jnp.float32))
    * scale
  )


def ce_direct(
  q_t: Array,
  k_t: Array,
  q_s: Array,
  k_s: Array,
  *,
  scale_t: float,
  scale_s: float,
  key_mask: Array | None = None,
) -> Array:
  """Per-query CE [B, H, N] through both [B, H, N, N] logit maps (the reference; O(N^2) memory)."""
  _check_shapes(q_t, k_t, q_s, k_s, key_mask)
  return ce_from_logits(qk_logits(q_t, k_t, scale_t), qk_logits(q_s, k_s, scale_s), key_mask)


# ---------------------------------------------------------------------------------------------------------
# Shared pieces of the streamed implementations. Shapes are [..., rows, cols]: the leading dims are
# (B, H) in the pure-JAX path and absent inside a Pallas kernel.


def _qk(q: Array, k: Array, valid: Array, scale: float) -> Array:
  """Masked logits [..., bq, bk] of q [..., bq, D] against k [..., bk, D]; `valid` broadcasts to them."""
  x = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(valid, x, _MASKED)


def _online(m: Array, l: Array, x: Array, valid: Array) -> tuple[Array, Array, Array, Array]:  # noqa: E741
  """One online-softmax step over a block of logits x [..., bq, bk].

  Returns the new running max m and sum l (of exp(x - m)), the factor alpha that rescales sums taken
  against the old max, and the block's unnormalised probabilities exp(x - m_new) (0 on masked keys).
  """
  m_new = jnp.maximum(m, x.max(axis=-1))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(valid, jnp.exp(x - m_new[..., None]), 0.0)
  return m_new, l * alpha + p.sum(axis=-1), alpha, p


def _ce_step(carry: tuple[Array, ...], t: Array, s: Array, valid: Array) -> tuple[Array, ...]:
  """Folds one key block into (m_t, l_t, m_s, l_s, acc), acc = sum_j exp(t_ij - m_t_i) s_ij."""
  m_t, l_t, m_s, l_s, acc = carry
  m_t, l_t, alpha_t, p_t = _online(m_t, l_t, t, valid)
  m_s, l_s, _, _ = _online(m_s, l_s, s, valid)
  return m_t, l_t, m_s, l_s, acc * alpha_t + jnp.sum(p_t * s, axis=-1)


def _ce_init(shape: tuple[int, ...]) -> tuple[Array, ...]:
  neg, zero = jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32)
  return neg, zero, neg, zero, zero


def _ce_finish(carry: tuple[Array, ...]) -> tuple[Array, Array, Array]:
  """(ce, lse_t, lse_s) from the folded carry."""
  m_t, l_t, m_s, l_s, acc = carry
  lse_s = m_s + jnp.log(l_s)
  return lse_s - acc / l_t, m_t + jnp.log(l_t), lse_s


def _dlogits(
  t: Array, s: Array, valid: Array, lse_t: Array, lse_s: Array, g: Array, scale_s: float
) -> Array:
  """Cotangent of the student's raw dot products q_s.k_s for one block: g (p_s - p_t) scale_s."""
  p_t = jnp.where(valid, jnp.exp(t - lse_t[..., None]), 0.0)
  p_s = jnp.where(valid, jnp.exp(s - lse_s[..., None]), 0.0)
  return (g[..., None] * scale_s) * (p_s - p_t)


def _check_shapes(q_t: Array, k_t: Array, q_s: Array, k_s: Array, key_mask: Array | None) -> None:
  if q_t.shape != k_t.shape or q_s.shape != k_s.shape or q_t.ndim != 4:
    raise ValueError(
      f"q and k must match and be [B, N, H, D]: teacher {q_t.shape}, {k_t.shape}; "
      f"student {q_s.shape}, {k_s.shape}"
    )
  if q_t.shape[:3] != q_s.shape[:3]:
    raise ValueError(
      f"teacher {q_t.shape} and student {q_s.shape} differ in batch, tokens or heads"
    )
  if key_mask is not None and key_mask.shape != q_t.shape[:2]:
    raise ValueError(f"key_mask {key_mask.shape} must be [B, N] = {q_t.shape[:2]}")


def _pad_tokens(x: Array, block: int) -> Array:
  """Pads axis 1 (tokens) with zeros up to a whole number of blocks."""
  pad = -x.shape[1] % block
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _valid_keys(key_mask: Array | None, batch: int, n: int, block_k: int) -> Array:
  """[B, Nk_padded] bool: the caller's key mask (or all True), False on padded keys."""
  valid = jnp.ones((batch, n), bool) if key_mask is None else key_mask.astype(bool)
  return _pad_tokens(valid, block_k)


# ---------------------------------------------------------------------------------------------------------
# Blockwise: pure JAX.


def _to_blocks(x_BNHD: Array, block: int) -> Array:
  """[B, N, H, D] -> float32 [N_padded / block, B, H, block, D], block-major for lax.scan/map."""
  b, _, h, d = x_BNHD.shape
  x = _pad_tokens(x_BNHD.astype(jnp.float32), block)
  return x.reshape(b, -1, block, h, d).transpose(1, 0, 3, 2, 4)


def _from_blocks(x: Array) -> Array:
  """[n, B, H, block, ...] -> [B, H, n * block, ...], undoing the block-major layout of rows."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise_core(
  qt_b: Array, kt_b: Array, qs_b: Array, ks_b: Array, valid_b: Array, scale_t: float, scale_s: float
) -> Array:
  """CE [nq, B, H, bq] from block-major q/k ([n, B, H, block, D]) and key validity [nk, B, bk]."""
  return _blockwise_fwd(qt_b, kt_b, qs_b, ks_b, valid_b, scale_t, scale_s)[0]


def _blockwise_fwd(qt_b, kt_b, qs_b, ks_b, valid_b, scale_t, scale_s):
  def q_block(q):
    qt, qs = q

    def k_block(carry, k):
      kt, ks, valid = k
      valid = valid[:, None, None, :]
      return _ce_step(carry, _qk(qt, kt, valid, scale_t), _qk(qs, ks, valid, scale_s), valid), None

    carry, _ = lax.scan(k_block, _ce_init(qt.shape[:-1]), (kt_b, ks_b, valid_b))
    return _ce_finish(carry)

  # lax.map runs the query blocks one after another, so only one block's [B, H, bq, bk] tiles are live.
  ce, lse_t, lse_s = lax.map(q_block, (qt_b, qs_b))
  return ce, (qt_b, kt_b, qs_b, ks_b, valid_b, lse_t, lse_s)


def _blockwise_bwd(scale_t, scale_s, res, g_b):
  qt_b, kt_b, qs_b, ks_b, valid_b, lse_t, lse_s = res

  def k_block(dq_b, k):
    kt, ks, valid = k
    valid = valid[:, None, None, :]

    def q_block(dk, q):
      qt, qs, lt, ls, g, dq = q
      ds = _dlogits(
        _qk(qt, kt, valid, scale_t), _qk(qs, ks, valid, scale_s), valid, lt, ls, g, scale_s
      )
      dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds, ks)
      return dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qs), dq

    # Each key block's dk is complete after one pass over the queries; dq accumulates across key blocks.
    dk, dq_b = lax.scan(q_block, jnp.zeros_like(ks), (qt_b, qs_b, lse_t, lse_s, g_b, dq_b))
    return dq_b, dk

  dq_b, dk_b = lax.scan(k_block, jnp.zeros_like(qs_b), (kt_b, ks_b, valid_b))
  # The teacher is frozen and the key mask is not differentiable: no cotangents for them.
  return None, None, dq_b, dk_b, None


_blockwise_core.defvjp(_blockwise_fwd, _blockwise_bwd)


def ce_blockwise(
  q_t: Array,
  k_t: Array,
  q_s: Array,
  k_s: Array,
  *,
  scale_t: float,
  scale_s: float,
  key_mask: Array | None = None,
  block_q: int = 128,
  block_k: int = 128,
) -> Array:
  """Per-query CE [B, H, N] streamed over block_q x block_k tiles in pure JAX; O(N) memory.

  Gradients flow to q_s and k_s only (a custom VJP that recomputes the tiles from the saved per-row
  logsumexps of both distributions).
  """
  _check_shapes(q_t, k_t, q_s, k_s, key_mask)
  batch, n, _, _ = q_t.shape
  valid_b = _valid_keys(key_mask, batch, n, block_k).reshape(batch, -1, block_k).transpose(1, 0, 2)
  ce_b = _blockwise_core(
    _to_blocks(q_t, block_q),
    _to_blocks(k_t, block_k),
    _to_blocks(q_s, block_q),
    _to_blocks(k_s, block_k),
    valid_b,
    scale_t,
    scale_s,
  )
  return _from_blocks(ce_b)[:, :, :n]


# ---------------------------------------------------------------------------------------------------------
# Pallas: the same algorithm as kernels. Grid (B, H, row blocks); refs keep the [B, N, H, D] layout, so no
# transposes are needed, and each program walks the other axis in a fori_loop. Compiled on GPU this lowers
# to Triton, which wants power-of-two tile sizes and head dims of at least 16.

# Triton, named explicitly: without compiler params, jax >= 0.10 sends GPU pallas_calls to Mosaic GPU, whose
# loads want 128-element multiples (it rejects these kernels' 64-row blocks of per-row vectors).
_TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)


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
  scale_t: float,
  scale_s: float,
  block_k: int,
):
  qt, qs = qt_ref[...].astype(jnp.float32), qs_ref[...].astype(jnp.float32)  # [bq, D]

  def k_block(j, carry):
    keys = pl.ds(j * block_k, block_k)
    valid = valid_ref[keys][None, :] != 0
    t = _qk(qt, kt_ref[keys, :].astype(jnp.float32), valid, scale_t)
    s = _qk(qs, ks_ref[keys, :].astype(jnp.float32), valid, scale_s)
    return _ce_step(carry, t, s, valid)

  carry = lax.fori_loop(0, kt_ref.shape[0] // block_k, k_block, _ce_init(qt.shape[:1]))
  ce_ref[...], lse_t_ref[...], lse_s_ref[...] = _ce_finish(carry)


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
  scale_t: float,
  scale_s: float,
  block_k: int,
):
  qt, qs = qt_ref[...].astype(jnp.float32), qs_ref[...].astype(jnp.float32)
  lse_t, lse_s, g = lse_t_ref[...], lse_s_ref[...], g_ref[...]

  def k_block(j, dq):
    keys = pl.ds(j * block_k, block_k)
    valid = valid_ref[keys][None, :] != 0
    ks = ks_ref[keys, :].astype(jnp.float32)
    t = _qk(qt, kt_ref[keys, :].astype(jnp.float32), valid, scale_t)
    ds = _dlogits(t, _qk(qs, ks, valid, scale_s), valid, lse_t, lse_s, g, scale_s)
    return dq + jnp.dot(ds, ks, preferred_element_type=jnp.float32)

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
  scale_t: float,
  scale_s: float,
  block_q: int,
):
  kt, ks = kt_ref[...].astype(jnp.float32), ks_ref[...].astype(jnp.float32)
  valid = valid_ref[...][None, :] != 0

  def q_block(i, dk):
    rows = pl.ds(i * block_q, block_q)
    qs = qs_ref[rows, :].astype(jnp.float32)
    t = _qk(qt_ref[rows, :].astype(jnp.float32), kt, valid, scale_t)
    ds = _dlogits(
      t, _qk(qs, ks, valid, scale_s), valid, lse_t_ref[rows], lse_s_ref[rows], g_ref[rows], scale_s
    )
    return dk + jnp.einsum("qk,qd->kd", ds, qs, preferred_element_type=jnp.float32)

  dk_ref[...] = lax.fori_loop(
    0, qt_ref.shape[0] // block_q, q_block, jnp.zeros(ks.shape, jnp.float32)
  )


def _row_spec(block: int, d: int) -> pl.BlockSpec:
  """One block of rows of one head of a [B, N, H, D] array, for a (b, h, block index) program."""
  return pl.BlockSpec((None, block, None, d), lambda b, h, i: (b, i, h, 0))


def _all_rows_spec(n: int, d: int) -> pl.BlockSpec:
  """All rows of one head of a [B, N, H, D] array."""
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


def _pallas_fwd_call(qt, kt, qs, ks, valid, scale_t, scale_s, block_q, block_k, interpret):
  (batch, nq, heads, dt), nk, ds = qt.shape, kt.shape[1], qs.shape[-1]
  row = jax.ShapeDtypeStruct((batch, heads, nq), jnp.float32)
  return pl.pallas_call(
    functools.partial(_fwd_kernel, scale_t=scale_t, scale_s=scale_s, block_k=block_k),
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
def _pallas_core(qt, kt, qs, ks, valid, scale_t, scale_s, block_q, block_k, interpret):
  """CE [B, H, Nq_padded] from padded [B, N_padded, H, D] q/k and int32 key validity [B, Nk_padded]."""
  return _pallas_fwd_call(qt, kt, qs, ks, valid, scale_t, scale_s, block_q, block_k, interpret)[0]


def _pallas_fwd(qt, kt, qs, ks, valid, scale_t, scale_s, block_q, block_k, interpret):
  ce, lse_t, lse_s = _pallas_fwd_call(
    qt, kt, qs, ks, valid, scale_t, scale_s, block_q, block_k, interpret
  )
  return ce, (qt, kt, qs, ks, valid, lse_t, lse_s)


def _pallas_bwd(scale_t, scale_s, block_q, block_k, interpret, res, g):
  qt, kt, qs, ks, valid, lse_t, lse_s = res
  (batch, nq, heads, dt), nk, ds = qt.shape, kt.shape[1], qs.shape[-1]
  scales = dict(scale_t=scale_t, scale_s=scale_s)
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
  )(qt, qs, lse_t, lse_s, g, kt, ks, valid)
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
  )(kt, ks, valid, qt, qs, lse_t, lse_s, g)
  return None, None, dq.astype(qs.dtype), dk.astype(ks.dtype), None


_pallas_core.defvjp(_pallas_fwd, _pallas_bwd)


def ce_pallas(
  q_t: Array,
  k_t: Array,
  q_s: Array,
  k_s: Array,
  *,
  scale_t: float,
  scale_s: float,
  key_mask: Array | None = None,
  block_q: int = 128,
  block_k: int = 128,
  interpret: bool = False,
) -> Array:
  """Per-query CE [B, H, N] from Pallas kernels (forward, dq, dk); O(N) memory, as `ce_blockwise`.

  `interpret=True` runs the kernels through the Pallas interpreter (any backend, slow); otherwise they
  compile for the default backend (Triton on GPU).

  XLA cannot split a pallas_call: under jit with batch-sharded inputs it gathers them and every device
  computes the whole batch (correct, not parallel). For data parallelism call this inside
  `jax.shard_map(..., in_specs=P(batch_axes), out_specs=P(batch_axes), check_vma=False)`.
  """
  _check_shapes(q_t, k_t, q_s, k_s, key_mask)
  batch, n, _, _ = q_t.shape
  # int32, not bool: kernels load the mask like any other array.
  valid = _valid_keys(key_mask, batch, n, block_k).astype(jnp.int32)
  ce = _pallas_core(
    _pad_tokens(q_t, block_q),
    _pad_tokens(k_t, block_k),
    _pad_tokens(q_s, block_q),
    _pad_tokens(k_s, block_k),
    valid,
    scale_t,
    scale_s,
    block_q,
    block_k,
    interpret,
  )
  return ce[:, :, :n]


# ---------------------------------------------------------------------------------------------------------


def attention_ce(
  impl: str,
  q_t: Array,
  k_t: Array,
  q_s: Array,
  k_s: Array,
  *,
  scale_t: float,
  scale_s: float,
  key_mask: Array | None = None,
  block_q: int = 128,
  block_k: int = 128,
  interpret: bool | None = None,
) -> Array:
  """Per-query attention CE [B, H, N] by the implementation named `impl` (one of `IMPLS`).

  Args:
    impl: "direct", "blockwise" or "pallas" (the `transfer.loss_impl` setting).
    q_t, k_t: the frozen teacher's queries and keys [B, N, H, Dt].
    q_s, k_s: the student's queries and keys [B, N, H, Ds].
    scale_t, scale_s: the logit scales (usually head_dim**-0.5 of each).
    key_mask: [B, N] bool, False for keys to leave out (padding tokens).
    block_q, block_k: tile sizes of the streamed implementations (ignored by "direct").
    interpret: Pallas only; None interprets on CPU and compiles elsewhere.
  """
  kw = dict(scale_t=scale_t, scale_s=scale_s, key_mask=key_mask)
  if impl == "direct":
    return ce_direct(q_t, k_t, q_s, k_s, **kw)
  if impl == "blockwise":
    return ce_blockwise(q_t, k_t, q_s, k_s, block_q=block_q, block_k=block_k, **kw)
  if impl == "pallas":
    if interpret is None:
      interpret = jax.default_backend() == "cpu"
    return ce_pallas(
      q_t, k_t, q_s, k_s, block_q=block_q, block_k=block_k, interpret=interpret, **kw
    )
  raise ConfigError("transfer.loss_impl", f"unknown {impl!r}; use one of {IMPLS}")
