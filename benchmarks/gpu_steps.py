"""The stages of benchmarks/gpu_bench.py that time whole train steps: recipe and fused (benchmarks/step.py's
JaxStep at the ViT-L recipes' settings, every repetition recorded as it is timed) and ours against
PyTorch/timm (torch_headline, torch_l16, torch_b16: benchmarks/torch_compare.py's rows)."""

from __future__ import annotations

from typing import Any

import flops  # benchmarks/flops.py
import gpu_stage  # benchmarks/gpu_stage.py

# ---------------------------------------------------------------------------------------------------------
# train steps: recipe, fused


def recipe_step(
  sizes: gpu_stage.Sizes, entry: str, mode: str, attention: str, loss_impl: str
) -> Any:
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


def time_steps(
  sizes: gpu_stage.Sizes, record: gpu_stage.Recorder, settings: list[dict[str, str]], group: str
) -> None:
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
          "cudnn_in_text": gpu_stage.cudnn_in(s.compiled),
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


def recipe(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
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


def fused(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
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
# ours against PyTorch


def _torch_stage(
  entry: str,
  modes: list[str],
  dtypes: list[str],
  sizes: gpu_stage.Sizes,
  record: gpu_stage.Recorder,
  native: bool,
) -> None:
  import step as jax_step
  import torch
  import torch_compare

  variant, size, batch = jax_step.parse_model(entry)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":  # the dry run: PyTorch's threads and XLA's pool would contend for a few cores
    torch.set_num_threads(1)
  with record.row(kind="torch_compare", model=entry, modes=modes, dtypes=dtypes):
    torch_compare.compare(
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


def torch_headline(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  _torch_stage(sizes.torch_b, ["distill"], ["float32", "bfloat16"], sizes, record, native=False)


def torch_l16(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  _torch_stage(sizes.torch_l, ["none", "distill"], ["bfloat16"], sizes, record, native=False)


def torch_b16(sizes: gpu_stage.Sizes, record: gpu_stage.Recorder) -> None:
  _torch_stage(sizes.torch_b, ["none", "copy"], ["float32", "bfloat16"], sizes, record, native=True)
