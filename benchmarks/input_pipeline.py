"""Input-pipeline throughput per host with the full recipe's augmentation, against what the train step needs.

  python benchmarks/input_pipeline.py  # sizes 28 and 224, crop+flip and full recipe, 5 s each
  python benchmarks/input_pipeline.py --sizes=224 --batch=224:256 --num_threads=16 --seconds=30  # a real host
  python benchmarks/input_pipeline.py --accelerators="H100:8,TPU v5p:4" --mfu=0.4 --configs=distill_vitl

Times `at_jax.data.pipeline.train_iterator` (as at_jax.experiment.loop._train_iter calls it) on Fashion-MNIST (Debian's
dataset-fashion-mnist, read into memory), resized by the random-resized crop to each --sizes, in two
settings: "crop+flip" (the base geometry: random-resized crop and horizontal flip) and "full recipe" (+
RandAugment and random erasing), both with the ImageNet recipe's values read from configs/distill_vitl.py.
Mixup and cutmix are no host work: they run inside the jitted train step. Per setting: images/s (wall),
CPU-ms per image (the process's CPU time, all threads: grain's workers and the main thread's batching),
CPU cores kept busy, and the grain worker threads that actually ran.

Then, for each accelerator kind x count per host and each recipe config (--configs), the images/s per host
the train step consumes at the device's bf16 peak (benchmarks/flops.py) times --mfu, and the host CPU
cores that the measured CPU-ms/img implies to keep up: cores = need img/s * CPU-ms/img / 1000.

The source flatters the pipeline: its images are 28 x 28 in memory (replicated to RGB with --rgb), while
ImageNet's are ~400 x 350 JPEGs, so a real host adds JPEG decoding and resizes crops down from many more
pixels; the cores are a lower bound. Append tables to benchmarks/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from typing import Any

import flops  # benchmarks/flops.py
import numpy as np
from absl import app, flags

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
FLAGS = flags.FLAGS

SETTINGS = {"crop+flip": "crop+flip", "full": "full recipe"}
_GRAIN_THREAD_PREFIX = "grain-prefetch"  # grain's ThreadPoolExecutor names its workers so


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


def grain_threads() -> int:
  return sum(t.name.startswith(_GRAIN_THREAD_PREFIX) for t in threading.enumerate())


def wait_for_grain_threads(timeout: float = 30.0) -> None:
  """Waits until a closed iterator's workers finish their last examples, so that their CPU time does not
  fall into the next measurement and the next thread count sees only its own workers."""
  deadline = time.monotonic() + timeout
  while grain_threads() and time.monotonic() < deadline:
    time.sleep(0.05)


def measure(
  source: Any,
  data_cfg: Any,
  *,
  image_size: int,
  batch: int,
  full: bool,
  num_threads: int,
  seconds: float,
  warmup: int,
) -> dict[str, float]:
  """Pulls batches from a fresh train_iterator for `seconds`; returns images/s, CPU-ms/img and threads."""
  from at_jax.data import pipeline

  it = pipeline.train_iterator(
    source,
    global_batch_size=batch,
    image_size=image_size,
    seed=0,
    normalization=data_cfg.normalization,
    rrc_scale=tuple(data_cfg.rrc_scale),
    hflip=data_cfg.hflip,
    randaugment=data_cfg.randaugment if full else "",
    random_erase=data_cfg.random_erase if full else 0.0,
    crop_pct=data_cfg.crop_pct,
    num_threads=num_threads,
  )
  try:
    for _ in range(warmup):
      next(it)
    # process_time counts every thread of the process: grain's workers and this thread's batching.
    wall0, cpu0 = time.perf_counter(), time.process_time()
    batches = 0
    while True:
      next(it)
      batches += 1
      wall = time.perf_counter() - wall0
      if wall >= seconds:
        break
    cpu = time.process_time() - cpu0
    threads = grain_threads()
  finally:
    it.close()
    wait_for_grain_threads()
  images = batches * batch
  return {
    "img_s": images / wall,
    "cpu_ms": 1000 * cpu / images,
    "busy": cpu / wall,
    "threads": threads,
    "batches": batches,
  }


def load_config(name: str) -> Any:
  return importlib.import_module(f"configs.{name}").get_config()


def step_need(config: Any) -> tuple[float, str]:
  """(model FLOPs per image of the config's train step, its transferred layers as text)."""
  from at_jax.models import vit
  from at_jax.transfer import spec

  m = config.model
  shape = vit.decode_variant(m.variant)
  size = config.data.image_size
  mode = config.transfer.mode
  layers = spec.parse_selection(config.transfer.layers, shape["depth"], "transfer.layers")
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


def main(argv):
  del argv
  from at_jax.data import sources

  sizes = [int(s) for s in FLAGS.sizes]
  batches = parse_batches(FLAGS.batch)
  missing = [s for s in sizes if s not in batches]
  if missing:
    raise app.UsageError(f"--batch has no entry for sizes {missing}, e.g. --batch={missing[0]}:64")
  unknown = [s for s in FLAGS.settings if s not in SETTINGS]
  if unknown:
    raise app.UsageError(f"unknown --settings {unknown}; use {sorted(SETTINGS)}")
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  num_threads = FLAGS.num_threads or cpus
  recipe = load_config(FLAGS.recipe).data
  source = sources.make_source("fashion_mnist", FLAGS.split, field="--split")
  if FLAGS.rgb:
    source = _RGB(source)

  print(
    f"host: {cpus} CPUs; grain num_threads {num_threads}; {FLAGS.seconds:g} s per measurement after "
    f"{FLAGS.warmup} warmup batches"
  )
  print(
    f"source: Fashion-MNIST {FLAGS.split} ({len(source)} images, 28 x 28, in memory"
    f"{', replicated to RGB' if FLAGS.rgb else ', gray'}): no JPEG decoding, crops upsampled from 28 px"
  )
  print(
    f"recipe (configs/{FLAGS.recipe}.py): crop+flip = random-resized crop scale {tuple(recipe.rrc_scale)}, "
    f"bicubic, hflip {recipe.hflip}, normalize {recipe.normalization}; full recipe = crop+flip + "
    f"RandAugment {recipe.randaugment!r} + random erasing {recipe.random_erase}. Mixup {recipe.mixup} / "
    f"cutmix {recipe.cutmix} run inside the jitted train step on the device: not host work, not timed."
  )
  print()
  print(
    "| image | batch | setting | grain threads | images/s (wall) | CPU-ms/img | CPU cores busy | batches |"
  )
  print("|---|---|---|---|---|---|---|---|")
  results: dict[tuple[int, str], dict[str, float]] = {}
  for size in sizes:
    for setting in FLAGS.settings:
      r = measure(
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
        f"| {size} | {batches[size]} | {SETTINGS[setting]} | {r['threads']} | {r['img_s']:.0f} | "
        f"{r['cpu_ms']:.2f} | {r['busy']:.2f} | {r['batches']} |",
        flush=True,
      )

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
      for setting in SETTINGS:
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


if __name__ == "__main__":
  app.run(main)
