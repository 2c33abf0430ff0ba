"""The ``data.*`` options the iterators take: the eval view's fields, and their range checks.

The ``check_*`` functions are the range checks of the fields `pipeline`'s iterators take, for a start-up
validation to call before anything runs; the iterators call them on their own arguments.
"""

from collections.abc import Mapping
from typing import Any

from at_jax.data import erasing, target_store, transforms
from at_jax.data import randaugment as rand_augment
from at_jax.errors import ConfigError

VIEW_FIELDS = ("image_size", "crop_pct", "normalization", "jpeg_downscale")


def eval_view(data: Mapping[str, Any]) -> dict[str, Any]:
  """The eval view's arguments of both iterators (`VIEW_FIELDS`), from config.data or from stored
  targets' metadata (which lacks ``jpeg_downscale`` if written before it: then True, its default)."""
  return {name: data[name] for name in VIEW_FIELDS if name in data}


def check_eval_args(
  *, image_size: int, crop_pct: float, normalization: str, jpeg_downscale: bool = True
) -> None:
  """ConfigError naming ``data.normalization``, ``data.image_size`` or ``data.crop_pct``."""
  transforms.mean_std(normalization)
  transforms.check_image_size(image_size)
  transforms.eval_shorter_side(image_size, crop_pct)


def check_train_args(
  *,
  image_size: int,
  normalization: str,
  seed: int = 0,
  rrc_scale: tuple[float, float] = (0.08, 1.0),
  rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
  randaugment: str = "",
  random_erase: float = 0.0,
  fixed_view: bool = False,
  crop_pct: float = 0.875,
  jpeg_downscale: bool = True,
) -> None:
  """ConfigError naming the field of the first of `train_iterator`'s arguments out of range.

  ``data.normalization``, ``data.image_size``, ``seed``, ``data.rrc_scale`` (and ratio),
  ``data.random_erase``, ``data.randaugment``, ``data.crop_pct``, and RandAugment or erasing with the
  fixed view.
  """
  transforms.mean_std(normalization)
  transforms.check_image_size(image_size)
  if seed < 0:
    raise ConfigError("seed", f"must be non-negative, got {seed}.")
  transforms.check_crop(rrc_scale, rrc_ratio)
  erasing.check_random_erase(random_erase)
  rand_augment.check_randaugment(randaugment)
  transforms.eval_shorter_side(image_size, crop_pct)
  if fixed_view and (randaugment or random_erase):
    # The fixed view exists to match stored teacher targets pixel for pixel.
    raise ConfigError(
      "data.randaugment" if randaugment else "data.random_erase",
      "must be off with the fixed view (precomputed teacher targets describe unaugmented pixels).",
    )


def check_targets(
  targets: target_store.TeacherTargets, *, fixed_view: bool, num_examples: int, **view: Any
) -> None:
  if not fixed_view:
    raise ConfigError(
      "fixed_view",
      "stored teacher targets describe the fixed view's pixels; pass fixed_view=True.",
    )
  targets.check(**view, num_examples=num_examples)
