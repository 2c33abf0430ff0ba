"""The studies' recipes on 2 CPU cores (projects/miniature, projects/cross_shape): an MAE teacher as
configs/mae_fmnist.py pre-trains it, and a student as configs/demo.py trains it, at a chosen ViT variant,
data, schedule and settings given as "section.field" overrides. Not a config file itself (no
get_config): the studies build one config per run from these."""

from collections.abc import Mapping
from typing import Any

import ml_collections

from at_jax.models import vit
from configs import mae_fmnist

TEACHER = (
  "<teacher>"  # stands for the run's teacher export in overrides (e.g. model.init: fine-tune it)
)


def apply_overrides(
  c: ml_collections.ConfigDict, overrides: Mapping[str, Any], teacher: str
) -> None:
  """Sets each "section.field" of `overrides` in `c` (an unknown field is a KeyError, not a new one)."""
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = teacher if value == TEACHER else value


def teacher_config(
  variant: str, epochs: float, data: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """configs/mae_fmnist.py's MAE at `variant`, `epochs` long, on `data`. The decoder is as wide as the
  encoder: most of MAE's cost is its decoder over all 17 tokens."""
  c = mae_fmnist.get_config()
  c.model.variant = variant
  width = vit.decode_variant(variant)["width"]
  c.mae.update(dict(decoder_width=width, decoder_mlp_dim=4 * width))
  c.schedule.epochs = epochs
  c.schedule.warmup_epochs = max(c.schedule.warmup_epochs, epochs / 20)
  apply_overrides(c, data, "")
  return c


def student_config(
  overrides: Mapping[str, Any],
  data: Mapping[str, Any],
  teacher: str,
  seed: int,
  epochs: float,
  eval_every_epochs: float,
  variant: str,
) -> ml_collections.ConfigDict:
  """configs/demo.py's student as a `variant` ViT with `data` and `overrides`, trained `epochs`,
  evaluated every `eval_every_epochs` (so that the best evaluation is reported next to the last), its
  teacher the export `teacher`."""
  from configs import demo  # pylint: disable=import-outside-toplevel  # demo imports this module

  c = demo.get_config()
  c.model.variant = variant
  c.seed = seed
  c.teacher.pretrain = None
  c.teacher.init = teacher
  c.schedule.epochs = epochs
  c.schedule.warmup_epochs = min(1.0, epochs / 10)
  c.evals.every_steps = 0
  c.evals.every_epochs = eval_every_epochs
  apply_overrides(c, data, teacher)
  apply_overrides(c, overrides, teacher)
  return c
