"""The photos run of benchmarks/input_pipeline.py (--source=photos): an image-folder tree of real JPEGs
(built by benchmarks/photos.py, or given), then ours (with and without draft decodes) against torchvision +
timm on the same files and cores: the throughput and ratio tables, then the profile and quality tables."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
import photos  # benchmarks/photos.py
import pipeline_profile  # benchmarks/pipeline_profile.py
import pipeline_quality  # benchmarks/pipeline_quality.py
import pipeline_timing  # benchmarks/pipeline_timing.py
import pipeline_torch  # benchmarks/pipeline_torch.py
import quiet  # benchmarks/quiet.py
from absl import app
from PIL import Image

PIPELINE_NAMES = {
  "ours": "ours, jpeg_downscale",
  "ours_full_decode": "ours, full decode",
  "torch": "torchvision ImageFolder + timm, DataLoader",
}
THROUGHPUT_HEADER = (
  "| image | batch | setting | pipeline | threads / workers | images/s (wall) | CPU-ms/img | "
  "CPU cores busy | images per CPU-s | batches |\n|---|---|---|---|---|---|---|---|---|---|"
)


@dataclasses.dataclass(frozen=True)
class PhotosOptions:
  """What the photos run does: input_pipeline.py's flags of the same names (`recipe_name`: --recipe,
  `eval_view`: --eval)."""

  recipe_name: str
  image_folder: str
  classes: int
  per_class: int
  large: float
  pipelines: list[str]
  settings: list[str]
  eval_view: bool
  seconds: float
  warmup: int
  reps: int
  quiet_wait: float
  profile: bool
  profile_images: int
  profile_rounds: int
  quality: bool
  quality_crops: int


def run_photos(
  recipe: Any,
  options: PhotosOptions,
  *,
  sizes: list[int],
  batches: dict[int, int],
  num_threads: int,
) -> dict:
  """--source=photos: builds (or takes) the tree, prints the throughput, ratio, profile and quality
  tables; returns ours' (jpeg_downscale) results by (size, setting) for the cores table."""
  from at_jax.data import sources

  unknown = [p for p in options.pipelines if p not in PIPELINE_NAMES]
  if unknown:
    raise app.UsageError(f"unknown --pipelines {unknown}; use {list(PIPELINE_NAMES)}")
  built = None if options.image_folder else tempfile.mkdtemp(prefix="at_jax_photos_")
  try:
    root = options.image_folder or built
    if built:
      info = build_photos(built, options)
      print(
        f"tree: foolbox's 20 ImageNet photographs (benchmarks/photos.py) as {info['classes']} classes x "
        f"{options.per_class} baseline JPEGs (quality {photos.QUALITY}), {info['large']} of them upsampled "
        f"to a longer side of {'/'.join(map(str, photos.LARGE_SIDES))} px, in {built}/train"
      )
    source = sources.make_source("imagefolder", "train", root, cache_dir=None)
    d = describe_tree(source)
    print(
      f"files: {d['files']}, mean {d['mean_kb']:.0f} kB and {d['mean_megapixels']:.2f} megapixels, "
      f"{d['large']:.0%} with a longer side of 1000+ px"
      + ("; read from the page cache (just written)" if built else " (sampled)")
    )
    pipeline_timing.print_recipe(recipe, options.recipe_name)
    return photos_tables(
      source, recipe, options, sizes=sizes, batches=batches, num_threads=num_threads
    )
  finally:
    if built:
      shutil.rmtree(built, ignore_errors=True)


def build_photos(dest: str, options: PhotosOptions) -> dict:
  """The photographs' tree in `dest` (`photos.build_tree` with the options' classes, per_class, large)."""
  return photos.build_tree(
    dest, classes=options.classes, per_class=options.per_class, large=options.large
  )


def describe_tree(source: Any, at_most: int = 2000) -> dict:
  """Files, and over `at_most` of them (headers only; a real ImageNet has 1.28M): mean kB and
  megapixels, and the share with a longer side of 1000+ px."""
  paths = split_paths(source)
  picked = sample(paths, min(len(paths), at_most))
  sizes = []
  for path in picked:
    with Image.open(path) as image:
      sizes.append(image.size)
  return {
    "files": len(paths),
    "mean_kb": float(np.mean([os.path.getsize(p) for p in picked]) / 1e3),
    "mean_megapixels": float(np.mean([w * h for w, h in sizes]) / 1e6),
    "large": float(np.mean([max(size) >= 1000 for size in sizes])),
  }


def split_paths(source: Any) -> list[str]:
  """The absolute paths of an image-folder source's files, in its order."""
  files = source.files
  return [os.path.join(files.root, p) for p in files.paths]


def sample(paths: list[str], n: int) -> list[str]:
  """`n` of `paths` drawn by a fixed seed (without replacement while there are enough)."""
  picked = np.random.default_rng(1).choice(len(paths), n, replace=n > len(paths))
  return [paths[i] for i in picked]


