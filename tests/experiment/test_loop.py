"""The training loop on real Fashion-MNIST: exact resume, teacher export, start-up validation."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from orbax import checkpoint as ocp

from at_jax import checkpoint, metrics
from at_jax.convert import export as convert_export
from at_jax.data import sources
from at_jax.errors import ConfigError
from at_jax.experiment import job, loop, paths, preemption, runs, teachers, validation
from at_jax.models import vit
from configs import mae_fmnist
from tests.conftest import demo_pretraining_its_teacher, subprocess_env


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory, tiny_config):
  """A real teacher: trained by our own loop, exported as teacher.init expects."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  c = tiny_config(steps=4, mode="none")
  loop.train_and_evaluate(c, workdir)
  return os.path.join(workdir, paths.EXPORT_DIR)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path, teacher_export, tiny_config):
  c = tiny_config(steps=6, mode="distill", layers="first:1")
  c.teacher.init = teacher_export
  c.model.drop_path = 0.1
  straight = str(tmp_path / "straight")
  c.profile = "2:4"
  evals = loop.train_and_evaluate(c, straight)
  c.profile = ""
  interrupted = str(tmp_path / "interrupted")
  loop.train_and_evaluate(c, interrupted)
  # Simulate a kill after the step-4 checkpoint: later checkpoints and the export never happened.
  shutil.rmtree(os.path.join(interrupted, "checkpoints", "6"))
  shutil.rmtree(os.path.join(interrupted, paths.EXPORT_DIR))
  resumed = loop.train_and_evaluate(c, interrupted)
  assert resumed == evals
  _, a = checkpoint.load_params(os.path.join(straight, paths.EXPORT_DIR))
  _, b = checkpoint.load_params(os.path.join(interrupted, paths.EXPORT_DIR))
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise on CPU: same data, rng and steps
  # Metrics: logged every 2 steps, distillation active, evals at the end.
  lines = metrics.read_jsonl(os.path.join(straight, "metrics.jsonl"))
  train_steps = [x["step"] for x in lines if "train/loss" in x]
  assert train_steps == [2, 4, 6]
  assert all(x["train/distill_loss"] > 0 for x in lines if "train/loss" in x)
  assert {"eval/top1", "eval/ema_top1", "eval/top5"} <= set(lines[-1])
  assert os.path.isdir(os.path.join(straight, "tensorboard"))
  # --config.profile="2:4": a trace of steps 2 and 3 that TensorBoard's profile plugin opens.
  (trace_dir,) = os.listdir(os.path.join(straight, "tensorboard", "plugins", "profile"))
  traces = os.listdir(os.path.join(straight, "tensorboard", "plugins", "profile", trace_dir))
  assert any(name.endswith(".xplane.pb") for name in traces), traces
  # The run's identity (run.json) and the checkpoint's data position refuse a relaunch on another
  # data stream up front; the identity names the field first.
  c.data.batch_size = 32
  shutil.rmtree(os.path.join(interrupted, "checkpoints", "6"))
  with pytest.raises(ConfigError, match=r"1 changed: data.batch_size: 16 -> 32") as e:
    loop.train_and_evaluate(c, interrupted)
  assert e.value.field == "data.batch_size"
  c.resume = "override"  # past the identity, the data position still refuses it
  with pytest.raises(ConfigError, match=r"data.batch_size=16, this run has 32") as e:
    loop.train_and_evaluate(c, interrupted)
  # A shorter schedule would relabel the step-4 state as step 2 and let ckpt.keep delete step 4.
  c.data.batch_size, c.schedule.steps = 16, 2
  with pytest.raises(ConfigError, match=r"ends at step 2, but .* holds step 4") as e:
    loop.train_and_evaluate(c, interrupted)
  assert e.value.field == "schedule.steps"
  assert sorted(os.listdir(os.path.join(interrupted, "checkpoints"))) == ["2", "4"]


def test_a_distillation_stopped_half_way_resumes_exactly_across_the_switch(
  tmp_path, teacher_export, tiny_config, capsys
):
  """transfer.until=0.5 of 6 steps: steps 1-3 distil, 4-6 train on labels alone. Killed after the step-2
  checkpoint, the relaunch crosses the switch where the straight run did, bitwise."""
  c = tiny_config(steps=6, mode="distill", layers="first:1", until=0.5)
  c.teacher.init = teacher_export
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  loop.train_and_evaluate(c, straight)
  said = capsys.readouterr().out
  assert "for the first 50% of steps (steps 1-3, then labels alone)" in said
  assert "step 4: the distillation ends (transfer.until); labels alone from here" in said
  # The progress lines name the phase each logged step trained, and drop the placeholder distill_loss.
  assert re.search(r"train\[distill\] +2/6 .*\| distill_loss ", said), said
  assert re.search(r"train\[none\] +4/6 ", said) and "6/6" in said, said
  assert not re.search(r"[46]/6 .*distill_loss", said), said
  loop.train_and_evaluate(c, interrupted)
  # Killed after the step-2 checkpoint: the later ones and the export never happened.
  for step in ("4", "6"):
    shutil.rmtree(os.path.join(interrupted, "checkpoints", step))
  shutil.rmtree(os.path.join(interrupted, paths.EXPORT_DIR))
  loop.train_and_evaluate(c, interrupted)
  _, a = checkpoint.load_params(os.path.join(straight, paths.EXPORT_DIR))
  _, b = checkpoint.load_params(os.path.join(interrupted, paths.EXPORT_DIR))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  lines = metrics.read_jsonl(os.path.join(straight, "metrics.jsonl"))
  distill = {x["step"]: x["train/distill_loss"] for x in lines if "train/loss" in x}
  assert distill[2] > 0 and distill[4] == distill[6] == 0, distill


