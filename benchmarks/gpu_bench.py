"""The GPU benchmark's stages, one per process: `benchmarks/gpu.sh` runs each under its own timeout.

  python benchmarks/gpu_bench.py --stage=preflight --out=$OUT/results1.jsonl
  python benchmarks/gpu_bench.py --stage=kernels --out=/tmp/r.jsonl --dry_run   # tiny shapes, any backend

Every figure is appended to the JSONL file `--out` the moment it exists, one object per line with its
`stage` and `kind`, flushed and fsynced, so that a stage killed at any point keeps everything before it:
- `stage_start` names the device (device_kind, backend, jax version); `row_start` names what the stage
  is about to do, so the last one in a killed stage says where it was;
- `compile`: one per XLA program compiled (or read from the persistent cache), with its seconds;
- the measurements themselves, raw: one `step_time` per (setting, repetition) of a train step and one
  `step` per setting with its static figures (FLOPs, compile time, memory); `torch_rep` and `torch_row`
  likewise against PyTorch; one record per kernel check, matmul and loss-memory row.
No stage computes a summary: MFU, medians and ratios are derived afterwards from these records by
`benchmarks/gpu_report.py`, which also runs on the CPU and writes RESULTS.md's GPU tables.
A row that raises (an OOM, a kernel that does not compile) is recorded as `kind: "error"` and the stage
goes on. `--dry_run` runs the same code on tiny shapes (any backend: CI runs it on the CPU), so nothing
can crash on the GPU for a reason a CPU could have shown.

Stages (benchmarks/gpu_plan.py: which command runs which, in this order, under which budget):
  preflight       bf16 and default-precision f32 matmuls: the measured ceiling, and whether f32 is TF32
  recipe          the ViT-L/16 recipe step (bf16, scan, remat dots, batch 32): the paper's 18-layer
                  distillation and scratch; MFU and distill/scratch come from their step_time records
  torch_headline  ours (scan) vs PyTorch/timm, ViT-B/16 batch 64, distill, fp32 (TF32) and autocast bf16
  kernels         Pallas and blockwise attention CE vs direct (value, student gradients); cuDNN vs XLA
                  attention in bf16 with the cuDNN call found in the compiled text; a small distill step
                  with fused attention + the Pallas loss against materialised + direct (same first losses)
  fused           the recipe step with fused attention (scratch) and fused + Pallas loss (distill): time,
                  temp memory, cuDNN in the compiled step (the materialised baseline is recipe's)
  loss_memory     one layer's distillation loss + gradient: compiled temp memory and time at 197/785/1601
                  tokens for direct, blockwise and pallas
  torch_l16       ours vs PyTorch, ViT-L/16 batch 32, scratch and distill, bf16
  torch_b16       ours vs PyTorch, ViT-B/16, scratch (with timm's fused-SDPA row) and copy, fp32 and bf16
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import flops  # benchmarks/flops.py
import gpu_plan  # benchmarks/gpu_plan.py
from absl import app, flags

flags.DEFINE_enum("stage", None, list(gpu_plan.STAGES), "The stage to run.")
flags.DEFINE_string("out", None, "JSONL file the records are appended to.")
flags.DEFINE_bool("dry_run", False, "Tiny shapes: the same code paths in seconds, on any backend.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The shapes each stage measures: the GPU's, or the dry run's."""

  matmul: int  # square matmul side for the ceiling
  kernel_tokens: tuple[int, int]  # attention-CE checks: (f32 and bf16, bf16 only)
  kernel_heads: int
  kernel_head_dim: int
  recipe: str  # VARIANT@IMAGE:BATCH of the recipe step
  recipe_layers: str  # the distilled layers
  loss_tokens: tuple[int, ...]  # loss_memory's token counts (image side = (tokens - 1) ** 0.5 * 16)
  loss_batch: int
  small_step: str  # the kernels stage's end-to-end step
  torch_b: str
  torch_l: str
  torch_remat: str
  steps: int
  reps: int


