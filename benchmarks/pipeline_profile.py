"""The per-stage profile of benchmarks/input_pipeline.py --source=photos: CPU time per image of each stage
of ours (with draft and with full decodes) and of torchvision + timm, one thread, aligned by what a stage
does into one table; and the file and simplejpeg decoding helpers it shares with the quality table."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pipeline_timing  # benchmarks/pipeline_timing.py
import pipeline_torch  # benchmarks/pipeline_torch.py
from PIL import Image

FLIP = Image.Transpose.FLIP_LEFT_RIGHT
PIL_FLIP = "flip, PIL (full recipe: before RandAugment)"
FLOAT_FLIP = "flip, float copy (crop+flip)"
SIMPLEJPEG = "decode, simplejpeg at the draft's scale (+ header, fromarray)"
READ_OPEN = ("read file", "PIL open (header)")


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def import_simplejpeg() -> Any:
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
    self.simplejpeg = import_simplejpeg()
    self.files = 0
    self.reduced = 0  # files whose crop decoded at a reduced DCT scale

  def __call__(self, path: str, timer: pipeline_timing.StageTimer) -> None:
    self.stages(path, timer)
    self.whole(path, timer)
    self.files += 1

  def stages(self, path: str, timer: pipeline_timing.StageTimer) -> None:
    from at_jax.data import erasing, transforms

    out, rng = self.out, np.random.default_rng([0, self.files])
    with timer("read file"):
      data = read_bytes(path)
    with timer("PIL open (header)"):
      image = Image.open(io.BytesIO(data))
    top, left, h, w = transforms.random_resized_crop_box(
      image.height, image.width, rng, tuple(self.data_cfg.rrc_scale), pipeline_timing.RRC_RATIO
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

  def whole(self, path: str, timer: pipeline_timing.StageTimer) -> None:
    """`transforms.train_example` (reading and opening the file included) under the stage names
    "end to end, <setting>, <draft|full decode>"."""
    from at_jax.data import transforms

    cfg = self.data_cfg
    for setting in pipeline_timing.SETTINGS:
      full = setting == "full"
      for downscale in (True, False):
        with timer(f"end to end, {setting}, {'draft' if downscale else 'full decode'}"):
          example = {"image": Image.open(io.BytesIO(read_bytes(path))), "label": 0}
          transforms.train_example(
            example,
            np.random.default_rng([0, self.files]),  # the crops of `stages`
            image_size=self.out[0],
            scale=tuple(cfg.rrc_scale),
            ratio=pipeline_timing.RRC_RATIO,
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
  (set by the caller: `pipeline_torch.torch_threads`)."""

  def __init__(self, data_cfg: Any, image_size: int):
    import random

    import torch

    self.transform = pipeline_torch.timm_train_transform(image_size, data_cfg, full=True)
    random.seed(0)
    torch.manual_seed(0)

  def __call__(self, path: str, timer: pipeline_timing.StageTimer) -> None:
    from torchvision.datasets.folder import pil_loader

    with timer("pil_loader"):
      image = pil_loader(path)
    for t in self.transform.transforms:
      name = type(t).__name__
      with timer(TORCH_STAGES.get(name, name)):
        image = t(image)


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
  with pipeline_torch.torch_threads(1):
    for _ in range(rounds):
      ours_profile, torch_profile = (
        OursProfile(data_cfg, image_size),
        TorchProfile(data_cfg, image_size),
      )
      timers = pipeline_timing.StageTimer(), pipeline_timing.StageTimer()
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


def profile_rows(ours: Callable[..., float], torch_: Callable[..., float]) -> list[tuple]:
  """(stage, ours with draft, ours with full decodes, torchvision + timm) in CPU-ms/img; None: no
  such stage. `ours` / `torch_`: stage names -> their summed CPU-ms/img."""
  o, t = ours, torch_
  opened = READ_OPEN + ("decode, draft",), READ_OPEN + ("decode, full",)
  tail = ("crop + resize, draft",), ("crop + resize, full decode",)

  # A stage after the resize: the same in both columns.
  def both(*stages: str) -> tuple[float, float]:
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
  ] + _total_rows(o, t, opened, tail)


def _total_rows(
  o: Callable[..., float],
  t: Callable[..., float],
  opened: tuple[tuple[str, ...], ...],
  tail: tuple[tuple[str, ...], ...],
) -> list[tuple]:
  """`profile_rows`' totals of crop+flip and of the full recipe (ours: `opened` + `tail` + the later
  stages, per column: draft, full decode), then `transforms.train_example` whole to check the sums."""
  crop_flip = [opened[i] + tail[i] + ("normalise (finish)", FLOAT_FLIP) for i in (0, 1)]
  full = [
    opened[i] + tail[i] + ("normalise (finish)", PIL_FLIP, "RandAugment", "random erasing")
    for i in (0, 1)
  ]
  torch_crop_flip = ("pil_loader", "crop + resize", "flip", "to float", "normalise")
  return [
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
