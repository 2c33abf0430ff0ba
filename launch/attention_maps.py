"""Draw the cls token's attention in every layer for a few test images, for one or more params exports,
and measure how similar their attention maps are, as the paper's appendix does.

  python launch/attention_maps.py --params=workdir/demo/teacher/params,workdir/demo/params \
      --names=teacher,student --out=workdir/demo/attention.png

Also prints each model's per-layer agreement with the first one (cross-entropy, its minimum the first
model's entropy, and Jensen-Shannon divergence) on those images; then, over `--jsd_images` images, each
model's per-layer Jensen-Shannon divergence to each of `--references` under the four head-matching schemes
(`at_jax.evaluate.similarity`: no matching, Hungarian one-to-one, nearest head, head-averaged maps), as a
table and a plot (`--jsd_out`).
"""

import itertools
import os

import cli
from absl import flags

flags.DEFINE_list(
  "params", None, "Params exports (the params/ folder of a run, or a converted teacher)."
)
flags.DEFINE_list("names", None, "Row labels, one per export (default: the paths).")
flags.DEFINE_string("out", "attention.png", "PNG to write.")
flags.DEFINE_string("dataset", "fashion_mnist", "Dataset name (sources.make_source).")
flags.DEFINE_string("split", "test", "Split to take images from.")
flags.DEFINE_string("data_dir", None, "config.data.dir equivalent.")
flags.DEFINE_integer("image_size", 28, "Image size the models expect.")
flags.DEFINE_string("normalization", "fashion_mnist", "transforms.NORMALIZATIONS key.")
flags.DEFINE_integer("num_images", 4, "How many images.")
flags.DEFINE_list(
  "references",
  None,
  "Names (from --names) every other model's attention similarity is measured against, e.g. "
  "teacher,finetuned (default: the first model).",
)
flags.DEFINE_integer(
  "jsd_images", 256, "Images the similarity averages over (the first of --split); 0 skips it."
)
flags.DEFINE_integer(
  "batch_size", 16, "Images per forward pass for the similarity (bounds memory)."
)
flags.DEFINE_string("jsd_out", None, "Similarity plot PNG (default: --out with a _jsd suffix).")
flags.mark_flag_as_required("params")
FLAGS = flags.FLAGS


def _check_flags() -> tuple[list[str], list[str]]:
  """Names and references, or a ConfigError naming the flag, before any model is loaded."""
  from at_jax.errors import ConfigError

  names = FLAGS.names or FLAGS.params
  if len(names) != len(FLAGS.params):
    raise ConfigError("--names", f"{len(names)} names for {len(FLAGS.params)} --params exports")
  if len(set(names)) != len(names):
    raise ConfigError("--names", f"names must differ: {names}")
  references = FLAGS.references or names[:1]
  unknown = [r for r in references if r not in names]
  if unknown:
    raise ConfigError("--references", f"{unknown} are not among --names {names}")
  if FLAGS.jsd_images < 0:
    raise ConfigError(
      "--jsd_images", f"must be >= 0 (0 skips the similarity), not {FLAGS.jsd_images}"
    )
  if FLAGS.batch_size < 1:
    raise ConfigError("--batch_size", f"must be >= 1, not {FLAGS.batch_size}")
  return names, references


def _check_shapes(models) -> None:
  """Maps compare only over the same keys: equal depth and token count (patches + prefix tokens)."""
  from at_jax.errors import ConfigError

  shapes = {name: (m.depth, m.tokens_for(FLAGS.image_size)) for name, (m, _) in models.items()}
  if len(set(shapes.values())) > 1:
    raise ConfigError("--params", f"attention maps need equal (depth, tokens): {shapes}")


def _first_images(source, count: int, batch_size: int):
  """Batches over the first `count` images of `source`; images past `count` are masked out."""
  import numpy as np

  from at_jax.data import pipeline

  batches = pipeline.eval_iterator(
    source,
    global_batch_size=batch_size,
    image_size=FLAGS.image_size,
    crop_pct=1.0,
    normalization=FLAGS.normalization,
    num_threads=0,
  )
  for step, batch in enumerate(itertools.islice(batches, -(-count // batch_size))):
    index = step * batch_size + np.arange(batch_size)
    yield {**batch, "mask": batch["mask"] & (index < count)}


def main(argv):
  del argv
  from at_jax import checkpoint
  from at_jax.data import sources
  from at_jax.evaluate import attention as evaluate
  from at_jax.evaluate import similarity
  from at_jax.models import vit

  names, references = _check_flags()
  source = sources.make_source(FLAGS.dataset, FLAGS.split, FLAGS.data_dir, field="--split")
  batch = next(_first_images(source, FLAGS.num_images, FLAGS.num_images))
  models = {}
  for name, path in zip(names, FLAGS.params):
    model_config, params = checkpoint.load_params(path)
    models[name] = (vit.build(model_config), params)
  _check_shapes(models)
  agreement = evaluate.compare_attention(models, batch["image"], FLAGS.out)
  print(f"wrote {FLAGS.out}")
  print(evaluate.format_agreement(agreement, names[0]))
  if FLAGS.jsd_images == 0 or len(models) < 2:
    return
  results = similarity.model_similarity(
    models, references, _first_images(source, FLAGS.jsd_images, FLAGS.batch_size)
  )
  images = int(next(iter(results.values())).images)
  print(f"\nattention similarity (Jensen-Shannon divergence, nats) over {images} images:")
  print(similarity.format_similarity(results))
  jsd_out = FLAGS.jsd_out or os.path.splitext(FLAGS.out)[0] + "_jsd.png"
  similarity.save_similarity_plot(jsd_out, results)
  print(f"wrote {jsd_out}")


if __name__ == "__main__":
  cli.run(main)
