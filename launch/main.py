"""Entry point: python launch/main.py --config=configs/demo.py --workdir=workdir/demo [--config.x=y ...].

With no --config it runs the embedded default (configs/demo.py). Re-running on an existing workdir
resumes from its last checkpoint. On a Cloud TPU pod pass --multihost (TPU topology is auto-detected);
on GPU/CPU clusters also --coordinator=host:port --num_processes=N --process_id=i (or the env vars that
jax.distributed.initialize reads).
"""

import sys

import cli
from absl import flags

cli.define_flags("Checkpoints, metrics and exports go here (default: workdir/<config>).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config_path, workdir = cli.start()
  from at_jax.errors import ConfigError
  from at_jax.experiment import job, preemption

  try:
    job.run_with_teacher(FLAGS.config, workdir)
  except ConfigError as e:
    # A config/input problem: say what to fix, without a traceback from deep inside.
    print(f"\nConfig error in {config_path}: {e.line()}", file=sys.stderr)
    sys.exit(2)
  except preemption.Preempted as e:
    print(f"\n{e}", file=sys.stderr)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main)