@pytest.mark.slow
def test_evaluate_checkpoint_reproduces_logged_eval(teacher_export, tiny_config):
  workdir = os.path.dirname(teacher_export)
  logged = [
    x for x in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/top1" in x
  ][-1]
  got = loop.evaluate_checkpoint(tiny_config(steps=4, mode="none"), workdir)
  # The logged line also holds the running best (eval/best_*), which is no figure of one checkpoint.
  evaluated = {k: v for k, v in logged.items() if k.startswith("eval/") and "/best_" not in k}
  assert got == {k[len("eval/") :]: v for k, v in evaluated.items()}
  # Not the run's model: refused by field, before anything is built. Other eval data: evaluated.
  other = tiny_config(steps=4, mode="none")
  other.model.drop_path = 0.3
  with pytest.raises(ConfigError, match=r"model.drop_path: 0.0 -> 0.3.* Evaluate it with its") as e:
    loop.evaluate_checkpoint(other, workdir)
  assert e.value.field == "model.drop_path"
  elsewhere = tiny_config(steps=4, mode="none")
  elsewhere.data.eval_split = "test[800:1200]"
  assert set(loop.evaluate_checkpoint(elsewhere, workdir)) == set(got)  # not refused


@pytest.mark.slow
def test_copy_mode_trains_and_evaluates_with_teacher(tmp_path, teacher_export, tiny_config):
  """...and its exports, which are no models on their own (they attend with the teacher's maps), are
  refused as a teacher, for export to PyTorch and by launch/evaluate.py, naming what they are."""
  c = tiny_config(steps=2, mode="copy", layers="all")
  c.teacher.init = teacher_export
  evals = loop.train_and_evaluate(c, str(tmp_path / "copy"))
  assert 0 <= evals["top1"] <= 100 and evals["top5"] >= evals["top1"]
  student = str(tmp_path / "copy" / paths.EXPORT_DIR)
  distill = tiny_config(steps=2, mode="distill")
  distill.teacher.init = student
  with pytest.raises(ConfigError, match=f"student of an attention-copy run.*{teacher_export}") as e:
    validation.validate(distill, str(tmp_path / "distill"))
  assert e.value.field == "teacher.init"
  with pytest.raises(ConfigError, match="an export to PyTorch needs a model on its own"):
    convert_export.export(student, str(tmp_path / "timm"), "timm")
  evaluate = subprocess.run(
    [sys.executable, "launch/evaluate.py", "--config=configs/demo.py", f"--ensemble={student}"],
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    env=subprocess_env(),
    capture_output=True,
    text=True,
  )
  assert evaluate.returncode == 2 and "attention-copy run" in evaluate.stderr, evaluate.stderr


@pytest.mark.slow
def test_copy_mode_with_teacher_and_workdir_in_a_bucket_equals_on_disk(
  tmp_path, teacher_export, tiny_config, gcs_bucket
):
  """teacher.init=gs://... and --workdir=gs://...: the same evaluations and export as on disk."""
  import fsspec  # pylint: disable=import-outside-toplevel

  remote_teacher = f"{gcs_bucket[0]}/copy_teacher/params"
  fsspec.filesystem("gs").put(teacher_export, remote_teacher, recursive=True)
  results = {}
  for where, teacher, workdir in (
    ("disk", teacher_export, str(tmp_path)),
    ("bucket", remote_teacher, f"{gcs_bucket[0]}/copy_run"),
  ):
    c = tiny_config(steps=2, mode="copy", layers="all")
    c.teacher.init = teacher
    results[where] = (
      loop.train_and_evaluate(c, workdir),
      checkpoint.load_params(f"{workdir}/{paths.EXPORT_DIR}")[1],
      checkpoint.load_params(f"{workdir}/{paths.EMA_EXPORT_DIR}")[1],
    )
  assert results["bucket"][0] == results["disk"][0]
  jax.tree.map(np.testing.assert_array_equal, results["bucket"][1], results["disk"][1])
  jax.tree.map(np.testing.assert_array_equal, results["bucket"][2], results["disk"][2])


def test_a_teacher_export_put_in_place_by_hand_is_used_as_it_is(tmp_path, tiny_config, capsys):
  """<workdir>/teacher/params without the run that would write it (no checkpoints, no results.json):
  not trained over, not an error; its evals are unknown."""
  c = tiny_config(steps=2, mode="distill")
  c.teacher.pretrain = tiny_config(steps=2, mode="none")
  export = _random_teacher(str(tmp_path / "teacher" / paths.EXPORT_DIR))
  before = os.path.getmtime(os.path.join(export, "model_config.json"))
  assert job.ensure_teacher(c, str(tmp_path)) is None
  assert "holds an export without its run" in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(export, "model_config.json")) == before
  assert not os.path.exists(tmp_path / "teacher" / "checkpoints")


