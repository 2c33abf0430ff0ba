"""The study's results side by side with the paper's: study.json, a Markdown table per group, plots.

Reads every finished job's results.json from the workdir (`study.build_jobs`), summarises each setting as
mean +- std over seeds (last and best evaluation, raw and EMA weights), and checks each of the paper's
findings that the miniature can test: whether it holds here, with the numbers it rests on.
"""

import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from at_jax import metrics, storage
from at_jax.experiment import studies
from projects.miniature import analysis as study_analysis
from projects.miniature import plan as study

# ImageNet-1K top-1 of ViT-L/16 with an MAE ViT-L teacher (the paper's Table 1 and section 2.4).
PAPER_TOP1 = {
  "scratch": 83.0,
  "finetune": 85.7,
  "copy": 85.1,
  "distill": 85.7,
  "feature_distill": 81.3,
  "ens_finetune_distill": 86.3,
}
METRICS = ("top1", "ema_top1", "best_top1", "best_ema_top1")
JSD_SHOWN = ("no_matching", "hungarian", "head_averaged")  # of similarity.Similarity.schemes


def collect(workdir: str, jobs: Sequence[studies.Job]) -> dict[str, Any]:
  """{"runs": {path: results}, "summary": {group: {setting: {metric: [mean, std, n]}}}, ...}."""
  runs = {}
  for job in jobs:
    found = studies.read_results(workdir, job)
    if found is not None:
      runs[job.path] = found
  summary: dict[str, dict[str, dict[str, list[float]]]] = {}
  by_setting: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for path, results in runs.items():
    parts = path.split("/")
    if len(parts) == 3 and parts[2].startswith("seed") and parts[1] != "analysis":
      by_setting.setdefault((parts[0], parts[1]), []).append(results)
  for (group, setting), results in sorted(by_setting.items()):
    row = {}
    for name in METRICS:
      values = [r[name] for r in results if name in r]
      if values:
        row[name] = [float(np.mean(values)), float(np.std(values)), len(values)]
    summary.setdefault(group, {})[setting] = row
  wall = sum(r.get("wall_s", 0.0) for r in runs.values())
  analysis = study_analysis.summarise(runs)
  return {"runs": runs, "summary": summary, "analysis": analysis, "wall_hours": wall / 3600}


mean_se, beats = studies.mean_se, studies.beats  # the verdict rule, shared with other studies


def findings(summary: Mapping[str, Any], group: str = "main") -> list[dict[str, str]]:
  """The paper's findings, each tested on the group's mean last-evaluation top-1. "A beats B" holds
  when A - B exceeds studies.NOISE_SE standard errors of the difference, fails when B - A does, and is
  "within noise" otherwise: the seeds cannot tell. The ablations' findings belong to the main group,
  the only one that runs them."""
  s = lambda setting: mean_se(summary, group, setting)
  members = max((s("finetune"), s("distill")), key=lambda x: x[0] if x[2] else -np.inf)
  (distill, _, distill_n), (finetune, _, finetune_n) = s("distill"), s("finetune")
  near = (
    ("n/a", "not run yet")
    if not (distill_n and finetune_n)
    else ("yes" if abs(distill - finetune) <= 1.0 else "no", f"{distill:.2f} vs {finetune:.2f}")
  )
  checks = {
    "copy beats scratch": beats(s("copy"), s("scratch")),
    "distill beats scratch": beats(s("distill"), s("scratch")),
    "distill is within 1 point of fine-tuning": near,
    "the fine-tune + distill ensemble beats both members": beats(
      s("ens_finetune_distill"), members
    ),
    "... and beats the fine-tune + scratch control": beats(
      s("ens_finetune_distill"), s("ens_finetune_scratch")
    ),
    "feature distillation is below attention distillation": beats(
      s("distill"), s("feature_distill")
    ),
  }
  if group == "main":  # the only group that runs the ablations
    (copy, copy_se, copy_n), (scratch, scratch_se, scratch_n) = s("copy"), s("scratch")
    midpoint = (
      (copy + scratch) / 2,
      float(np.hypot(copy_se, scratch_se)) / 2,
      min(copy_n, scratch_n),
    )
    checks |= {
      "copying Q beats copying the map": beats(s("copy_q"), s("copy")),
      "later layers matter more (last 2 beat first 2)": beats(s("copy_last2"), s("copy_first2")),
      "more layers help (all beat the last 2)": beats(s("copy"), s("copy_last2")),
      "more heads help (all 4 beat 2)": beats(s("copy"), s("copy_heads2")),
      # not the paper's: our reading of the ablations above (copying layers 0-1 holds copy back)
      "(ours) the student's own first 2 layers help (last 4 beat all 6)": beats(
        s("copy_last4"), s("copy")
      ),
      "averaged maps lose most of the gain (the copy-scratch midpoint beats them)": beats(
        midpoint, s("copy_averaged")
      ),
    }
  return [{"finding": k, "holds": h, "numbers": n} for k, (h, n) in checks.items()]


