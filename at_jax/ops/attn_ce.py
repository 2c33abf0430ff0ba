"""Attention-distillation loss: per-query cross-entropy between teacher and student attention.

For one batch element and head, with teacher logits t_ij = scale_teacher q_teacher[i].k_teacher[j] and
student logits s_ij = scale_student q_student[i].k_student[j] over keys j, the per-query loss is

  CE_i = -sum_j softmax(t_i)_j log_softmax(s_i)_j = logsumexp_j(s_ij) - sum_j softmax(t_i)_j s_ij,

and its gradient with respect to s_ij is g_i (softmax(s_i)_j - softmax(t_i)_j). The teacher is frozen: it
gets no gradient.

Implementations (`IMPLS`), all returning float32 CE of shape [B, H, Nq]:
  direct     materialises both [B, H, N, N] logit maps of the layer; plain autodiff. Memory O(N^2).
  blockwise  pure JAX, flash-style: loops over query blocks and key blocks with an online (running max,
             running sum) softmax for both distributions; a custom VJP recomputes the blocks. No array
             larger than block_q x block_k per (batch, head) exists, so memory is O(N).
  pallas     the same algorithm as Pallas kernels (`attn_ce_pallas`), one program per (batch, head,
             query or key block). `interpret=True` runs it anywhere (tests run it on CPU).

Layout follows the ViT: q, k are [B, N, H, K]. Teacher and student may differ in head dim (widths), not in
head count. Inputs may be bfloat16: "direct" and "blockwise" upcast them, the Pallas kernels run their
dots in the inputs' dtype with float32 accumulation; softmax and CE math is float32 in all three.
`key_mask_BN` drops the False keys (padding tokens) from both softmaxes; every batch element needs at
least one True key. Block sizes (`transfer.loss_block`; 0 = `attn_ce_tiles.auto_block`) need not divide
N: inputs are padded to whole blocks, padded keys masked and padded query rows dropped.

q.k logits are formed in one place, `qk_logits`, for this module, the ViT's attention and the transfer
loss's reference formula; the Pallas kernels use its 2-D form (Triton lowers no batched dots).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from at_jax.errors import ConfigError
from at_jax.ops import attn_ce_pallas
from at_jax.ops import attn_ce_tiles as tiles

Array = jax.Array
IMPLS = ("direct", "blockwise", "pallas")


def qk_logits(q_NHK: Array, k_NHK: Array, scale: float, dtype: Any = jnp.float32) -> Array:
  """float32 logits [..., H, Nq, Nk] = scale q.k of q [..., Nq, H, K] and k [..., Nk, H, K].

  Any leading axes. The product runs in `dtype` (the inputs are cast to it: float32 for the losses, the
  ViT's `dtype_mm` in its own attention) and accumulates in float32.
  """
  logits = jnp.einsum(
    "...qhd,...khd->...hqk",
    q_NHK.astype(dtype),
    k_NHK.astype(dtype),
    preferred_element_type=jnp.float32,
  )
  return logits * scale


# ---------------------------------------------------------------------------------------------------------
# Direct: materialised maps.


def ce_from_logits(
  teacher_logits_BHNN: Array,
  student_logits_BHNN: Array,
  key_mask_BN: Array | None = None,
  *,
  student_lse_BHN: Array | None = None,
) -> Array:
  """Per-query CE [B, H, Nq] from materialised teacher and student logits [B, H, Nq, Nk], in float32.

  Without a key mask any leading axes work ([..., Nq, Nk] -> [..., Nq]). Keys where `key_mask_BN` [B, Nk]
  is False are left out of both softmaxes. The teacher gets no gradient. `student_lse_BHN`: logsumexp of
  the student's logits over keys, if the caller has it (no key mask then).
  """
  teacher = lax.stop_gradient(teacher_logits_BHNN.astype(jnp.float32))
  student = student_logits_BHNN.astype(jnp.float32)
  if key_mask_BN is not None:
    valid_BHNN = key_mask_BN[:, None, None, :]
    teacher = jnp.where(valid_BHNN, teacher, tiles.MASKED)
    student = jnp.where(valid_BHNN, student, tiles.MASKED)
  p_teacher = jax.nn.softmax(teacher, axis=-1)  # exactly 0 on masked keys: they drop out of the sum
  return ce_from_probs(p_teacher, student, student_lse=student_lse_BHN)


def ce_from_probs(
  teacher_probs: Array, student_logits: Array, *, student_lse: Array | None = None
) -> Array:
  """Per-query CE [..., Nq] of student logits [..., Nq, Nk] against given teacher probabilities, in
  float32, with a gradient in both: `ce_from_logits` stops the teacher's before it comes here; a target
  the student trains itself (a learned mix of the teacher's heads) keeps its own."""
  student = student_logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(student, axis=-1) if student_lse is None else student_lse
  return lse - jnp.sum(teacher_probs.astype(jnp.float32) * student, axis=-1)


def logits_of(probs: Array) -> Array:
  """Logits of exactly the maps `probs` (their log), with zeros at log(float32 tiny) rather than -inf,
  so that no -inf * 0 reaches a cross-entropy or divergence."""
  return jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))