@pytest.mark.slow
def test_run_with_teacher_trains_then_reuses_teacher(tmp_path, tiny_config):
  c = tiny_config(steps=2, mode="distill")
  t = tiny_config(steps=2, mode="none")
  t.lock()
  c.teacher.pretrain = t
  results = job.run_with_teacher(c, str(tmp_path))
  assert set(results) == {"teacher", "student"}
  exported = os.path.join(tmp_path, paths.TEACHER_DIR, paths.EXPORT_DIR, "model_config.json")
  assert json.load(open(exported))["patch_size"] == 7
  mtime = os.path.getmtime(exported)
  again = job.run_with_teacher(c, str(tmp_path))  # resumes: teacher kept, student already done
  assert os.path.getmtime(exported) == mtime and again == results


def test_bad_student_config_fails_before_teacher_training(tmp_path, tiny_config):
  c = tiny_config(
    steps=2, mode="distill", layers="end_layer:-2"
  )  # Pico has depth 2: selects nothing
  c.teacher.pretrain = tiny_config(steps=2, mode="none")
  with pytest.raises(ConfigError, match="end_layer"):
    job.run_with_teacher(c, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, paths.TEACHER_DIR))


@pytest.mark.slow
def test_mae_pretraining_exports_a_teacher(tmp_path, tiny_config):
  """task='mae' learns without labels; its export is the encoder, a working teacher for distillation."""
  c = mae_fmnist.get_config()
  c.unlock()
  c.model.variant = "Pico/7"
  c.mae.update(dict(decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64))
  c.data.update(
    dict(
      batch_size=16,
      eval_batch_size=400,
      train_split="train[:320]",
      eval_split="test[:400]",
      num_threads=0,
    )
  )
  c.schedule.update(dict(steps=4, log_every_steps=2))
  c.mesh.update(dict(data=4, fsdp=2))
  evals = loop.train_and_evaluate(c, str(tmp_path / "mae"))
  assert set(evals) == {"loss", "ema_loss"} | {
    f"best_{name}{suffix}" for name in ("loss", "ema_loss") for suffix in ("", "_step")
  }
  assert 0 < evals["loss"] < 5 and evals["best_loss"] == evals["loss"]  # one evaluation: the last
  export = str(tmp_path / "mae" / paths.EXPORT_DIR)
  model_config, params = checkpoint.load_params(export)
  assert (
    model_config["num_classes"] == 0 and "decoder_embed" not in params and "Transformer" in params
  )
  student = tiny_config(steps=2, mode="distill")
  student.teacher.init = export
  assert 0 <= loop.train_and_evaluate(student, str(tmp_path / "student"))["top1"] <= 100