def _cell(row: Mapping[str, Any], metric: str) -> str:
  if metric not in row:
    return ""
  mean, std, n = row[metric]
  return f"{mean:.2f} +- {std:.2f} ({n})"


def markdown(collected: Mapping[str, Any]) -> str:
  """Tables per group (mean +- std (seeds)), the paper's numbers beside, and each group's findings
  (`collected["findings_by_group"]`)."""
  out = [f"Total wall time of the finished jobs: {collected['wall_hours']:.2f} h (2 CPU cores).\n"]
  for group, settings in collected["summary"].items():
    rows = [
      {
        "setting": s,
        **{k: _cell(row, k) for k in METRICS},
        "paper (ImageNet)": PAPER_TOP1.get(s, ""),
      }
      for s, row in settings.items()
    ]
    out.append(
      f"### {group}\n\n" + metrics.format_table(rows, ["setting", *METRICS, "paper (ImageNet)"])
    )
  for group, found in collected.get("analysis", {}).items():
    out.append(_analysis_markdown(group, found))
  for group, found in collected["findings_by_group"].items():
    out.append(
      f"### Findings ({group} group, last evaluation)\n\n"
      + metrics.format_table(found, ["finding", "holds", "numbers"])
    )
  return "\n\n".join(out) + "\n"


def _analysis_markdown(group: str, found: Mapping[str, Any]) -> str:
  """The probes (top-1, mean +- std) and the JSD to the teacher (mean over layers) of each model."""
  rows = []
  for name, probed in found["probes"].items():
    jsd = found["jsd"].get(name, {})
    rows.append(
      {
        "model": name,
        **{f"{p} probe": _cell(probed, p) for p in study_analysis.PROBES},
        **{f"JSD {k}": f"{np.mean(jsd[k]):.3f}" if k in jsd else "" for k in JSD_SHOWN},
        "JSD per layer (Hungarian)": " ".join(f"{v:.2f}" for v in jsd.get("hungarian", [])),
      }
    )
  columns = [
    "model",
    *(f"{p} probe" for p in study_analysis.PROBES),
    *(f"JSD {k}" for k in JSD_SHOWN),
    "JSD per layer (Hungarian)",
  ]
  return (
    f"### {group}: frozen-feature probes (test top-1 %) and attention JSD to the teacher (nats), "
    f"{found['seeds']} seeds\n\n" + metrics.format_table(rows, columns)
  )


def _bars(ax, summary: Mapping[str, Any], group: str, names: Sequence[str], title: str) -> None:
  names = [n for n in names if n in summary.get(group, {})]
  means = [summary[group][n]["top1"][0] for n in names]
  stds = [summary[group][n]["top1"][1] for n in names]
  ax.bar(names, means, yerr=stds, capsize=3, color="tab:blue")
  if means:
    ax.set_ylim(min(means) - 3, max(means) + 2)
  ax.set_title(title, fontsize=9)
  ax.set_ylabel("test top-1 (%)")
  ax.tick_params(axis="x", labelrotation=30, labelsize=7)


def _gains_vs_paper(ax, summary: Mapping[str, Any]) -> None:
  """Each setting's top-1 gain over its group's scratch, beside the paper's gain over its scratch (83.0):
  the datasets differ, so the gains are what can be compared. Error bars: the two stds combined."""
  names = [n for n in PAPER_TOP1 if n != "scratch"]
  groups = sorted(  # main first; a group with no setting beside scratch yet has no gain to show
    (g for g in summary if "scratch" in summary[g] and set(summary[g]) & set(names)),
    key=lambda g: g != "main",
  )
  series = [("paper (ImageNet)", [PAPER_TOP1[n] - PAPER_TOP1["scratch"] for n in names], None)]
  for g in groups:
    base_mean, base_std, _ = summary[g]["scratch"]["top1"]
    rows = [summary[g].get(n, {}).get("top1") for n in names]
    gains = [r[0] - base_mean if r else np.nan for r in rows]
    series.append((g, gains, [float(np.hypot(r[1], base_std)) if r else 0.0 for r in rows]))
  width = 0.8 / len(series)
  x = np.arange(len(names))
  for i, (label, gains, errors) in enumerate(series):
    ax.bar(x + i * width, gains, width, yerr=errors, capsize=2, label=label)
  ax.axhline(0, color="black", lw=0.8)
  ax.set_xticks(x + 0.4 - width / 2, names, rotation=20, fontsize=7)
  ax.set_ylabel("top-1 gain over scratch (points)")
  ax.set_title("gains over scratch: the miniature's groups and the paper", fontsize=9)
  low, high = ax.get_ylim()  # headroom for the legend's row above the tallest bars
  ax.set_ylim(low, high + 0.2 * (high - low))
  ax.legend(fontsize=7, loc="upper left", ncol=len(series))


