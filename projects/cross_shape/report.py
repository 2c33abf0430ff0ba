"""The cross-shape study's record: results.json (every finished run), results.md (a table per group and
the findings, each with its noise) and cross_shape.png (top-1 per setting, mean and spread over seeds)."""

import functools
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from at_jax import metrics, storage
from at_jax.experiment import studies
from at_jax.experiment.job import attention_agreement, eval_images
from at_jax.experiment.paths import EXPORT_DIR
from at_jax.transfer import pairing
from projects.cross_shape import plan

TAUGHT_IMAGES = 512  # the first test images, on which each student's maps meet those it was taught
# The group whose settings' maps are compared for sharpness: all over the same 17 keys (the finer group's
# `prefix=drop` maps have 49 keys, the others 50: their entropies are not on one scale).
SHARPNESS_GROUP = "deeper"
TEACHER_EXPORT = "teacher"  # <out>/teacher: the deep teacher's export, committed (~2.4 MB)
# (finding, setting A, setting B): "A beats B" under studies.beats's rule (2 standard errors)
FINDINGS = {
  "deeper": [
    ("a deeper 8-head teacher helps at all (uniform layers, grouped heads beat scratch)", "uniform_group", "scratch"),
    ("... as much as the same-shape teacher (uniform/group vs same shape)", "uniform_group", "same_shape"),
    ("the same-shape teacher beats scratch", "same_shape", "scratch"),
    ("a learned mix of heads beats fixed groups", "uniform_learned", "uniform_group"),
    ("a learned mix started apart (head_mix_init=group) beats one started at the mean", "uniform_learned_group", "uniform_learned"),
    ("... and fixed groups", "uniform_learned_group", "uniform_group"),
    ("groups of heads beat the first 4 heads alone", "uniform_group", "uniform_first"),
    ("groups of heads beat one mean map for every head", "uniform_group", "uniform_mean"),
    ("spread layers (uniform) beat the teacher's last layers", "uniform_group", "last_group"),
    ("sharpening the mean maps (target_temperature 0.5) helps", "uniform_mean_sharp", "uniform_mean"),
    ("flattening the same-shape teacher's maps (target_temperature 2) hurts", "same_shape", "same_shape_flat"),
    ("sharpening the same-shape teacher's maps (target_temperature 0.5) helps", "same_shape_sharp", "same_shape"),
    ("the sharpest 4 teacher heads (head_map=pick) beat the first 4", "uniform_sharpest", "uniform_first"),
    ("... and the flattest 4", "uniform_sharpest", "uniform_flattest"),
    ("... and one mean map for every head", "uniform_sharpest", "uniform_mean"),
    ("... and a learned mix started from groups", "uniform_sharpest", "uniform_learned_group"),
    ("... and one started at the mean", "uniform_sharpest", "uniform_learned"),
    ("stopping distillation half-way (transfer.until 0.5) beats distilling throughout", "same_shape_until_half", "same_shape"),
    ("... a quarter of the way (transfer.until 0.25)", "same_shape_until_quarter", "same_shape"),
    ("... which still beats scratch", "same_shape_until_quarter", "scratch"),
  ],
  "finer": [
    ("resampled maps from a coarser teacher beat scratch", "resample_keep", "scratch"),
    ("... and so do the teacher's maps at the student's grid (teacher.image_size)", "image_size", "scratch"),
    ("showing the teacher larger images beats resampling its maps", "image_size", "resample_keep"),
    ("patch tokens only (prefix drop) beat keeping the cls row and column", "resample_drop", "resample_keep"),
  ],
}  # fmt: skip


def restore_teacher(out: str, workdir: str) -> None:
  """The committed teacher export into a fresh workdir, so that its students need not train it again."""
  studies.copy_export(os.path.join(out, TEACHER_EXPORT), plan.teacher_dir(workdir))


def _distill_losses(run_dir: str) -> list[float]:
  """The run's logged train/distill_loss on steps that distil, in order: whether the loss fell (empty
  for scratch). A step that does not distil (scratch; after `transfer.until`) logs exactly 0, which an
  attention cross-entropy (at least the taught maps' entropy) never is."""
  path = os.path.join(run_dir, metrics.METRICS_FILE)
  if not storage.exists(path):
    return []
  logged = (x.get("train/distill_loss", 0.0) for x in metrics.read_jsonl(path))
  return [loss for loss in logged if loss > 0]