@pytest.mark.slow
def test_a_diverged_state_is_never_saved_and_the_named_checkpoint_is_good(tmp_path, tiny_config):
  # Saves every 2 steps, logs only the last: the divergence must stop the run at a save, and what the
  # message names must be committed and finite. The warm-up's first step (lr 0) keeps step 2 finite.
  c = tiny_config(steps=8, mode="none")
  c.schedule.update(dict(log_every_steps=8, warmup_epochs=0.3))  # 6 of 20 steps per epoch
  c.optim.base_lr = 1e36
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d+;") as e:
    loop.train_and_evaluate(c, str(tmp_path))
  stopped_at = int(re.search(r"at step (\d+);", str(e.value))[1])
  named = int(re.search(r"the last good checkpoint \(step (\d+)\)", str(e.value))[1])
  directory = tmp_path / "checkpoints"
  committed = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  assert stopped_at < 8 and committed[-1] == named < stopped_at
  for step in committed:
    restored = ocp.StandardCheckpointer().restore(directory / str(step) / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_a_run_shortened_by_schedule_steps_cuts_its_warmup_and_says_so(tiny_config, capsys):
  c = tiny_config(steps=3, mode="none")  # the demo's warm-up: 0.2 of 20 steps per epoch, 4 steps
  run = runs.setup(c, "/nonexistent-workdir")
  peak = float(run.schedule(2))  # a 2-step warm-up: its peak at the last step
  assert [float(run.schedule(i)) for i in range(3)] == pytest.approx([0.0, 0.5 * peak, peak])
  loop._describe(run, 0)  # pylint: disable=protected-access
  assert "warm-up cut from 4 to 2 steps (schedule.steps)" in capsys.readouterr().out


def _setup_error(c):
  with pytest.raises(ConfigError) as e:
    runs.setup(c, "/nonexistent-workdir")
  return e.value


@pytest.mark.parametrize(
  "change,field",
  [
    (lambda c: c.transfer.update(dict(mode="attend")), "transfer.mode"),
    (lambda c: c.transfer.update(dict(layers="0,9")), "transfer.layers"),
    (lambda c: c.transfer.update(dict(heads="last:3")), "transfer.heads"),
    (lambda c: c.transfer.update(dict(loss_impl="flash")), "transfer.loss_impl"),
    (lambda c: c.data.update(dict(image_size=30)), "data.image_size"),
    (lambda c: c.data.update(dict(batch_size=12)), "data.batch_size"),
    (lambda c: c.mesh.update(dict(data=3, fsdp=2)), "mesh"),
    (lambda c: c.model.update(dict(variant="Giant/7")), "model.variant"),
    (lambda c: c.data.update(dict(name="imagenet2012", dir="/nonexistent")), "data.dir"),
    (lambda c: c.teacher.update(dict(init="")), "teacher.init"),
    (
      lambda c: c.teacher.update(dict(init="/nonexistent/mae_pretrain_vit_large.pth")),
      "teacher.init",
    ),
    (lambda c: c.update(dict(task="mim")), "task"),
    (lambda c: c.update(dict(task="mae")), "transfer.mode"),
  ],
)
def test_bad_configs_fail_before_compute(change, field, teacher_export, tiny_config):
  c = tiny_config(mode="distill")
  c.teacher.init = teacher_export
  change(c)
  assert _setup_error(c).field == field


def test_student_mirrors_teacher_architecture(tmp_path, tiny_config):
  """model.arch='teacher': the teacher's architecture (here with registers, LayerScale, QK-norm),
  freshly initialised, with the student's own recipe fields."""
  t = tiny_config(steps=2, mode="none")
  t.model.update(dict(num_classes=0, pool="cls"))
  teacher = vit.build(
    vit.mirror(
      {
        "variant": "Pico/7",
        "num_registers": 2,
        "layerscale_init": 0.1,
        "qk_norm": True,
        "pre_norm": True,
        "num_classes": 0,
      },
      t.model.to_dict(),
    )
  )
  params = teacher.init(jax.random.key(0), np.zeros((1, 28, 28, 3), np.float32), train=False)[
    "params"
  ]
  export = str(tmp_path / "teacher")
  checkpoint.save_params(export, params, vit.model_fields(teacher))
  c = tiny_config(steps=2, mode="distill")
  c.teacher.init = export
  c.model.update(dict(arch="teacher", variant="Nano/4", drop_path=0.1))  # shape fields ignored
  run = runs.setup(c, str(tmp_path / "student"))
  m = run.model
  assert (m.num_registers, m.layerscale_init, m.qk_norm, m.pre_norm, m.patch_size, m.width) == (
    2,
    0.1,
    True,
    True,
    7,
    32,
  )
  assert (m.num_classes, m.pool, m.drop_path) == (10, "gap", 0.1)
  evals = loop.train_and_evaluate(c, str(tmp_path / "student"))
  assert 0 <= evals["top1"] <= 100
  c.model.arch = "twin"
  assert _setup_error(c).field == "model.arch"


def test_teacher_at_another_image_size_needs_resampling(tmp_path, teacher_export, tiny_config):
  c = tiny_config(steps=2, mode="distill")
  c.teacher.init = teacher_export  # trained at 28 px: a 4x4 patch grid
  c.data.image_size = 42  # 6x6 at patch 7
  err = _setup_error(c)
  assert err.field == os.path.abspath(teacher_export) or err.field == teacher_export
  assert "resample_posemb" in str(err)
  c.teacher.resample_posemb = True
  run = runs.setup(c, str(tmp_path))
  assert run.teacher_params["pos_embedding"].shape == (1, 37, 32)
  assert run.teacher.tokens_for(42) == 37 == run.model.tokens_for(42)


@pytest.mark.slow
def test_model_init_fine_tunes_from_an_export(tmp_path, teacher_export, tiny_config):
  """model.init loads every matching leaf (lr 0 keeps them bitwise); a head of another size stays fresh."""
  _, loaded = checkpoint.load_params(teacher_export)
  c = tiny_config(steps=1, mode="none")
  c.model.init = teacher_export
  c.model.scan = True  # the export is in the loop layout: converted on load
  c.optim.base_lr = 0.0
  loop.train_and_evaluate(c, str(tmp_path / "same"))
  _, tuned = checkpoint.load_params(os.path.join(tmp_path, "same", paths.EXPORT_DIR))
  jax.tree.map(np.testing.assert_array_equal, vit.scan_to_loop(tuned), loaded)

  fresh = {
    "head": {"kernel": np.zeros((32, 7)), "bias": np.zeros(7)},
    "fc_norm": {"scale": np.ones(32)},
  }
  pretrained = {
    "head": {"kernel": np.ones((32, 10)), "bias": np.ones(10)},
    "fc_norm": {"scale": np.full(32, 2.0)},
    "encoder_norm": {"scale": np.ones(32)},
  }
  params, kept, unused = teachers.init_from_pretrained(fresh, pretrained, scan=False)
  np.testing.assert_array_equal(params["fc_norm"]["scale"], 2.0)
  np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
  assert kept == ["['head']['bias']", "['head']['kernel']"]
  assert unused == ["['encoder_norm']['scale']", "['head']['bias']", "['head']['kernel']"]
  c.model.init = "/nonexistent/weights.pth"
  assert _setup_error(c).field == "model.init"


def test_missing_teacher_file_names_path(teacher_export, tiny_config):
  c = tiny_config(mode="distill")
  c.teacher.init = "/nonexistent/teacher"
  err = _setup_error(c)
  assert "/nonexistent/teacher" in str(err) and "teacher.init" in str(err)


def test_teacher_with_other_patch_size_hands_over_maps_only(tmp_path, teacher_export, tiny_config):
  """Its maps are resampled onto the student's grid (tests/transfer/test_grids.py); q, k and v, which
  go token by token, are refused naming the teacher."""
  c = tiny_config(mode="distill", what="q")
  c.teacher.init = teacher_export
  c.model.variant = "Pico/4"
  assert _setup_error(c).field == "teacher.init"
  c.transfer.what = "attn"
  assert runs.setup(c, str(tmp_path / "maps")).transfer.token_map == (1, 0, 4, 1, 7)


def _validate_error(c, workdir):
  with pytest.raises(ConfigError) as e:
    validation.validate(c, str(workdir))
  return e.value


@pytest.mark.parametrize(
  "field,value",
  [
    ("optim.grad_clip", -1.0),
    ("optim.base_lr", -1e-3),
    ("optim.base_lr", float("nan")),
    ("optim.min_lr", -1e-6),
    ("optim.b1", 1.0),
    ("optim.b2", -0.1),
    ("optim.eps", 0.0),
    ("optim.weight_decay", -0.05),
    ("optim.layer_decay", 0.0),
    ("optim.layer_decay", 1.5),
    ("optim.label_smoothing", 1.0),
    ("optim.label_smoothing", -0.1),
    ("optim.ema_decay", 1.0),
    ("optim.ema_decay", -0.5),
    ("schedule.steps", -1),
    ("schedule.log_every_steps", 0),
  ],
)
def test_out_of_range_optim_and_schedule_fields_fail_validation(
  tmp_path, field, value, tiny_config
):
  c = tiny_config(mode="none")
  group, name = field.split(".")
  c[group][name] = value
  err = _validate_error(c, tmp_path)
  assert err.field == field and repr(value) in str(err)


def test_range_boundaries_pass_validation(tmp_path, tiny_config):
  """The edges that mean something (off, no decay, no smoothing, EMA = params) are accepted."""
  c = tiny_config(mode="none")
  c.optim.update(
    dict(
      base_lr=0.0,
      min_lr=0.0,
      b1=0.0,
      b2=0.0,
      weight_decay=0.0,
      layer_decay=1.0,
      grad_clip=0.0,
      label_smoothing=0.0,
      ema_decay=0.0,
    )
  )
  c.schedule.update(dict(steps=0, log_every_steps=1))
  validation.validate(c, str(tmp_path))


def test_layer_decay_is_rejected_for_mae_pretraining(tmp_path, tiny_config):
  """MAE's param tree has no layer ids for optim.layer_decay_scales: a decay < 1 would silently do nothing."""
  c = mae_fmnist.get_config()
  c.unlock()
  c.model.variant = "Pico/7"
  c.data.eval_batch_size = 400  # divisible by the 8 emulated devices
  c.optim.layer_decay = 0.75
  err = _validate_error(c, tmp_path)
  assert err.field == "optim.layer_decay" and "task='mae'" in str(err)
  c.optim.layer_decay = 1.0
  validation.validate(c, str(tmp_path))
  classify = tiny_config(mode="none")  # fine-tuning a classifier: layer decay is meaningful
  classify.optim.layer_decay = 0.75
  validation.validate(classify, str(tmp_path))


@pytest.mark.slow
def test_skipped_examples_count_survives_resume(tmp_path, monkeypatch, tiny_config, damaged_source):
  """train/skipped_examples counts the whole run: a resumed run logs what an uninterrupted one does."""
  bad = {1: "garbage", 2: "truncated", 40: "garbage"}  # met once per epoch of 4 steps

  def make_source(name, split, data_dir=None, **options):
    del name, data_dir, options
    return (
      damaged_source(64, bad, size=28)
      if split.startswith("train")
      else damaged_source(40, {}, size=28)
    )

  monkeypatch.setattr(sources, "make_source", make_source)
  c = tiny_config(steps=8, mode="none")
  c.data.eval_batch_size = 40
  straight = tmp_path / "straight"
  loop.train_and_evaluate(c, str(straight))

  def skipped_by_step(workdir):
    lines = metrics.read_jsonl(str(workdir / "metrics.jsonl"))
    return {x["step"]: x["train/skipped_examples"] for x in lines if "train/loss" in x}

  expected = skipped_by_step(straight)
  assert expected == {2: expected[2], 4: len(bad), 6: expected[6], 8: 2 * len(bad)}

  def kill_after_step_4(workdir):
    """What a run killed after its step-4 checkpoint leaves: checkpoints up to 4, metrics up to 4."""
    shutil.copytree(straight, workdir)
    for step in (6, 8):
      shutil.rmtree(workdir / "checkpoints" / str(step))
    shutil.rmtree(workdir / paths.EXPORT_DIR)
    kept = [x for x in metrics.read_jsonl(str(workdir / "metrics.jsonl")) if x["step"] <= 4]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))

  resumed = tmp_path / "resumed"
  kill_after_step_4(resumed)
  loop.train_and_evaluate(c, str(resumed))
  assert skipped_by_step(resumed) == expected

  # A checkpoint written before the count was saved resumes counting from 0.
  old = tmp_path / "old"
  kill_after_step_4(old)
  extra_file = old / "checkpoints" / "4" / "extra" / "metadata"
  extra = json.loads(extra_file.read_text())
  assert extra.pop("skipped_examples") == len(bad)
  extra_file.write_text(json.dumps(extra))
  loop.train_and_evaluate(c, str(old))
  assert skipped_by_step(old)[8] == len(bad)


