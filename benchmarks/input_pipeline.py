"""Input-pipeline throughput per host with the full recipe's augmentation, against what the train step needs.

  python benchmarks/input_pipeline.py  # Fashion-MNIST: sizes 28 and 224, crop+flip and full recipe, 5 s each
  python benchmarks/input_pipeline.py --sizes=224 --batch=224:256 --num_threads=16 --seconds=30  # a real host
  python benchmarks/input_pipeline.py --accelerators="H100:8,TPU v5p:4" --mfu=0.4 --configs=distill_vitl
  python benchmarks/input_pipeline.py --source=photos --seconds=10  # real JPEGs, ours vs torchvision + timm
  python benchmarks/input_pipeline.py --source=photos --image_folder=/data/imagenet  # any ImageFolder tree

--source=fashion_mnist (the default) times `at_jax.data.pipeline.train_iterator` (as
at_jax.experiment.loop._train_iter calls it) on Fashion-MNIST (Debian's dataset-fashion-mnist, read into
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
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import io
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flops  # benchmarks/flops.py
import numpy as np
import photos  # benchmarks/photos.py
import quiet  # benchmarks/quiet.py
from absl import app, flags
from PIL import Image

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

SETTINGS = {"crop+flip": "crop+flip", "full": "full recipe"}
SETTING_NAMES = {**SETTINGS, "eval": "eval view"}  # photos: the eval view too
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


def timed(
  it: Iterator[Any],
  *,
  batch: int,
  seconds: float,
  warmup: int,
  cpu: Callable[[], float] = time.process_time,
) -> dict[str, float]:
  """Pulls `warmup` untimed batches (threads or workers starting, buffers filling), then batches for
  `seconds` of wall time; returns images/s, CPU-ms/img and CPU cores busy over that window.

  `cpu`: cumulative CPU seconds of everything that works for `it` (default: this process, all threads).
  """
  for _ in range(warmup):
    next(it)
  wall0, cpu0 = time.perf_counter(), cpu()
  batches = 0
  while True:
    next(it)
    batches += 1
    wall = time.perf_counter() - wall0
    if wall >= seconds:
      break
  used = cpu() - cpu0
  images = batches * batch
  return {
    "img_s": images / wall,
    "cpu_ms": 1000 * used / images,
    "busy": used / wall,
    "batches": batches,
  }


def time_grain(it: Any, *, batch: int, seconds: float, warmup: int) -> dict[str, float]:
  """`timed` of a grain iterator, with the worker threads that ran; closes it and waits for them.
  process_time counts every thread of the process: grain's workers and this thread's batching."""
  try:
    r = timed(it, batch=batch, seconds=seconds, warmup=warmup)
    r["threads"] = grain_threads()
  finally:
    it.close()
    wait_for_grain_threads()
  return r


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
  jpeg_downscale: bool = True,
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
    jpeg_downscale=jpeg_downscale,
    num_threads=num_threads,
  )
  return time_grain(it, batch=batch, seconds=seconds, warmup=warmup)


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


# ----------------------------------------------------------------------------
# --source=photos: JPEG files, ours vs torchvision's ImageFolder + timm's transforms.

PIPELINE_NAMES = {
  "ours": "ours, jpeg_downscale",
  "ours_full_decode": "ours, full decode",
  "torch": "torchvision ImageFolder + timm, DataLoader",
}
RRC_RATIO = (3 / 4, 4 / 3)  # train_iterator's and timm's default aspect-ratio range
FLIP = Image.Transpose.FLIP_LEFT_RIGHT
LONG_SOURCE = 10**8  # examples of a source cycled so that no timed pass runs out


def available_cpus() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def process_cpu_seconds(pids: list[int]) -> float:
  """utime + stime of the processes `pids` (Linux /proc/<pid>/stat), in seconds.

  DataLoader workers are child processes, whose CPU time this process's process_time does not include,
  and RUSAGE_CHILDREN only counts them once joined (warm-up included): reading their stat at both ends
  of the timed window counts exactly the window. A process that has exited counts 0.
  """
  tick = os.sysconf("SC_CLK_TCK")
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
      continue
    total += int(fields[11]) + int(fields[12])  # utime, stime: stat(5) fields 14 and 15
  return total / tick


class Cycle:
  """A source repeated to `length` examples: an eval pass (finite) long enough to time."""

  def __init__(self, source: Any, length: int = LONG_SOURCE):
    self.source, self.length = source, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[index % len(self.source)]


def measure_ours_eval(
  source: Any,
  data_cfg: Any,
  *,
  image_size: int,
  batch: int,
  num_threads: int,
  seconds: float,
  warmup: int,
  jpeg_downscale: bool,
) -> dict[str, float]:
  """`measure` for `pipeline.eval_iterator` (the eval view) over `source` cycled."""
  from at_jax.data import pipeline

  it = pipeline.eval_iterator(
    Cycle(source),
    global_batch_size=batch,
    image_size=image_size,
    crop_pct=data_cfg.crop_pct,
    normalization=data_cfg.normalization,
    num_threads=num_threads,
    jpeg_downscale=jpeg_downscale,
  )
  return time_grain(it, batch=batch, seconds=seconds, warmup=warmup)


def _posterize_any_bits(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
  """timm's posterize as it ran before Pillow 13, which refuses to keep 0 bits (ValueError).

  timm's PosterizeIncreasing keeps 4 - int(4 * level / 10) bits, and RandAugment's magnitude noise
  (mstd0.5) reaches level 10, so it asks for 0 bits: a black image under older Pillow (and ours).
  """
  if bits_to_keep >= 8:
    return image
  mask = ~(2 ** (8 - max(bits_to_keep, 0)) - 1) & 0xFF
  return image.point([i & mask for i in range(256)] * len(image.getbands()))


def patch_timm_posterize() -> None:
  """Makes timm's RandAugment run under Pillow 13 (`_posterize_any_bits`); ops built later use it."""
  from timm.data import auto_augment

  for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[name] = _posterize_any_bits


