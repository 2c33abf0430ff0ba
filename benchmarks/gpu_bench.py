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

This file holds the command line and each stage's start and end records; the stages live beside it:
gpu_stage.py (the shapes, the Recorder and the measuring helpers every stage uses), gpu_steps.py (recipe,
fused and the torch stages: whole train steps) and gpu_kernels.py (preflight, kernels, loss_memory).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import gpu_kernels  # benchmarks/gpu_kernels.py
import gpu_plan  # benchmarks/gpu_plan.py
import gpu_stage  # benchmarks/gpu_stage.py
import gpu_steps  # benchmarks/gpu_steps.py
from absl import app, flags

flags.DEFINE_enum("stage", None, list(gpu_plan.STAGES), "The stage to run.")
flags.DEFINE_string("out", None, "JSONL file the records are appended to.")
flags.DEFINE_bool("dry_run", False, "Tiny shapes: the same code paths in seconds, on any backend.")
FLAGS = flags.FLAGS


RUN: dict[str, Callable[[gpu_stage.Sizes, gpu_stage.Recorder], None]] = {
  "preflight": gpu_kernels.preflight,
  "recipe": gpu_steps.recipe,
  "torch_headline": gpu_steps.torch_headline,
  "kernels": gpu_kernels.kernels,
  "fused": gpu_steps.fused,
  "loss_memory": gpu_kernels.loss_memory,
  "torch_l16": gpu_steps.torch_l16,
  "torch_b16": gpu_steps.torch_b16,
}
assert set(RUN) == set(gpu_plan.STAGES), "every planned stage runs, and only those"


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never wait on a model hub
  start = time.perf_counter()
  record = gpu_stage.Recorder(FLAGS.out, FLAGS.stage)
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
  RUN[FLAGS.stage](gpu_stage.DRY if FLAGS.dry_run else gpu_stage.GPU, record)
  record({"kind": "stage_done", "seconds": time.perf_counter() - start})


if __name__ == "__main__":
  flags.mark_flags_as_required(["stage", "out"])
  app.run(main)
