"""Evaluate a run's checkpoint, or an ensemble of exports, on a config's eval split.

# A checkpoint (default: the latest), as training evaluated it (raw and EMA params):
python launch/evaluate.py --config=configs/demo.py --workdir=workdir/demo [--step=936]
# An ensemble (average of softmax probabilities) of params exports / checkpoint files:
python launch/evaluate.py --config=configs/demo.py --ensemble=workdir/ft/params,workdir/demo/params
"""

import json
import sys

import cli
from absl import app, flags

cli.define_config_flag()
flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to evaluate.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_list("ensemble", None, "Params exports or checkpoint files to ensemble.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from at_jax import metrics
  from at_jax.data import options, pipeline, sources
  from at_jax.errors import ConfigError
  from at_jax.evaluate import ensembles
  from at_jax.experiment import loop, teachers
  from at_jax.models import vit

  config = FLAGS.config
  try:
    if FLAGS.ensemble:
      members = {}
      for path in FLAGS.ensemble:
        model_config, params = teachers.load_vit(path, config)
        members[path] = (vit.build(model_config), params)
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
    print(f"\nConfig error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