def timm_train_transform(image_size: int, data_cfg: Any, full: bool) -> Any:
  """timm's training transform for the recipe `data_cfg`: RandAugment and random erasing (pixel, one
  rectangle) only for the full recipe. No colour jitter: timm adds ColorJitter(0.4) by default when
  RandAugment is off, which ours (and the recipe) has not."""
  import timm.data

  from at_jax.data import transforms

  patch_timm_posterize()
  mean, std = transforms.NORMALIZATIONS[data_cfg.normalization]
  return timm.data.create_transform(
    input_size=image_size,
    is_training=True,
    interpolation="bicubic",
    scale=tuple(data_cfg.rrc_scale),
    ratio=RRC_RATIO,
    hflip=0.5 if data_cfg.hflip else 0.0,
    color_jitter=None,
    auto_augment=data_cfg.randaugment if full else None,
    re_prob=data_cfg.random_erase if full else 0.0,
    re_mode="pixel",
    re_count=1,
    mean=mean,
    std=std,
  )


def torchvision_eval_transform(image_size: int, data_cfg: Any) -> Any:
  """torchvision's eval view: Resize(shorter side, bicubic), CenterCrop, ToTensor, Normalize."""
  from torchvision import transforms as tv

  from at_jax.data import transforms

  mean, std = transforms.NORMALIZATIONS[data_cfg.normalization]
  shorter = transforms.eval_shorter_side(image_size, data_cfg.crop_pct)
  return tv.Compose(
    [
      tv.Resize(shorter, tv.InterpolationMode.BICUBIC),
      tv.CenterCrop(image_size),
      tv.ToTensor(),
      tv.Normalize(mean, std),
    ]
  )


def measure_torch(
  split_dir: str, transform: Any, *, batch: int, num_workers: int, seconds: float, warmup: int
) -> dict[str, float]:
  """`measure` for torchvision's ImageFolder(`split_dir`, `transform`) in a DataLoader of `num_workers`
  worker processes; CPU time is this process's plus the workers' (`process_cpu_seconds`).

  One long shuffled epoch (a RandomSampler of `LONG_SOURCE` samples), as ours is one endless stream: no
  worker restarts or pipeline drains at epoch ends inside the timed window.
  """
  import torch
  import torchvision

  dataset = torchvision.datasets.ImageFolder(split_dir, transform=transform)
  sampler = torch.utils.data.RandomSampler(
    dataset, num_samples=LONG_SOURCE, generator=torch.Generator().manual_seed(0)
  )
  loader = torch.utils.data.DataLoader(
    dataset, batch_size=batch, sampler=sampler, num_workers=num_workers, drop_last=True
  )
  it = iter(loader)
  pids = [w.pid for w in getattr(it, "_workers", [])]  # started by iter(); none with num_workers=0
  try:
    r = timed(
      it,
      batch=batch,
      seconds=seconds,
      warmup=warmup,
      cpu=lambda: time.process_time() + process_cpu_seconds(pids),
    )
    r["threads"] = len(pids)
  finally:
    if hasattr(it, "_shutdown_workers"):
      it._shutdown_workers()  # now, not at garbage collection: the next measurement gets the cores
  return r