def plots(collected: Mapping[str, Any], out_dir: str) -> list[str]:
  """study_groups.png (headline settings per group), study_vs_paper.png (gains over scratch beside the
  paper's), study_ablations.png, study_analysis.png (the main group's probes and attention
  similarity), study_curve.png."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  summary, written = collected["summary"], []
  headline = [*study.HEADLINE, *(name for _, name in study.ENSEMBLES)]
  figures = {
    "study_groups.png": [(g, headline, g) for g in summary],
    "study_ablations.png": [("main", ["scratch", "copy", *study.ABLATIONS], "main: ablations")],
  }
  for file_name, panels in figures.items():
    if not panels:
      continue
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (group, names, title) in zip(axes[0], panels):
      _bars(ax, summary, group, names, title)
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out_dir, file_name)))
    plt.close(fig)
  if summary:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _gains_vs_paper(ax, summary)
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out_dir, "study_vs_paper.png")))
    plt.close(fig)
  main = collected.get("analysis", {}).get("main")
  if main:
    written.append(_analysis_plot(plt, main, os.path.join(out_dir, "study_analysis.png")))
  curve = collected["runs"].get("curve")
  if curve:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    top1 = curve["top1_by_epoch"]
    ax.plot(range(1, len(top1) + 1), top1, "o-", ms=3)
    plateau = study.plateau_epoch(top1, collected["plan"]["plateau_within"])
    if plateau:
      ax.axvline(
        plateau,
        color="gray",
        ls="--",
        label=f"students train {plateau} epochs",
      )
      ax.legend(fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("scratch learning curve (main group)", fontsize=9)
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out_dir, "study_curve.png")))
    plt.close(fig)
  return written


def _analysis_plot(plt, found: Mapping[str, Any], path: str) -> str:
  """Probe top-1 per model (bars) and each student's per-layer JSD to the teacher (Hungarian)."""
  fig, (probe_ax, jsd_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
  names = list(found["probes"])
  x = np.arange(len(names))
  for i, p in enumerate(study_analysis.PROBES):
    means = [found["probes"][n][p][0] for n in names]
    stds = [found["probes"][n][p][1] for n in names]
    probe_ax.bar(x + 0.4 * i, means, 0.4, yerr=stds, capsize=3, label=f"{p} probe")
  probe_ax.set_xticks(x + 0.2, names, rotation=30, fontsize=7)
  probe_ax.set_ylabel("test top-1 (%)")
  probe_ax.set_title("frozen features (main group)", fontsize=9)
  probe_ax.legend(fontsize=7)
  for name, jsd in found["jsd"].items():
    jsd_ax.plot(range(len(jsd["hungarian"])), jsd["hungarian"], "o-", ms=3, label=name)
  jsd_ax.set_xlabel("layer")
  jsd_ax.set_ylabel("JSD to the teacher (nats)")
  jsd_ax.set_title("attention similarity, Hungarian head matching", fontsize=9)
  jsd_ax.legend(fontsize=7)
  fig.tight_layout()
  saved = _save(fig, path)
  plt.close(fig)
  return saved


def _save(fig, path: str) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=110, format="png")
  storage.write_atomic(path, buffer.getvalue())
  return path


def write(
  workdir: str,
  jobs: Sequence[studies.Job],
  out_dir: str,
  chunk: Mapping[str, Any] | None,
  plan: Mapping[str, Any],
) -> str:
  """Writes study.json (the `plan`'s options, appending `chunk`, if any, to its chunk log),
  study_results.md and the plots to `out_dir`; returns the Markdown."""
  storage.makedirs(out_dir)
  path = os.path.join(out_dir, "study.json")
  chunks = []
  if storage.exists(path):
    with storage.open_file(path) as f:
      chunks = json.load(f).get("chunks", [])
  collected = {"plan": dict(plan), **collect(workdir, jobs)}
  summary = collected["summary"]
  # main first, and always (its findings read "not run yet" before it has results)
  groups = ["main", *(g for g in summary if g != "main")]
  collected["findings_by_group"] = {g: findings(summary, g) for g in groups}
  collected["findings"] = collected["findings_by_group"]["main"]  # the key records had before
  text = markdown(collected)
  collected["chunks"] = [*chunks, dict(chunk)] if chunk else chunks
  storage.write_atomic(path, json.dumps(collected, indent=1))
  storage.write_atomic(os.path.join(out_dir, "study_results.md"), text)
  plots(collected, out_dir)
  return text