def _evals_by_step(workdir) -> dict[int, dict]:
  """{step: the eval/ line of metrics.jsonl}; a relaunch writes lines again, the last one kept."""
  lines = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {x["step"]: x for x in lines if "eval/top1" in x}


def _lines(workdir) -> list[dict]:
  """metrics.jsonl's lines, ordered by step (a train line before an evaluation)."""
  lines = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return sorted(lines, key=lambda x: (x["step"], "eval/top1" in x))


@pytest.mark.slow
def test_a_run_killed_right_after_a_save_keeps_that_steps_train_line(
  tmp_path, tiny_config, monkeypatch
):
  """Step 4 is logged and saved; the run dies once its save is committed: the relaunch resumes at step
  5, so step 4's line must have been written before the save (it was written one step later)."""
  c = tiny_config(steps=6, mode="none")
  real_save = checkpoint.Checkpointer.save

  def save_then_die(self, step, *args, **kwargs):
    started = real_save(self, step, *args, **kwargs)
    if step == 4:
      self.wait()
      raise RuntimeError("killed after the save of step 4")
    return started

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
  with pytest.raises(RuntimeError, match="killed after the save"):
    loop.train_and_evaluate(c, str(tmp_path))
  monkeypatch.undo()
  loop.train_and_evaluate(c, str(tmp_path))
  steps = [x["step"] for x in _lines(tmp_path) if "train/loss" in x]
  assert steps == [2, 4, 6]