GPU = Sizes(
  matmul=8192,
  kernel_tokens=(197, 1601),
  kernel_heads=16,
  kernel_head_dim=64,
  recipe="L/16@224:32",
  recipe_layers="end_layer:-6",
  loss_tokens=(197, 785, 1601),
  loss_batch=32,
  small_step="Ti/16@224:16",
  torch_b="B/16@224:64",
  torch_l="L/16@224:32",
  torch_remat="none",  # as PyTorch's step: no activation checkpointing
  steps=5,
  reps=3,
)
# Head dim 8 and tokens that no block divides: the dry run also exercises the kernels' padding. Every
# step of the dry run is one of four programs (scratch/distill x materialised/fused+pallas, Pico/7 at
# the recipe's settings), so the persistent compilation cache compiles each once across the stages.
DRY = Sizes(
  matmul=256,
  kernel_tokens=(17, 50),
  kernel_heads=2,
  kernel_head_dim=8,
  recipe="Pico/7@28:8",
  recipe_layers="all",
  loss_tokens=(17, 50),
  loss_batch=2,
  small_step="Pico/7@28:8",
  torch_b="Pico/7@28:8",
  torch_l="Pico/7@28:8",
  torch_remat="dots",
  steps=1,
  reps=2,
)
COMPILE_EVENT = (
  "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Recorder:
  """Appends one JSON object per figure to a file the moment it exists (flushed, fsynced), and prints it.

  Each record carries the stage, the time and the row being run (`row()`), so a compile or an error is
  attributed to the setting that caused it."""

  def __init__(self, path: str, stage: str):
    self.path, self.stage = path, stage
    self.current: dict[str, Any] = {}

  def __call__(self, record: dict[str, Any]) -> None:
    record = {"stage": self.stage, "time": round(time.time(), 2), **record}
    if self.current and "row" not in record:
      record["row"] = self.current
    line = json.dumps(record, default=_plain)
    with open(self.path, "a") as f:
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())
    print(line, flush=True)

  @contextlib.contextmanager
  def row(self, **what: Any) -> Iterator[None]:
    """Records `row_start` (what is about to run), and an exception inside the block as `kind: "error"`
    (with `what`), then carries on."""
    self({"kind": "row_start", "row": what})
    self.current = what
    try:
      yield
    except Exception as e:  # one failing row must not cost the rest of the stage
      self({"kind": "error", **what, "error": f"{type(e).__name__}: {e}"[:2000]})
      traceback.print_exc()
    finally:
      self.current = {}

  def watch_compiles(self) -> None:
    """One `compile` record per XLA program this process compiles or reads from the persistent cache,
    with its seconds (jax.monitoring's backend-compile event, which covers the cache lookup)."""
    import jax

    hit = []

    def on_event(event: str, **kwargs: Any) -> None:
      del kwargs
      if event == CACHE_HIT_EVENT:
        hit.append(True)

    def on_duration(event: str, seconds: float, **kwargs: Any) -> None:
      if event == COMPILE_EVENT:
        self(
          {
            "kind": "compile",
            "fun": kwargs.get("fun_name"),
            "seconds": seconds,
            "cache_hit": bool(hit),
          }
        )
        hit.clear()

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)


def _plain(x: Any) -> Any:
  """JSON for numpy/jax scalars and arrays."""
  import numpy as np

  value = np.asarray(x)
  return value.item() if value.ndim == 0 else value.tolist()


def _time_call(fn: Callable[[], Any], reps: int) -> float:
  """Seconds per call of `fn` (already compiled), after one untimed call."""
  import jax

  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


# ---------------------------------------------------------------------------------------------------------
# preflight


def preflight(sizes: Sizes, record: Recorder) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  n = sizes.matmul
  for dtype in ("bfloat16", "float32"):
    with record.row(kind="matmul", dtype=dtype):
      a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0), 2))
      matmul = jax.jit(jnp.matmul).lower(a, b).compile()
      seconds = _time_call(lambda: matmul(a, b), 10)
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
# train steps: recipe, fused


