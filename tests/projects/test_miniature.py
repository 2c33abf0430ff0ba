"""The miniature study's plan, chunking and report (python -m projects.miniature), without training: the schedule rule,
the job order, a chunk that stops at its budget and resumes, and the findings read from results."""

import dataclasses
import json
import os

import pytest

from at_jax.experiment import studies
from configs import miniature
from projects.miniature import analysis as study_analysis
from projects.miniature import plan as study
from projects.miniature import report as study_report


def test_plateau_is_the_first_epoch_within_a_margin_of_the_smoothed_best():
  # Smoothed over 3 epochs: 50, 55, 60, 66.67, 70, 70.07, ... 70.2: within 1 of 70.2 from epoch 5.
  curve = [50, 60, 70, 70, 70, 70.2, 70.25, 70.15, 70.2, 70.1, 70.2, 70.2]
  assert study.plateau_epoch(curve, within=1.0) == 5
  assert study.plateau_epoch(curve, within=10.0) == 4
  # A flat, noisy stretch does not stop a curve that rises again: smoothed, 75.17 to 75.37 over epochs
  # 5-8 (the first rule stopped at epoch 5), then 81.87 at the end; 81.37 >= 80.87 first at epoch 13.
  curve = [60, 70, 75, 75.5, 75, 75.5, 75.2, 75.4, 78, 80, 81, 81.5, 81.6, 81.8, 81.7, 81.8, 81.9]
  curve += [81.8, 81.9]
  assert study.plateau_epoch(curve, within=1.0) == 13
  # Still rising over its last 5 epochs: no plateau yet (a longer curve would move the answer).
  assert study.plateau_epoch([50, 51, 52, 53, 54, 55, 56, 57], within=1.0) is None
  assert study.plateau_epoch([50], within=1.0) is None


def test_jobs_come_in_a_useful_order_and_cover_the_plan():
  o = study.Options(seeds=3, ablation_seeds=2)
  paths = [job.path for job in study.build_jobs(o, "/w")]
  assert paths[:3] == ["teachers/full", "teachers/unlabelled", "curve"]
  assert len(paths) == len(set(paths))
  setting = lambda p: p.split("/")[1] if p.count("/") == 2 else ""
  headline = [p for p in paths if setting(p) in study.HEADLINE]
  assert len(headline) == 3 * 3 * len(study.HEADLINE)
  assert paths.index("main/distill/seed2") < paths.index("lowlabel/scratch/seed0")
  ensemble = paths.index("main/ens_finetune_distill/seed0")  # right after its members
  assert paths.index("main/distill/seed0") < ensemble < paths.index("main/scratch/seed1")
  analysis = {job.path: job for job in study.build_jobs(o, "/w")}["main/analysis/seed0"]
  assert paths.index(analysis.path) == paths.index("main/ens_finetune_scratch/seed0") + 1
  assert analysis.kind == "analysis" and set(analysis.needs) == {
    "teachers/full",
    *(f"main/{name}/seed0" for name in study_analysis.ANALYSED),
  }
  ablations = [p for p in paths if setting(p) in study.ABLATIONS]
  assert len(ablations) == 2 * len(study.ABLATIONS) and paths[-1] == ablations[-1]


def test_student_configs_carry_the_group_and_setting():
  c = miniature.student_config(
    study.HEADLINE["finetune"],
    study.groups(study.Options())["shift"]["data"],
    "/t/params",
    2,
    12,
    5,
    study.Options.variant,
  )
  assert (c.model.init, c.teacher.init, c.seed) == ("/t/params", "/t/params", 2)
  teacher = miniature.teacher_config("Mini/7", 20.0, study.TEACHER_DATA["unlabelled"])
  assert c.model.variant == teacher.model.variant == "Mini/7"  # copy needs the teacher's shape
  assert (teacher.mae.decoder_width, teacher.data.train_split) == (64, "train[10%:]")
  assert (c.data.name, c.data.train_split, c.schedule.epochs, c.evals.every_epochs) == (
    "mnist_5k",
    "train",
    12,
    5,
  )
  with pytest.raises(KeyError, match="wat"):  # a typo in a setting is not silently a new field
    miniature.apply_overrides(c, {"transfer.wat": "q"}, "")


def test_a_chunk_stops_at_its_budget_and_the_next_resumes(tmp_path):
  workdir, ran = str(tmp_path), []

  def job(name: str, seconds: float) -> studies.Job:
    def run(run_dir: str) -> dict:
      os.makedirs(run_dir, exist_ok=True)
      ran.append(name)
      return {"top1": float(len(ran))}

    return studies.Job(name, run, "student"), seconds

  jobs_and_times = [job("a", 60), job("b", 60), job("c", 3600)]
  jobs = [j for j, _ in jobs_and_times]
  estimate = {j.path: s for j, s in jobs_and_times}.__getitem__
  assert studies.run_chunk(workdir, jobs, 30, lambda j: estimate(j.path)) == ["a", "b"]
  assert studies.read_results(workdir, jobs[0])["top1"] == 1 and "wall_s" in studies.read_results(
    workdir, jobs[0]
  )
  assert studies.run_chunk(workdir, jobs, 120, lambda j: estimate(j.path)) == ["c"]
  assert ran == ["a", "b", "c"]


