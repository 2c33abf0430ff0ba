"""How each teacher head attends, and the `transfer.head_pick` that teaches the sharpest heads.

  python launch/teacher_heads.py --config.teacher.init=projects/cross_shape/results/teacher \
      --config.transfer.layer_map=uniform

For a config's teacher and the teacher layers its distilled student layers read (`transfer.layer_map`;
the head map is ignored), prints per head, as the mean over query tokens and the first --num_images
training images in the eval view, its attention entropy over keys (nats; low is sharp) and its mass on the
query's own token and on the prefix tokens (a sharp head whose mass sits there, an attention sink, says
little about where to look); then the overrides for `transfer.head_map=pick` that give each student layer
the sharpest heads of the teacher layer it reads and, as a control, the flattest. Use the training run's
--config, overrides and --workdir (a teacher that `teacher.pretrain` trains is trained there first, as by
launch/main.py).
"""

import sys

import cli
from absl import flags

cli.define_flags("The training run's workdir (default: workdir/<config>).")
flags.DEFINE_integer("num_images", 512, "Training images the entropies average over.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config_path, workdir = cli.start()
  from at_jax.errors import ConfigError
  from at_jax.evaluate import attention as evaluate
  from at_jax.experiment import job
  from at_jax.transfer import pairing

  try:
    statistics, teacher_layers, heads = job.teacher_head_statistics(
      FLAGS.config, workdir, FLAGS.num_images
    )
  except ConfigError as e:
    print(f"\nConfig error in {config_path}: {e.line()}", file=sys.stderr)
    sys.exit(2)
  entropy_LH = statistics["entropy"]
  picks = {
    "sharpest": pairing.sharpest_heads(entropy_LH, teacher_layers, heads),
    "flattest": pairing.sharpest_heads(-entropy_LH, teacher_layers, heads),
  }
  print(
    f"The teacher's heads in the layers the student's distilled layers read, mean over query tokens "
    f"and {FLAGS.num_images} training images; the {heads} heads each student layer would read:"
  )
  for key, title in evaluate.HEAD_STATISTICS.items():
    table = evaluate.format_heads(
      statistics[key], teacher_layers, picks if key == "entropy" else None
    )
    print(f"\n{title}:\n{table}")
  print()
  for name, pick in picks.items():
    print(f"{name}: --config.transfer.head_map=pick --config.transfer.head_pick='{pick}'")


if __name__ == "__main__":
  cli.run(main)
