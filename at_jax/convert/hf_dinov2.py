"""What transformers' DINOv2 adds to its ViT, read by the importer (`hf`) and the exporter (`export_keys`,
`export_hf`): the MLP width its config builds, and its classifier.

Dinov2ForImageClassification (and Dinov2WithRegistersForImageClassification) classify
[cls token | mean of the patch tokens], both from the final LayerNorm's output and registers not averaged:
a classifier 2 * width wide, our `cls_mean` pooling. One whose mean half is zero computes what our `cls`
head computes, and is how `export_hf` writes a cls-pooled ViT: it reads back as that head.
"""

from typing import Any

import numpy as np

from at_jax.convert import keymap


def dinov2_mlp_dim(width: int, mlp_ratio: float, swiglu: bool) -> int:
  """The MLP width transformers' DINOv2 builds: int(width * mlp_ratio), SwiGLU 2/3 of it rounded up to a
  multiple of 8."""
  hidden = int(width * mlp_ratio)
  return (int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden


def classifier(sd: dict[str, Any]) -> tuple[dict[str, Any], str]:
  """(`sd` with its classifier as our head reads it, our pooling): `cls` and the classifier's cls half
  when the mean half is zero, else `cls_mean` and the classifier as it is. Headless: `cls`."""
  if "classifier.weight" not in sd:
    return sd, "cls"
  weight = keymap.f32(sd["classifier.weight"])  # [classes, 2 * width]: [cls | mean] inputs
  width = weight.shape[1] // 2
  if np.any(weight[:, width:]):
    return sd, "cls_mean"
  return {**sd, "classifier.weight": weight[:, :width]}, "cls"
