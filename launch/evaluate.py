"""Evaluate a run's checkpoint, or an ensemble of exports, on a config's eval split.

# A checkpoint (default: the latest), as training evaluated it (raw and EMA params):
python launch/evaluate.py --config=configs/demo.py --workdir=workdir/demo [--step=936]
# An ensemble (average of softmax probabilities) of params exports / checkpoint files:
python launch/evaluate.py --config=configs/demo.py --ensemble=workdir/ft/params,workdir/demo/params
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

config_flags.DEFINE_config_file(
  "config", os.path.join(ROOT, "configs", "demo.py"), "Config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to evaluate.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_list("ensemble", None, "Params exports or checkpoint files to ensemble.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from at_jax import metrics
  from at_jax.data import pipeline as data
  from at_jax.errors import ConfigError
  from at_jax.evaluate import attention as evaluate
  from at_jax.experiment import loop as train
  from at_jax.models import vit

  config = FLAGS.config
  try:
    if FLAGS.ensemble:
      members = {}
      for path in FLAGS.ensemble:
        model_config, params = train.load_vit(path, config)
        members[path] = (vit.build(model_config), params)
      d = config.data
      batches = data.eval_iterator(
        data.make_source(d.name, d.eval_split, d.dir or None),
        global_batch_size=d.eval_batch_size,
        image_size=d.image_size,
        crop_pct=d.crop_pct,
        normalization=d.normalization,
        num_threads=d.num_threads,
      )
      results = evaluate.ensemble_accuracy(members, batches)
      rows = [
        {"model": name, **{k: round(v, 2) for k, v in r.items()}} for name, r in results.items()
      ]
      print(metrics.format_table(rows, ["model", "top1", "top5"]))
    elif FLAGS.workdir:
      results = train.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step)
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