def build_photos(dest: str) -> dict:
  """The photographs' tree in `dest` (`photos.build_tree` with --classes, --per_class, --large)."""
  return photos.build_tree(
    dest, classes=FLAGS.classes, per_class=FLAGS.per_class, large=FLAGS.large
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


def row(size: int, batch: int, setting: str, pipeline: str, r: dict[str, float]) -> str:
  return (
    f"| {size} | {batch} | {setting} | {PIPELINE_NAMES[pipeline]} | {r['threads']} | "
    f"{r['img_s']:.0f} | {r['cpu_ms']:.2f} | {r['busy']:.2f} | {1000 / r['cpu_ms']:.0f} | "
    f"{r['batches']} |"
  )


THROUGHPUT_HEADER = (
  "| image | batch | setting | pipeline | threads / workers | images/s (wall) | CPU-ms/img | "
  "CPU cores busy | images per CPU-s | batches |\n|---|---|---|---|---|---|---|---|---|---|"
)


def measure_photos_setting(
  pipeline_name: str,
  source: Any,
  recipe: Any,
  *,
  setting: str,
  size: int,
  batch: int,
  num_threads: int,
) -> dict[str, float]:
  """One row of the throughput table: `pipeline_name` in `setting` (crop+flip, full, eval)."""
  common = dict(batch=batch, seconds=FLAGS.seconds, warmup=FLAGS.warmup)
  if pipeline_name == "torch":
    transform = (
      torchvision_eval_transform(size, recipe)
      if setting == "eval"
      else timm_train_transform(size, recipe, full=setting == "full")
    )
    return measure_torch(source.files.root, transform, num_workers=num_threads, **common)
  ours = dict(image_size=size, num_threads=num_threads, jpeg_downscale=pipeline_name == "ours")
  if setting == "eval":
    return measure_ours_eval(source, recipe, **ours, **common)
  return measure(source, recipe, full=setting == "full", **ours, **common)


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
        f"| {size} | {SETTING_NAMES[setting]} | {cell(per_cpu['ours'])} | "
        f"{cell(per_cpu['ours_full_decode'])} | {cell(per_cpu['torch'])} | "
        f"{ratio(per_cpu['ours'], per_cpu['torch'])} | "
        f"{ratio(per_cpu['ours_full_decode'], per_cpu['torch'])} | {wall} |"
      )


# -- The profile: CPU time per stage, one thread.


class StageTimer:
  """CPU seconds of this thread per named stage, summed over calls.

  time.thread_time counts only this thread's CPU: on a host shared with other jobs the profile is not
  inflated by waiting for a core (it still is by sharing caches).
  """

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)

  @contextlib.contextmanager
  def __call__(self, stage: str) -> Iterator[None]:
    start = time.thread_time()
    try:
      yield
    finally:
      self.seconds[stage] += time.thread_time() - start


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _simplejpeg() -> Any:
  """simplejpeg (a libjpeg-turbo binding) if installed, else None: it is no requirement."""
  try:
    import simplejpeg
  except ImportError:
    return None
  return simplejpeg


def simplejpeg_decode(simplejpeg: Any, data: bytes, reduction: int) -> Image.Image:
  """`data` decoded by simplejpeg at the DCT scale Pillow's draft picks for `reduction` (the smallest
  scale at least 1/reduction of the size), as a PIL image for the resize."""
  height, width, _, _ = simplejpeg.decode_jpeg_header(data)
  pixels = simplejpeg.decode_jpeg(
    data, "RGB", min_height=height // reduction, min_width=width // reduction
  )
  return Image.fromarray(pixels, "RGB")


