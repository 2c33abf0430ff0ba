"""Precompute a config's teacher targets once, for --config.transfer.source=precomputed.

  python launch/precompute.py --config=configs/demo.py --workdir=workdir/demo [--config.x=y ...]
  python launch/main.py --config=configs/demo.py --workdir=workdir/demo --config.transfer.source=precomputed

Runs the teacher (teacher.init, or trains teacher.pretrain first like launch/main.py) over the training
split in a fixed view (the eval preprocessing) and stores the selected layers' targets in bfloat16 in
transfer.targets_dir (default <workdir>/teacher_targets); precompute.store picks attention logits or q and
k. Use the same --config, overrides and --workdir as the training run. Rerun to resume an interrupted
precompute. Multi-host: the same flags as launch/main.py; each process writes its slice of every batch.
"""

import sys

import cli
from absl import flags

cli.define_flags("The training run's workdir (default: workdir/<config>).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config_path, workdir = cli.start()  # workdir: where launch/main.py would train this config
  import jax

  from at_jax.data import target_store
  from at_jax.errors import ConfigError
  from at_jax.experiment import precompute

  try:
    metadata = precompute.run(FLAGS.config, workdir)
  except ConfigError as e:
    print(f"\nConfig error in {config_path}: {e.line()}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    print(
      f"Done: {metadata['num_examples']} examples ({metadata['skipped']} unreadable, skipped) in "
      f"{target_store.targets_dir(FLAGS.config.transfer.targets_dir, workdir)}",
      flush=True,
    )


if __name__ == "__main__":
  cli.run(main)
