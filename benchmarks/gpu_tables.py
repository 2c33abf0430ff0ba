"""The markdown of benchmarks/gpu_report.py's report: its first lines and one table per kind of figure, each
from the summaries gpu_report.py derives from the records (nothing here reads a record)."""

from __future__ import annotations

import json
from typing import Any


def _fmt(x: Any, digits: int = 1) -> str:
  if x is None:
    return "-"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def _table(header: list[str], rows: list[list[Any]], digits: int = 1) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(c, digits) for c in row) + " |" for row in rows]
  return lines


def _ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def device_lines(d: dict[str, Any], source: str) -> list[str]:
  """The report's first lines: where the records are, the device and versions, the matmul ceiling."""
  dry = (
    " (dry run: tiny shapes on the CPU; times are the CPU's, budgets the GPU's)"
    if d["dry_run"]
    else ""
  )
  lines = [
    f"Records: `{source}`. Device: {', '.join(d['device_kinds']) or '?'} ({d['backend']}), jax {d['jax']}{dry}.",
    "",
  ]
  if d["ceiling_bf16_tflops"] is not None:
    lines.append(
      f"Measured matmul ceiling: bf16 {_fmt(d['ceiling_bf16_tflops'])} TFLOP/s (datasheet "
      f"{_fmt(d['datasheet_bf16_tflops'])}), default-precision f32 {_fmt(d['ceiling_f32_tflops'])} "
      f"(datasheet TF32 {_fmt(d['datasheet_tf32_tflops'])}); default f32 dot's max relative error "
      f"{_fmt(d['f32_max_rel_error'], 7)} (~1e-3: TF32 or one bf16 pass; ~1e-6: full f32)."
    )
    lines.append("")
  return lines


def stages_table(stages: list[dict[str, Any]]) -> list[str]:
  """Each stage's status beside its budget."""
  lines = ["**Stages** (budget and model: benchmarks/gpu_plan.py)", ""]
  lines += _table(
    [
      "cmd",
      "stage",
      "status",
      "s",
      "start s",
      "compiled",
      "cached",
      "compile s",
      "budget s",
      "model s",
      "errors",
      "last row started",
    ],
    [
      [
        s["command"],
        s["stage"],
        s["status"],
        s["seconds"],
        s["start_s"],
        s["compiles"],
        s["cache_hits"],
        s["compile_s"],
        s["budget_s"],
        s["model_s"],
        s["errors"],
        json.dumps(s["last_row"]) if s["last_row"] else "",
      ]
      for s in stages
    ],
  )
  return lines


def train_steps_table(rows: list[dict[str, Any]]) -> list[str]:
  """The recipe and fused train steps; nothing without rows."""
  if not rows:
    return []
  lines = ["", "**Train steps** (bf16, scan, dots remat; MFU: model FLOPs / time / peak)", ""]
  lines += _table(
    [
      "group",
      "model",
      "mode",
      "attention",
      "loss",
      "ms median",
      "min",
      "img/s",
      "TFLOP/s",
      "MFU %",
      "MFU % of ceiling",
      "vs scratch",
      "compile s",
      "temp GiB",
      "cuDNN",
      "reps",
    ],
    [
      [
        r["group"],
        r["model"],
        r["mode"],
        r["attention"],
        r["loss_impl"],
        r["ms_median"],
        r["ms_min"],
        r["img_s"],
        r["tflops"],
        r["mfu_pct"],
        r["mfu_ceiling_pct"],
        _ratio(r["vs_scratch"]),
        r["compile_s"],
        r["temp_gib"],
        r["cudnn_in_text"],
        r["reps"],
      ]
      for r in rows
    ],
  )
  return lines