class OursProfile:
  """Our training transform stage by stage (`transforms.train_example`'s steps, in the full recipe's
  order), and `transforms.train_example` whole in both settings with and without draft, on one file at
  a time. Crops come from per-file generators, so every variant and round sees the same crops."""

  def __init__(self, data_cfg: Any, image_size: int):
    from at_jax.data import transforms

    self.data_cfg = data_cfg
    self.out = (image_size, image_size)
    self.mean, self.std = transforms.mean_std(data_cfg.normalization)
    self.op = transforms.make_randaugment(data_cfg.randaugment, data_cfg.normalization)
    self.simplejpeg = _simplejpeg()
    self.files = 0
    self.reduced = 0  # files whose crop decoded at a reduced DCT scale

  def __call__(self, path: str, timer: StageTimer) -> None:
    self.stages(path, timer)
    self.whole(path, timer)
    self.files += 1

  def stages(self, path: str, timer: StageTimer) -> None:
    from at_jax.data import erasing, transforms

    out, rng = self.out, np.random.default_rng([0, self.files])
    with timer("read file"):
      data = _read(path)
    with timer("PIL open (header)"):
      image = Image.open(io.BytesIO(data))
    top, left, h, w = transforms.random_resized_crop_box(
      image.height, image.width, rng, tuple(self.data_cfg.rrc_scale), RRC_RATIO
    )
    box = (left, top, left + w, top + h)
    reduction = transforms.dct_reduction((w, h), out)
    self.reduced += reduction > 1
    with timer("decode, full"):
      full, full_box = transforms.decode(image, box, out, False)
    drafted = Image.open(io.BytesIO(data))
    with timer("decode, draft"):
      pil, draft_box = transforms.decode(drafted, box, out, True)
    if self.simplejpeg is not None:
      with timer(SIMPLEJPEG):
        simplejpeg_decode(self.simplejpeg, data, reduction)
    with timer("crop + resize, full decode"):
      full.resize(out, Image.BICUBIC, box=full_box)
    with timer("crop + resize, draft"):
      pil = pil.resize(out, Image.BICUBIC, box=draft_box)
    flip = rng.random() < 0.5
    with timer(PIL_FLIP):
      flipped = pil.transpose(FLIP) if flip else pil
    with timer("RandAugment"):
      augmented = self.op(flipped, rng)
    with timer("normalise (finish)"):
      x = transforms.finish(augmented, self.mean, self.std)
    with timer(FLOAT_FLIP):
      np.ascontiguousarray(x[:, ::-1]) if flip else np.ascontiguousarray(x)
    with timer("random erasing"):
      erasing.random_erase(x, rng, prob=self.data_cfg.random_erase)

  def whole(self, path: str, timer: StageTimer) -> None:
    """`transforms.train_example` (reading and opening the file included) under the stage names
    "end to end, <setting>, <draft|full decode>"."""
    from at_jax.data import transforms

    cfg = self.data_cfg
    for setting in SETTINGS:
      full = setting == "full"
      for downscale in (True, False):
        with timer(f"end to end, {setting}, {'draft' if downscale else 'full decode'}"):
          example = {"image": Image.open(io.BytesIO(_read(path))), "label": 0}
          transforms.train_example(
            example,
            np.random.default_rng([0, self.files]),  # the crops of `stages`
            image_size=self.out[0],
            scale=tuple(cfg.rrc_scale),
            ratio=RRC_RATIO,
            hflip=cfg.hflip,
            mean=self.mean,
            std=self.std,
            randaugment=self.op if full else None,
            random_erase=cfg.random_erase if full else 0.0,
            jpeg_downscale=downscale,
          )


# timm's / torchvision's transform classes -> the stage of ours that does the same.
TORCH_STAGES = {
  "RandomResizedCropAndInterpolation": "crop + resize",
  "RandomResizedCrop": "crop + resize",
  "RandomHorizontalFlip": "flip",
  "RandAugment": "RandAugment",
  "MaybeToTensor": "to float",
  "ToTensor": "to float",
  "Normalize": "normalise",
  "RandomErasing": "random erasing",
}


class TorchProfile:
  """torchvision's pil_loader and each transform of timm's full-recipe Compose on one file at a time,
  each timed under `TORCH_STAGES` of its class name, with one torch thread as in a DataLoader worker
  (set by the caller: `torch_threads`)."""

  def __init__(self, data_cfg: Any, image_size: int):
    import random

    import torch

    self.transform = timm_train_transform(image_size, data_cfg, full=True)
    random.seed(0)
    torch.manual_seed(0)

  def __call__(self, path: str, timer: StageTimer) -> None:
    from torchvision.datasets.folder import pil_loader

    with timer("pil_loader"):
      image = pil_loader(path)
    for t in self.transform.transforms:
      name = type(t).__name__
      with timer(TORCH_STAGES.get(name, name)):
        image = t(image)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
  import torch

  before = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(before)