def taught(workdir: str, path: str) -> dict[str, float] | None:
  """How close a distilled student's attention came to the maps it was taught, on the first
  TAUGHT_IMAGES test images, per distilled layer (mean over them, in nats): the maps' entropy (the
  distillation loss's floor: flat, averaged maps have a high one), the cross-entropy the student
  reaches and their difference, the KL divergence left. A learned head mix, which the export drops, is
  read from the last checkpoint. None for scratch students and runs without their export (or, with a
  learned mix, their checkpoints)."""
  group, setting, seed = path.split("/")
  config = plan.student_config(workdir, group, setting, int(seed.removeprefix("seed")))
  run_dir = os.path.join(workdir, path)
  if config.transfer.mode == "none" or not storage.exists(os.path.join(run_dir, EXPORT_DIR)):
    return None
  mix = None
  if config.transfer.get("head_map") == "learned":
    mix = _checkpoint_mix(workdir, path)
    if mix is None:
      return None
  images = eval_images(config, run_dir, TAUGHT_IMAGES)
  layers = attention_agreement(config, run_dir, images, head_mix=mix)["student"]
  entropy, cross = (float(np.mean(layers[k])) for k in ("teacher_entropy", "cross_entropy"))
  return {"entropy": entropy, "cross_entropy": cross, "kl": cross - entropy}


@functools.lru_cache(maxsize=1)  # `collect` asks for a run's mix twice (`taught`, `learned_mix`)
def _checkpoint_mix(workdir: str, path: str) -> np.ndarray | None:
  """The learned head mix's logits [S, H_s, H_t] in the run's last checkpoint, read-only (cached);
  None without one."""
  directory = os.path.join(workdir, path, "checkpoints")
  if not storage.exists(directory):
    return None
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  last = max(int(step) for step in storage.listdir(directory) if step.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(last), "state"))
  logits_SHT = np.asarray(state["params"]["head_mix"], np.float64)
  logits_SHT.flags.writeable = False
  return logits_SHT


def learned_mix(workdir: str, path: str) -> dict[str, float] | None:
  """A learned head mix as the run's last checkpoint holds it (the export drops it): "spread", the
  largest difference of one teacher head's weight between two student heads of a layer (0: every head
  mixes alike), and "heads", how many teacher heads a student head mixes (exp of its weights' entropy,
  mean; 8 is the uniform mean, 1 one head). None for other runs or without checkpoints."""
  group, setting, seed = path.split("/")
  config = plan.student_config(workdir, group, setting, int(seed.removeprefix("seed")))
  logits_SHT = (
    _checkpoint_mix(workdir, path) if config.transfer.get("head_map") == "learned" else None
  )
  if logits_SHT is None:
    return None
  prior_HT = pairing.head_mix_prior(config.transfer.head_mix_init, *logits_SHT.shape[1:])
  weights = np.exp(logits_SHT + prior_HT)
  weights /= weights.sum(-1, keepdims=True)
  spread = float((weights.max(axis=1) - weights.min(axis=1)).max())
  heads = float(np.exp(-(weights * np.log(weights)).sum(-1)).mean())
  return {"spread": spread, "heads": heads}


def collect(
  workdir: str, jobs: Sequence[studies.Job], recorded: Mapping[str, Any]
) -> dict[str, Any]:
  """{path: results} of every finished job, with its first and last logged distillation loss and its
  agreement with the maps it was taught (`taught`), each from the workdir where it has them, else as
  recorded before."""
  runs = {}
  for job in jobs:
    found = studies.read_results(workdir, job)
    if found is None:
      continue
    before = recorded.get(job.path, {})
    losses = _distill_losses(os.path.join(workdir, job.path))
    if any(losses):  # scratch runs log none, or zeros
      found = {**found, "distill_loss_first_last": [losses[0], losses[-1]]}
    elif "distill_loss_first_last" in before:
      found = {**found, "distill_loss_first_last": before["distill_loss_first_last"]}
    if job.kind == "student":
      agreement = before.get("taught") or taught(workdir, job.path)
      mix = before.get("learned_mix") or learned_mix(workdir, job.path)
      found = {**found, **({"taught": agreement} if agreement else {})}
      found = {**found, **({"learned_mix": mix} if mix else {})}
    runs[job.path] = found
  return runs