def ce_direct(
  q_teacher_BNHK: Array,
  k_teacher_BNHK: Array,
  q_student_BNHK: Array,
  k_student_BNHK: Array,
  *,
  scale_teacher: float,
  scale_student: float,
  key_mask_BN: Array | None = None,
) -> Array:
  """Per-query CE [B, H, N] through both [B, H, N, N] logit maps (the reference; O(N^2) memory)."""
  tiles.check_shapes(q_teacher_BNHK, k_teacher_BNHK, q_student_BNHK, k_student_BNHK, key_mask_BN)
  return ce_from_logits(
    qk_logits(q_teacher_BNHK, k_teacher_BNHK, scale_teacher),
    qk_logits(q_student_BNHK, k_student_BNHK, scale_student),
    key_mask_BN,
  )


# ---------------------------------------------------------------------------------------------------------
# Blockwise: pure JAX. Block-major arrays ([n, B, block, H, K], n blocks of rows) walked by lax.scan/map;
# the tiles of logits are [B, H, bq, bk].


def _to_blocks(x_BNHK: Array, block: int) -> Array:
  """[B, N, H, K] -> float32 [N_padded / block, B, block, H, K], block-major for lax.scan/map."""
  b, _, h, d = x_BNHK.shape
  x = tiles.pad_tokens(x_BNHK.astype(jnp.float32), block)
  return x.reshape(b, -1, block, h, d).transpose(1, 0, 2, 3, 4)


