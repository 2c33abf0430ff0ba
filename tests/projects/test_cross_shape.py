"""projects/cross_shape: every planned student is a valid run before the study spends CPU on it, the
plan's order and seeds, and the report's findings and plot."""

import os

import jax
import numpy as np
import pytest

from at_jax import checkpoint
from at_jax.experiment import job as run_job
from at_jax.experiment import teachers, validation
from at_jax.experiment.paths import EXPORT_DIR
from at_jax.models import vit
from projects.cross_shape import plan, report


def _random_export(path: str, variant: str) -> str:
  teacher = vit.build({"variant": variant, "num_classes": 0})
  params = teacher.init(jax.random.key(0), np.zeros((1, 28, 28, 3), np.float32), train=False)
  checkpoint.save_params(path, jax.device_get(params["params"]), vit.model_fields(teacher))
  return path


def test_jobs_run_the_deep_teacher_first_then_seed_by_seed():
  jobs = plan.build_jobs("/nowhere")
  paths = [job.path for job in jobs]
  assert paths[0] == "teachers/deep" and len(paths) == len(set(paths))
  expected = sum(s[3] for g in plan.GROUPS.values() for s in g.values())
  assert len(paths) == 1 + expected
  first_seed1 = paths.index("deeper/scratch/seed1")
  assert all(p.endswith("seed0") for p in paths[1:first_seed1])  # one run of everything first
  for job in jobs[1:]:
    group, setting, _ = job.path.split("/")
    assert job.needs == (("teachers/deep",) if plan.GROUPS[group][setting][1] == plan.DEEP else ())


def test_every_planned_student_is_a_valid_run(tmp_path, monkeypatch):
  """Validated as launch/main.py would (data, model, teacher, transfer, memory), nothing compiled:
  random teachers of the planned shapes stand in for the pre-trained ones."""
  workdir = str(tmp_path)
  _random_export(plan.teacher_dir(workdir), plan.DEEP_TEACHER)
  monkeypatch.setattr(plan, "SAME_SHAPE_TEACHER", _random_export(str(tmp_path / "same"), "Mini/7"))
  for group, settings in plan.GROUPS.items():
    for setting in settings:
      config = plan.student_config(workdir, group, setting, 0)
      config.data.eval_batch_size = 496  # over the tests' 8 devices (the study: 500 on one)
      validation.validate(config, str(tmp_path / group / setting))


def _fake_runs(top1: dict[str, list[float]]) -> dict[str, dict]:
  return {
    f"deeper/{setting}/seed{i}": {"top1": value, "wall_s": 60.0}
    for setting, values in top1.items()
    for i, value in enumerate(values)
  }


def test_report_states_each_finding_with_its_noise(tmp_path):
  runs = _fake_runs(
    {
      "scratch": [70.0, 70.5, 69.5],
      "same_shape": [74.0, 74.2, 73.8],
      "uniform_group": [74.1, 73.9, 74.3],
      "uniform_learned": [72.0, 75.0, 73.0],
    }
  )
  text = report.markdown(runs)
  rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
  assert (
    "| yes |"
    in rows["a deeper 8-head teacher helps at all (uniform layers, grouped heads beat scratch)"]
  )
  assert (
    "| within noise |"
    in rows["... as much as the same-shape teacher (uniform/group vs same shape)"]
  )
  assert "| n/a |" in rows["groups of heads beat the first 4 heads alone"]
  assert "74.10 +- 0.16 (3)" in text  # uniform_group's mean and population std over 3 seeds
  report.plot(runs, str(tmp_path / "plot.png"))
  assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("missing", ["teacher", "none"])
def test_restore_teacher_copies_a_committed_export_once(tmp_path, missing):
  out, workdir = tmp_path / "out", str(tmp_path / "work")
  if missing == "none":
    _random_export(str(out / report.TEACHER_EXPORT), plan.DEEP_TEACHER)
  report.restore_teacher(str(out), workdir)
  assert checkpoint.is_export(plan.teacher_dir(workdir)) == (missing == "none")


