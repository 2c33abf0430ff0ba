"""Input-pipeline throughput per host with the full recipe's augmentation, against what the train step needs.

  python benchmarks/input_pipeline.py  # Fashion-MNIST: sizes 28 and 224, crop+flip and full recipe, 5 s each
  python benchmarks/input_pipeline.py --sizes=224 --batch=224:256 --num_threads=16 --seconds=30  # a real host
  python benchmarks/input_pipeline.py --accelerators="H100:8,TPU v5p:4" --mfu=0.4 --configs=distill_vitl
  python benchmarks/input_pipeline.py --source=photos --seconds=10  # real JPEGs, ours vs torchvision + timm
  python benchmarks/input_pipeline.py --source=photos --image_folder=/data/imagenet  # any ImageFolder tree

--source=fashion_mnist (the default) times `at_jax.data.pipeline.train_iterator` (as
at_jax.experiment.stream.train_batches calls it) on Fashion-MNIST (Debian's dataset-fashion-mnist, read into
memory), resized by the random-resized crop to each --sizes, in two settings: "crop+flip" (the base
geometry: random-resized crop and horizontal flip) and "full recipe" (+ RandAugment and random erasing),
both with the ImageNet recipe's values read from configs/distill_vitl.py. Mixup and cutmix are no host
work: they run inside the jitted train step. Per setting: images/s (wall), CPU-ms per image (the process's
CPU time, all threads: grain's workers and the main thread's batching), CPU cores kept busy, and the grain
worker threads that actually ran. That source flatters the pipeline: its images are 28 x 28 in memory
(replicated to RGB with --rgb), while ImageNet's are JPEGs of ~500 px, so a real host adds JPEG decoding
and resizes crops down from many more pixels: its cores (below) are a lower bound.

--source=photos measures that cost, on real photographs: an image-folder tree of foolbox's 20 ImageNet
JPEGs, some upsampled to 1000+ px (benchmarks/photos.py; or --image_folder, any tree with a train/
split), read from disk (the page cache) as a training run reads them. In one run, on the same files, the
same batch size and the same number of cores (--num_threads: grain threads, and DataLoader workers):
(a) ours, train_iterator over sources.make_source("imagefolder"), decoding JPEGs at a reduced DCT scale
where the crop allows (jpeg_downscale=True); (b) ours with full decodes (jpeg_downscale=False); (c)
torchvision.datasets.ImageFolder with timm.data.create_transform (bicubic; RandAugment and random erasing
for the full recipe, no colour jitter for crop+flip, as ours) in a torch DataLoader. CPU time: ours, the
process's (time.process_time counts grain's threads); torch, this process's plus the DataLoader workers'
utime + stime, read from /proc/<pid>/stat at both ends of the timed window. Then the eval view (shorter
side to 256, centre 224 crop) the same way (--eval), a single-threaded per-stage CPU profile of both
pipelines (--profile), and how far decoding at a reduced scale moves the output pixels (--quality).

Then, for each accelerator kind x count per host and each recipe config (--configs), the images/s per host
the train step consumes at the device's bf16 peak (benchmarks/flops.py) times --mfu, and the host CPU
cores that the measured CPU-ms/img implies to keep up: cores = need img/s * CPU-ms/img / 1000 (photos:
ours with jpeg_downscale). Append tables to benchmarks/RESULTS.md with the machine and date.

This file holds the command line, the Fashion-MNIST run and the need table; the other jobs live beside it:
pipeline_timing.py (timing and CPU-time machinery, ours' iterators timed), pipeline_torch.py (torchvision
+ timm in a DataLoader), pipeline_photos.py (the photos run and its throughput tables),
pipeline_profile.py (the per-stage profile) and pipeline_quality.py (draft vs full decode pixels).
"""

from __future__ import annotations

import importlib
from typing import Any

import flops  # benchmarks/flops.py
import numpy as np
import pipeline_photos  # benchmarks/pipeline_photos.py
import pipeline_timing  # benchmarks/pipeline_timing.py
from absl import app, flags

flags.DEFINE_enum(
  "source",
  "fashion_mnist",
  ["fashion_mnist", "photos"],
  "fashion_mnist: in memory, ours only; photos: JPEG files, ours vs torchvision + timm side by side.",
)