def recipe_step(sizes: Sizes, entry: str, mode: str, attention: str, loss_impl: str) -> Any:
  """benchmarks/step.py's JaxStep of model `entry` (VARIANT@IMAGE:BATCH) at the ViT-L recipes'
  settings: bf16 matmuls, scan over layers, dots remat, the distilled layers of `sizes`."""
  import step as jax_step

  variant, size, batch = jax_step.parse_model(entry)
  return jax_step.JaxStep(
    variant,
    size,
    batch,
    mode,
    "bfloat16",
    "dots",
    True,
    attention=attention,
    layers=sizes.recipe_layers,
    loss_impl=loss_impl,
  )


def _cudnn_in(compiled: Any) -> bool:
  """Whether a compiled GPU program calls cuDNN's fused attention (its custom call's name)."""
  text = compiled.as_text().lower()
  return "cudnn" in text and "fmha" in text


def time_steps(sizes: Sizes, record: Recorder, settings: list[dict[str, str]], group: str) -> None:
  """Builds one JaxStep per setting (dict of mode, attention, loss_impl) and times them.

  Each setting, once compiled, gets its `step` record (static figures) and its first repetition at once;
  the other repetitions then run interleaved across the settings (load from elsewhere falls on all
  alike), each recorded as `step_time` the moment it is timed. So a stage killed after the first
  setting's compile still has that setting's time."""
  import jax
  import step as jax_step

  variant, size, batch = jax_step.parse_model(sizes.recipe)
  built: list[tuple[dict[str, str], Any]] = []

  def rep(setting: dict[str, str], s: Any, i: int) -> None:
    with record.row(kind="step_time", group=group, **setting, rep=i):
      ms = 1e3 * s.run(sizes.steps)
      record({"kind": "step_time", "group": group, **setting, "rep": i, "ms": ms})

  for setting in settings:
    with record.row(kind="step", group=group, **setting):
      s = recipe_step(sizes, sizes.recipe, **setting)
      s.run(2)  # warm-up; the first call's metrics are of the initial params
      record(
        {
          "kind": "step",
          "group": group,
          **setting,
          "model": sizes.recipe,
          "batch": batch,
          "dtype": "bfloat16",
          "remat": "dots",
          "scan": True,
          "layers": list(s.layers) if setting["mode"] != "none" else [],
          "gflop_per_image": s.flops_per_image()["total"] / 1e9,
          "peak_tflops": flops.peak_tflops(jax.devices()[0].device_kind, "bfloat16"),
          "compile_s": s.compile_s,
          "program_gib": s.program_bytes / 2**30,
          "temp_gib": s.temp_bytes / 2**30,
          "cudnn_in_text": _cudnn_in(s.compiled),
          "first_loss": s.first_metrics["loss"],
          "first_ce": s.first_metrics["ce_loss"],
          "first_distill": s.first_metrics.get("distill_loss"),
          "steps_per_rep": sizes.steps,
        }
      )
      built.append((setting, s))
      rep(setting, s, 0)
  for i in range(1, sizes.reps):
    for setting, s in built:
      rep(setting, s, i)
  for _, s in built:
    s.close()


def recipe(sizes: Sizes, record: Recorder) -> None:
  # Distillation first: the 50% MFU target is its.
  time_steps(
    sizes,
    record,
    [
      dict(mode="distill", attention="materialized", loss_impl="direct"),
      dict(mode="none", attention="materialized", loss_impl="direct"),
    ],
    "recipe",
  )


def fused(sizes: Sizes, record: Recorder) -> None:
  time_steps(
    sizes,
    record,
    [
      dict(mode="none", attention="fused", loss_impl="direct"),
      dict(mode="distill", attention="fused", loss_impl="pallas"),
    ],
    "fused",
  )


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


def attention_ce_checks(sizes: Sizes, record: Recorder) -> None:
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


