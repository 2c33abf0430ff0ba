"""Precompute a config's teacher targets once, for --config.transfer.source=precomputed.

  python launch/precompute.py --config=configs/demo.py --workdir=workdir/demo [--config.x=y ...]
  python launch/main.py --config=configs/demo.py --workdir=workdir/demo --config.transfer.source=precomputed

Runs the teacher (teacher.init, or trains teacher.pretrain first like launch/main.py) over the training
split in a fixed view (the eval preprocessing) and stores the selected layers' targets in bfloat16 in
transfer.targets_dir (default <workdir>/teacher_targets); precompute.store picks attention logits or q and
k. Use the same --config, overrides and --workdir as the training run. Rerun to resume an interrupted
precompute. Multi-host: the same flags as launch/main.py; each process writes its slice of every batch.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # so that configs/*.py can `from configs import common`

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "demo.py"),
                                "Config file (get_config); override fields with --config.a.b=value.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's workdir (default: workdir/<config>).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, GPU clusters).")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (GPU/CPU clusters).")
flags.DEFINE_integer("num_processes", None, "Number of processes (GPU/CPU clusters).")
flags.DEFINE_integer("process_id", None, "This process's index (GPU/CPU clusters).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # noqa: PLC0415 -- after absl parsed flags, so --jax_* flags apply
  if FLAGS.multihost:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from at_jax import data, precompute  # noqa: PLC0415
  from at_jax.errors import ConfigError  # noqa: PLC0415

  config_path = flags.FLAGS["config"].config_filename
  name = os.path.splitext(os.path.basename(config_path))[0]
  workdir = FLAGS.workdir or os.path.join("workdir", name)  # where launch/main.py would train it
  try:
    metadata = precompute.run(FLAGS.config, workdir)
  except ConfigError as e:
    print(f"\nConfig error in {config_path}: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    print(f"Done: {metadata['num_examples']} examples ({metadata['skipped']} unreadable, skipped) in "
          f"{data.targets_dir(FLAGS.config.transfer.targets_dir, workdir)}", flush=True)


if __name__ == "__main__":
  app.run(main)