def summarise(runs: Mapping[str, Any]) -> dict[str, dict[str, list[float]]]:
  """{group: {setting: [mean, std, seeds]}} of the last evaluation's top-1 (as projects/miniature's report lays it out)."""
  by_setting: dict[tuple[str, str], list[float]] = {}
  for path, results in runs.items():
    group, setting, *_ = path.split("/")
    if group in plan.GROUPS:
      by_setting.setdefault((group, setting), []).append(results["top1"])
  summary: dict[str, dict[str, Any]] = {}
  for (group, setting), values in by_setting.items():
    row = [float(np.mean(values)), float(np.std(values)), len(values)]
    summary.setdefault(group, {})[setting] = {"top1": row}
  return summary


def _describe(group: str, setting: str) -> str:
  variant, teacher, overrides, _ = plan.GROUPS[group][setting]
  if teacher is None:
    return f"{variant}, no teacher"
  shown = {k.split(".")[1]: v for k, v in overrides.items() if k != "transfer.mode"}
  name = plan.DEEP_TEACHER if teacher == plan.DEEP else "Mini/7"
  return f"{variant} from {name}" + "".join(f", {k}={v}" for k, v in shown.items())


def _taught(runs: Mapping[str, Any], group: str, setting: str) -> str:
  """The setting's `taught` entropy and KL (nats per distilled layer), mean over the seeds that have it."""
  found = [
    r["taught"] for p, r in runs.items() if p.startswith(f"{group}/{setting}/") and "taught" in r
  ]
  if not found:
    return " | "
  return " | ".join(f"{np.mean([t[k] for t in found]):.3f}" for k in ("entropy", "kl"))


def markdown(runs: Mapping[str, Any]) -> str:
  summary = summarise(runs)
  lines = []
  for group, settings in plan.GROUPS.items():
    lines += [f"### {group}", "", "| setting | student and transfer | top-1 (mean +- std, seeds) | "
              "distill loss first -> last | taught maps' entropy | KL left |", "|---|---|---|---|---|---|"]  # fmt: skip
    for setting in settings:
      row = summary.get(group, {}).get(setting)
      cell = "not run yet" if row is None else "{:.2f} +- {:.2f} ({})".format(*row["top1"])
      losses = [runs[p]["distill_loss_first_last"] for p in runs if p.startswith(f"{group}/{setting}/")
                if any(runs[p].get("distill_loss_first_last", []))]  # fmt: skip
      loss = " / ".join(f"{a:.2f} -> {b:.2f}" for a, b in losses)
      lines.append(
        f"| {setting} | {_describe(group, setting)} | {cell} | {loss} | {_taught(runs, group, setting)} |"
      )
    lines += ["", "| finding | holds | numbers |", "|---|---|---|"]
    for text, a, b in FINDINGS[group]:
      a_est, b_est = (studies.mean_se(summary, group, s) for s in (a, b))
      holds, numbers = studies.beats(a_est, b_est)
      lines.append(f"| {text} | {holds} | {numbers} |")
    if group == SHARPNESS_GROUP:
      lines.append(_sharpness_line(runs, group))
    lines += _learned_lines(runs, group) + _stopped_lines(runs, group)
    lines.append("")
  return "\n".join(lines)


def paired_difference(
  runs: Mapping[str, Any], group: str, a: str, b: str
) -> tuple[float, float, int, int]:
  """(mean, standard error, seeds, seeds where a is above) of top-1 of `a` minus `b`, seed by seed over
  the seeds both have. For a setting that stops distilling early against the same setting distilled
  throughout the pairs are the same run up to the switch (same init, data order and steps), so the
  difference is the stop's alone, without the seed-to-seed spread the unpaired verdict carries."""
  seeds = [p.rsplit("/", 1)[1] for p in runs if p.startswith(f"{group}/{a}/")]
  pairs = [(runs[f"{group}/{a}/{s}"]["top1"], runs[f"{group}/{b}/{s}"]["top1"]) for s in seeds
           if f"{group}/{b}/{s}" in runs]  # fmt: skip
  diff = np.array([x - y for x, y in pairs])
  se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
  return float(diff.mean()), se, len(diff), int((diff > 0).sum())


