"""Evaluate a run's checkpoint, or an ensemble of exports, on a config's eval split.

# A checkpoint (default: the latest), as training evaluated it (raw and EMA params):
python launch/evaluate.py --config=configs/demo.py --workdir=workdir/demo [--step=936]
# An ensemble (average of softmax probabilities) of params exports / checkpoint files; a run's EMA params
# are the export next to its raw one, <workdir>/params_ema:
python launch/evaluate.py --config=configs/demo.py --ensemble=workdir/ft/params,workdir/demo/params
python launch/evaluate.py --config=configs/demo.py --ensemble=workdir/ft/params_ema,workdir/demo/params_ema
"""

import json
import os
import sys

import cli
from absl import flags

cli.define_config_flag()
flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to evaluate.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_list("ensemble", None, "Params exports or checkpoint files to ensemble.")
flags.DEFINE_list(
  "models", None, "Exports / checkpoint files for --shift/--probe (default: <workdir>/params)."
)
flags.DEFINE_list("shift", None, "Shift sets to evaluate on (at_jax.evaluate.shift.SETS).")
flags.DEFINE_string("shift_dir", None, "Folder holding the sets' folders, or their tfds data dir.")
flags.DEFINE_list("probe", None, "Frozen-feature probes: knn, linear.")
flags.DEFINE_string("output", None, "Write --shift/--probe results here as JSON (default: stdout).")
FLAGS = flags.FLAGS


def _load(config, paths: list[str]) -> dict:
  """path -> (ViT, params) of params exports / checkpoint files."""
  from at_jax import checkpoint
  from at_jax.experiment import teachers
  from at_jax.models import vit

  members = {}
  for path in paths:
    checkpoint.check_standalone(path, path, "an evaluation of models on their own")
    model_config, params = teachers.load_vit(path, config)
    members[path] = (vit.build(model_config), params)
  return members


def _members(config) -> dict:
  """`_load` of --models, or of <workdir>/params."""
  from at_jax.errors import ConfigError
  from at_jax.experiment import paths

  names = FLAGS.models or ([os.path.join(FLAGS.workdir, paths.EXPORT_DIR)] if FLAGS.workdir else [])
  if not names:
    raise ConfigError(
      "--models", "give exports / checkpoint files, or --workdir (its params export)"
    )
  return _load(config, names)


def _batches(config, source):
  from at_jax.data import options, pipeline

  d = config.data
  return pipeline.eval_iterator(
    source, global_batch_size=d.eval_batch_size, **options.eval_view(d), num_threads=d.num_threads
  )


def _check_flags() -> None:
  """ConfigError for a bad --shift, --shift_dir or --probe, before any model is loaded."""
  from at_jax.errors import ConfigError
  from at_jax.evaluate import probes, shift

  if FLAGS.shift:
    shift.check_names(FLAGS.shift)
    if not FLAGS.shift_dir:
      raise ConfigError("--shift_dir", "the folder holding the sets (or their tfds data dir)")
  unknown = sorted(set(FLAGS.probe or ()) - set(probes.PROBES))
  if unknown:
    raise ConfigError("--probe", f"unknown {unknown}; choose from {sorted(probes.PROBES)}")


def _shift(config, members) -> tuple[dict, str]:
  """({set: {"source": where, "results": {model: {top1, top5, count}}}}, top-1 table) of --shift."""
  from at_jax import metrics
  from at_jax.data import sources
  from at_jax.evaluate import shift

  scorers = {name: shift.Scorer(name) for name in FLAGS.shift}  # reads timm's files first
  d = config.data
  cache = d.file_list_dir or (
    os.path.join(FLAGS.workdir, sources.FILE_LIST_DIR) if FLAGS.workdir else None
  )
  found = {name: shift.make_source(name, FLAGS.shift_dir, cache) for name in FLAGS.shift}
  out = {}
  for name, (source, where) in found.items():
    print(f"{name}: {len(source)} images from {where}", flush=True)
    out[name] = {
      "source": where,
      "results": shift.evaluate(members, scorers[name], _batches(config, source)),
    }
  models = list(out[FLAGS.shift[0]]["results"])
  rows = [
    {"model": m, **{n: round(out[n]["results"][m]["top1"], 2) for n in FLAGS.shift}} for m in models
  ]
  return out, metrics.format_table(rows, ["model", *FLAGS.shift])


def _probe(config, members) -> tuple[dict, str]:
  """({model: {probe: {top1, top5}}}, top-1 table) of --probe on data.train_split / data.eval_split."""
  from at_jax import metrics
  from at_jax.data import sources
  from at_jax.evaluate import probes

  splits = {
    field: sources.from_config(config.data, field, FLAGS.workdir)
    for field in ("data.train_split", "data.eval_split")
  }
  results = {}
  for name, (model, params) in members.items():
    train, test = (
      probes.extract_features(model, params, _batches(config, s)) for s in splits.values()
    )
    classes = int(max(train[1].max(), test[1].max())) + 1
    results[name] = {p: probes.PROBES[p](train, test, classes) for p in FLAGS.probe}
  rows = [
    {"model": m, **{p: round(r[p]["top1"], 2) for p in FLAGS.probe}} for m, r in results.items()
  ]
  return results, metrics.format_table(rows, ["model", *FLAGS.probe])


def _shift_and_probes(config) -> None:
  """Runs --shift and/or --probe; prints their tables, writes the JSON to --output (or prints it)."""
  _check_flags()
  members = _members(config)
  out, tables = {}, []
  for key, run in (("shift", _shift), ("probe", _probe)):
    if FLAGS[key].value:
      out[key], table = run(config, members)
      tables.append(table)
  print("\n\n".join(tables))
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(out, f, indent=1)
  else:
    print(json.dumps(out))


def main(argv):
  del argv
  from at_jax import metrics
  from at_jax.data import options, pipeline, sources
  from at_jax.errors import ConfigError
  from at_jax.evaluate import ensembles
  from at_jax.experiment import loop

  config = FLAGS.config
  try:
    if (FLAGS.shift or FLAGS.probe) and FLAGS.ensemble:
      raise ConfigError("--ensemble", "--shift/--probe score each of --models; give those instead")
    if FLAGS.shift or FLAGS.probe:
      _shift_and_probes(config)
    elif FLAGS.ensemble:
      members = _load(config, FLAGS.ensemble)
      d = config.data
      batches = pipeline.eval_iterator(
        sources.from_config(d, "data.eval_split", FLAGS.workdir),
        global_batch_size=d.eval_batch_size,
        **options.eval_view(d),
        num_threads=d.num_threads,
      )
      results = ensembles.ensemble_accuracy(members, batches)
      rows = [
        {"model": name, **{k: round(v, 2) for k, v in r.items()}} for name, r in results.items()
      ]
      print(metrics.format_table(rows, ["model", "top1", "top5"]))
    elif FLAGS.workdir:
      results = loop.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step)
      print(json.dumps({k: round(v, 4) for k, v in results.items()}))
    else:
      raise ConfigError(
        "--workdir/--ensemble", "give a run directory or a list of exports to ensemble"
      )
  except ConfigError as e:
    print(f"\nConfig error: {e.line()}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  cli.run(main)
