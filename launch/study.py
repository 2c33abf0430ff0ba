"""The paper's findings in miniature, on Fashion-MNIST with an MAE teacher (run by hand; resumable).

  python launch/study.py --workdir=workdir/study --seeds=2 --epochs=0.5

Trains, for each seed, the demo's student (configs/demo.py) under each setting below, from one frozen MAE
teacher (pre-trained here without labels unless --teacher names an export): scratch, MAE fine-tuning,
attention copy and distillation, copy of Q/K/V, copy of the first vs last k layers, copy of a subset of
heads, and the averaged-maps control; plus the fine-tune + distill ensemble. Finished runs are skipped, so
an interrupted study resumes where it stopped. Writes study.md (mean +- std over seeds), study.json and
plots (study_main.png, study_layers.png, study_heads.png) to the workdir.
"""

import io
import json
import os
import time

from absl import app, flags

flags.DEFINE_string("workdir", "workdir/study", "Where runs, table and plots go.")
flags.DEFINE_string(
  "teacher", "", "A teacher export; default: pre-train an MAE teacher in <workdir>/teacher."
)
flags.DEFINE_integer("seeds", 2, "Seeds per setting.")
flags.DEFINE_float("epochs", 0.5, "Training epochs per run.")
flags.DEFINE_list("only", None, "Run only these settings.")
FLAGS = flags.FLAGS

# Setting -> overrides of configs/demo.py (a student of the teacher's architecture, distill recipe).
COPY = {"transfer.mode": "copy", "transfer.layers": "all"}
SETTINGS = {
  "scratch": {"transfer.mode": "none"},
  "finetune": {"transfer.mode": "none", "model.init": "<teacher>"},
  "copy": COPY,
  "distill": {"transfer.mode": "distill"},
  "copy_q": {**COPY, "transfer.what": "q"},
  "copy_k": {**COPY, "transfer.what": "k"},
  "copy_v": {**COPY, "transfer.what": "v"},
  "copy_first2": {**COPY, "transfer.layers": "first:2"},
  "copy_last2": {**COPY, "transfer.layers": "last:2"},
  "copy_first4": {**COPY, "transfer.layers": "first:4"},
  "copy_last4": {**COPY, "transfer.layers": "last:4"},
  "copy_heads1": {**COPY, "transfer.heads": "first:1"},
  "copy_heads2": {**COPY, "transfer.heads": "first:2"},
  "copy_averaged": {**COPY, "transfer.average": "images"},
}


def _config(overrides: dict, teacher: str, seed: int, epochs: float):
  from configs import demo

  c = demo.get_config()
  c.seed = seed
  c.teacher.pretrain = None
  c.teacher.init = teacher
  c.schedule.epochs = epochs
  c.schedule.warmup_epochs = min(c.schedule.warmup_epochs, epochs / 4)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = teacher if value == "<teacher>" else value
  return c


def _mean_std(values: list[float]) -> tuple[float, float]:
  import numpy as np

  return float(np.mean(values)), float(np.std(values))


def _save(fig, path: str) -> None:
  """Saves a figure to `path`, on disk or in a bucket."""
  from at_jax import storage

  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=110, format="png")
  storage.write_atomic(path, buffer.getvalue())


def _write_json(path: str, value) -> None:
  from at_jax import storage

  storage.write_atomic(path, json.dumps(value, indent=1))


def _read_json(path: str):
  from at_jax import storage

  with storage.open_file(path) as f:
    return json.load(f)


