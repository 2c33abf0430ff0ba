"""timm's RandAugment (`rand_augment_transform`) on PIL images, as in MAE fine-tuning.

`RandAugment` runs on the uint8 image after crop and flip (see `transforms.train_example`). All
randomness comes from the caller's numpy generator: each call is pure given it, which keeps
`pipeline.train_iterator` exactly resumable. `parse_randaugment` is the check of
``data.randaugment``.
"""

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from at_jax.errors import ConfigError

# timm's magnitude scale: "m9" is 9 / _LEVEL_DENOM of each op's full range.
_LEVEL_DENOM = 10.0

# ----------------------------------------------------------------------------
# RandAugment ops on PIL images (uint8, mode RGB; pixel ops also take L).


def _lut(image: Image.Image, table: list[int]) -> Image.Image:
  """Maps every band of `image` through the same 256-entry table."""
  return image.point(table * len(image.getbands()))


def _invert(image: Image.Image) -> Image.Image:
  return _lut(image, [255 - i for i in range(256)])


def _posterize(image: Image.Image, bits: int) -> Image.Image:
  """Keeps the `bits` most significant bits of each value."""
  if bits >= 8:
    return image
  mask = (0xFF << (8 - max(bits, 0))) & 0xFF
  return _lut(image, [i & mask for i in range(256)])


def _solarize(image: Image.Image, threshold: int) -> Image.Image:
  """Inverts values at or above `threshold` (256: no change)."""
  return _lut(image, [i if i < threshold else 255 - i for i in range(256)])


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
  """Adds `add` (saturating) to values below `threshold`."""
  return _lut(image, [min(255, i + add) if i < threshold else i for i in range(256)])


def _enhance(kind: type) -> Callable[[Image.Image, float], Image.Image]:
  """An op blending with PIL's degenerate image: factor 1 is the identity."""
  return lambda image, factor: kind(image).enhance(factor)