def profile(
  paths: list[str], data_cfg: Any, image_size: int, rounds: int
) -> tuple[dict[str, float], dict[str, float], float]:
  """(ours, torch) CPU seconds per stage summed over `paths`, the least over `rounds` rounds, and the
  fraction of ours' crops decoded at a reduced scale.

  Each round runs all files through ours, then all through torch's: one pipeline at a time, as a grain
  thread or a DataLoader worker runs it (interleaving them per file made torch's stages up to 2.5x slower,
  as each side's allocations evicted the other's). The least of the rounds drops bursts of load from
  other jobs.
  """
  best: tuple[dict[str, float], dict[str, float]] = ({}, {})
  reduced = 0.0
  with torch_threads(1):
    for _ in range(rounds):
      ours_profile, torch_profile = (
        OursProfile(data_cfg, image_size),
        TorchProfile(data_cfg, image_size),
      )
      timers = StageTimer(), StageTimer()
      for run, timer in zip((ours_profile, torch_profile), timers):
        for path in paths:
          run(path, timer)
      for kept, timer in zip(best, timers):
        for stage, seconds in timer.seconds.items():
          kept[stage] = min(kept.get(stage, math.inf), seconds)
      reduced = ours_profile.reduced / len(paths)
  return best[0], best[1], reduced


def ms(seconds: dict[str, float], n: int, *stages: str) -> float:
  return 1000 * sum(seconds.get(s, 0.0) for s in stages) / n


PIL_FLIP = "flip, PIL (full recipe: before RandAugment)"
FLOAT_FLIP = "flip, float copy (crop+flip)"
SIMPLEJPEG = "decode, simplejpeg at the draft's scale (+ header, fromarray)"
READ_OPEN = ("read file", "PIL open (header)")


def profile_rows(ours: Callable[..., float], torch_: Callable[..., float]) -> list[tuple]:
  """(stage, ours with draft, ours with full decodes, torchvision + timm) in CPU-ms/img; None: no
  such stage. `ours` / `torch_`: stage names -> their summed CPU-ms/img."""
  o, t = ours, torch_
  opened = READ_OPEN + ("decode, draft",), READ_OPEN + ("decode, full",)
  tail = ("crop + resize, draft",), ("crop + resize, full decode",)
  crop_flip = [opened[i] + tail[i] + ("normalise (finish)", FLOAT_FLIP) for i in (0, 1)]
  full = [
    opened[i] + tail[i] + ("normalise (finish)", PIL_FLIP, "RandAugment", "random erasing")
    for i in (0, 1)
  ]
  torch_crop_flip = ("pil_loader", "crop + resize", "flip", "to float", "normalise")

  def both(
    *stages: str,
  ) -> tuple[float, float]:  # a stage after the resize: the same in both columns
    return o(*stages), o(*stages)

  return [
    ("read file", *both("read file"), None),
    ("PIL open (header only)", *both("PIL open (header)"), None),
    (
      "decode (PIL load; draft: at 1/2, 1/4, 1/8 where the crop allows)",
      o("decode, draft"),
      o("decode, full"),
      None,
    ),
    (
      "**read + open + decode** (torch: pil_loader, whose convert('RGB') also copies)",
      o(*opened[0]),
      o(*opened[1]),
      t("pil_loader"),
    ),
    (
      "crop + resize to 224, bicubic (ours: one resize(box=); timm: crop, then resize)",
      o(*tail[0]),
      o(*tail[1]),
      t("crop + resize"),
    ),
    ("flip p=0.5, PIL (ours: full recipe only, before RandAugment)", *both(PIL_FLIP), t("flip")),
    ("flip p=0.5, float copy (ours: crop+flip only)", *both(FLOAT_FLIP), None),
    ("RandAugment rand-m9-mstd0.5-inc1", *both("RandAugment"), t("RandAugment")),
    (
      "to float + normalise (ours: finish, a table lookup; torch: ToTensor + Normalize)",
      *both("normalise (finish)"),
      t("to float", "normalise"),
    ),
    ("random erasing p=0.25, pixel", *both("random erasing"), t("random erasing")),
    ("**total, crop+flip**", o(*crop_flip[0]), o(*crop_flip[1]), t(*torch_crop_flip)),
    (
      "**total, full recipe**",
      o(*full[0]),
      o(*full[1]),
      t(*torch_crop_flip, "RandAugment", "random erasing"),
    ),
    (
      "whole transforms.train_example, crop+flip (check of the sum)",
      o("end to end, crop+flip, draft"),
      o("end to end, crop+flip, full decode"),
      None,
    ),
    (
      "whole transforms.train_example, full recipe",
      o("end to end, full, draft"),
      o("end to end, full, full decode"),
      None,
    ),
  ]