def _write(workdir, path, **results):
  os.makedirs(os.path.join(workdir, path), exist_ok=True)
  with open(os.path.join(workdir, path, "results.json"), "w") as f:
    json.dump({"wall_s": 60.0, **results}, f)


def _fake_export(workdir: str, path: str) -> str:
  """A folder shaped like an export: model_config.json beside a nested params folder."""
  export = os.path.join(workdir, path)
  os.makedirs(os.path.join(export, "params", "d"))
  open(os.path.join(export, "model_config.json"), "w").write('{"variant": "Mini/7"}')
  open(os.path.join(export, "params", "d", "0"), "w").write("weights")
  return export


def test_report_summarises_seeds_and_tests_the_findings(tmp_path):
  workdir, out = str(tmp_path / "w"), str(tmp_path / "out")
  o = study.Options(seeds=2, ablation_seeds=2)
  jobs = study.build_jobs(o, workdir)
  curve = [70.0, 79.0, 80.0, 80.1, 80.1, 80.1, 80.1]
  _write(
    workdir, "curve", top1=80.0, top1_by_epoch=curve, plateau_epoch=study.plateau_epoch(curve, 1.0)
  )
  for seed, shift in ((0, 0.0), (1, 1.0)):
    for name, top1 in (("scratch", 80), ("finetune", 84), ("copy", 82), ("distill", 83.5)):
      _write(workdir, f"main/{name}/seed{seed}", top1=top1 + shift, best_top1=top1 + shift + 0.5)
    _write(workdir, f"main/ens_finetune_distill/seed{seed}", top1=86.0 + shift)
    _write(workdir, f"main/ens_finetune_scratch/seed{seed}", top1=86.0 + 3 * shift)
    jsd = {"no_matching": [0.3, 0.5], "hungarian": [0.2, 0.4 + shift], "head_averaged": [0.1, 0.2]}
    _write(
      workdir,
      f"main/analysis/seed{seed}",
      probes={"teacher": {"knn": 70 + shift, "linear": 75.0}, "distill": {"knn": 72, "linear": 78}},
      jsd={"distill": jsd},
    )
  _write(workdir, "main/copy_q/seed0", top1=90.0)  # an ablation with one seed so far
  for seed in (0, 1):  # two seeds of the last 2 layers, 3 points above copying all of them
    _write(workdir, f"main/copy_last2/seed{seed}", top1=85.0 + seed)
  for seed, top1 in ((0, 70.0), (1, 70.2)):  # low-label: distill below scratch, beyond noise
    _write(workdir, f"lowlabel/scratch/seed{seed}", top1=top1 + 5)
    _write(workdir, f"lowlabel/distill/seed{seed}", top1=top1)
  text = study_report.write(workdir, jobs, out, {"minutes": 1.0}, dataclasses.asdict(o))
  saved = json.load(open(os.path.join(out, "study.json")))
  study.check_plan(saved["plan"], o, "study.json")  # the record names the options it was run with
  with pytest.raises(ValueError, match=r"study.json records a study with other options \(seeds"):
    study.check_plan(saved["plan"], study.Options(seeds=3, ablation_seeds=2), "study.json")
  with pytest.raises(ValueError, match="other options"):  # a record from before plans were recorded
    study.check_plan(None, o, "study.json")
  assert saved["summary"]["main"]["scratch"]["top1"] == [80.5, 0.5, 2]
  assert saved["summary"]["main"]["copy"]["best_top1"] == [83.0, 0.5, 2]
  holds = {f["finding"]: f["holds"] for f in saved["findings"]}
  # 2 standard errors of a difference of two 2-seed means with std 0.5 each: 2 * sqrt(0.5^2 + 0.5^2)
  assert holds["copy beats scratch"] == "yes"  # by 2.0 > 1.41
  assert holds["distill beats scratch"] == "yes"
  assert holds["... and beats the fine-tune + scratch control"] == "within noise"  # 86.5 vs 87.5
  assert holds["distill is within 1 point of fine-tuning"] == "yes"
  assert holds["the fine-tune + distill ensemble beats both members"] == "yes"  # 86.5 vs 84.5
  found = {f["finding"]: f["numbers"] for f in saved["findings"]}
  assert found["copy beats scratch"] == "82.50 vs 80.50 (noise 1.41)"
  assert holds["feature distillation is below attention distillation"] == "n/a"  # not run yet
  assert found["feature distillation is below attention distillation"] == "not run yet"
  # one seed has no noise estimate: a gap of 7.5 points still gets no verdict
  assert (holds["copying Q beats copying the map"], found["copying Q beats copying the map"]) == (
    "1 seed",
    "90.00 vs 82.50",
  )
  assert "| scratch" in text and "80.50 +- 0.50 (2)" in text
  # each group's findings are its own; the ablations are the main group's only
  by_group = {
    g: {f["finding"]: f["holds"] for f in found} for g, found in saved["findings_by_group"].items()
  }
  assert holds["more layers help (all beat the last 2)"] == "no"  # 82.5 vs 85.5, noise 1.41
  assert holds["more heads help (all 4 beat 2)"] == "n/a"
  assert holds["(ours) the student's own first 2 layers help (last 4 beat all 6)"] == "n/a"
  assert by_group["main"] == holds and set(by_group) == {"main", "lowlabel"}
  assert by_group["lowlabel"]["distill beats scratch"] == "no"
  assert by_group["lowlabel"]["copy beats scratch"] == "n/a"
  assert "copying Q beats copying the map" not in by_group["lowlabel"]
  assert text.index("### Findings (main group") < text.index("### Findings (lowlabel group")
  assert "analysis" not in saved["summary"]["main"]  # not a setting
  analysed = saved["analysis"]["main"]
  assert analysed["probes"]["teacher"]["knn"] == [70.5, 0.5, 2] and analysed["seeds"] == 2
  assert analysed["jsd"]["distill"]["hungarian"] == pytest.approx([0.2, 0.9])
  row = next(line for line in text.splitlines() if "78.00 +- 0.00 (2)" in line)
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells == [
    "distill",
    "72.00 +- 0.00 (2)",
    "78.00 +- 0.00 (2)",
    "0.400",
    "0.550",
    "0.150",
  ] + ["0.20 0.90"]
  assert len(saved["chunks"]) == 1
  study_report.write(
    workdir, jobs, out, {"minutes": 2.0}, dataclasses.asdict(o)
  )  # the next chunk appends to the log
  assert [c["minutes"] for c in json.load(open(os.path.join(out, "study.json")))["chunks"]] == [
    1.0,
    2.0,
  ]
  assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == [
    "study_ablations.png",
    "study_analysis.png",
    "study_curve.png",
    "study_groups.png",
    "study_vs_paper.png",
  ]


