"""The PyTorch side of benchmarks/input_pipeline.py: timm's training transform and torchvision's eval view
for the recipe (timm's posterize patched for Pillow 13), timed in a torch DataLoader, and torch's thread
count for the single-threaded profile. torch, torchvision and timm are imported only when called."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pipeline_timing  # benchmarks/pipeline_timing.py
from PIL import Image


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
    ratio=pipeline_timing.RRC_RATIO,
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
  """`pipeline_timing.measure` for torchvision's ImageFolder(`split_dir`, `transform`) in a DataLoader of `num_workers`
  worker processes; CPU time is this process's plus the workers' (`pipeline_timing.process_cpu_seconds`).

  One long shuffled epoch (a RandomSampler of `pipeline_timing.LONG_SOURCE` samples), as ours is one endless stream: no
  worker restarts or pipeline drains at epoch ends inside the timed window.
  """
  import torch
  import torchvision

  dataset = torchvision.datasets.ImageFolder(split_dir, transform=transform)
  sampler = torch.utils.data.RandomSampler(
    dataset, num_samples=pipeline_timing.LONG_SOURCE, generator=torch.Generator().manual_seed(0)
  )
  loader = torch.utils.data.DataLoader(
    dataset, batch_size=batch, sampler=sampler, num_workers=num_workers, drop_last=True
  )
  it = iter(loader)
  pids = [w.pid for w in getattr(it, "_workers", [])]  # started by iter(); none with num_workers=0
  try:
    r = pipeline_timing.timed(
      it,
      batch=batch,
      seconds=seconds,
      warmup=warmup,
      cpu=lambda: time.process_time() + pipeline_timing.process_cpu_seconds(pids),
    )
    r["threads"] = len(pids)
  finally:
    if hasattr(it, "_shutdown_workers"):
      it._shutdown_workers()  # now, not at garbage collection: the next measurement gets the cores
  return r


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
  import torch

  before = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(before)