def cudnn_attention(sizes: Sizes, record: Recorder) -> None:
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
          "ms": 1e3 * _time_call(lambda c=compiled: c(q, k, v), 10),
          "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
          "cudnn_in_text": _cudnn_in(compiled),
        }
      grads = [
        _rel_diff(np.asarray(g_c, np.float32), np.asarray(g_x, np.float32))
        for g_c, g_x in zip(outputs["cudnn"][1], outputs["xla"][1])
      ]
      record(
        {"kind": "cudnn_attention", "tokens": n, "batch": b, **figures, "rel_diff_grads": grads}
      )


def small_fused_pallas_step(sizes: Sizes, record: Recorder) -> None:
  """A few steps of distillation with fused attention + the Pallas loss against materialised + direct:
  same first-step losses, finite after."""

  for attention, loss_impl in (("materialized", "direct"), ("fused", "pallas")):
    with record.row(kind="small_step", attention=attention, loss_impl=loss_impl):
      s = recipe_step(sizes, sizes.small_step, "distill", attention, loss_impl)
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
          "cudnn_in_text": _cudnn_in(s.compiled),
        }
      )
      s.close()


def kernels(sizes: Sizes, record: Recorder) -> None:
  attention_ce_checks(sizes, record)
  cudnn_attention(sizes, record)
  small_fused_pallas_step(sizes, record)


# ---------------------------------------------------------------------------------------------------------
# loss_memory


def loss_memory(sizes: Sizes, record: Recorder) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# ours against PyTorch


def _torch_stage(
  entry: str, modes: list[str], dtypes: list[str], sizes: Sizes, record: Recorder, native: bool
) -> None:
  import step as jax_step
  import torch
  import torch_reference

  variant, size, batch = jax_step.parse_model(entry)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":  # the dry run: PyTorch's threads and XLA's pool would contend for a few cores
    torch.set_num_threads(1)
  with record.row(kind="torch_compare", model=entry, modes=modes, dtypes=dtypes):
    torch_reference.compare(
      variant,
      size,
      batch,
      modes=modes,
      dtypes=dtypes,
      device=device,
      scan=True,
      remat=sizes.torch_remat,
      tf32=True,
      steps=sizes.steps,
      reps=sizes.reps,
      warmup=1,
      native_scratch=native,
      record=record,
    )


def torch_headline(sizes: Sizes, record: Recorder) -> None:
  _torch_stage(sizes.torch_b, ["distill"], ["float32", "bfloat16"], sizes, record, native=False)


def torch_l16(sizes: Sizes, record: Recorder) -> None:
  _torch_stage(sizes.torch_l, ["none", "distill"], ["bfloat16"], sizes, record, native=False)


def torch_b16(sizes: Sizes, record: Recorder) -> None:
  _torch_stage(sizes.torch_b, ["none", "copy"], ["float32", "bfloat16"], sizes, record, native=True)


RUN: dict[str, Callable[[Sizes, Recorder], None]] = {
  "preflight": preflight,
  "recipe": recipe,
  "torch_headline": torch_headline,
  "kernels": kernels,
  "fused": fused,
  "loss_memory": loss_memory,
  "torch_l16": torch_l16,
  "torch_b16": torch_b16,
}
assert set(RUN) == set(gpu_plan.STAGES), "every planned stage runs, and only those"


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never wait on a model hub
  start = time.perf_counter()
  record = Recorder(FLAGS.out, FLAGS.stage)
  import jax

  device = jax.devices()[0]
  record(
    {
      "kind": "stage_start",
      "dry_run": FLAGS.dry_run,
      "budget_s": gpu_plan.STAGES[FLAGS.stage].budget_s,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "devices": jax.device_count(),
      "jax": jax.__version__,
      "start_s": time.perf_counter() - start,  # Python, jax import and the backend's start
    }
  )
  record.watch_compiles()
  RUN[FLAGS.stage](DRY if FLAGS.dry_run else GPU, record)
  record({"kind": "stage_done", "seconds": time.perf_counter() - start})


if __name__ == "__main__":
  flags.mark_flags_as_required(["stage", "out"])
  app.run(main)