def _student_export(workdir: str, path: str, encoder_from: str | None = None) -> None:
  """A freshly initialised student of the planned run `path` exported into its run folder; with
  `encoder_from`, every leaf that export has (the encoder: all but the head) taken from it."""
  group, setting, seed = path.split("/")
  config = plan.student_config(workdir, group, setting, int(seed.removeprefix("seed")))
  student = vit.build(teachers.model_config(config, workdir))
  params = student.init(jax.random.key(1), np.zeros((1, 28, 28, 3), np.float32), train=False)
  params = jax.device_get(params["params"])
  if encoder_from:
    params, kept, unused = teachers.init_from_pretrained(
      params, checkpoint.load_params(encoder_from)[1], scan=student.scan
    )
    assert [k for k in kept if "head" not in k] == [] and unused == [], (kept, unused)
  export = os.path.join(workdir, path, EXPORT_DIR)
  checkpoint.save_params(export, params, vit.model_fields(student))


def test_taught_measures_each_student_against_the_maps_it_was_taught(tmp_path, monkeypatch):
  """On the first test images: a student whose encoder is its teacher's reaches the maps' entropy
  exactly (KL 0); a random student of another teacher shape is somewhere above it; scratch and a
  learned mix (dropped from exports) have no taught maps."""
  workdir = str(tmp_path)
  monkeypatch.setattr(report, "TAUGHT_IMAGES", 16)
  same = _random_export(str(tmp_path / "same"), "Mini/7")
  monkeypatch.setattr(plan, "SAME_SHAPE_TEACHER", same)
  _random_export(plan.teacher_dir(workdir), plan.DEEP_TEACHER)
  _student_export(workdir, "deeper/same_shape/seed0", encoder_from=same)
  _student_export(workdir, "deeper/uniform_group/seed0")
  itself = report.taught(workdir, "deeper/same_shape/seed0")
  assert abs(itself["kl"]) < 1e-5 and 0 < itself["entropy"] <= np.log(17) + 1e-6, itself
  other = report.taught(workdir, "deeper/uniform_group/seed0")
  assert other["kl"] > 1e-4 and np.isclose(other["cross_entropy"] - other["entropy"], other["kl"])
  assert report.taught(workdir, "deeper/scratch/seed0") is None
  assert report.taught(workdir, "deeper/uniform_learned/seed0") is None  # no export, no checkpoint
  # A learned mix read from its checkpoint: at zeros from the mean start, each head is taught the mean
  # map, so the same student measures as under head_map=mean.
  for setting in ("uniform_mean", "uniform_learned"):
    _student_export(workdir, f"deeper/{setting}/seed0")
  manager = checkpoint.Checkpointer(
    os.path.join(workdir, "deeper/uniform_learned/seed0/checkpoints"), save_every=1
  )
  manager.save(1, {"params": {"head_mix": np.zeros((4, 4, 8), np.float32)}})
  manager.wait()
  learned = report.taught(workdir, "deeper/uniform_learned/seed0")
  mean = report.taught(workdir, "deeper/uniform_mean/seed0")
  assert learned.keys() == mean.keys()
  for key in mean:
    np.testing.assert_allclose(learned[key], mean[key], rtol=1e-5, err_msg=key)
  runs = {
    "deeper/same_shape/seed0": {"top1": 76.0, "taught": itself},
    "deeper/uniform_group/seed0": {"top1": 75.0, "taught": other},
    "deeper/uniform_first/seed0": {"top1": 77.0, "taught": {**other, "entropy": 0.5}},
  }
  text = report.markdown(runs)
  assert f"| {itself['entropy']:.3f} | {itself['kl']:.3f} |" in text
  own = "over the 3 distilled settings at the teacher's own temperature: Spearman rank correlation"
  assert own in text and "tempered included" not in text  # none tempered here


