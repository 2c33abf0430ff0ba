"""Analytic model FLOPs of one attention-transfer train step, and device peaks for MFU.

Pure Python (no JAX or PyTorch import), shared by benchmarks/step.py and benchmarks/torch_compare.py so
that both report MFU against the same count.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# Dense (no sparsity) peak TFLOP/s per chip, as (name, bfloat16, TF32, plain float32). A float32 matmul
# runs at the TF32 peak only where TF32 is on: XLA's default for f32 dots on NVIDIA Ampere and later, and
# PyTorch's only when asked (torch_reference.py --tf32); with TF32 off it gets the CUDA cores' fp32 peak,
# 15x lower on an H100. On TPU all three are the bf16 peak: JAX's default precision is one bf16 pass.
# Matched by substring of `device_kind`, first hit wins: more specific names come first ("H200 NVL" before
# "H200", which "GH200" also contains).
PEAK_TFLOPS: tuple[tuple[str, float, float, float], ...] = (
  ("H100 PCIe", 756.0, 378.0, 51.0),
  ("H100 NVL", 835.0, 418.0, 60.0),
  ("H100", 989.4, 494.7, 67.0),  # SXM
  ("H200 NVL", 835.0, 418.0, 60.0),
  ("GH200", 989.4, 494.7, 67.0),
  ("H200", 989.4, 494.7, 67.0),  # SXM
  ("A100", 312.0, 156.0, 19.5),
  ("TPU v5 lite", 197.0, 197.0, 197.0),
  ("TPU v5e", 197.0, 197.0, 197.0),
  ("TPU v5p", 459.0, 459.0, 459.0),
  ("TPU v5", 459.0, 459.0, 459.0),  # v5p reports device_kind "TPU v5"
  ("TPU v4", 275.0, 275.0, 275.0),
)


def peak_tflops(device_kind: str, dtype: str, override: float = 0.0, tf32: bool = True) -> float:
  """Peak dense TFLOP/s of `device_kind` for matmuls in `dtype`; 0.0 when unknown (e.g. a CPU).

  `tf32`: whether float32 matmuls use TF32 tensor cores. The default, True, is XLA's behaviour on NVIDIA
  GPUs; pass False for PyTorch with TF32 off (or JAX at "highest" precision), which gets the fp32 peak.
  """
  if override > 0:
    return override
  for name, bf16, tf32_peak, fp32 in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      if dtype in ("bfloat16", "bf16"):
        return bf16
      return tf32_peak if tf32 else fp32
  return 0.0


def train_step_flops(
  *,
  width: int,
  depth: int,
  mlp_dim: int,
  patch: int,
  num_patches: int,
  num_prefix: int = 1,
  num_classes: int = 1000,
  channels: int = 3,
  mode: str = "none",
  layers: Sequence[int] | None = None,
) -> dict[str, float]:
  """Model FLOPs (2 per multiply-add, matmuls only) per image of one train step.

  Counts what the step needs: the frozen teacher's forward up to the attention logits of the last
  transferred layer (never its head), the student's forward, and its backward at twice the forward for
  every matmul except the patch embedding (its input needs no gradient: weight gradient only). In copy mode
  the student's own q, k projections and q @ k^T are not needed in the transferred layers (the teacher's
  maps replace them), and maps @ V back-propagates to V alone (the frozen maps need no gradient): once its
  forward, not twice. Softmax, LayerNorm, GELU and the losses are elementwise and not counted.

  Args:
    width, depth, mlp_dim, patch: the ViT's shape (teacher and student share it here).
    num_patches: patches per image; tokens = num_patches + num_prefix (cls, registers).
    mode: "none" (scratch), "copy" or "distill".
    layers: the transferred layers (default: all).

  Returns:
    dict of per-image FLOPs: teacher_fwd, student_fwd, student_bwd, total.
  """
  n, d = num_patches + num_prefix, width
  layers = tuple(range(depth)) if layers is None else tuple(layers)
  embed = 2 * num_patches * patch * patch * channels * d
  qk_proj, v_proj, out_proj = 2 * n * d * 2 * d, 2 * n * d * d, 2 * n * d * d
  qk_t = av = 2 * n * n * d  # summed over heads: n^2 * head_dim * heads
  mlp = 2 * 2 * n * d * mlp_dim
  block = qk_proj + v_proj + out_proj + qk_t + av + mlp
  head = 2 * d * num_classes
  student_block = [
    block - (qk_proj + qk_t if mode == "copy" and i in layers else 0) for i in range(depth)
  ]
  student_fwd = embed + sum(student_block) + head
  copied = sum(1 for i in range(depth) if mode == "copy" and i in layers)
  student_bwd = embed + 2 * (sum(student_block) + head) - copied * av
  teacher_fwd = 0.0
  if mode != "none":
    last = max(layers)
    teacher_fwd = embed + last * block + qk_proj + qk_t
  return {
    "teacher_fwd": float(teacher_fwd),
    "student_fwd": float(student_fwd),
    "student_bwd": float(student_bwd),
    "total": float(teacher_fwd + student_fwd + student_bwd),
  }


def step_figures(
  seconds_per_step: Sequence[float], batch: int, flop_per_image: float, peak: float
) -> dict[str, float | None]:
  """One step's figures from its timed repetitions (seconds per step each): ms/step median and min,
  images/s and TFLOP/s at the median, and MFU in percent of `peak` TFLOP/s (None where the peak is
  unknown, e.g. a CPU). Shared by benchmarks/torch_compare.py and benchmarks/gpu_report.py."""
  median = 1000 * statistics.median(seconds_per_step)
  tflops = batch * flop_per_image / (median / 1000) / 1e12
  return {
    "ms_median": median,
    "ms_min": 1000 * min(seconds_per_step),
    "img_s": batch / median * 1000,
    "tflops": tflops,
    "mfu_pct": 100 * tflops / peak if peak else None,
  }