def _kill_after_checkpoint(straight, workdir, step: int) -> None:
  """What a run killed after its checkpoint at `step` leaves: checkpoints and metrics up to `step`, no
  exports (a killed run may also leave metrics past its checkpoint: the relaunch writes them again)."""
  shutil.copytree(straight, workdir)
  for later in os.listdir(workdir / "checkpoints"):
    if later.isdigit() and int(later) > step:
      shutil.rmtree(workdir / "checkpoints" / later)
  for export in (paths.EXPORT_DIR, paths.EMA_EXPORT_DIR):
    shutil.rmtree(workdir / export)
  kept = [x for x in metrics.read_jsonl(str(workdir / "metrics.jsonl")) if x["step"] <= step]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))


@pytest.mark.slow
def test_best_evaluation_is_reported_and_survives_resume(tmp_path, tiny_config, monkeypatch):
  """Evaluations every 0.1 epoch (2 steps): the run returns the last one and the running best, raw and
  EMA, as the reference's max accuracy; logged at each evaluation; a relaunch reports the same."""
  c = tiny_config(steps=8, mode="none")
  c.evals.every_epochs = 0.1  # 320 examples / 16 = 20 steps an epoch: steps 2, 4, 6 and the last, 8
  c.optim.base_lr = 3.0  # the constructed case: so high that the raw accuracy falls after step 2
  straight = tmp_path / "straight"
  results = loop.train_and_evaluate(c, str(straight))
  evals = _evals_by_step(straight)
  assert sorted(evals) == [2, 4, 6, 8]
  last = {k[len("eval/") :]: v for k, v in evals[8].items() if k.startswith("eval/")}
  assert {k: v for k, v in last.items() if not k.startswith("best_")} == {
    k: results[k] for k in ("top1", "top5", "ema_top1", "ema_top5")
  }
  for name in ("top1", "ema_top1"):
    values = [evals[step][f"eval/{name}"] for step in (2, 4, 6, 8)]
    assert results[f"best_{name}"] == max(values)
    assert results[f"best_{name}_step"] == (2, 4, 6, 8)[values.index(max(values))]  # the first
    running = [evals[step][f"eval/best_{name}"] for step in (2, 4, 6, 8)]
    assert running == [max(values[: i + 1]) for i in range(4)]
    assert last[f"best_{name}"] == results[f"best_{name}"]
  assert results["best_top1"] > results["top1"]  # the case: the best is not the last
  assert set(results) == {"top1", "top5", "ema_top1", "ema_top5"} | {
    f"best_{n}{s}" for n in ("top1", "ema_top1") for s in ("", "_step")
  }

  # Killed after the step-4 checkpoint, which carries the evaluations up to 4: the same best.
  resumed = tmp_path / "resumed"
  _kill_after_checkpoint(straight, resumed, 4)
  assert loop.train_and_evaluate(c, str(resumed)) == results
  assert _evals_by_step(resumed) == evals

  # Preempted at step 4 (SIGTERM during it; `stop_at` is the loop's view of the signal): it saves
  # before evaluating step 4 and logs step 4's train line; the relaunch evaluates step 4 first, then
  # goes on as the uninterrupted run did: the same results and the same log lines (step 4's train line
  # now before its evaluation).
  logged = _lines(straight)
  preempted = tmp_path / "preempted"
  real_stop_at = preemption.Training.stop_at
  monkeypatch.setattr(
    preemption.Training, "stop_at", lambda self, step: real_stop_at(self, step) or step == 4
  )
  with pytest.raises(preemption.Preempted, match="preempted at step 4"):
    loop.train_and_evaluate(c, str(preempted))
  monkeypatch.undo()
  assert sorted(_evals_by_step(preempted)) == [2]

  # Its relaunch evaluates step 4, then dies at step 5, before its next save: the next relaunch
  # evaluates step 4 again, and logs it once.
  def host_lost_at_5(self, step):
    if step == 5:
      raise RuntimeError("host lost at step 5")
    return real_stop_at(self, step)

  monkeypatch.setattr(preemption.Training, "stop_at", host_lost_at_5)
  with pytest.raises(RuntimeError, match="host lost"):
    loop.train_and_evaluate(c, str(preempted))
  monkeypatch.undo()
  assert sorted(_evals_by_step(preempted)) == [2, 4]
  assert loop.train_and_evaluate(c, str(preempted)) == results
  assert _lines(preempted) == logged
  # A finished run relaunched evaluates its last step again, and logs it once.
  assert loop.train_and_evaluate(c, str(straight)) == results
  assert _lines(straight) == logged


