"""Per-example preprocessing, in numpy/PIL on the input pipeline's threads.

Training: timm's order: random-resized crop (bicubic) and flip, `RandAugment` on the uint8 image,
normalisation, then `random_erase`. Evaluation (and the fixed view precomputed teacher targets are
computed on): shorter side resized to round(image_size / crop_pct), centre image_size crop,
normalisation. Both crop and resize in one PIL call (``resize(box=...)``), which resamples only the
output's pixels. An image still encoded (`decode`: an image folder's JPEG) is decoded knowing its crop:
where the crop is at least twice the output, libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT
domain (``draft``), before the bicubic resize. Every random draw comes from the caller's numpy
generator, so each function is pure given it. The ``check_*`` functions are the range checks of the
``data.*`` fields involved, for a start-up validation to call before anything runs; the preprocessing
calls them too.
"""

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from at_jax.data import erasing
from at_jax.data import randaugment as rand_augment
from at_jax.errors import ConfigError

# (mean, std) per RGB channel of pixels scaled to [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  # What MAE / torchvision-pretrained teachers were trained with.
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
  "unit": ((0.5,) * 3, (0.5,) * 3),  # Maps [0, 1] to [-1, 1].
}


def mean_std(normalization: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) float32 [3] of `NORMALIZATIONS[normalization]`.

  Raises:
    ConfigError: ``data.normalization`` is not a key of `NORMALIZATIONS`.
  """
  if normalization not in NORMALIZATIONS:
    raise ConfigError(
      "data.normalization", f"unknown {normalization!r}; valid names are {sorted(NORMALIZATIONS)}."
    )
  mean, std = NORMALIZATIONS[normalization]
  return np.array(mean, np.float32), np.array(std, np.float32)


def check_image_size(image_size: int) -> None:
  """ConfigError ``data.image_size`` unless positive."""
  if image_size <= 0:
    raise ConfigError("data.image_size", f"must be positive, got {image_size}.")


def eval_shorter_side(image_size: int, crop_pct: float) -> int:
  """The shorter side before the eval view's centre `image_size` crop.

  Raises:
    ConfigError: ``data.crop_pct`` outside (0, 1].
  """
  if not 0 < crop_pct <= 1:
    raise ConfigError("data.crop_pct", f"must be in (0, 1], got {crop_pct}.")
  return round(image_size / crop_pct)


def check_crop(rrc_scale: tuple[float, float], rrc_ratio: tuple[float, float]) -> None:
  """ConfigError ``data.rrc_scale`` unless 0 < scale lo <= hi <= 1 and 0 < ratio lo <= hi."""
  if not (0 < rrc_scale[0] <= rrc_scale[1] <= 1 and 0 < rrc_ratio[0] <= rrc_ratio[1]):
    raise ConfigError(
      "data.rrc_scale",
      f"scale {rrc_scale} must satisfy 0 < lo <= hi <= 1 and ratio {rrc_ratio} 0 < lo <= hi.",
    )


def make_randaugment(spec: str, normalization: str) -> rand_augment.RandAugment | None:
  """RandAugment for the string `spec` ("" : None), filling with the normalisation mean's colour.

  Raises:
    ConfigError: ``data.randaugment`` does not parse, or ``data.normalization`` is unknown.
  """
  if not spec:
    return None
  mean_std(normalization)  # Checks the name.
  # timm's fill: the mean pixel, e.g. (124, 116, 104) for ImageNet.
  fill = tuple(min(255, round(255 * m)) for m in NORMALIZATIONS[normalization][0])
  return rand_augment.RandAugment(spec, fill=fill)


def to_pil(image: np.ndarray) -> Image.Image:
  """uint8 [H, W, 1 or 3] -> a PIL image in mode L or RGB."""
  if image.shape[-1] == 1:
    return Image.fromarray(image[..., 0], "L")
  if image.shape[-1] == 3:
    return Image.fromarray(image, "RGB")
  raise ConfigError("data.name", f"images must have 1 or 3 channels, got shape {image.shape}.")


def image_hw(image: np.ndarray | Image.Image) -> tuple[int, int]:
  """(height, width) of a uint8 [H, W, C] array or of a (possibly undecoded) PIL image."""
  if isinstance(image, Image.Image):
    return image.height, image.width
  return image.shape[0], image.shape[1]


def dct_reduction(crop_wh: tuple[float, float], out_wh: tuple[int, int]) -> int:
  """The largest of 8, 4, 2 and 1 that leaves the crop at least the output's size on both sides."""
  for reduction in (8, 4, 2):
    if crop_wh[0] >= reduction * out_wh[0] and crop_wh[1] >= reduction * out_wh[1]:
      return reduction
  return 1