def test_learned_mix_reads_the_mix_the_last_checkpoint_holds(tmp_path):
  """Logits that keep each student head at its group's start (head_mix_init=group, mix zeros) read back
  as heads apart; equal logits from the mean, as heads alike mixing all 8 teacher heads."""
  workdir = str(tmp_path)
  for setting, logits in (
    ("uniform_learned_group", np.zeros((4, 4, 8), np.float32)),
    ("uniform_learned", np.zeros((4, 4, 8), np.float32)),
  ):
    path = f"deeper/{setting}/seed0"
    manager = checkpoint.Checkpointer(
      os.path.join(workdir, path, "checkpoints"), save_every=1, keep=2
    )
    for step in (1, 2):  # the last one is read (step 1's mix leans on teacher head 0)
      manager.save(step, {"params": {"head_mix": logits + 5.0 * (step == 1) * np.eye(8)[0]}})
    manager.wait()
  apart = report.learned_mix(workdir, "deeper/uniform_learned_group/seed0")
  # Halfway between a group of 2 and the mean of 8: weights .3125 (twice) and .0625; heads differ by .25.
  assert np.isclose(apart["spread"], 0.25) and apart["heads"] < 8
  alike = report.learned_mix(workdir, "deeper/uniform_learned/seed0")
  assert np.isclose(alike["spread"], 0.0) and np.isclose(alike["heads"], 8.0)
  assert report.learned_mix(workdir, "deeper/uniform_group/seed0") is None


def test_the_sharpness_correlation_leaves_out_students_that_stop_distilling_early():
  """A student taught its maps for part of training (transfer.until) is not a point of the sharpness
  correlation: its maps were not the target to the end."""
  runs = {
    f"deeper/{setting}/seed0": {"top1": 75.0, "taught": {"entropy": 2.5, "kl": 0.1}}
    for setting in ("same_shape", "same_shape_until_half", "uniform_first")
  }
  assert sorted(report.sharpness(runs, "deeper")) == ["same_shape", "uniform_first"]


def test_a_setting_that_stops_early_is_compared_seed_by_seed_with_its_twin_distilled_throughout():
  """Seeds the two share pair up (seed2 of same_shape has no twin); the report says the difference."""
  runs = _fake_runs(
    {
      "same_shape": [76.5, 77.0, 76.0],
      "same_shape_until_half": [77.0, 77.25],
      "scratch": [74.0, 74.5],
    }
  )
  mean, se, count, above = report.paired_difference(
    runs, "deeper", "same_shape_until_half", "same_shape"
  )
  assert (mean, count, above) == (0.375, 2, 2) and np.isclose(se, 0.125)
  assert report.twin("deeper", "same_shape_until_half", "transfer.until") == "same_shape"
  text = report.markdown(runs)
  assert (
    "same_shape_until_half - same_shape, seed by seed (the same run up to the switch): +0.38"
    in text
  )
  assert "same_shape_until_quarter - same_shape" not in text  # not run


def test_tempered_settings_point_at_the_maps_they_temper():
  """The plot's arrows: each target_temperature setting's untempered twin has the same student, teacher
  and other overrides; settings at the teacher's temperature have none."""
  assert report.untempered("deeper", "same_shape_flat") == "same_shape"
  assert report.untempered("deeper", "same_shape_sharp") == "same_shape"
  assert report.untempered("deeper", "uniform_mean_sharp") == "uniform_mean"
  assert report.untempered("deeper", "uniform_mean") is None


def test_the_picked_heads_are_the_teachers_sharpest_and_flattest(tmp_path):
  """plan.SHARPEST and FLATTEST are what job.sharpest_teacher_heads finds in the committed deep teacher
  on the first 512 Fashion-MNIST training images, for the layers `uniform` reads."""
  workdir = str(tmp_path)
  report.restore_teacher(os.path.join(os.path.dirname(plan.__file__), "results"), workdir)
  config = plan.student_config(workdir, "deeper", "uniform_first", 0)
  run_dir = os.path.join(workdir, "deeper/uniform_first/seed0")
  assert run_job.sharpest_teacher_heads(config, run_dir) == plan.SHARPEST
  assert run_job.sharpest_teacher_heads(config, run_dir, flattest=True) == plan.FLATTEST