@pytest.mark.slow
def test_ema_params_are_exported_and_serve_as_teacher(tmp_path, teacher_export, tiny_config):
  """<workdir>/params_ema: the final checkpoint's EMA params, with the raw export's model config, usable
  as teacher.init."""
  workdir = os.path.dirname(teacher_export)
  ema_export = os.path.join(workdir, paths.EMA_EXPORT_DIR)
  ema_config, ema = checkpoint.load_params(ema_export)
  raw_config, raw = checkpoint.load_params(teacher_export)
  assert ema_config == raw_config
  c = tiny_config(steps=4, mode="none")
  run = runs.setup(c, workdir, check_targets=False)
  state, _, _, _ = loop._fresh_state_and_steps(run)
  ckpt = loop._checkpointer(run)
  state, extra = ckpt.restore(state)  # the latest: the final step's
  ckpt.close()
  assert extra["step"] == 4
  jax.tree.map(np.testing.assert_array_equal, ema, jax.device_get(state.ema_params))
  jax.tree.map(np.testing.assert_array_equal, raw, jax.device_get(state.params))
  differs = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), ema, raw))
  assert any(differs)  # EMA 0.99 over 4 steps is not the raw params
  student = tiny_config(steps=2, mode="distill")
  student.teacher.init = ema_export
  assert 0 <= loop.train_and_evaluate(student, str(tmp_path / "student"))["top1"] <= 100


def test_evaluation_steps_every_steps_or_epochs(tmp_path, tiny_config):
  """evals.every_epochs: the ends of every so many epochs (20 steps each here), fractions rounded to a
  step each; evals.every_steps: its multiples; the last step is the final evaluation, not in the set."""
  c = tiny_config(steps=40, mode="none")
  run = runs.setup(c, str(tmp_path))
  assert (run.steps_per_epoch, run.total_steps, run.eval_steps()) == (20, 40, frozenset())
  expected = {
    (0, 1.0): {20},
    (0, 0.5): {10, 20, 30},
    (0, 0.3): {6, 12, 18, 24, 30, 36},
    (0, 0.33): {7, 13, 20, 26, 33},  # 6.6 steps apart, without drift
    (0, 0.01): set(range(1, 40)),  # less than a step: every step
    (15, 0.0): {15, 30},
  }
  for (every_steps, every_epochs), steps in expected.items():
    run.config.evals.update(dict(every_steps=every_steps, every_epochs=every_epochs))
    assert run.eval_steps() == steps, (every_steps, every_epochs)
  c.evals.update(dict(every_steps=15, every_epochs=1.0))
  err = _validate_error(c, tmp_path)
  assert err.field == "evals.every_epochs" and "not both" in str(err)
  c.evals.update(dict(every_steps=0, every_epochs=-1.0))
  assert _validate_error(c, tmp_path).field == "evals.every_epochs"


@pytest.mark.parametrize("what", ["attn", "q", "k", "v", "features"])
@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_every_transfer_setting_validates_from_both_teacher_sources(
  tmp_path, teacher_export, tiny_config, mode, what
):
  """A teacher pre-trained in the run (teacher.pretrain, here the demo's MAE) and one exported before
  (teacher.init): feature distillation from the first failed on a field of the teacher's run config."""
  if mode == "copy" and what == "features":
    pytest.skip("features are distilled, not copied")
  pretrained = demo_pretraining_its_teacher(**{"transfer.mode": mode, "transfer.what": what})
  exported = tiny_config(mode=mode, what=what)
  exported.teacher.init = teacher_export
  for config in (pretrained, exported):
    validation.validate(config, str(tmp_path / "run"))


def _random_teacher(path: str, **fields) -> str:
  """A params export of a freshly initialised Pico ViT with `fields`: a teacher of another shape."""
  teacher = vit.build({"variant": "Pico/7", "num_classes": 0, **fields})
  images = np.zeros((1, 28, 28, 3), np.float32)  # the pipeline hands grey images over as RGB
  params = teacher.init(jax.random.key(3), images, train=False)["params"]
  checkpoint.save_params(path, jax.device_get(params), vit.model_fields(teacher))
  return path