Box = tuple[float, float, float, float]  # PIL's (left, top, right, bottom)


def decode(
  image: np.ndarray | Image.Image, box: Box, out_wh: tuple[int, int], downscale: bool
) -> tuple[Image.Image, Box]:
  """(the image decoded to mode L or RGB, `box` in its coordinates), ready for ``resize(box=)``.

  An array becomes a PIL image as it is. An undecoded PIL image (an image folder's file) is decoded,
  a JPEG with `downscale` at the `dct_reduction` of its crop `box` to `out_wh`; CMYK, palette, RGBA,
  16-bit and other modes become RGB (PIL's conversion, as torchvision's loader does). A truncated or
  corrupt file raises here (PIL's OSError), for the pipeline to skip.
  """
  if not isinstance(image, Image.Image):
    return to_pil(image), box
  reduction = dct_reduction((box[2] - box[0], box[3] - box[1]), out_wh) if downscale else 1
  if reduction > 1:
    width = image.width
    # Only JPEG decoders can (others return None). It returns the original's extent in the reduced
    # image, whose size it rounds up.
    drafted = image.draft("RGB", (image.width // reduction, image.height // reduction))
    if drafted is not None:
      scale = width / drafted[1][2]
      box = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
  if image.mode not in ("L", "RGB"):
    return image.convert("RGB"), box
  image.load()
  return image, box


def finish(pil: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """PIL image of size S x S -> float32 [S, S, 3] = (pixels / 255 - mean) / std.

  A lookup in a [256, 3] table of pixels * scale - offset: 2-5x faster than
  the arithmetic on [S, S, 3] arrays (whose innermost axis has length 3),
  equal to it within float32 rounding (a few entries differ by <= 5e-7).
  """
  table = np.arange(256, dtype=np.float32)[:, None] * (1 / (255 * std)) - (mean / std)
  x = np.asarray(pil)
  if x.ndim == 2:  # Models always take RGB: the table's rows replicate gray.
    return np.take(table, x, axis=0)
  out = np.empty(x.shape, np.float32)
  for c in range(3):
    np.take(table[:, c], x[..., c], out=out[..., c])
  return out


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params: returns (top, left, h, w)."""
  area = height * width
  log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(np.sqrt(target_area * aspect)))
    h = int(round(np.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centre crop whose aspect ratio is within `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def train_example(
  example: dict[str, Any],
  rng: np.random.Generator,
  *,
  image_size: int,
  scale: tuple[float, float],
  ratio: tuple[float, float],
  hflip: bool,
  mean: np.ndarray,
  std: np.ndarray,
  randaugment: rand_augment.RandAugment | None = None,
  random_erase: float = 0.0,
  jpeg_downscale: bool = True,
) -> dict[str, np.ndarray]:
  """Augments one example in timm's order.

  Random-resized-crop with bicubic resize, flip, RandAugment (if given),
  normalise, random erasing (if `random_erase` > 0). Every random draw comes
  from `rng`, in that order. `jpeg_downscale`: see `decode`.
  """
  top, left, h, w = random_resized_crop_box(*image_hw(example["image"]), rng, scale, ratio)
  out_wh = (image_size, image_size)
  pil, box = decode(example["image"], (left, top, left + w, top + h), out_wh, jpeg_downscale)
  # One PIL call crops (box) and resizes: no intermediate copy.
  pil = pil.resize(out_wh, Image.BICUBIC, box=box)
  if hflip and rng.random() < 0.5:
    # On the uint8 image (RandAugment sees it flipped, as in timm): ~0.02 ms, 5x less than flipping and
    # copying the floats (benchmarks/RESULTS.md, the photographs' profile).
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if randaugment is not None:
    pil = randaugment(pil, rng)
  x = finish(pil, mean, std)
  if random_erase > 0:
    x = erasing.random_erase(x, rng, prob=random_erase)
  return {"image": x, "label": np.int32(example["label"])}


def eval_box(h: int, w: int, image_size: int, resize_to: int) -> Box:
  """The centre crop of the eval view in the original image's coordinates.

  torchvision's Resize(resize_to) (the shorter side to `resize_to`, the longer keeping the aspect
  ratio, floored) then CenterCrop(image_size), as one box: resizing it to image_size resamples the
  same positions with the same filter as resizing the whole image and cropping.
  """
  if h <= w:
    new_h, new_w = resize_to, int(resize_to * w / h)
  else:
    new_h, new_w = int(resize_to * h / w), resize_to
  top = int(round((new_h - image_size) / 2))
  left = int(round((new_w - image_size) / 2))
  sx, sy = w / new_w, h / new_h
  return (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)


def eval_example(
  example: dict[str, Any],
  *,
  image_size: int,
  resize_to: int,
  mean: np.ndarray,
  std: np.ndarray,
  jpeg_downscale: bool = True,
) -> dict[str, np.ndarray]:
  """Resizes the shorter side to `resize_to`, centre-crops `image_size` (`eval_box`)."""
  box = eval_box(*image_hw(example["image"]), image_size, resize_to)
  out_wh = (image_size, image_size)
  pil, box = decode(example["image"], box, out_wh, jpeg_downscale)
  pil = pil.resize(out_wh, Image.BICUBIC, box=box)
  return {"image": finish(pil, mean, std), "label": np.int32(example["label"]), "mask": np.True_}


def eval_preprocessor(
  *, image_size: int, crop_pct: float, normalization: str, jpeg_downscale: bool = True
) -> Callable[[dict[str, Any]], dict[str, np.ndarray]]:
  """example -> `eval_example` of it: the view of `crop_pct` (see `eval_shorter_side`), normalised."""
  mean, std = mean_std(normalization)
  resize_to = eval_shorter_side(image_size, crop_pct)
  return functools.partial(
    eval_example,
    image_size=image_size,
    resize_to=resize_to,
    mean=mean,
    std=std,
    jpeg_downscale=jpeg_downscale,
  )


def train_preprocessor(
  *,
  seed: int,
  image_size: int,
  normalization: str,
  crop_pct: float,
  fixed_view: bool,
  randaugment: str,
  jpeg_downscale: bool = True,
  **augment: Any,
) -> Callable[[dict[str, Any], int], dict[str, np.ndarray]]:
  """(example, stream position g) -> `train_example` of it, drawn from (seed, g); or the fixed view.

  Args:
    seed: with g, seeds the example's augmentation: a pure function of both.
    image_size, normalization, crop_pct: the output, and the fixed view's crop.
    fixed_view: every example is the eval view (`eval_example`, without its mask) instead.
    randaugment: a RandAugment string, or "" for none (`make_randaugment`).
    jpeg_downscale: whether JPEGs may be decoded at a reduced scale (`decode`).
    **augment: `train_example`'s scale, ratio, hflip and random_erase.
  """
  view = eval_preprocessor(
    image_size=image_size,
    crop_pct=crop_pct,
    normalization=normalization,
    jpeg_downscale=jpeg_downscale,
  )
  mean, std = view.keywords["mean"], view.keywords["std"]
  op = make_randaugment(randaugment, normalization)

  def prepare(example: dict[str, Any], g: int) -> dict[str, np.ndarray]:
    if fixed_view:
      out = view(example)
      del out["mask"]
      return out
    # A fresh generator per call: a replacement gets the draws the
    # failed example would have had, whatever the failure consumed.
    rng = np.random.default_rng([seed, 1, g])  # Stream 1: augmentation.
    return train_example(
      example,
      rng,
      image_size=image_size,
      mean=mean,
      std=std,
      randaugment=op,
      jpeg_downscale=jpeg_downscale,
      **augment,
    )

  return prepare
