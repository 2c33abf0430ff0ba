"""Whether a params tree is the ViT a config describes: the input its position table is built for, and
each leaf that differs from what the ViT builds (missing, extra, or of another shape)."""

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from at_jax.models import vit


def flat_shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} of a params tree (nested dicts, or already flat with '/' keys)."""
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(dict(params))
  }


def input_shape(model: vit.ViT, params: Mapping[str, Any]) -> tuple[int, int]:
  """(image size, channels) of the square images `params` are for: the position table's grid times
  the patch size, and the patch kernel's input channels. ValueError with the reason otherwise."""
  shapes = flat_shapes(params)
  if "pos_embedding" not in shapes or "embedding/kernel" not in shapes:
    raise ValueError("no pos_embedding or embedding/kernel: not the params of a ViT")
  patches = shapes["pos_embedding"][1] - (model.num_prefix if model.posemb_prefix else 0)
  grid = math.isqrt(max(patches, 0))
  if patches <= 0 or grid * grid != patches:
    raise ValueError(
      f"its position table has {patches} patch slots, not a square grid: timm's and Hugging "
      "Face's ViTs are built for a square image size"
    )
  return grid * model.patch_size, shapes["embedding/kernel"][2]


def mismatches(
  model: vit.ViT, params: Mapping[str, Any], image_size: int, channels: int
) -> list[str]:
  """'path: shape in params vs shape the model builds' for each leaf that differs (None: absent on
  that side), sorted; [] when `params` are exactly `model`'s for that input."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  want = flat_shapes(
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)["params"]
  )
  got = flat_shapes(params)
  return [
    f"{k}: {got.get(k)} vs {want.get(k)}"
    for k in sorted(set(want) | set(got))
    if want.get(k) != got.get(k)
  ]