flags.DEFINE_list(
  "sizes", ["28", "224"], "Output image sizes (the random-resized crop resizes to them)."
)
flags.DEFINE_list(
  "batch", ["28:128", "224:64"], "SIZE:BATCH entries: the batch size per image size."
)
flags.DEFINE_list(
  "settings", ["crop+flip", "full"], "Settings to time: crop+flip, full (the full recipe)."
)
flags.DEFINE_float("seconds", 5.0, "Wall seconds per measurement.")
flags.DEFINE_integer(
  "warmup", 3, "Untimed batches first (starts the threads, drains the prefetch buffer)."
)
flags.DEFINE_integer("num_threads", 0, "Grain threads; 0: the CPUs this process may run on.")
flags.DEFINE_bool(
  "rgb",
  True,
  "Replicate the gray images to RGB, as ImageNet's: the crop+flip path then "
  "works on 3 channels, as the full recipe's RandAugment does anyway.",
)
flags.DEFINE_string("split", "train", "Fashion-MNIST split to read.")
flags.DEFINE_string(
  "recipe", "distill_vitl", "Config (in configs/) whose data.* augmentation is timed."
)
flags.DEFINE_list(
  "configs",
  ["scratch_vitl", "copy_vitl", "distill_vitl"],
  "Configs (in configs/) whose train step's need is computed: model, image size, mode, layers.",
)
flags.DEFINE_list(
  "accelerators",
  ["H100:8", "TPU v4:4"],
  "DEVICE_KIND:COUNT per host; the peak is looked up in flops.PEAK_TFLOPS by device kind.",
)
flags.DEFINE_float("mfu", 0.5, "Assumed model FLOPs utilization of the train step.")
flags.DEFINE_string(
  "image_folder",
  "",
  "photos: an ImageFolder root with a train/ split to time instead of the photographs' tree.",
)
flags.DEFINE_integer("classes", 10, "photos: class folders of the built tree.")
flags.DEFINE_integer("per_class", 40, "photos: images per class folder of the built tree.")
flags.DEFINE_float("large", 0.1, "photos: fraction of the tree's files upsampled to 1000+ px.")
flags.DEFINE_list(
  "pipelines",
  ["ours", "ours_full_decode", "torch"],
  "photos: pipelines to time: ours (jpeg_downscale), ours_full_decode, torch (torchvision + timm).",
)
flags.DEFINE_integer(
  "reps",
  1,
  "photos: rounds of every measurement, interleaved; each row keeps its round of least CPU-ms/img.",
)
flags.DEFINE_float(
  "quiet_wait",
  0.0,
  "photos: before each measurement, wait up to this many seconds for other processes to leave the "
  "CPUs idle (Linux /proc/stat); 0: never wait.",
)
flags.DEFINE_bool("eval", True, "photos: also time the eval view (shorter side 256, centre 224).")
flags.DEFINE_bool("profile", True, "photos: per-stage CPU time per image, single-threaded.")
flags.DEFINE_integer("profile_images", 400, "photos: images the profile runs through each stage.")
flags.DEFINE_integer(
  "profile_rounds", 2, "photos: rounds of the profile; each stage keeps its least CPU time."
)
flags.DEFINE_bool("quality", True, "photos: draft vs full decode pixel differences.")
flags.DEFINE_integer(
  "quality_crops", 400, "photos: random-resized crops the quality table compares."
)
FLAGS = flags.FLAGS