def torch_table(rows: list[dict[str, Any]]) -> list[str]:
  """Ours against PyTorch/timm; nothing without rows."""
  if not rows:
    return []
  lines = [
    "",
    "**Ours against PyTorch/timm** (same weights and batch; speedup = PyTorch ms / ours)",
    "",
  ]
  lines += _table(
    [
      "stage",
      "model",
      "batch",
      "dtype",
      "mode",
      "precision ours / torch",
      "ours ms",
      "PyTorch ms",
      "speedup",
      "timm SDPA ms",
      "vs SDPA",
      "ours MFU %",
      "PyTorch MFU %",
      "first CE ours / torch",
      "reps",
    ],
    [
      [
        r["stage"],
        r["model"],
        r["batch"],
        r["dtype"],
        r["mode"],
        r["precision"],
        r["ours_ms"],
        r["torch_ms"],
        _ratio(r["speedup"]),
        r["native_ms"],
        _ratio(r["speedup_native"]),
        r["ours_mfu_pct"],
        r["torch_mfu_pct"],
        " / ".join(f"{x:.5f}" for x in r["first_ce"]) if r["first_ce"] else "-",
        r["reps"],
      ]
      for r in rows
    ],
  )
  return lines


def kernel_tables(summary: dict[str, Any]) -> list[str]:
  """The attention-CE checks, cuDNN against XLA attention and the small distill steps; nothing without
  checks or steps."""
  if not (summary["ce_checks"] or summary["small_steps"]):
    return []
  lines = [
    "",
    "**Kernel checks** (relative max difference against the direct loss at full f32 precision)",
    "",
  ]
  lines += _ce_table(summary["ce_checks"])
  if summary["cudnn"]:
    lines += [""]
    lines += _cudnn_table(summary["cudnn"])
  if summary["small_steps"]:
    lines += [""]
    lines += _small_steps_table(summary["small_steps"])
  return lines


def _ce_table(rows: list[dict[str, Any]]) -> list[str]:
  return _table(
    ["impl", "tokens", "dtype", "backend", "value", "d q_s", "d k_s"],
    [
      [
        r["impl"],
        r["tokens"],
        r["dtype"],
        r["backend"],
        f"{r['rel_diff_value']:.1e}",
        f"{r['rel_diff_dq']:.1e}",
        f"{r['rel_diff_dk']:.1e}",
      ]
      for r in rows
    ],
  )


def _cudnn_table(rows: list[dict[str, Any]]) -> list[str]:
  return _table(
    [
      "tokens",
      "batch",
      "XLA ms",
      "cuDNN ms",
      "XLA temp MiB",
      "cuDNN temp MiB",
      "cuDNN in text",
      "grad rel diff (q, k, v)",
    ],
    [
      [
        r["tokens"],
        r["batch"],
        r["xla"]["ms"],
        r["cudnn"]["ms"],
        r["xla"]["temp_mib"],
        r["cudnn"]["temp_mib"],
        r["cudnn"]["cudnn_in_text"],
        ", ".join(f"{g:.1e}" for g in r["rel_diff_grads"]),
      ]
      for r in rows
    ],
  )


def _small_steps_table(rows: list[dict[str, Any]]) -> list[str]:
  return _table(
    [
      "distill step",
      "attention",
      "loss",
      "first CE",
      "first distill",
      "ms",
      "compile s",
      "cuDNN",
    ],
    [
      [
        r["model"],
        r["attention"],
        r["loss_impl"],
        f"{r['first_ce']:.6f}",
        f"{r['first_distill']:.6f}",
        r["ms"],
        r["compile_s"],
        r["cudnn_in_text"],
      ]
      for r in rows
    ],
  )


def loss_memory_table(rows: list[dict[str, Any]]) -> list[str]:
  """One layer's distillation loss + gradient per implementation and token count; nothing without rows."""
  if not rows:
    return []
  lines = [
    "",
    "**One layer's distillation loss + gradient** (bf16 q/k; compiled temp memory)",
    "",
  ]
  lines += _table(
    ["tokens", "batch", "impl", "temp MiB", "one f32 map MiB", "ms"],
    [[r["tokens"], r["batch"], r["impl"], r["temp_mib"], r["one_map_mib"], r["ms"]] for r in rows],
  )
  return lines


def error_lines(rows: list[dict[str, Any]]) -> list[str]:
  """Each error record: its stage, row and the last line of its error; nothing without errors."""
  if not rows:
    return []
  lines = ["", "**Errors**", ""]
  lines += [
    f"- {r['stage']}: {json.dumps(r.get('row', {}))}: {r['error'].splitlines()[-1][:300]}"
    for r in rows
  ]
  return lines
