"""Entry point: python launch/main.py --config=configs/demo.py --workdir=workdir/demo [--config.x=y ...].

With no --config it runs the embedded default (configs/demo.py). Re-running on an existing workdir
resumes from its last checkpoint. On a Cloud TPU pod pass --multihost (TPU topology is auto-detected);
on GPU/CPU clusters also --coordinator=host:port --num_processes=N --process_id=i (or the env vars that
jax.distributed.initialize reads).
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
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here (default: workdir/<config>).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, GPU clusters).")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (GPU/CPU clusters).")
flags.DEFINE_integer("num_processes", None, "Number of processes (GPU/CPU clusters).")
flags.DEFINE_integer("process_id", None, "This process's index (GPU/CPU clusters).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # noqa: PLC0415 -- after absl parsed flags, so --jax_* flags apply
  if FLAGS.multihost:
    # CPU clusters (and tests over loopback) need a cross-process collectives backend; TPU/GPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from at_jax import train  # noqa: PLC0415
  from at_jax.errors import ConfigError  # noqa: PLC0415

  config_path = flags.FLAGS["config"].config_filename
  name = os.path.splitext(os.path.basename(config_path))[0]
  workdir = FLAGS.workdir or os.path.join("workdir", name)
  try:
    train.run_with_teacher(FLAGS.config, workdir)
  except ConfigError as e:
    # A config/input problem: say what to fix, without a traceback from deep inside.
    print(f"\nConfig error in {config_path}: {e}", file=sys.stderr)
    sys.exit(2)
  except train.Preempted as e:
    print(f"\n{e}", file=sys.stderr)
    sys.exit(143)  # 128 + SIGTERM, what schedulers expect from a job that honoured the signal


if __name__ == "__main__":
  app.run(main)