@pytest.mark.parametrize(
  "teacher_fields,transfer,student_variant,expected",
  [
    # Deeper, more heads: uniform layers (student 0 <- teacher 1, 1 <- 3), grouped heads; the teacher
    # is cut after its deepest read layer.
    (
      dict(depth=4, num_heads=4),
      dict(layer_map="uniform", head_map="group"),
      "Pico/7",
      ((1, 3), 4, 16),
    ),
    # The same, each student head's mix of the teacher's heads learned with it (not in the export),
    # started from its group, sharpened (target_temperature), scored over patch tokens only
    # (transfer.prefix=drop: cls row and column out, renormalised).
    (
      dict(depth=4, num_heads=4),
      dict(
        layer_map="uniform",
        head_map="learned",
        head_mix_init="group",
        prefix="drop",
        target_temperature=0.5,
      ),
      "Pico/7",
      ((1, 3), 4, 16),
    ),
    # A teacher twice as wide (its heads too): the student's q mapped per layer to its width.
    (dict(width=64), dict(what="q"), "Pico/7", ((0, 1), 2, 16)),
    # A patch-4 student (7x7 = 49 patches) from a patch-7 teacher (4x4 = 16): maps resampled.
    (dict(), dict(), "Pico/4", ((0, 1), 2, 16)),
    # The same teacher shown the images at 49 px: a 7x7 grid, the student's (its table resampled).
    (dict(), dict(teacher_image_size=49), "Pico/4", ((0, 1), 2, 49)),
  ],
)
def test_a_teacher_of_another_shape_distils_through_the_loop(
  tmp_path, tiny_config, teacher_fields, transfer, student_variant, expected
):
  export = _random_teacher(str(tmp_path / "teacher"), **teacher_fields)
  size = transfer.pop("teacher_image_size", 0)
  c = tiny_config(steps=4, mode="distill", layers="all", **transfer)
  c.model.update(dict(variant=student_variant, drop_path=0.1))  # masks shared by mapped layer
  c.teacher.update(dict(init=export, image_size=size, resample_posemb=bool(size)))
  run = runs.setup(c, str(tmp_path / "student"))
  t = run.transfer
  patches = run.teacher.tokens_for(size or 28) - 1
  assert (t.teacher_layers, run.teacher.depth, patches) == expected
  assert t.student_prefix == (1 if transfer.get("prefix") == "drop" else 0)
  assert not t.token_map if size else True
  results = loop.train_and_evaluate(c, str(tmp_path / "student"))
  exported_config, exported = checkpoint.load_params(str(tmp_path / "student" / paths.EXPORT_DIR))
  assert not {"head_mix", "feature_proj"} & set(exported) and "head_mix" not in exported_config
  assert exported_config["feature_dim"] == 0
  lines = metrics.read_jsonl(str(tmp_path / "student" / "metrics.jsonl"))
  distill = [x["train/distill_loss"] for x in lines if "train/distill_loss" in x]
  assert distill and all(np.isfinite(distill)) and all(d > 0 for d in distill)
  assert 0 <= results["top1"] <= 100
  job.attention_report(c, str(tmp_path / "student"), num_images=2)  # the maps each layer was taught
  assert (tmp_path / "student" / "attention.png").stat().st_size > 5000


def test_a_student_takes_the_teachers_components_at_its_own_size(tmp_path, tiny_config):
  """model.arch=teacher_components: a register token, LayerScale and QK-norm from a deeper 4-head
  teacher, the student's own width, depth, heads and patch (Pico/7)."""
  export = _random_teacher(
    str(tmp_path / "teacher"),
    depth=4,
    num_heads=4,
    num_registers=1,
    layerscale_init=0.1,
    qk_norm=True,
  )
  c = tiny_config(mode="distill", layers="all", layer_map="uniform", head_map="group")
  c.teacher.init = export
  c.model.arch = "teacher_components"
  run = runs.setup(c, str(tmp_path / "student"))
  m = run.model
  assert (m.width, m.depth, m.num_heads, m.patch_size) == (32, 2, 2, 7)
  assert (m.num_registers, m.layerscale_init, m.qk_norm) == (1, 0.1, True)
  assert run.transfer.token_map == ()  # the same tokens: cls, one register, 16 patches


@pytest.mark.slow
def test_a_hugging_face_teacher_of_another_shape_distils_and_the_student_goes_to_timm(
  tmp_path, tiny_config
):
  """The issues' chain: a transformers DINOv2-with-registers folder (4 layers, 4 heads, a register) as
  teacher.init of the Pico/7 student (2 layers, 2 heads) through uniform layers, grouped heads and its
  register dropped from the maps; the trained student exported to timm, whose logits match ours."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from at_jax.convert import export  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  config = transformers.Dinov2WithRegistersConfig(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=28,
    patch_size=7, num_register_tokens=1,
  )  # fmt: skip
  folder = str(tmp_path / "dinov2_hf")
  transformers.Dinov2WithRegistersModel(config).save_pretrained(folder)
  c = tiny_config(steps=4, mode="distill", layers="all", layer_map="uniform", head_map="group")
  c.teacher.init = folder
  run = runs.setup(c, str(tmp_path / "student"))
  assert (run.teacher.num_registers, run.transfer.teacher_layers) == (1, (1, 3))
  assert run.transfer.token_map == (
    1,
    1,
    4,
    1,
    4,
  )  # cls kept, the register's row and column dropped
  loop.train_and_evaluate(c, str(tmp_path / "student"))
  export.export(str(tmp_path / "student" / paths.EXPORT_DIR), str(tmp_path / "timm"), "timm")
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel

  args = json.loads((tmp_path / "timm" / "timm_args.json").read_text())
  model = timm.create_model(args["model_name"], pretrained=False, **args["kwargs"]).eval()
  model.load_state_dict(safetensors.torch.load_file(str(tmp_path / "timm" / "model.safetensors")))
  fields, params = checkpoint.load_params(str(tmp_path / "student" / paths.EXPORT_DIR))
  images = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
  ours = vit.build(fields).apply({"params": params}, images, train=False)[0]
  with torch.no_grad():
    theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