def test_the_report_goes_to_a_bucket_as_to_disk(tmp_path, gcs_bucket):
  from at_jax import storage  # pylint: disable=import-outside-toplevel

  workdir, out = str(tmp_path / "w"), f"{gcs_bucket[0]}/study_out"
  jobs = study.build_jobs(study.Options(seeds=1, ablation_seeds=1), workdir)
  _write(workdir, "main/scratch/seed0", top1=80.0)
  study_report.write(workdir, jobs, out, {"minutes": 1.0}, {})
  with storage.open_file(f"{out}/study.json") as f:
    assert json.load(f)["summary"]["main"]["scratch"]["top1"] == [80.0, 0.0, 1]
  assert "study_groups.png" in storage.listdir(out)
  # The teachers' exports travel with the record: to the bucket, and from it to a fresh workdir.
  export = _fake_export(workdir, "teachers/full/params")
  assert study.copy_teachers(workdir, out) == ["full"]
  assert study.copy_teachers(workdir, out) == []  # already there
  fresh = str(tmp_path / "fresh")
  assert study.copy_teachers(out, fresh) == ["full"]
  for name in ("model_config.json", "params/d/0"):
    assert (
      open(os.path.join(fresh, "teachers/full/params", name)).read()
      == open(os.path.join(export, name)).read()
    )


def test_a_fresh_machine_continues_from_the_committed_record(tmp_path):
  workdir = str(tmp_path / "fresh")
  jobs = study.build_jobs(study.Options(seeds=1, ablation_seeds=1), workdir)
  recorded = {
    path: {"top1": 1.0}
    for path in ("teachers/full", "curve", "main/scratch/seed0", "main/finetune/seed0")
  }
  recorded["main/ens_finetune_scratch/seed0"] = {"top1": 2.0}  # done: its members are not needed
  restored = studies.restore(workdir, jobs, recorded)
  # No teacher without its weights; the finetune and scratch runs' exports are needed by pending jobs
  # (the finetune + distill ensemble, the seed's analysis).
  assert restored == ["curve", "main/ens_finetune_scratch/seed0"]
  _fake_export(workdir, "teachers/full/params")
  assert studies.restore(workdir, jobs, recorded) == ["teachers/full"]
  by_path = {job.path: job for job in jobs}
  assert studies.read_results(workdir, by_path["curve"]) == {"top1": 1.0}