def _stopped_lines(runs: Mapping[str, Any], group: str) -> list[str]:
  """Per setting that stops distilling early (`transfer.until`), its paired difference from the same
  setting distilled throughout."""
  lines = []
  for setting in plan.GROUPS[group]:
    throughout = twin(group, setting, "transfer.until")
    if throughout is None or not any(p.startswith(f"{group}/{setting}/") for p in runs):
      continue
    mean, se, count, above = paired_difference(runs, group, setting, throughout)
    lines.append(
      f"\n{setting} - {throughout}, seed by seed (the same run up to the switch): {mean:+.2f} +- {se:.2f} "
      f"(standard error, {count} seeds; above in {above})."
    )
  return lines


def _learned_lines(runs: Mapping[str, Any], group: str) -> list[str]:
  """Per setting with a learned mix, its weights at the last checkpoint (`learned_mix`), mean over seeds."""
  lines = []
  for setting in plan.GROUPS[group]:
    mixes = [
      r["learned_mix"]
      for p, r in runs.items()
      if p.startswith(f"{group}/{setting}/") and "learned_mix" in r
    ]
    if mixes:
      spread, heads = (np.mean([m[k] for m in mixes]) for k in ("spread", "heads"))
      lines.append(
        f"\n{setting}'s learned mix at its last checkpoint ({len(mixes)} seeds): student heads differ "
        f"by at most {spread:.3f} in any teacher head's weight (0: all alike); each mixes "
        f"{heads:.2f} teacher heads' worth (exp of the weights' entropy)."
      )
  return lines


def _sharpness_line(runs: Mapping[str, Any], group: str) -> str:
  """The rank correlation, over the group's distilled settings, of top-1 with the taught maps'
  entropy (negative: sharper maps, higher top-1), over all of them and over those at the teacher's own
  temperature; settings' means, so a handful of points."""
  found = sharpness(runs, group)
  own = {s: v for s, v in found.items() if untempered(group, s) is None}
  if len(own) < 3:
    return ""

  def rho(points: Mapping[str, tuple[float, float]]) -> float:
    entropy, top1 = (np.argsort(np.argsort(v)) for v in zip(*points.values(), strict=True))
    return float(np.corrcoef(entropy, top1)[0, 1])

  tempered = len(found) - len(own)
  over_all = f"; {rho(found):+.2f} over all {len(found)}, the {tempered} tempered included" * bool(
    tempered
  )
  return (
    f"\nTop-1 against the entropy of the taught maps over the {len(own)} distilled settings at the "
    f"teacher's own temperature: Spearman rank correlation {rho(own):+.2f}{over_all} (negative: "
    "sharper maps, higher top-1; settings' means)."
  )


def plot(runs: Mapping[str, Any], path: str) -> None:
  """Per group, each setting's top-1 over seeds (dots) and mean, scratch's mean as a line."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(plan.GROUPS) + 1, figsize=(15, 4.4), squeeze=False)
  for ax, (group, settings) in zip(axes[0], plan.GROUPS.items()):
    for y, setting in enumerate(settings):
      values = [r["top1"] for p, r in runs.items() if p.startswith(f"{group}/{setting}/")]
      if values:
        ax.scatter(values, [y] * len(values), s=14, color="tab:blue", alpha=0.6)
        ax.plot([np.mean(values)] * 2, [y - 0.3, y + 0.3], color="black")
      if setting == "scratch" and values:
        ax.axvline(np.mean(values), color="gray", linestyle=":", label="scratch mean")
    ax.set_yticks(range(len(settings)), list(settings), fontsize=8)
    ax.set_xlabel("test top-1 (%)")
    ax.set_title(group, fontsize=9)
  _plot_sharpness(axes[0, -1], runs)
  fig.suptitle(
    "cross-shape attention distillation on Fashion-MNIST (dots: seeds; bar: mean)", fontsize=9
  )
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  storage.write_atomic(path, buffer.getvalue())
  plt.close(fig)


def sharpness(runs: Mapping[str, Any], group: str) -> dict[str, tuple[float, float]]:
  """{setting: (mean entropy of its taught maps, mean top-1)} of the group's settings that have both
  and distil throughout (a setting that stops early, `transfer.until`, is not taught its maps to the end)."""
  found = {}
  for setting, (_, _, overrides, _) in plan.GROUPS[group].items():
    if overrides.get("transfer.until", 1.0) < 1:
      continue
    seeds = [r for p, r in runs.items() if p.startswith(f"{group}/{setting}/") and "taught" in r]
    if seeds:
      entropy = float(np.mean([r["taught"]["entropy"] for r in seeds]))
      found[setting] = (entropy, float(np.mean([r["top1"] for r in seeds])))
  return found


def twin(group: str, setting: str, key: str) -> str | None:
  """The setting that is `setting` without its `key` override (the same student, teacher and other
  overrides); None where `setting` does not set `key` or no such setting is planned."""
  variant, teacher, overrides, _ = plan.GROUPS[group][setting]
  if key not in overrides:
    return None
  base = (variant, teacher, {k: v for k, v in overrides.items() if k != key})
  found = [name for name, (v, t, o, _) in plan.GROUPS[group].items() if (v, t, o) == base]
  return found[0] if found else None


def untempered(group: str, setting: str) -> str | None:
  """The setting whose maps `setting` takes at another `transfer.target_temperature`; None for a
  setting at the teacher's own temperature."""
  return twin(group, setting, "transfer.target_temperature")