def versions() -> str:
  """The libraries the photos mode compares, as one line: results move with Pillow's libjpeg-turbo."""
  from importlib import metadata

  from PIL import features

  names = ("pillow", "numpy", "grain", "torch", "torchvision", "timm", "simplejpeg")
  found = []
  for name in names:
    try:
      found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      continue
  return ", ".join(found) + f"; libjpeg-turbo {features.version('libjpeg_turbo')}"


def photos_tables(
  source: Any,
  recipe: Any,
  options: PhotosOptions,
  *,
  sizes: list[int],
  batches: dict[int, int],
  num_threads: int,
) -> dict:
  """The throughput rows (settings x pipelines, then the eval view), the ratios, profile and quality."""
  print(f"versions: {versions()}")
  print(
    "CPU time: ours, this process (time.process_time: grain's threads and the batching thread); torch, "
    "this process plus its DataLoader workers' utime + stime (/proc/<pid>/stat) over the timed window."
  )
  print()
  settings = options.settings + (["eval"] if options.eval_view else [])
  results: dict[tuple[int, str, str], dict[str, float]] = {}
  for rep in range(options.reps):
    for size in sizes:
      for setting in settings:
        for name in options.pipelines:
          quiet.wait_for_quiet(options.quiet_wait)
          r = measure_photos_setting(
            name,
            source,
            recipe,
            options,
            setting=setting,
            size=size,
            batch=batches[size],
            num_threads=num_threads,
          )
          print(
            f"round {rep + 1}/{options.reps}: {size} px, {pipeline_timing.SETTING_NAMES[setting]}, "
            f"{PIPELINE_NAMES[name]}: {r['img_s']:.0f} img/s, {r['cpu_ms']:.2f} CPU-ms/img",
            file=sys.stderr,
            flush=True,
          )
          best = results.get((size, setting, name))
          if best is None or r["cpu_ms"] < best["cpu_ms"]:
            results[size, setting, name] = r
  print()
  print(THROUGHPUT_HEADER)
  for (size, setting, name), r in results.items():
    print(row(size, batches[size], pipeline_timing.SETTING_NAMES[setting], name, r))
  print_ratios(results, settings)
  paths = split_paths(source)
  if options.profile:
    picked = sample(paths, options.profile_images)
    pipeline_profile.print_profile(picked, recipe, sizes[-1], options.profile_rounds)
  if options.quality:
    pipeline_quality.print_quality(paths, recipe, sizes[-1], options.quality_crops)
  return {(size, s): r for (size, s, name), r in results.items() if name == "ours"}


def measure_photos_setting(
  pipeline_name: str,
  source: Any,
  recipe: Any,
  options: PhotosOptions,
  *,
  setting: str,
  size: int,
  batch: int,
  num_threads: int,
) -> dict[str, float]:
  """One row of the throughput table: `pipeline_name` in `setting` (crop+flip, full, eval)."""
  common = dict(batch=batch, seconds=options.seconds, warmup=options.warmup)
  if pipeline_name == "torch":
    transform = (
      pipeline_torch.torchvision_eval_transform(size, recipe)
      if setting == "eval"
      else pipeline_torch.timm_train_transform(size, recipe, full=setting == "full")
    )
    return pipeline_torch.measure_torch(
      source.files.root, transform, num_workers=num_threads, **common
    )
  ours = dict(image_size=size, num_threads=num_threads, jpeg_downscale=pipeline_name == "ours")
  if setting == "eval":
    return pipeline_timing.measure_ours_eval(source, recipe, **ours, **common)
  return pipeline_timing.measure(source, recipe, full=setting == "full", **ours, **common)


def row(size: int, batch: int, setting: str, pipeline: str, r: dict[str, float]) -> str:
  return (
    f"| {size} | {batch} | {setting} | {PIPELINE_NAMES[pipeline]} | {r['threads']} | "
    f"{r['img_s']:.0f} | {r['cpu_ms']:.2f} | {r['busy']:.2f} | {1000 / r['cpu_ms']:.0f} | "
    f"{r['batches']} |"
  )


def print_ratios(
  results: dict[tuple[int, str, str], dict[str, float]], settings: list[str]
) -> None:
  """Ours against torchvision + timm, per image size and setting: images per CPU-second and per wall
  second."""
  print()
  print(
    "| image | setting | images per CPU-s: ours | ours, full decode | torchvision + timm | "
    "ours / torch | ours full decode / torch | ours / torch, images/s (wall) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for size in sorted({k[0] for k in results}):
    for setting in settings:
      r = {p: results.get((size, setting, p)) for p in PIPELINE_NAMES}
      per_cpu = {p: 1000 / x["cpu_ms"] if x else None for p, x in r.items()}

      def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

      def cell(v: float | None) -> str:
        return f"{v:.0f}" if v else "-"

      wall = ratio(*(r[p]["img_s"] if r[p] else None for p in ("ours", "torch")))
      print(
        f"| {size} | {pipeline_timing.SETTING_NAMES[setting]} | {cell(per_cpu['ours'])} | "
        f"{cell(per_cpu['ours_full_decode'])} | {cell(per_cpu['torch'])} | "
        f"{ratio(per_cpu['ours'], per_cpu['torch'])} | "
        f"{ratio(per_cpu['ours_full_decode'], per_cpu['torch'])} | {wall} |"
      )
