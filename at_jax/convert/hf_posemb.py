"""Position tables resized as Hugging Face `transformers` does (`interpolate_pos_encoding`):
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`, antialiased in some models.

Not timm's resampling (`posemb.resample_posemb`: bicubic, always antialiased), which the antialiased
variant equals (to 1e-6), but the plain one does not: DINOv2's 518-px table (37x37) at 224 px (16x16),
for a smooth sin-cos table of std 0.59, differs from timm's by 0.043 rms (max 0.25), since plain bicubic
neither widens its kernel when downsampling nor uses timm's a = -0.5. A teacher converted from
transformers must see the table transformers gave it.
"""

import math

import numpy as np


def resample_like_hf(
  pos_BND: np.ndarray, num_prefix: int, grid: int, antialias: bool
) -> np.ndarray:
  """The table [1, N, D] with its square patch grid resized to grid x grid as transformers'
  `interpolate_pos_encoding` does: `torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False, antialias=...)`, separably, in float64. Prefix slots unchanged."""
  prefix_BED, patches_BPD = pos_BND[:, :num_prefix], pos_BND[:, num_prefix:]
  old, width = math.isqrt(patches_BPD.shape[1]), pos_BND.shape[-1]
  weights = _interpolation_matrix(old, grid, antialias)  # [new, old], the same along both axes
  grid_YXD = np.einsum(
    "yi,xj,ijd->yxd", weights, weights, patches_BPD.reshape(old, old, width).astype(np.float64)
  )
  resized_BPD = grid_YXD.reshape(1, grid * grid, width).astype(np.float32)
  return np.concatenate([prefix_BED, resized_BPD], axis=1)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a`."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = a * (((x - 5) * x + 8) * x - 4)
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _interpolation_matrix(old: int, new: int, antialias: bool) -> np.ndarray:
  """[new, old] weights of torch's bicubic resize (align_corners=False) along one axis.

  Without antialias (upsample_bicubic2d): a = -0.75 at the four taps around (i + 0.5) * scale - 0.5,
  taps clamped to the edge. With it (_upsample_bicubic2d_aa, PIL's filter): a = -0.5, the kernel widened
  by the downscale factor, taps cut at the edges and the weights renormalised.
  """
  scale = old / new
  weights = np.zeros((new, old))
  for i in range(new):
    if antialias:
      stretch = max(scale, 1.0)
      center = scale * (i + 0.5)
      # int() truncates toward zero, as torch's int64 cast does.
      taps = np.arange(
        max(int(center - 2 * stretch + 0.5), 0), min(int(center + 2 * stretch + 0.5), old)
      )
      w = _cubic((taps - center + 0.5) / stretch, -0.5)
      weights[i, taps] = w / w.sum()
    else:
      source = scale * (i + 0.5) - 0.5
      for tap in range(math.floor(source) - 1, math.floor(source) + 3):
        weights[i, min(max(tap, 0), old - 1)] += _cubic(np.asarray(source - tap), -0.75)
  return weights
