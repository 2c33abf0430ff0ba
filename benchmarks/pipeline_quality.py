"""The quality table of benchmarks/input_pipeline.py --source=photos: how far decoding a JPEG at a reduced
DCT scale (draft) moves the output pixels, against full decodes, on the same crops."""

from __future__ import annotations

import collections
import io
from typing import Any

import numpy as np
import pipeline_profile  # benchmarks/pipeline_profile.py
import pipeline_timing  # benchmarks/pipeline_timing.py
from PIL import Image


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
  simplejpeg = pipeline_profile.import_simplejpeg()
  rows: dict[str, Differences] = collections.defaultdict(Differences)
  rng = np.random.default_rng(0)
  for k in range(crops):
    data = pipeline_profile.read_bytes(paths[k % len(paths)])
    image = Image.open(io.BytesIO(data))
    top, left, h, w = transforms.random_resized_crop_box(
      image.height, image.width, rng, tuple(data_cfg.rrc_scale), pipeline_timing.RRC_RATIO
    )
    box = (left, top, left + w, top + h)
    full, draft = _view(data, box, out, False), _view(data, box, out, True)
    reduction = transforms.dct_reduction((w, h), out)
    rows["train crops, all"].add(full, draft)
    if reduction > 1:
      rows["train crops, draft applied"].add(full, draft)
      rows[f"train crops, draft at 1/{reduction}"].add(full, draft)
      if simplejpeg is not None:
        decoded = pipeline_profile.simplejpeg_decode(simplejpeg, data, reduction)
        ratio = image.width / decoded.width
        scaled = tuple(c / ratio for c in box)
        rows["simplejpeg vs Pillow draft, same scale"].add(
          np.asarray(decoded.resize(out, Image.BICUBIC, box=scaled)), draft
        )
    timm_like = Image.open(io.BytesIO(data)).convert("RGB").crop(box).resize(out, Image.BICUBIC)
    rows["reference: ours full decode vs timm's crop-then-resize"].add(full, np.asarray(timm_like))
  shorter = transforms.eval_shorter_side(image_size, data_cfg.crop_pct)
  for path in paths[:crops]:
    data = pipeline_profile.read_bytes(path)
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
