"""The stages of benchmarks/gpu_bench.py that check and time kernels rather than whole train steps:
preflight (the matmul ceiling, and whether a default f32 dot is TF32), kernels (Pallas and blockwise
attention CE against direct, cuDNN against XLA attention, and a small distill step with both fused
paths) and loss_memory (one layer's distillation loss + gradient)."""

from __future__ import annotations

from typing import Any

import gpu_stage  # benchmarks/gpu_stage.py
import gpu_steps  # benchmarks/gpu_steps.py

# ---------------------------------------------------------------------------------------------------------
# preflight


def preflight(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  n = sizes.matmul
  for dtype in ("bfloat16", "float32"):
    with record.row(kind="matmul", dtype=dtype):
      a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0), 2))
      matmul = jax.jit(jnp.matmul).lower(a, b).compile()
      seconds = gpu_stage.time_call(lambda: matmul(a, b), 10)
      record(
        {
          "kind": "matmul",
          "dtype": dtype,
          "n": n,
          "tflops": 2 * n**3 / seconds / 1e12,
          "ms": 1e3 * seconds,
        }
      )
  # Precision of a default f32 dot: ~1e-3 relative error is TF32 (10-bit mantissa) or one bf16 pass,
  # ~1e-6 is true f32.
  with record.row(kind="f32_precision"):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 512, 512), np.float32)
    got = np.asarray(jax.jit(jnp.matmul)(a, b))
    want = a.astype(np.float64) @ b.astype(np.float64)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    record({"kind": "f32_precision", "max_rel_error": rel, "f32_is_reduced": rel > 1e-4})


# ---------------------------------------------------------------------------------------------------------
# kernels


def _ce_grads(impl: str, qk: list, dtype_reference: bool, **blocks: int) -> tuple[Any, Any, Any]:
  """(mean CE, d/dq_student, d/dk_student) of one implementation, jitted."""
  import jax

  from at_jax.ops import attn_ce

  scales = dict(scale_teacher=qk[0].shape[-1] ** -0.5, scale_student=qk[2].shape[-1] ** -0.5)

  def loss(q_s, k_s):
    return attn_ce.attention_ce(impl, qk[0], qk[1], q_s, k_s, **scales, **blocks).mean()

  precision = "float32" if dtype_reference else None
  with jax.default_matmul_precision(precision):
    value, (dq, dk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(qk[2], qk[3])
  return value, dq, dk


def _rel_diff(got: Any, want: Any) -> float:
  import numpy as np

  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def attention_ce_checks(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  """Pallas and blockwise vs direct (f32 reference at full precision): f32 and bf16 inputs at the
  smaller token count, bf16 (the recipes' dtype) at the larger."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  h, d = sizes.kernel_heads, sizes.kernel_head_dim
  small, large = sizes.kernel_tokens
  for n, dtypes in ((small, ("float32", "bfloat16")), (large, ("bfloat16",))):
    base = [2 * rng.standard_normal((2, n, h, d), np.float32) for _ in range(4)]
    with record.row(kind="ce_reference", tokens=n):
      reference = _ce_grads("direct", [jnp.asarray(x) for x in base], True)
    for dtype in dtypes:
      qk = [jnp.asarray(x, dtype) for x in base]
      for impl in ("blockwise", "pallas"):
        with record.row(kind="ce_check", impl=impl, tokens=n, dtype=dtype):
          got = _ce_grads(impl, qk, dtype == "float32")
          record(
            {
              "kind": "ce_check",
              "impl": impl,
              "tokens": n,
              "dtype": dtype,
              "backend": jax.default_backend(),
              "rel_diff_value": _rel_diff(got[0], reference[0]),
              "rel_diff_dq": _rel_diff(got[1], reference[1]),
              "rel_diff_dk": _rel_diff(got[2], reference[2]),
            }
          )


def cudnn_attention(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  """jax.nn.dot_product_attention, cuDNN against XLA, bf16: values, gradients, time, the op in the text."""
  import jax
  import numpy as np

  if jax.default_backend() != "gpu":
    record({"kind": "cudnn_attention", "skipped": f"no cuDNN on {jax.default_backend()}"})
    return
  b = 32
  for n in sizes.kernel_tokens:
    with record.row(kind="cudnn_attention", tokens=n):
      keys = jax.random.split(jax.random.key(1), 3)
      q, k, v = (
        jax.random.normal(key, (b, n, sizes.kernel_heads, sizes.kernel_head_dim), "bfloat16")
        for key in keys
      )
      figures: dict[str, Any] = {}
      outputs = {}
      for impl in ("xla", "cudnn"):

        def loss(q, k, v, impl=impl):
          return jax.nn.dot_product_attention(q, k, v, implementation=impl).astype("float32").sum()

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        outputs[impl] = compiled(q, k, v)
        figures[impl] = {
          "ms": 1e3 * gpu_stage.time_call(lambda c=compiled: c(q, k, v), 10),
          "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
          "cudnn_in_text": gpu_stage.cudnn_in(compiled),
        }
      grads = [
        _rel_diff(np.asarray(g_c, np.float32), np.asarray(g_x, np.float32))
        for g_c, g_x in zip(outputs["cudnn"][1], outputs["xla"][1])
      ]
      record(
        {"kind": "cudnn_attention", "tokens": n, "batch": b, **figures, "rel_diff_grads": grads}
      )


def small_fused_pallas_step(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  """A few steps of distillation with fused attention + the Pallas loss against materialised + direct:
  same first-step losses, finite after."""

  for attention, loss_impl in (("materialized", "direct"), ("fused", "pallas")):
    with record.row(kind="small_step", attention=attention, loss_impl=loss_impl):
      s = gpu_steps.recipe_step(sizes, sizes.small_step, "distill", attention, loss_impl)
      s.run(1)  # the first execution loads kernels and builds cuDNN graphs: not a step's time
      ms = 1e3 * s.run(3)
      record(
        {
          "kind": "small_step",
          "model": sizes.small_step,
          "attention": attention,
          "loss_impl": loss_impl,
          "first_ce": s.first_metrics["ce_loss"],
          "first_distill": s.first_metrics["distill_loss"],
          "ms": ms,
          "compile_s": s.compile_s,
          "cudnn_in_text": gpu_stage.cudnn_in(s.compiled),
        }
      )
      s.close()


def kernels(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  attention_ce_checks(sizes, record)
  cudnn_attention(sizes, record)
  small_fused_pallas_step(sizes, record)


# ---------------------------------------------------------------------------------------------------------
# loss_memory


def loss_memory(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  """Compiled temp memory and time of one layer's CE + student gradients (benchmarks/distill_memory.py),
  per implementation and token count, ViT-L heads, bf16 q/k, the recipe's per-device batch."""
  import distill_memory  # benchmarks/distill_memory.py

  from at_jax.ops import attn_ce

  for tokens in sizes.loss_tokens:
    for impl in attn_ce.IMPLS:
      with record.row(kind="loss_memory", impl=impl, tokens=tokens):
        figures = distill_memory.measure(
          impl,
          tokens,
          batch=sizes.loss_batch,
          heads=sizes.kernel_heads,
          head_dim=sizes.kernel_head_dim,
          dtype="bfloat16",
          iters=5,
        )
        record({"kind": "loss_memory", **figures})
