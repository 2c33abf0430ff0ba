"""The cross-shape study's runs: which teacher, student and transfer settings, in which order.

Two groups of students, trained from scratch on Fashion-MNIST labels (the miniature study's main-group
data, `train[:10000]`) for EPOCHS epochs, each setting against its own scratch students:

  deeper  the MiniDeep/7 MAE teacher (12 layers, 8 heads, width 64; pre-trained here on all 60,000
          training images without labels, the miniature study's recipe) into the Mini/7 student (6 layers,
          4 heads): layer maps `uniform` and `last`, head maps `first`, `group`, `mean`, `learned`; and,
          as the reference, the same-shape Mini/7 teacher of the miniature study (projects/miniature/results/teachers/full).
  finer   that same-shape Mini/7 teacher (16 patches of 7x7) into a Mini/4 student (49 patches of 4x4):
          the teacher's maps resampled onto the student's grid (`transfer.prefix` keep, drop), or the
          teacher shown the images at 49 px (`teacher.image_size`: its grid becomes the student's).

The learned mix runs twice: from the mean (every student head taught one map at first) and from
halfway between each head's group and the mean (`transfer.head_mix_init=group`), added when the first
was found to keep its four heads' mixes equal.
Two settings change only the taught maps' temperature (`transfer.target_temperature`), added to test
what the first settings only correlated (sharper taught maps, higher top-1): the flattest maps, `mean`'s,
sharpened (T = 1/2), and the best, the same-shape teacher's, flattened (T = 2) and sharpened (T = 1/2):
whether the teacher's own sharpness (T = 1, the paper's) is where more sharpness stops helping.
Which teacher heads to keep (`transfer.head_map=pick`), added when the sharpness test found that
averaging heads loses what no temperature restores: the sharpest 4 of 8 per layer, and the flattest as
the control, against `first` (heads 0-3).
When to stop distilling (`transfer.until`: the first fraction of training distils, the rest trains on
labels alone with no teacher run), added after HASTE's report that ending the alignment early helps: the
same-shape teacher's distillation stopped half-way and a quarter of the way. Half-way beat distilling
throughout at 3 seeds (by 0.35, noise 0.27); both then ran 2 more seeds, to confirm or undo it.
`merge` is left out: for 8 teacher heads into 4 it is one round of adjacent pairs averaged, which is
`group` exactly (tests/transfer/test_pairing.py).
"""

import os
from typing import Any

from at_jax.experiment import studies
from at_jax.experiment.paths import EXPORT_DIR
from configs import miniature

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The miniature study's teacher (a file it committed, read as data: projects never import each other).
SAME_SHAPE_TEACHER = os.path.join(
  ROOT, "projects", "miniature", "results", "teachers", "full", EXPORT_DIR
)
DEEP_TEACHER = "MiniDeep/7"
TEACHER_EPOCHS = 20.0  # as the same-shape teacher's, so that the two teachers differ in shape only
EPOCHS, EVAL_EVERY_EPOCHS = 10, 5
DATA = {"data.train_split": "train[:10000]"}
DISTILL = {"transfer.mode": "distill"}  # the demo's layers 0-3 of 6 (end_layer:-2)
DEEP, SAME = "deep", "same"  # which teacher a setting reads
# head_map "pick": per distilled layer (reading teacher layers 1, 3, 5, 7), the 4 of the deep teacher's 8
# heads with the lowest (SHARPEST) and highest (FLATTEST) mean attention entropy on the first 512
# training images (`job.sharpest_teacher_heads`; the flattest by negated entropy). Written out so that
# the runs' configs need no teacher to build; tests/projects/test_cross_shape.py derives them again.
SHARPEST = "1,2,4,5;0,1,2,4;0,1,3,4;0,3,6,7"
FLATTEST = "0,3,6,7;3,5,6,7;2,5,6,7;1,2,4,5"

