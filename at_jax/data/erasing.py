"""timm's RandomErasing (count 1) of one normalised example, on the input pipeline's threads.

All randomness comes from the caller's numpy generator. `check_random_erase` is the range check of
``data.random_erase``.
"""

import math

import numpy as np

from at_jax.errors import ConfigError


def check_random_erase(prob: float) -> None:
  """ConfigError ``data.random_erase`` unless a probability in [0, 1]."""
  if not 0 <= prob <= 1:
    raise ConfigError("data.random_erase", f"must be a probability in [0, 1], got {prob}.")


def random_erase(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  prob: float,
  min_area: float = 0.02,
  max_area: float = 1 / 3,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  mode: str = "pixel",
) -> np.ndarray:
  """timm's RandomErasing (count 1) of one normalised image.

  With probability `prob`, tries up to 10 times to draw a rectangle of area
  uniform in [min_area, max_area] of the image and log-uniform aspect ratio
  (h / w) that fits strictly inside, and replaces it.

  Args:
    image: float [H, W, C], normalised (the noise is standard normal).
    rng: the only source of randomness.
    prob: probability of erasing.
    min_area: smallest rectangle, as a fraction of the image.
    max_area: largest rectangle, as a fraction of the image.
    min_aspect: smallest h / w.
    max_aspect: largest h / w; None: 1 / min_aspect.
    mode: "pixel" (noise per pixel and channel), "rand" (one noise colour)
      or "const" (zeros, i.e. the mean colour).

  Returns:
    float [H, W, C]: `image` itself if nothing was erased, else a copy.

  Raises:
    ConfigError: `prob` (``data.random_erase``) outside [0, 1], or an unknown `mode`.
  """
  check_random_erase(prob)
  if mode not in ("pixel", "rand", "const"):
    raise ConfigError(
      "data.random_erase_mode", f"unknown {mode!r}; expected 'pixel', 'rand' or 'const'."
    )
  if rng.random() >= prob:
    return image
  height, width, channels = image.shape
  log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
  for _ in range(10):
    target_area = rng.uniform(min_area, max_area) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if h < height and w < width:
      top = int(rng.integers(height - h + 1))
      left = int(rng.integers(width - w + 1))
      shape = {"pixel": (h, w, channels), "rand": (1, 1, channels), "const": None}[mode]
      out = image.copy()
      out[top : top + h, left : left + w] = (
        0 if shape is None else rng.standard_normal(shape, image.dtype)
      )
      return out
  return image