def _from_blocks(x: Array) -> Array:
  """[n, B, H, block, ...] -> [B, H, n * block, ...], undoing the block-major layout of rows."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def _tile_logits(q: Array, k: Array, valid: Array, scale: float) -> Array:
  """Masked logits [B, H, bq, bk] of one query block [B, bq, H, K] against one key block [B, bk, H, K]."""
  return tiles.masked(qk_logits(q, k, scale), valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise_core(
  qt_b: Array,
  kt_b: Array,
  qs_b: Array,
  ks_b: Array,
  valid_b: Array,
  scale_teacher: float,
  scale_student: float,
) -> Array:
  """CE [nq, B, H, bq] from block-major q/k (`t` the teacher's, `s` the student's) and key validity
  [nk, B, bk]."""
  return _blockwise_fwd(qt_b, kt_b, qs_b, ks_b, valid_b, scale_teacher, scale_student)[0]


def _blockwise_fwd(qt_b, kt_b, qs_b, ks_b, valid_b, scale_teacher, scale_student):
  def q_block(q):
    qt, qs = q

    def k_block(carry, k):
      kt, ks, valid = k
      valid = valid[:, None, None, :]
      logits_teacher = _tile_logits(qt, kt, valid, scale_teacher)
      logits_student = _tile_logits(qs, ks, valid, scale_student)
      return tiles.ce_step(carry, logits_teacher, logits_student, valid), None

    rows = (qt.shape[0], qt.shape[2], qt.shape[1])  # [B, H, bq]
    carry, _ = lax.scan(k_block, tiles.ce_init(rows), (kt_b, ks_b, valid_b))
    return tiles.ce_finish(carry)

  # lax.map runs the query blocks one after another, so only one block's [B, H, bq, bk] tiles are live.
  ce, lse_teacher, lse_student = lax.map(q_block, (qt_b, qs_b))
  return ce, (qt_b, kt_b, qs_b, ks_b, valid_b, lse_teacher, lse_student)


def _blockwise_bwd(scale_teacher, scale_student, res, g_b):
  qt_b, kt_b, qs_b, ks_b, valid_b, lse_teacher, lse_student = res

  def k_block(dq_b, k):
    kt, ks, valid = k
    valid = valid[:, None, None, :]

    def q_block(dk, q):
      qt, qs, lse_t, lse_s, g, dq = q
      logits_teacher = _tile_logits(qt, kt, valid, scale_teacher)
      logits_student = _tile_logits(qs, ks, valid, scale_student)
      ds = tiles.dlogits(logits_teacher, logits_student, valid, lse_t, lse_s, g, scale_student)
      dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, ks)
      return dk + jnp.einsum("bhqk,bqhd->bkhd", ds, qs), dq

    # Each key block's dk is complete after one pass over the queries; dq accumulates across key blocks.
    xs = (qt_b, qs_b, lse_teacher, lse_student, g_b, dq_b)
    dk, dq_b = lax.scan(q_block, jnp.zeros_like(ks), xs)
    return dq_b, dk

  dq_b, dk_b = lax.scan(k_block, jnp.zeros_like(qs_b), (kt_b, ks_b, valid_b))
  # The teacher is frozen and the key mask is not differentiable: no cotangents for them.
  return None, None, dq_b, dk_b, None


_blockwise_core.defvjp(_blockwise_fwd, _blockwise_bwd)


def ce_blockwise(
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
) -> Array:
  """Per-query CE [B, H, N] streamed over block_q x block_k tiles in pure JAX; O(N) memory.

  Gradients flow to the student's q and k only (a custom VJP that recomputes the tiles from the saved
  per-row logsumexps of both distributions). A block of 0 picks `tiles.auto_block`, as the kernels do.
  """
  tiles.check_shapes(q_teacher_BNHK, k_teacher_BNHK, q_student_BNHK, k_student_BNHK, key_mask_BN)
  batch, n, _, _ = q_teacher_BNHK.shape
  auto = tiles.auto_block(n, max(q_teacher_BNHK.shape[-1], q_student_BNHK.shape[-1]))
  block_q, block_k = block_q or auto, block_k or auto
  valid_BN = tiles.valid_keys(key_mask_BN, batch, n, block_k)
  ce_b = _blockwise_core(
    _to_blocks(q_teacher_BNHK, block_q),
    _to_blocks(k_teacher_BNHK, block_k),
    _to_blocks(q_student_BNHK, block_q),
    _to_blocks(k_student_BNHK, block_k),
    valid_BN.reshape(batch, -1, block_k).transpose(1, 0, 2),
    scale_teacher,
    scale_student,
  )
  return _from_blocks(ce_b)[:, :, :n]


# ---------------------------------------------------------------------------------------------------------


def attention_ce(
  impl: str,
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
  interpret: bool | None = None,
) -> Array:
  """Per-query attention CE [B, H, N] by the implementation named `impl` (one of `IMPLS`).

  Args:
    impl: "direct", "blockwise" or "pallas" (the `transfer.loss_impl` setting).
    q_teacher_BNHK, k_teacher_BNHK: the frozen teacher's queries and keys [B, N, H, K_teacher].
    q_student_BNHK, k_student_BNHK: the student's queries and keys [B, N, H, K_student].
    scale_teacher, scale_student: the logit scales (usually head_dim**-0.5 of each).
    key_mask_BN: [B, N] bool, False for keys to leave out (padding tokens).
    block_q, block_k: tile sizes of the streamed implementations (ignored by "direct"); 0 picks
      `attn_ce_tiles.auto_block`. The model passes `transfer.loss_block` as both.
    interpret: Pallas only; None interprets on CPU and compiles elsewhere. Inside a step traced under
      `sharding.on_mesh` the kernels run on each device's examples (`attn_ce_pallas.ce_pallas_sharded`).
  """
  qk = (q_teacher_BNHK, k_teacher_BNHK, q_student_BNHK, k_student_BNHK)
  kw = dict(scale_teacher=scale_teacher, scale_student=scale_student, key_mask_BN=key_mask_BN)
  if impl == "direct":
    return ce_direct(*qk, **kw)
  if impl == "blockwise":
    return ce_blockwise(*qk, block_q=block_q, block_k=block_k, **kw)
  if impl == "pallas":
    if interpret is None:
      interpret = jax.default_backend() == "cpu"
    return attn_ce_pallas.ce_pallas_sharded(
      *qk, block_q=block_q, block_k=block_k, interpret=interpret, **kw
    )
  raise ConfigError("transfer.loss_impl", f"unknown {impl!r}; use one of {IMPLS}")