# name -> (student variant, teacher, overrides, seeds)
Setting = tuple[str, str | None, dict[str, Any], int]
GROUPS: dict[str, dict[str, Setting]] = {
  "deeper": {
    "scratch": ("Mini/7", None, {"transfer.mode": "none"}, 3),
    "same_shape": ("Mini/7", SAME, DISTILL, 5),
    "uniform_group": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "uniform", "transfer.head_map": "group"}, 3),
    "uniform_learned": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "uniform", "transfer.head_map": "learned"}, 3),
    "uniform_learned_group": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "uniform", "transfer.head_map": "learned", "transfer.head_mix_init": "group"}, 3),
    "uniform_first": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "uniform", "transfer.head_map": "first"}, 3),
    "uniform_sharpest": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "uniform", "transfer.head_map": "pick", "transfer.head_pick": SHARPEST}, 3),
    "uniform_flattest": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "uniform", "transfer.head_map": "pick", "transfer.head_pick": FLATTEST}, 3),
    "uniform_mean": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "uniform", "transfer.head_map": "mean"}, 3),
    "uniform_mean_sharp": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "uniform", "transfer.head_map": "mean", "transfer.target_temperature": 0.5}, 3),
    "same_shape_flat": ("Mini/7", SAME, {**DISTILL, "transfer.target_temperature": 2.0}, 3),
    "same_shape_sharp": ("Mini/7", SAME, {**DISTILL, "transfer.target_temperature": 0.5}, 3),
    "same_shape_until_half": ("Mini/7", SAME, {**DISTILL, "transfer.until": 0.5}, 5),
    "same_shape_until_quarter": ("Mini/7", SAME, {**DISTILL, "transfer.until": 0.25}, 3),
    "last_group": ("Mini/7", DEEP, {**DISTILL, "transfer.layer_map": "last", "transfer.head_map": "group"}, 2),
  },
  "finer": {
    "scratch": ("Mini/4", None, {"transfer.mode": "none"}, 2),
    "resample_keep": ("Mini/4", SAME, {**DISTILL, "transfer.prefix": "keep"}, 2),
    "resample_drop": ("Mini/4", SAME, {**DISTILL, "transfer.prefix": "drop"}, 2),
    "image_size": ("Mini/4", SAME, {**DISTILL, "teacher.image_size": 49, "teacher.resample_posemb": True}, 2),
  },
}  # fmt: skip


def teacher_dir(workdir: str) -> str:
  return os.path.join(workdir, "teachers", "deep", EXPORT_DIR)


def student_config(workdir: str, group: str, setting: str, seed: int) -> Any:
  """The run config of one student: configs/demo.py's, as the miniature study's students
  (`configs.miniature.student_config`), with the setting's variant, teacher and overrides."""
  variant, which, overrides, _ = GROUPS[group][setting]
  teacher = {DEEP: teacher_dir(workdir), SAME: SAME_SHAPE_TEACHER, None: ""}[which]
  return miniature.student_config(
    overrides, DATA, teacher, seed, EPOCHS, EVAL_EVERY_EPOCHS, variant
  )


def build_jobs(workdir: str) -> list[studies.Job]:
  """The deep teacher, then seed by seed every setting that has that seed (seed 0 of everything first,
  so that a partial study already has one run of each setting)."""
  teacher = lambda: miniature.teacher_config(
    DEEP_TEACHER, TEACHER_EPOCHS, {"data.train_split": "train"}
  )
  jobs = [studies.Job("teachers/deep", studies.train(teacher), "teacher")]
  for seed in range(max(s[3] for g in GROUPS.values() for s in g.values())):
    for group, settings in GROUPS.items():
      for name, (_, which, _, seeds) in settings.items():
        if seed >= seeds:
          continue
        config_fn = lambda g=group, n=name, s=seed: student_config(workdir, g, n, s)
        needs = ("teachers/deep",) if which == DEEP else ()
        jobs.append(
          studies.Job(f"{group}/{name}/seed{seed}", studies.train(config_fn), "student", needs)
        )
  return jobs