class _RGB:
  """A source whose gray images are replicated to 3 channels on read (~1 us at 28 x 28)."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    image = example["image"]
    return {**example, "image": np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image}


def parse_batches(entries: list[str]) -> dict[int, int]:
  """["28:128", "224:64"] -> {28: 128, 224: 64}."""
  out = {}
  for entry in entries:
    size, batch = entry.split(":")
    out[int(size)] = int(batch)
  return out


def parse_accelerators(entries: list[str]) -> list[tuple[str, int]]:
  """["H100:8", "TPU v4:4"] -> [("H100", 8), ("TPU v4", 4)]."""
  out = []
  for entry in entries:
    kind, count = entry.rsplit(":", 1)
    out.append((kind.strip(), int(count)))
  return out


def load_config(name: str) -> Any:
  return importlib.import_module(f"configs.{name}").get_config()


def step_need(config: Any) -> tuple[float, str]:
  """(model FLOPs per image of the config's train step, its transferred layers as text)."""
  from at_jax.models import vit
  from at_jax.transfer import pairing, spec

  m = config.model
  shape = vit.decode_variant(m.variant)
  size = config.data.image_size
  mode = config.transfer.mode
  layers = pairing.parse_selection(config.transfer.layers, shape["depth"], "transfer.layers")
  f = flops.train_step_flops(
    width=shape["width"],
    depth=shape["depth"],
    mlp_dim=shape["mlp_dim"],
    patch=shape["patch_size"],
    num_patches=(size // shape["patch_size"]) ** 2,
    num_prefix=int(m.class_token),
    num_classes=m.num_classes,
    mode=mode,
    layers=layers,
  )
  return f["total"], "-" if mode == "none" else spec.selected(layers)


def run_fashion_mnist(
  recipe: Any, *, sizes: list[int], batches: dict[int, int], num_threads: int
) -> dict[tuple[int, str], dict[str, float]]:
  """--source=fashion_mnist: ours only, in memory; returns the results by (size, setting)."""
  from at_jax.data import sources

  source = sources.make_source("fashion_mnist", FLAGS.split, field="--split")
  if FLAGS.rgb:
    source = _RGB(source)
  print(
    f"source: Fashion-MNIST {FLAGS.split} ({len(source)} images, 28 x 28, in memory"
    f"{', replicated to RGB' if FLAGS.rgb else ', gray'}): no JPEG decoding, crops upsampled from 28 px"
  )
  pipeline_timing.print_recipe(recipe, FLAGS.recipe)
  print()
  print(
    "| image | batch | setting | grain threads | images/s (wall) | CPU-ms/img | CPU cores busy | batches |"
  )
  print("|---|---|---|---|---|---|---|---|")
  results: dict[tuple[int, str], dict[str, float]] = {}
  for size in sizes:
    for setting in FLAGS.settings:
      r = pipeline_timing.measure(
        source,
        recipe,
        image_size=size,
        batch=batches[size],
        full=setting == "full",
        num_threads=num_threads,
        seconds=FLAGS.seconds,
        warmup=FLAGS.warmup,
      )
      results[size, setting] = r
      print(
        f"| {size} | {batches[size]} | {pipeline_timing.SETTINGS[setting]} | {r['threads']} | "
        f"{r['img_s']:.0f} | {r['cpu_ms']:.2f} | {r['busy']:.2f} | {r['batches']} |",
        flush=True,
      )
  return results


def print_need(results: dict[tuple[int, str], dict[str, float]], sizes: list[int]) -> None:
  """Per accelerator kind x count and --configs: the step's images/s at --mfu and the host cores
  that `results`' CPU-ms/img imply to keep up."""
  if not FLAGS.configs:
    return
  print()
  print(
    f"The train step's need per host at {FLAGS.mfu:.0%} MFU (model FLOPs: benchmarks/flops.py), and the "
    "host CPU cores the CPU-ms/img above imply to keep up (cores = need img/s x CPU-ms/img / 1000):"
  )
  print()
  print(
    "| accelerators per host | peak TFLOP/s each | config | model | image | mode | layers | GFLOP/img "
    "| step needs img/s per host | cores: crop+flip | cores: full recipe |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for kind, count in parse_accelerators(FLAGS.accelerators):
    for name in FLAGS.configs:
      config = load_config(name)
      peak = flops.peak_tflops(kind, config.model.dtype_mm)
      size = config.data.image_size
      per_image, layers = step_need(config)
      need = count * peak * 1e12 * FLAGS.mfu / per_image if peak else 0.0
      cores = {}
      for setting in pipeline_timing.SETTINGS:
        r = results.get((size, setting))
        cores[setting] = f"{need * r['cpu_ms'] / 1000:.1f}" if r and need else "-"
      print(
        f"| {count}x {kind} | {f'{peak:g}' if peak else 'unknown'} ({config.model.dtype_mm}) | {name} | "
        f"{config.model.variant} | {size} | {config.transfer.mode} | {layers} | {per_image / 1e9:.1f} | "
        f"{f'{need:.0f}' if need else '-'} | {cores['crop+flip']} | "
        f"{cores['full']} |",
        flush=True,
      )
  if not any(size in sizes for size in {load_config(n).data.image_size for n in FLAGS.configs}):
    print("\n(no cores: measure the configs' image size, e.g. --sizes=224)")


def photos_options() -> pipeline_photos.PhotosOptions:
  """The photos run's flags, for pipeline_photos (which reads no flags)."""
  return pipeline_photos.PhotosOptions(
    recipe_name=FLAGS.recipe,
    image_folder=FLAGS.image_folder,
    classes=FLAGS.classes,
    per_class=FLAGS.per_class,
    large=FLAGS.large,
    pipelines=FLAGS.pipelines,
    settings=FLAGS.settings,
    eval_view=FLAGS.eval,
    seconds=FLAGS.seconds,
    warmup=FLAGS.warmup,
    reps=FLAGS.reps,
    quiet_wait=FLAGS.quiet_wait,
    profile=FLAGS.profile,
    profile_images=FLAGS.profile_images,
    profile_rounds=FLAGS.profile_rounds,
    quality=FLAGS.quality,
    quality_crops=FLAGS.quality_crops,
  )


def main(argv):
  del argv
  photo_mode = FLAGS.source == "photos"
  # Photographs are timed at 224 (timm's input_size) unless --sizes says otherwise.
  sizes = [224] if photo_mode and not FLAGS["sizes"].present else [int(s) for s in FLAGS.sizes]
  batches = parse_batches(FLAGS.batch)
  missing = [s for s in sizes if s not in batches]
  if missing:
    raise app.UsageError(f"--batch has no entry for sizes {missing}, e.g. --batch={missing[0]}:64")
  unknown = [s for s in FLAGS.settings if s not in pipeline_timing.SETTINGS]
  if unknown:
    raise app.UsageError(f"unknown --settings {unknown}; use {sorted(pipeline_timing.SETTINGS)}")
  cpus = pipeline_timing.available_cpus()
  num_threads = FLAGS.num_threads or cpus
  recipe = load_config(FLAGS.recipe).data

  workers = "; DataLoader num_workers the same" if photo_mode else ""
  print(
    f"host: {cpus} CPUs; grain num_threads {num_threads}{workers}; {FLAGS.seconds:g} s per measurement "
    f"after {FLAGS.warmup} warmup batches"
  )
  if photo_mode:
    results = pipeline_photos.run_photos(
      recipe, photos_options(), sizes=sizes, batches=batches, num_threads=num_threads
    )
  else:
    results = run_fashion_mnist(recipe, sizes=sizes, batches=batches, num_threads=num_threads)
  print_need(results, sizes)


if __name__ == "__main__":
  app.run(main)
