"""Draw the cls token's attention in every layer for a few test images, for one or more params exports.

  python launch/attention_maps.py --params=workdir/demo/teacher/params,workdir/demo/params \
      --names=teacher,student --out=workdir/demo/attention.png

Also prints each model's per-layer agreement with the first one (cross-entropy, its minimum the first
model's entropy, and Jensen-Shannon divergence) on those images.
"""

from absl import app, flags

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
flags.mark_flag_as_required("params")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from at_jax import checkpoint
  from at_jax.data import pipeline, sources
  from at_jax.evaluate import attention as evaluate
  from at_jax.models import vit

  names = FLAGS.names or FLAGS.params
  source = sources.make_source(FLAGS.dataset, FLAGS.split, FLAGS.data_dir, field="--split")
  batch = next(
    pipeline.eval_iterator(
      source,
      global_batch_size=FLAGS.num_images,
      image_size=FLAGS.image_size,
      crop_pct=1.0,
      normalization=FLAGS.normalization,
      num_threads=0,
    )
  )
  models = {}
  for name, path in zip(names, FLAGS.params):
    model_config, params = checkpoint.load_params(path)
    models[name] = (vit.build(model_config), params)
  agreement = evaluate.compare_attention(models, batch["image"], FLAGS.out)
  print(f"wrote {FLAGS.out}")
  print(evaluate.format_agreement(agreement, names[0]))


if __name__ == "__main__":
  app.run(main)