def _plot_sharpness(ax: Any, runs: Mapping[str, Any]) -> None:
  """The deeper group's settings: top-1 against the entropy of the maps each was taught; an arrow from
  a setting to the same maps at another temperature (the intervention on sharpness alone)."""
  points = sharpness(runs, SHARPNESS_GROUP)
  for setting, (entropy, top1) in points.items():
    ax.scatter([entropy], [top1], s=18, color="tab:orange")
    base = untempered(SHARPNESS_GROUP, setting)
    if base in points:
      arrow = dict(arrowstyle="->", color="gray", alpha=0.7, shrinkA=4, shrinkB=4)
      ax.annotate("", xy=(entropy, top1), xytext=points[base], arrowprops=arrow)
  ax.margins(x=0.25, y=0.08)  # room for the labels; the limits are fixed before placing them
  ax.set_xlim(ax.get_xlim())
  ax.set_ylim(ax.get_ylim())
  renderer, placed = ax.figure.canvas.get_renderer(), []
  for setting, xy in points.items():
    placed.append(_free_label(ax, renderer, placed, setting, xy))
  ax.set_xlabel("entropy of the taught maps (nats per layer; uniform: ln 17 = 2.83)", fontsize=8)
  ax.set_ylabel("test top-1 (%), mean over seeds", fontsize=8)
  ax.set_title("deeper: sharper taught maps, higher top-1? (arrows: T changed)", fontsize=9)


def _free_label(ax: Any, renderer: Any, placed: list, text: str, xy: tuple[float, float]) -> Any:
  """`text` beside its point, on the first side (right, left; above, below; then further out) where it
  overlaps no label in `placed`; on the last side if none is free. Returns the label's box."""
  *sides, last = [(3, 2), (3, -10), (-3, 2), (-3, -10), (3, 9), (3, -17)]
  for offset in sides:
    label = _label(ax, text, xy, offset)
    box = label.get_window_extent(renderer)
    if not any(box.overlaps(other) for other in placed):
      return box
    label.remove()
  return _label(ax, text, xy, last).get_window_extent(renderer)


def _label(ax: Any, text: str, xy: tuple[float, float], offset: tuple[int, int]) -> Any:
  ha = "left" if offset[0] > 0 else "right"
  return ax.annotate(text, xy, fontsize=7, xytext=offset, textcoords="offset points", ha=ha)


def write(workdir: str, jobs: Sequence[studies.Job], out: str) -> str:
  """Writes results.json, results.md, cross_shape.png and the teacher export into `out`; returns the
  Markdown."""
  recorded_path = os.path.join(out, "results.json")
  recorded = {}
  if storage.exists(recorded_path):
    with storage.open_file(recorded_path) as f:
      recorded = json.load(f)["runs"]
  runs = collect(workdir, jobs, recorded)
  studies.copy_export(plan.teacher_dir(workdir), os.path.join(out, TEACHER_EXPORT))
  text = markdown(runs)
  storage.write_atomic(recorded_path, json.dumps({"runs": runs}, indent=1))
  storage.write_atomic(os.path.join(out, "results.md"), text)
  if runs:
    plot(runs, os.path.join(out, "cross_shape.png"))
  return text
