"""The distillation loss: attention cross-entropy (or q/k/v mean squared error) and the paper's reduction;
the feature-distillation baseline's per-token standardised MSE."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.ops import attn_ce
from at_jax.transfer import spec

Array = jax.Array


def attention_cross_entropy(teacher_logits_NN: Array, student_logits_NN: Array) -> Array:
  """-sum_j softmax(teacher)_j log_softmax(student)_j over the key axis (last), in float32.

  Logits [..., Nq, Nk] with any leading axes; the result has their shape minus the key axis.
  """
  return attn_ce.ce_from_logits(teacher_logits_NN, student_logits_NN)


def _teacher_logits(teacher_targets: Mapping[str, Array]) -> Array:
  """[S, B, H, N, N] teacher logits from stored logits or from q and k."""
  if "attn_logits" in teacher_targets:
    return teacher_targets["attn_logits"]
  q_SBNHK, k_SBNHK = teacher_targets["q"], teacher_targets["k"]
  return attn_ce.qk_logits(q_SBNHK, k_SBNHK, q_SBNHK.shape[-1] ** -0.5)


def _paper_reduction(per_SH: Array, transfer: spec.Transfer) -> Array:
  """Mean over the selected heads of each layer, summed over layers (the paper's reduction)."""
  mask_SH = jnp.asarray(transfer.head_mask(), jnp.float32)
  return jnp.sum(jnp.sum(per_SH * mask_SH, axis=1) / jnp.sum(mask_SH, axis=1))


def _token_norm(x: Array, eps: float = 1e-6) -> Array:
  """Each token's vector standardised over its channels (LayerNorm without scale or bias), float32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def feature_loss(student_SBND: Array, teacher_SBND: Array) -> Array:
  """[S]: the mean squared error between the student's and the teacher's block outputs of each layer,
  both standardised per token, over batch, tokens and channels. Per-token standardisation makes it
  blind to the residual stream's growing scale (the norms differ between two ViTs trained apart); a
  perfect match gives 0, unrelated features about 2."""
  err = (_token_norm(student_SBND) - _token_norm(teacher_SBND)) ** 2
  return err.mean(axis=(1, 2, 3))


def distill_loss(
  student_out: Mapping[str, Array],
  teacher_targets: Mapping[str, Array],
  transfer: spec.Transfer,
) -> Array:
  """weight * sum over selected layers of the mean (over batch, selected heads, queries) loss.

  `attn`: cross-entropy between softmax(teacher logits) and log_softmax(student logits) over keys; its
  minimum over the student is the teacher's attention entropy. Taken from the per-layer "attn_ce" the
  student's blocks computed (given `attn_target`), else from its stacked "attn_logits" (the reference
  formula, materialising every selected layer's maps). `q`/`k`/`v`: mean squared error.
  """
  layers = np.asarray(transfer.layers)
  if transfer.what == "features":  # the paper's baseline: summed over layers, no heads
    # Projected to the teacher's width where the student has the head (`ViT.feature_dim`).
    student_LBND = student_out.get("projected_features", student_out["features"])
    per_S = feature_loss(student_LBND[layers], teacher_targets["features"])
    return transfer.weight * per_S.sum()
  skip = transfer.student_prefix  # tokens left out of the loss (transfer.prefix "drop")
  if transfer.what == "attn" and "attn_ce" in student_out:
    per_SH = student_out["attn_ce"][layers]
  elif transfer.what == "attn" and "attn_probs" in teacher_targets:  # a learned mix of heads
    student_SBHNN = student_out["attn_logits"][layers][..., skip:, skip:]
    per_SH = attn_ce.ce_from_probs(teacher_targets["attn_probs"], student_SBHNN).mean((1, 3))
  elif transfer.what == "attn":  # [S, B, H, N, N] -> per query [S, B, H, N] -> [S, H]
    student_SBHNN = student_out["attn_logits"][layers][..., skip:, skip:]
    per_SBHN = attention_cross_entropy(_teacher_logits(teacher_targets), student_SBHNN)
    per_SH = per_SBHN.mean((1, 3))
  else:  # [S, B, N, H, K] -> [S, H]
    teacher_SBNHK = teacher_targets[transfer.what].astype(jnp.float32)
    projected = student_out.get(f"projected_{transfer.what}")  # a teacher of another width
    student_SBNHK = (
      student_out[transfer.what][layers]
      if projected is None
      else projected[layers].reshape(teacher_SBNHK.shape)
    ).astype(jnp.float32)
    err_SBNHK = (student_SBNHK - teacher_SBNHK) ** 2
    per_SH = err_SBNHK.mean(axis=(1, 2, 4))
  return transfer.weight * _paper_reduction(per_SH, transfer)
