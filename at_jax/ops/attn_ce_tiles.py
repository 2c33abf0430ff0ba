"""The tile math of the streamed attention CE, shared by the pure-JAX loop (`attn_ce.ce_blockwise`) and the
Pallas kernels (`attn_ce_pallas`): one online-softmax step, the per-query CE carried over key tiles, the
student's logit cotangent, the checks and padding of the inputs, and the tile size (`auto_block`).

Tiles are [..., rows, cols] (queries x keys): the leading axes are (B, H) in the pure-JAX loop and absent
inside a Pallas kernel. Teacher values carry `_teacher`, the student's `_student`.
"""

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# Masked logits get a finite stand-in for -inf: with -inf, a block whose keys are all masked would give
# exp(-inf - -inf) = NaN in the running-max update. Their probabilities are also zeroed explicitly.
MASKED = -0.7 * float(np.finfo(np.float32).max)


def masked(logits: Array, valid: Array) -> Array:
  """`logits` with MASKED where `valid` (broadcasting to them) is False."""
  return jnp.where(valid, logits, MASKED)


def online_step(
  running_max: Array, running_sum: Array, logits: Array, valid: Array
) -> tuple[Array, Array, Array, Array]:
  """One online-softmax step over a tile of logits [..., bq, bk].

  Returns the new running max and sum (of exp(logits - max)), the factor alpha that rescales sums taken
  against the old max, and the tile's unnormalised probabilities exp(logits - new max) (0 on masked keys).
  """
  new_max = jnp.maximum(running_max, logits.max(axis=-1))
  alpha = jnp.exp(running_max - new_max)
  p = jnp.where(valid, jnp.exp(logits - new_max[..., None]), 0.0)
  return new_max, running_sum * alpha + p.sum(axis=-1), alpha, p


def ce_init(shape: tuple[int, ...]) -> tuple[Array, ...]:
  """The carry (max_teacher, sum_teacher, max_student, sum_student, acc) before any key tile."""
  neg, zero = jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32)
  return neg, zero, neg, zero, zero


def ce_step(
  carry: tuple[Array, ...], logits_teacher: Array, logits_student: Array, valid: Array
) -> tuple[Array, ...]:
  """Folds one key tile into the carry; acc = sum_j exp(teacher_ij - max_teacher_i) student_ij."""
  max_teacher, sum_teacher, max_student, sum_student, acc = carry
  max_teacher, sum_teacher, alpha_teacher, p_teacher = online_step(
    max_teacher, sum_teacher, logits_teacher, valid
  )
  max_student, sum_student, _, _ = online_step(max_student, sum_student, logits_student, valid)
  acc = acc * alpha_teacher + jnp.sum(p_teacher * logits_student, axis=-1)
  return max_teacher, sum_teacher, max_student, sum_student, acc


def ce_finish(carry: tuple[Array, ...]) -> tuple[Array, Array, Array]:
  """(ce, lse_teacher, lse_student) from the folded carry."""
  max_teacher, sum_teacher, max_student, sum_student, acc = carry
  lse_student = max_student + jnp.log(sum_student)
  return lse_student - acc / sum_teacher, max_teacher + jnp.log(sum_teacher), lse_student


def dlogits(
  logits_teacher: Array,
  logits_student: Array,
  valid: Array,
  lse_teacher: Array,
  lse_student: Array,
  g: Array,
  scale_student: float,
) -> Array:
  """Cotangent of the student's raw dot products q.k for one tile: g (p_student - p_teacher) scale."""
  p_teacher = jnp.where(valid, jnp.exp(logits_teacher - lse_teacher[..., None]), 0.0)
  p_student = jnp.where(valid, jnp.exp(logits_student - lse_student[..., None]), 0.0)
  return (g[..., None] * scale_student) * (p_student - p_teacher)


def check_shapes(
  q_teacher_BNHK: Array,
  k_teacher_BNHK: Array,
  q_student_BNHK: Array,
  k_student_BNHK: Array,
  key_mask_BN: Array | None,
) -> None:
  """ValueError unless q and k match, are [B, N, H, K], and teacher and student share B, N and H."""
  teacher, student = q_teacher_BNHK.shape, q_student_BNHK.shape
  if teacher != k_teacher_BNHK.shape or student != k_student_BNHK.shape or len(teacher) != 4:
    raise ValueError(
      f"q and k must match and be [B, N, H, K]: teacher {teacher}, {k_teacher_BNHK.shape}; "
      f"student {student}, {k_student_BNHK.shape}"
    )
  if teacher[:3] != student[:3]:
    raise ValueError(f"teacher {teacher} and student {student} differ in batch, tokens or heads")
  if key_mask_BN is not None and key_mask_BN.shape != teacher[:2]:
    raise ValueError(f"key_mask {key_mask_BN.shape} must be [B, N] = {teacher[:2]}")


def next_pow2(n: int, minimum: int = 16) -> int:
  """The smallest power of two >= max(n, minimum): Triton's tile sizes and dot dims (it wants >= 16)."""
  return max(minimum, 1 << (n - 1).bit_length())


def auto_block(tokens: int, head_dim: int) -> int:
  """block_q = block_k of the streamed CE when `transfer.loss_block` is 0 (auto).

  `head_dim`: the larger of the teacher's and student's head dims (padded or not: a dim is <= 64 exactly
  when its next power of two is). 128 up to head dim 64, else 64: a kernel program holds one block of q
  rows and two pipeline stages of k rows for both models, which in float32 (the teacher's q and k usually
  are) is 192 KB at 128 rows x 64 dims or 64 rows x 128 dims (ViT-H/14's 80, padded), but 384 KB at 128 x
  128, past Hopper's 227 KB of shared memory. Never more than `tokens` rounded up to a power of two (at
  least 16), so that small inputs are not padded to a whole 128-row block.
  """
  return min(128 if head_dim <= 64 else 64, next_pow2(tokens))


def pad_tokens(x: Array, block: int) -> Array:
  """Pads axis 1 (tokens) with zeros up to a whole number of blocks."""
  pad = -x.shape[1] % block
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def valid_keys(key_mask_BN: Array | None, batch: int, n: int, block_k: int) -> Array:
  """[B, Nk_padded] bool: the caller's key mask (or all True), False on padded keys."""
  valid_BN = jnp.ones((batch, n), bool) if key_mask_BN is None else key_mask_BN.astype(bool)
  return pad_tokens(valid_BN, block_k)