def _plots(summary: dict, workdir: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def bar(names, path, title):
    names = [n for n in names if n in summary]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 3.2))
    ax.bar(
      names,
      [summary[n]["top1"][0] for n in names],
      yerr=[summary[n]["top1"][1] for n in names],
      color="tab:blue",
      capsize=3,
    )
    lo = min(summary[n]["top1"][0] for n in names) - 3
    ax.set_ylim(lo, max(summary[n]["top1"][0] for n in names) + 2)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    _save(fig, os.path.join(workdir, path))
    plt.close(fig)

  bar(
    [
      "scratch",
      "copy",
      "distill",
      "finetune",
      "ensemble",
      "copy_q",
      "copy_k",
      "copy_v",
      "copy_averaged",
    ],
    "study_main.png",
    "Fashion-MNIST, MAE teacher: mean +- std over seeds",
  )
  fig, ax = plt.subplots(figsize=(4, 3.2))
  for side, style in (("first", "o-"), ("last", "s-")):
    ks = [k for k in (2, 4) if f"copy_{side}{k}" in summary]
    xs = [0] + ks + [6]
    ys = [summary.get("scratch", {}).get("top1", (float("nan"),))[0]]
    ys += [summary[f"copy_{side}{k}"]["top1"][0] for k in ks]
    ys += [summary.get("copy", {}).get("top1", (float("nan"),))[0]]
    ax.plot(xs, ys, style, label=f"copy {side} k layers")
  ax.set_xlabel("layers copied (of 6)")
  ax.set_ylabel("test top-1 (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, os.path.join(workdir, "study_layers.png"))
  plt.close(fig)
  bar(
    ["scratch", "copy_heads1", "copy_heads2", "copy"],
    "study_heads.png",
    "heads copied: 0, 1, 2, 4 of 4",
  )


def main(argv):
  del argv
  from at_jax import checkpoint, metrics, storage
  from at_jax.data import pipeline, sources
  from at_jax.evaluate import ensembles
  from at_jax.experiment import loop, paths
  from at_jax.models import vit
  from configs import mae_fmnist

  workdir = storage.absolute(FLAGS.workdir)  # a folder, or gs://bucket/...
  storage.makedirs(workdir)
  start = time.time()
  teacher = FLAGS.teacher
  if not teacher:
    teacher = os.path.join(workdir, "teacher", paths.EXPORT_DIR)
    if not storage.exists(os.path.join(teacher, "model_config.json")):
      print("== pre-training the MAE teacher (no labels) ==", flush=True)
      loop.train_and_evaluate(mae_fmnist.get_config(), os.path.join(workdir, "teacher"))
  names = FLAGS.only or list(SETTINGS)
  jobs = [(name, seed) for seed in range(FLAGS.seeds) for name in names]
  results: dict[str, dict[int, dict]] = {}
  for i, (name, seed) in enumerate(jobs, 1):
    run_dir = os.path.join(workdir, name, f"seed{seed}")
    done = os.path.join(run_dir, "results.json")
    if not storage.exists(done):
      print(
        f"== [{i}/{len(jobs)}] {name} seed {seed} ({(time.time() - start) / 60:.1f} min so far) ==",
        flush=True,
      )
      evals = loop.train_and_evaluate(_config(SETTINGS[name], teacher, seed, FLAGS.epochs), run_dir)
      _write_json(done, evals)
    results.setdefault(name, {})[seed] = _read_json(done)

  # The paper's ensemble: fine-tuned teacher + distilled student, averaged probabilities.
  if {"finetune", "distill"} <= set(results):
    c = _config({}, teacher, 0, FLAGS.epochs)
    source = sources.from_config(c.data, "data.eval_split", None)
    for seed in range(FLAGS.seeds):
      done = os.path.join(workdir, "ensemble", f"seed{seed}", "results.json")
      if not storage.exists(done):
        members = {}
        for name in ("finetune", "distill"):
          model_config, params = checkpoint.load_params(
            os.path.join(workdir, name, f"seed{seed}", paths.EXPORT_DIR)
          )
          members[name] = (vit.build(model_config), params)
        batches = pipeline.eval_iterator(
          source,
          global_batch_size=c.data.eval_batch_size,
          image_size=28,
          crop_pct=1.0,
          normalization=c.data.normalization,
          num_threads=0,
        )
        _write_json(done, ensembles.ensemble_accuracy(members, batches)["ensemble"])
      results.setdefault("ensemble", {})[seed] = _read_json(done)

  summary = {
    name: {k: _mean_std([r[k] for r in runs.values()]) for k in ("top1",)}
    for name, runs in results.items()
  }
  for name, runs in results.items():
    if all("ema_top1" in r for r in runs.values()):
      summary[name]["ema_top1"] = _mean_std([r["ema_top1"] for r in runs.values()])
  rows = [
    {
      "setting": name,
      "seeds": len(results[name]),
      "top1": f"{s['top1'][0]:.2f} +- {s['top1'][1]:.2f}",
      "ema_top1": f"{s['ema_top1'][0]:.2f} +- {s['ema_top1'][1]:.2f}" if "ema_top1" in s else "",
    }
    for name, s in summary.items()
  ]
  table = metrics.format_table(rows, ["setting", "seeds", "top1", "ema_top1"])
  header = (
    f"Fashion-MNIST, MAE teacher ({teacher}), demo student, {FLAGS.epochs} epochs per run; "
    f"test top-1 %, mean +- std over seeds. Wall time of this invocation: "
    f"{(time.time() - start) / 60:.1f} min.\n\n"
  )
  storage.write_atomic(os.path.join(workdir, "study.md"), header + table + "\n")
  _write_json(os.path.join(workdir, "study.json"), {"summary": summary, "runs": results})
  _plots(summary, workdir)
  print(header + table, flush=True)


if __name__ == "__main__":
  app.run(main)