def _affine(
  coefficients: Callable[[Image.Image, float], tuple[float, ...]],
) -> Callable[..., Image.Image]:
  """A geometric op: output pixel (x, y) samples input at A @ (x, y, 1)."""

  def apply(image: Image.Image, v: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    return image.transform(
      image.size, Image.Transform.AFFINE, coefficients(image, v), resample=resample, fillcolor=fill
    )

  return apply


def _rotate(
  image: Image.Image, degrees: float, fill: tuple[int, ...], resample: int
) -> Image.Image:
  return image.rotate(degrees, resample=resample, fillcolor=fill)


# Level functions: magnitude (0..10, may exceed 10 with "mmax") -> the op's
# arguments, exactly as timm's *_level_to_arg (including its int()
# truncations), with the sign drawn from `rng` where timm negates at random.


def _signed(v: float, rng: np.random.Generator) -> float:
  return -v if rng.random() > 0.5 else v  # timm's _randomly_negate.


def _no_args(_: float, __: np.random.Generator) -> tuple[()]:
  return ()


def _scaled_signed(full: float) -> Callable[..., tuple[float]]:
  return lambda m, rng: (_signed(m / _LEVEL_DENOM * full, rng),)


def _enhance_level(m: float, _: np.random.Generator) -> tuple[float]:
  return (m / _LEVEL_DENOM * 1.8 + 0.1,)  # [0.1, 1.9].


def _enhance_increasing_level(m: float, rng: np.random.Generator) -> tuple[float]:
  # Moves away from the identity (1.0) in a random direction, >= 0.1.
  return (max(0.1, 1.0 + _signed(m / _LEVEL_DENOM * 0.9, rng)),)


def _posterize_level(m: float, _: np.random.Generator) -> tuple[int]:
  return (int(m / _LEVEL_DENOM * 4),)  # Bits kept, 0..4: weaker with m.


def _posterize_increasing_level(m: float, rng: np.random.Generator) -> tuple[int]:
  return (4 - _posterize_level(m, rng)[0],)  # Bits kept, 4..0.


def _solarize_level(m: float, _: np.random.Generator) -> tuple[int]:
  return (min(256, int(m / _LEVEL_DENOM * 256)),)  # Threshold: weaker with m.


def _solarize_increasing_level(m: float, rng: np.random.Generator) -> tuple[int]:
  return (256 - _solarize_level(m, rng)[0],)


def _solarize_add_level(m: float, _: np.random.Generator) -> tuple[int]:
  return (min(128, int(m / _LEVEL_DENOM * 110)),)


class Op(NamedTuple):
  """One RandAugment op.

  Attributes:
    level: (magnitude, rng) -> the arguments of `apply` after the image.
    apply: (image, *level args[, fill, resample]) -> image of the same size
      and mode.
    geometric: whether `apply` also takes (fill, resample).
  """

  level: Callable[[float, np.random.Generator], tuple[Any, ...]]
  apply: Callable[..., Image.Image]
  geometric: bool = False


OPS: dict[str, Op] = {
  "AutoContrast": Op(_no_args, ImageOps.autocontrast),
  "Equalize": Op(_no_args, ImageOps.equalize),
  "Invert": Op(_no_args, _invert),
  "Rotate": Op(_scaled_signed(30.0), _rotate, True),  # Degrees.
  "Posterize": Op(_posterize_level, _posterize),
  "PosterizeIncreasing": Op(_posterize_increasing_level, _posterize),
  "Solarize": Op(_solarize_level, _solarize),
  "SolarizeIncreasing": Op(_solarize_increasing_level, _solarize),
  "SolarizeAdd": Op(_solarize_add_level, _solarize_add),
  "Color": Op(_enhance_level, _enhance(ImageEnhance.Color)),
  "ColorIncreasing": Op(_enhance_increasing_level, _enhance(ImageEnhance.Color)),
  "Contrast": Op(_enhance_level, _enhance(ImageEnhance.Contrast)),
  "ContrastIncreasing": Op(_enhance_increasing_level, _enhance(ImageEnhance.Contrast)),
  "Brightness": Op(_enhance_level, _enhance(ImageEnhance.Brightness)),
  "BrightnessIncreasing": Op(_enhance_increasing_level, _enhance(ImageEnhance.Brightness)),
  "Sharpness": Op(_enhance_level, _enhance(ImageEnhance.Sharpness)),
  "SharpnessIncreasing": Op(_enhance_increasing_level, _enhance(ImageEnhance.Sharpness)),
  # Shear factor in [-0.3, 0.3]; translation as a fraction of the size.
  "ShearX": Op(_scaled_signed(0.3), _affine(lambda im, v: (1, v, 0, 0, 1, 0)), True),
  "ShearY": Op(_scaled_signed(0.3), _affine(lambda im, v: (1, 0, 0, v, 1, 0)), True),
  "TranslateXRel": Op(
    _scaled_signed(0.45), _affine(lambda im, v: (1, 0, v * im.size[0], 0, 1, 0)), True
  ),
  "TranslateYRel": Op(
    _scaled_signed(0.45), _affine(lambda im, v: (1, 0, 0, 0, 1, v * im.size[1])), True
  ),
}

# timm's _RAND_TRANSFORMS ("inc0") and _RAND_INCREASING_TRANSFORMS ("inc1"),
# in timm's order (the order matters only for which op an index draws).
DEFAULT_OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
INCREASING_OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed timm RandAugment string; defaults are timm's.

  Attributes:
    magnitude: "m": mean op strength, on a 0..10 scale.
    num_ops: "n": ops drawn (with replacement) per image.
    prob: "p": probability of applying each drawn op.
    magnitude_std: "mstd": std of the Gaussian noise added to the magnitude
      per op; inf (written as a value > 100) draws it uniformly in
      [0, magnitude].
    magnitude_max: "mmax": the noisy magnitude is clipped to [0, this].
    increasing: "inc": use the op set whose severity grows with magnitude.
  """

  magnitude: int = 10
  num_ops: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0
  magnitude_max: int = 10
  increasing: bool = False


# Section key -> (field, type); numbers as timm: ints except p and mstd.
_SPEC_SECTIONS = {
  "m": ("magnitude", int),
  "n": ("num_ops", int),
  "p": ("prob", float),
  "mstd": ("magnitude_std", float),
  "mmax": ("magnitude_max", int),
  "inc": ("increasing", int),
}


def parse_randaugment(spec: str) -> RandAugmentSpec:
  """Parses timm's RandAugment string, e.g. ``"rand-m9-mstd0.5-inc1"``.

  Args:
    spec: "rand" then dash-separated sections, in any order: ``m<int>``,
      ``n<int>``, ``p<float>``, ``mstd<float>``, ``mmax<int>``, ``inc<0|1>``.
      timm's ``t<name>`` (other op sets, weighted choice) is not supported.

  Returns:
    The parsed spec.

  Raises:
    ConfigError: (field ``data.randaugment``) an unknown, repeated or
      out-of-range section.
  """

  def fail(why: str) -> ConfigError:
    return ConfigError(
      "data.randaugment",
      f"cannot parse {spec!r}: {why}; "
      "expected e.g. 'rand-m9-mstd0.5-inc1' (sections m<int>,"
      " n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>),"
      " or '' for none.",
    )

  head, *sections = spec.split("-")
  if head != "rand":
    raise fail("it must start with 'rand'")
  values = {}
  for section in sections:
    m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", section)
    if m is None:
      raise fail(f"unknown section {section!r}")
    field, kind = _SPEC_SECTIONS[m[1]]
    if field in values:
      raise fail(f"section {m[1]!r} given twice")
    try:
      values[field] = kind(m[2])
    except ValueError:
      raise fail(f"{m[1]!r} takes an integer, not {m[2]!r}") from None
  if values.get("increasing", 0) not in (0, 1):
    raise fail("inc must be 0 or 1")
  if values.get("num_ops", 1) < 1:
    raise fail("n must be at least 1")
  if not 0 <= values.get("prob", 0) <= 1:
    raise fail("p must be in [0, 1]")
  if values.get("magnitude_std", 0) > 100:  # timm: uniform sampling.
    values["magnitude_std"] = math.inf
  if values.get("magnitude_max") == 0:  # timm: `magnitude_max or 10`, so mmax0 is the default bound
    values["magnitude_max"] = 10
  values["increasing"] = bool(values.get("increasing", 0))
  return RandAugmentSpec(**values)


def check_randaugment(spec: str) -> None:
  """ConfigError ``data.randaugment`` unless "" (off) or a string `parse_randaugment` takes."""
  if spec:
    parse_randaugment(spec)


class RandAugment:
  """timm's RandAugment (`rand_augment_transform`) on PIL images.

  Per image: draw `num_ops` ops uniformly with replacement; apply each with
  probability `prob`, at a magnitude drawn around `magnitude`. Geometric ops
  fill uncovered pixels with `fill`.
  """

  def __init__(
    self, spec: str, *, fill: tuple[int, int, int] = (124, 116, 104), interpolation: str = "bicubic"
  ):
    """Parses `spec`.

    Args:
      spec: a RandAugment string, see `parse_randaugment`.
      fill: RGB uint8 fill; timm's is round(255 * normalisation mean), i.e.
        (124, 116, 104) for ImageNet's.
      interpolation: "bicubic" (MAE's choice), "bilinear", or "random" (one
        of the two per op, timm's default).
    """
    self.spec = parse_randaugment(spec)
    self.names = INCREASING_OPS if self.spec.increasing else DEFAULT_OPS
    self.fill = tuple(fill)
    if interpolation not in (*_RESAMPLE, "random"):
      raise ConfigError(
        "data.interpolation",
        f"unknown {interpolation!r}; expected one of {[*_RESAMPLE, 'random']}.",
      )
    self.interpolation = interpolation

  def _magnitude(self, rng: np.random.Generator) -> float:
    m, std = self.spec.magnitude, self.spec.magnitude_std
    if std == math.inf:
      m = rng.uniform(0, m)
    elif std > 0:
      m = rng.normal(m, std)
    return min(max(m, 0.0), self.spec.magnitude_max)

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Augments one image.

    Args:
      image: uint8 image [H, W] (mode L) or [H, W, 3] (mode RGB); gray is
        converted to RGB first, as timm's loaders would (and so that the
        fill has its colour).
      rng: the only source of randomness.

    Returns:
      The augmented RGB image of the same size.
    """
    if image.mode != "RGB":
      image = image.convert("RGB")
    for index in rng.integers(len(self.names), size=self.spec.num_ops):
      op = OPS[self.names[index]]
      if rng.random() >= self.spec.prob:
        continue
      args = op.level(self._magnitude(rng), rng)
      if op.geometric:
        name = (
          self.interpolation
          if self.interpolation != "random"
          else ("bilinear", "bicubic")[rng.integers(2)]
        )
        args += (self.fill, _RESAMPLE[name])
      image = op.apply(image, *args)
    return image
