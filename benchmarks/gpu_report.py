"""Tables from the GPU run's raw records: every summary (MFU, medians, ratios, budgets) is made here.

  python benchmarks/gpu_report.py $OUT                  # the tables of $OUT/results*.jsonl, as markdown
  python benchmarks/gpu_report.py $OUT --results=benchmarks/RESULTS.md   # also rewrite its GPU section

The stages of benchmarks/gpu_bench.py write raw records only (one per compile, repetition, check); this
module reads them (no JAX, no GPU: it runs on any machine, the CPU dry run's records included) and
derives the tables. `--results` replaces the text between RESULTS.md's two `gpu-report` markers with
the tables, so that file's GPU figures are always the records' own. A stage killed by its budget shows
as killed, with the row it was running and every figure it wrote before.

This file holds the command line, the loading of the records and the summaries derived from them;
gpu_tables.py beside it writes the summaries' markdown.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

import flops  # benchmarks/flops.py
import gpu_plan  # benchmarks/gpu_plan.py
import gpu_tables  # benchmarks/gpu_tables.py

BEGIN = (
  "<!-- gpu-report:begin (written by benchmarks/gpu_report.py from the records named in it) -->"
)
END = "<!-- gpu-report:end -->"
Record = dict[str, Any]


def load(paths: Iterable[str]) -> list[Record]:
  """The records of `paths` (JSONL files, or folders holding results<N>.jsonl), each tagged with its
  command (the N of results<N>.jsonl) and file. A last line cut short by a kill is skipped."""
  files: list[str] = []
  for path in paths:
    if os.path.isdir(path):
      files += sorted(
        os.path.join(path, f) for f in os.listdir(path) if re.fullmatch(r"results\d+\.jsonl", f)
      )
    else:
      files.append(path)
  records = []
  for file in files:
    match = re.search(r"results(\d+)\.jsonl$", file)
    with open(file) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # the line a SIGKILL interrupted
        record["command"] = match.group(1) if match else "?"
        record["file"] = os.path.basename(file)
        records.append(record)
  return records


def _of(records: list[Record], kind: str, **match: Any) -> list[Record]:
  return [r for r in records if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]


# ---------------------------------------------------------------------------------------------------------
# summaries


def stages(records: list[Record]) -> list[Record]:
  """Per planned stage of the commands in `records`: status (done, killed at budget, failed, not run),
  wall and start seconds, programs compiled (and read from the cache), seconds of the compiles, budget
  and model, the last row started."""
  out = []
  loaded = {r["command"] for r in records}
  for command, planned in gpu_plan.COMMANDS.items():
    if command not in loaded:
      continue
    for stage in planned:
      mine = [r for r in records if r.get("stage") == stage.name]
      started = _of(mine, "stage_start")
      done = _of(mine, "stage_done")
      failed = _of(mine, "stage_failed")
      compiles = _of(mine, "compile")
      if done:
        status, wall = "done", done[-1]["seconds"]
      elif failed:
        rc = failed[-1]["rc"]
        status = "killed at budget" if rc in (124, 137) else f"failed (rc {rc})"
        wall = mine[-1]["time"] - started[0]["time"] + started[0]["start_s"] if started else None
      elif started:
        status = "running when the records end"
        wall = mine[-1]["time"] - started[0]["time"] + started[0]["start_s"]
      else:
        status, wall = "not run", None
      rows = _of(mine, "row_start")
      out.append(
        {
          "command": command,
          "stage": stage.name,
          "status": status,
          "seconds": wall,
          "start_s": started[0]["start_s"] if started else None,
          "compiles": sum(not c["cache_hit"] for c in compiles),
          "cache_hits": sum(c["cache_hit"] for c in compiles),
          "compile_s": sum(c["seconds"] for c in compiles if not c["cache_hit"]),
          "budget_s": stage.budget_s,
          "model_s": stage.model_s,
          "programs": stage.programs,
          "errors": len(_of(mine, "error")),
          "last_row": None if status == "done" or not rows else rows[-1]["row"],
        }
      )
  return out


def device(records: list[Record]) -> Record:
  """The device, versions, the measured matmul ceiling and whether default f32 dots are reduced."""
  starts = _of(records, "stage_start")
  first = starts[0] if starts else {}
  matmul = {r["dtype"]: r["tflops"] for r in _of(records, "matmul")}
  precision = _of(records, "f32_precision")
  kind = first.get("device_kind", "?")
  return {
    "device_kind": kind,
    "backend": first.get("backend"),
    "jax": first.get("jax"),
    "dry_run": first.get("dry_run"),
    "device_kinds": sorted({r["device_kind"] for r in starts}),
    "ceiling_bf16_tflops": matmul.get("bfloat16"),
    "ceiling_f32_tflops": matmul.get("float32"),
    "datasheet_bf16_tflops": flops.peak_tflops(kind, "bfloat16") or None,
    "datasheet_tf32_tflops": flops.peak_tflops(kind, "float32") or None,
    "f32_max_rel_error": precision[-1]["max_rel_error"] if precision else None,
  }


def _setting(r: Record) -> tuple[str, str, str, str]:
  return (r["group"], r["mode"], r["attention"], r["loss_impl"])


def train_steps(records: list[Record]) -> list[Record]:
  """Per train-step setting (recipe and fused groups): median/min ms, img/s, TFLOP/s, MFU against the
  datasheet and the measured bf16 ceiling, time relative to the materialised scratch step."""
  ceiling = device(records)["ceiling_bf16_tflops"]
  times: dict[tuple, list[float]] = collections.defaultdict(list)
  for r in _of(records, "step_time"):
    times[_setting(r)].append(r["ms"] / 1e3)
  rows = []
  for s in _of(records, "step"):
    key = _setting(s)
    if not times[key]:
      continue
    figures = flops.step_figures(
      times[key], s["batch"], s["gflop_per_image"] * 1e9, s["peak_tflops"]
    )
    rows.append(
      {
        **{k: s[k] for k in ("group", "mode", "attention", "loss_impl", "model", "layers")},
        **figures,
        "mfu_ceiling_pct": 100 * figures["tflops"] / ceiling if ceiling else None,
        "reps": len(times[key]),
        **{
          k: s[k] for k in ("compile_s", "temp_gib", "program_gib", "cudnn_in_text", "first_loss")
        },
      }
    )
  scratch = [
    r for r in rows if (r["group"], r["mode"], r["attention"]) == ("recipe", "none", "materialized")
  ]
  for r in rows:
    r["vs_scratch"] = r["ms_median"] / scratch[0]["ms_median"] if scratch else None
  return rows


def torch_rows(records: list[Record]) -> list[Record]:
  """Per (stage, model, dtype, mode): ours and PyTorch (and timm's fused SDPA) median ms, the speedup
  torch/ours, MFU of each side, first-step losses."""
  rows = []
  for facts in _of(records, "torch_row"):
    key = {k: facts[k] for k in ("stage", "model", "image_size", "batch", "dtype", "mode")}
    reps = collections.defaultdict(list)
    for r in _of(records, "torch_rep", **key):
      reps[r["side"]].append(r["ms"] / 1e3)
    if not reps["ours"] or not reps["torch"]:
      continue
    flop = facts["gflop_per_img"] * 1e9
    ours = flops.step_figures(reps["ours"], facts["batch"], flop, facts["ours_peak_tflops"])
    torch = flops.step_figures(reps["torch"], facts["batch"], flop, facts["torch_peak_tflops"])
    native = (
      flops.step_figures(reps["torch_native"], facts["batch"], flop, facts["torch_peak_tflops"])
      if reps["torch_native"]
      else None
    )
    losses = _of(records, "first_step_losses", **key)
    rows.append(
      {
        **key,
        "ours_ms": ours["ms_median"],
        "torch_ms": torch["ms_median"],
        "speedup": torch["ms_median"] / ours["ms_median"],
        "native_ms": native["ms_median"] if native else None,
        "speedup_native": native["ms_median"] / ours["ms_median"] if native else None,
        "ours_mfu_pct": ours["mfu_pct"],
        "torch_mfu_pct": torch["mfu_pct"],
        "precision": f"{facts['ours_precision']} / {facts['torch_precision']}",
        "first_ce": (losses[-1]["ours"]["ce"], losses[-1]["torch"]["ce"]) if losses else None,
        "first_distill": (losses[-1]["ours"]["distill"], losses[-1]["torch"]["distill"])
        if losses
        else None,
        "reps": min(len(reps["ours"]), len(reps["torch"])),
      }
    )
  return rows


def summarize(records: list[Record]) -> dict[str, Any]:
  return {
    "device": device(records),
    "stages": stages(records),
    "train_steps": train_steps(records),
    "torch": torch_rows(records),
    "ce_checks": _of(records, "ce_check"),
    "cudnn": [r for r in _of(records, "cudnn_attention") if "skipped" not in r],
    "small_steps": _of(records, "small_step"),
    "loss_memory": _of(records, "loss_memory"),
    "errors": _of(records, "error"),
  }


# ---------------------------------------------------------------------------------------------------------
# markdown


def render(summary: dict[str, Any], source: str) -> str:
  """The report as markdown: where the records are and the device, then each table that has rows."""
  lines = gpu_tables.device_lines(summary["device"], source)
  lines += gpu_tables.stages_table(summary["stages"])
  lines += gpu_tables.train_steps_table(summary["train_steps"])
  lines += gpu_tables.torch_table(summary["torch"])
  lines += gpu_tables.kernel_tables(summary)
  lines += gpu_tables.loss_memory_table(summary["loss_memory"])
  lines += gpu_tables.error_lines(summary["errors"])
  return "\n".join(lines) + "\n"


def write_results(path: str, text: str) -> None:
  """Replaces the text between RESULTS.md's gpu-report markers with `text`."""
  with open(path) as f:
    content = f.read()
  if BEGIN not in content or END not in content:
    raise SystemExit(f"{path}: no gpu-report markers ({BEGIN!r} ... {END!r}) to write between")
  head, rest = content.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  with open(path, "w") as f:
    f.write(head + BEGIN + "\n" + text + END + tail)


def main(argv: list[str]) -> int:
  results = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--results=")]
  paths = [a for a in argv[1:] if not a.startswith("--")]
  if not paths:
    print(
      f"usage: {argv[0]} OUT_DIR_OR_JSONL... [--results=benchmarks/RESULTS.md]", file=sys.stderr
    )
    return 2
  text = render(summarize(load(paths)), ", ".join(paths))
  print(text)
  for path in results:
    write_results(path, text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