def print_profile(paths: list[str], data_cfg: Any, image_size: int, rounds: int) -> None:
  """The per-stage table: ours with draft, ours with full decodes, torchvision + timm, aligned by what a
  stage does, with the totals of crop+flip and of the full recipe."""
  ours, torch_, reduced = profile(paths, data_cfg, image_size, rounds)
  n = len(paths)
  o = functools.partial(ms, ours, n)
  rows = profile_rows(o, functools.partial(ms, torch_, n))
  if SIMPLEJPEG in ours:
    name = "simplejpeg: header + decode at the draft's DCT scale + Image.fromarray (vs PIL open + decode)"
    rows.insert(4, (name, o(SIMPLEJPEG), None, None))
  print()
  print(
    f"Profile: CPU-ms per image per stage, one thread (time.thread_time), {n} images of the tree, the "
    f"least of {rounds} rounds per stage ({image_size} px output; crops from a fixed seed: {reduced:.0%} "
    "of ours decoded at a reduced DCT scale):"
  )
  print()
  print("| stage | ours, jpeg_downscale | ours, full decode | torchvision + timm |")
  print("|---|---|---|---|")
  for name, *cells in rows:
    print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")


# -- Quality: how far a draft decode moves the output pixels.


class Differences:
  """Absolute differences (0..255) between two sets of uint8 images, pooled: a histogram, so that
  percentiles are exact, plus the count of images compared."""

  def __init__(self):
    self.histogram = np.zeros(256, np.int64)
    self.images = 0

  def add(self, a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    self.histogram += np.bincount(diff.ravel(), minlength=256)
    self.images += 1

  def summary(self) -> tuple[float, int, int]:
    """(mean, 99th percentile, max) of the pooled differences."""
    total = self.histogram.sum()
    mean = float((np.arange(256) * self.histogram).sum() / total)
    p99 = int(np.searchsorted(np.cumsum(self.histogram), 0.99 * total))
    return mean, p99, int(np.nonzero(self.histogram)[0].max())


def _view(data: bytes, box: tuple[float, ...], out: tuple[int, int], downscale: bool) -> np.ndarray:
  """Our crop of the file `data` (`transforms.decode`, then the bicubic resize(box=)), as uint8."""
  from at_jax.data import transforms

  pil, box = transforms.decode(Image.open(io.BytesIO(data)), box, out, downscale)
  return np.asarray(pil.resize(out, Image.BICUBIC, box=box))


def quality(paths: list[str], data_cfg: Any, image_size: int, crops: int) -> dict[str, Differences]:
  """Draft against full decode on `crops` random-resized crops (fixed seed; the tree's files cycled)
  and on the eval view of each distinct file; also, for scale, ours (resize(box=)) against timm's
  crop-then-resize on the same full decode, and simplejpeg's scaled decode against Pillow's draft."""
  from at_jax.data import transforms

  out = (image_size, image_size)
  simplejpeg = _simplejpeg()
  rows: dict[str, Differences] = collections.defaultdict(Differences)
  rng = np.random.default_rng(0)
  for k in range(crops):
    data = _read(paths[k % len(paths)])
    image = Image.open(io.BytesIO(data))
    top, left, h, w = transforms.random_resized_crop_box(
      image.height, image.width, rng, tuple(data_cfg.rrc_scale), RRC_RATIO
    )
    box = (left, top, left + w, top + h)
    full, draft = _view(data, box, out, False), _view(data, box, out, True)
    reduction = transforms.dct_reduction((w, h), out)
    rows["train crops, all"].add(full, draft)
    if reduction > 1:
      rows["train crops, draft applied"].add(full, draft)
      rows[f"train crops, draft at 1/{reduction}"].add(full, draft)
      if simplejpeg is not None:
        decoded = simplejpeg_decode(simplejpeg, data, reduction)
        ratio = image.width / decoded.width
        scaled = tuple(c / ratio for c in box)
        rows["simplejpeg vs Pillow draft, same scale"].add(
          np.asarray(decoded.resize(out, Image.BICUBIC, box=scaled)), draft
        )
    timm_like = Image.open(io.BytesIO(data)).convert("RGB").crop(box).resize(out, Image.BICUBIC)
    rows["reference: ours full decode vs timm's crop-then-resize"].add(full, np.asarray(timm_like))
  shorter = transforms.eval_shorter_side(image_size, data_cfg.crop_pct)
  for path in paths[:crops]:
    data = _read(path)
    image = Image.open(io.BytesIO(data))
    box = transforms.eval_box(image.height, image.width, image_size, shorter)
    full, draft = _view(data, box, out, False), _view(data, box, out, True)
    rows["eval view, all files"].add(full, draft)
    if transforms.dct_reduction((box[2] - box[0], box[3] - box[1]), out) > 1:
      rows["eval view, draft applied"].add(full, draft)
  return rows


def print_quality(paths: list[str], data_cfg: Any, image_size: int, crops: int) -> None:
  rows = quality(paths, data_cfg, image_size, crops)
  print()
  print(
    f"Quality: draft decode vs full decode, same crops, after the bicubic resize to {image_size} "
    "(|difference| in 0..255 pixel units, over all pixels and channels of the images compared):"
  )
  print()
  print("| crops | images | share of crops | mean abs diff | 99th percentile | max |")
  print("|---|---|---|---|---|---|")
  counts = {"train": rows["train crops, all"].images, "eval": rows["eval view, all files"].images}
  for name in QUALITY_ROWS:
    if name not in rows:
      continue
    d = rows[name]
    share = d.images / counts["eval" if name.startswith("eval") else "train"]
    mean, p99, top = d.summary()
    print(f"| {name} | {d.images} | {share:.0%} | {mean:.2f} | {p99} | {top} |")


QUALITY_ROWS = (
  "train crops, all",
  "train crops, draft applied",
  "train crops, draft at 1/2",
  "train crops, draft at 1/4",
  "train crops, draft at 1/8",
  "eval view, all files",
  "eval view, draft applied",
  "simplejpeg vs Pillow draft, same scale",
  "reference: ours full decode vs timm's crop-then-resize",
)


def run_photos(recipe: Any, *, sizes: list[int], batches: dict[int, int], num_threads: int) -> dict:
  """--source=photos: builds (or takes) the tree, prints the throughput, ratio, profile and quality
  tables; returns ours' (jpeg_downscale) results by (size, setting) for the cores table."""
  from at_jax.data import sources

  unknown = [p for p in FLAGS.pipelines if p not in PIPELINE_NAMES]
  if unknown:
    raise app.UsageError(f"unknown --pipelines {unknown}; use {list(PIPELINE_NAMES)}")
  built = None if FLAGS.image_folder else tempfile.mkdtemp(prefix="at_jax_photos_")
  try:
    root = FLAGS.image_folder or built
    if built:
      info = build_photos(built)
      print(
        f"tree: foolbox's 20 ImageNet photographs (benchmarks/photos.py) as {info['classes']} classes x "
        f"{FLAGS.per_class} baseline JPEGs (quality {photos.QUALITY}), {info['large']} of them upsampled "
        f"to a longer side of {'/'.join(map(str, photos.LARGE_SIDES))} px, in {built}/train"
      )
    source = sources.make_source("imagefolder", "train", root, cache_dir=None)
    d = describe_tree(source)
    print(
      f"files: {d['files']}, mean {d['mean_kb']:.0f} kB and {d['mean_megapixels']:.2f} megapixels, "
      f"{d['large']:.0%} with a longer side of 1000+ px"
      + ("; read from the page cache (just written)" if built else " (sampled)")
    )
    print_recipe(recipe)
    return photos_tables(source, recipe, sizes=sizes, batches=batches, num_threads=num_threads)
  finally:
    if built:
      shutil.rmtree(built, ignore_errors=True)


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
  source: Any, recipe: Any, *, sizes: list[int], batches: dict[int, int], num_threads: int
) -> dict:
  """The throughput rows (settings x pipelines, then the eval view), the ratios, profile and quality."""
  print(f"versions: {versions()}")
  print(
    "CPU time: ours, this process (time.process_time: grain's threads and the batching thread); torch, "
    "this process plus its DataLoader workers' utime + stime (/proc/<pid>/stat) over the timed window."
  )
  print()
  settings = FLAGS.settings + (["eval"] if FLAGS.eval else [])
  results: dict[tuple[int, str, str], dict[str, float]] = {}
  for rep in range(FLAGS.reps):
    for size in sizes:
      for setting in settings:
        for name in FLAGS.pipelines:
          quiet.wait_for_quiet(FLAGS.quiet_wait)
          r = measure_photos_setting(
            name,
            source,
            recipe,
            setting=setting,
            size=size,
            batch=batches[size],
            num_threads=num_threads,
          )
          print(
            f"round {rep + 1}/{FLAGS.reps}: {size} px, {SETTING_NAMES[setting]}, {PIPELINE_NAMES[name]}: "
            f"{r['img_s']:.0f} img/s, {r['cpu_ms']:.2f} CPU-ms/img",
            file=sys.stderr,
            flush=True,
          )
          best = results.get((size, setting, name))
          if best is None or r["cpu_ms"] < best["cpu_ms"]:
            results[size, setting, name] = r
  print()
  print(THROUGHPUT_HEADER)
  for (size, setting, name), r in results.items():
    print(row(size, batches[size], SETTING_NAMES[setting], name, r))
  print_ratios(results, settings)
  paths = split_paths(source)
  if FLAGS.profile:
    print_profile(sample(paths, FLAGS.profile_images), recipe, sizes[-1], FLAGS.profile_rounds)
  if FLAGS.quality:
    print_quality(paths, recipe, sizes[-1], FLAGS.quality_crops)
  return {(size, s): r for (size, s, name), r in results.items() if name == "ours"}


def sample(paths: list[str], n: int) -> list[str]:
  """`n` of `paths` drawn by a fixed seed (without replacement while there are enough)."""
  picked = np.random.default_rng(1).choice(len(paths), n, replace=n > len(paths))
  return [paths[i] for i in picked]


def print_recipe(recipe: Any) -> None:
  """The line saying which augmentation is timed."""
  print(
    f"recipe (configs/{FLAGS.recipe}.py): crop+flip = random-resized crop scale {tuple(recipe.rrc_scale)}, "
    f"bicubic, hflip {recipe.hflip}, normalize {recipe.normalization}; full recipe = crop+flip + "
    f"RandAugment {recipe.randaugment!r} + random erasing {recipe.random_erase}. Mixup {recipe.mixup} / "
    f"cutmix {recipe.cutmix} run inside the jitted train step on the device: not host work, not timed."
  )


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
  print_recipe(recipe)
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


def main(argv):
  del argv
  photo_mode = FLAGS.source == "photos"
  # Photographs are timed at 224 (timm's input_size) unless --sizes says otherwise.
  sizes = [224] if photo_mode and not FLAGS["sizes"].present else [int(s) for s in FLAGS.sizes]
  batches = parse_batches(FLAGS.batch)
  missing = [s for s in sizes if s not in batches]
  if missing:
    raise app.UsageError(f"--batch has no entry for sizes {missing}, e.g. --batch={missing[0]}:64")
  unknown = [s for s in FLAGS.settings if s not in SETTINGS]
  if unknown:
    raise app.UsageError(f"unknown --settings {unknown}; use {sorted(SETTINGS)}")
  cpus = available_cpus()
  num_threads = FLAGS.num_threads or cpus
  recipe = load_config(FLAGS.recipe).data

  workers = "; DataLoader num_workers the same" if photo_mode else ""
  print(
    f"host: {cpus} CPUs; grain num_threads {num_threads}{workers}; {FLAGS.seconds:g} s per measurement "
    f"after {FLAGS.warmup} warmup batches"
  )
  run = run_photos if photo_mode else run_fashion_mnist
  results = run(recipe, sizes=sizes, batches=batches, num_threads=num_threads)
  print_need(results, sizes)


if __name__ == "__main__":
  app.run(main)
