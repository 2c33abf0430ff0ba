"""Bad input is refused at start-up, naming the config field, before anything is compiled or a teacher
is trained: each case goes through `job.run_with_teacher` (what launch/main.py calls) on the demo."""

import os

import jax
import jax.numpy as jnp
import pytest

from at_jax.errors import ConfigError
from at_jax.experiment import job, validation
from configs import demo
from tests.conftest import demo_pretraining_its_teacher as _demo


def test_the_compile_check_sees_a_compilation(no_compiles):
  """The control: without it every test below could pass because nothing was being watched."""
  with pytest.raises(AssertionError, match="compiled before the error"), no_compiles():
    jnp.arange(7.0).sum().block_until_ready()


@pytest.mark.parametrize(
  "overrides,field",
  [
    ({"data.mixup": -1.0}, "data.mixup"),
    ({"profile": "4:2"}, "profile"),
    ({"profile": "steps 2-4"}, "profile"),
    ({"data.cutmix": -0.5}, "data.cutmix"),
    ({"data.mixup_prob": 1.5}, "data.mixup_prob"),
    ({"data.batch_size": 0}, "data.batch_size"),
    ({"data.batch_size": -8}, "data.batch_size"),
    ({"data.eval_batch_size": 0}, "data.eval_batch_size"),
    ({"data.batch_size": 100_000}, "data.batch_size"),  # more than the 60,000 training images
    ({"data.dir": "/nonexistent/fashion-mnist"}, "data.dir"),
    ({"data.train_split": "trian"}, "data.train_split"),
    ({"data.eval_split": "test[:abc]"}, "data.eval_split"),
    ({"ckpt.every_steps": -5}, "ckpt.every_steps"),
    ({"ckpt.keep": 0}, "ckpt.keep"),
    ({"evals.every_steps": -1}, "evals.every_steps"),
    ({"data.random_erase": 1.5}, "data.random_erase"),
    ({"data.randaugment": "rand-x9"}, "data.randaugment"),
    ({"data.rrc_scale": (0.9, 0.2)}, "data.rrc_scale"),
    ({"data.crop_pct": 0.0}, "data.crop_pct"),
    ({"optim.label_smoothing": 1.0}, "optim.label_smoothing"),
    ({"task": "segment"}, "task"),
    # Trained without a word before: a head too small for the labels, an impossible drop rate.
    ({"model.num_classes": 5}, "model.num_classes"),
    ({"model.drop_path": 1.5}, "model.drop_path"),
    # Found only after the teacher's training before.
    ({"transfer.weight": float("inf")}, "transfer.weight"),
    ({"data.num_threads": -1}, "data.num_threads"),
    ({"schedule.epochs": float("nan")}, "schedule.epochs"),
    ({"model.dtype_mm": "float16x"}, "model.dtype_mm"),
  ],
)
def test_bad_input_stops_before_anything_compiles(tmp_path, no_compiles, overrides, field):
  config = _demo(**overrides)
  with no_compiles(), pytest.raises(ConfigError) as e:
    job.run_with_teacher(config, str(tmp_path))
  assert e.value.field == field, str(e.value)
  assert not (tmp_path / "teacher").exists()  # the demo's MAE teacher was not trained first


def test_a_bad_teacher_recipe_stops_before_anything_compiles(tmp_path, no_compiles):
  """Named in full, as the flag that fixes it: the teacher's run config sits at teacher.pretrain."""
  config = _demo()
  config.teacher.pretrain.optim.b2 = 1.0
  with no_compiles(), pytest.raises(ConfigError) as e:
    job.run_with_teacher(config, str(tmp_path))
  assert e.value.field == "teacher.pretrain.optim.b2"
  assert e.value.line().startswith(
    "teacher.pretrain.optim.b2 (--config.teacher.pretrain.optim.b2): "
  )


@pytest.mark.parametrize("teacher", ["committed", "pre-trained"])
def test_the_demo_validates_without_compiling(tmp_path, no_compiles, teacher):
  """The control for the cases above: the same path accepts the unchanged demo, compiling nothing,
  with its committed teacher (the default) and with one pre-trained first."""
  config = _demo()
  if teacher == "committed":
    config.teacher.init = demo.STUDY_TEACHER
  with no_compiles():
    model, mesh, train_source, eval_source, memory = validation.validate(config, str(tmp_path))
  assert (len(train_source), len(eval_source)) == (60_000, 10_000)
  assert model.num_classes == 10 and mesh.size == 8
  assert memory.startswith("per-device memory estimate: params ") and "host RAM" in memory


def test_a_missing_bucket_is_refused_before_anything_compiles(tiny_config, gcs_bucket, no_compiles):
  c = tiny_config()
  with no_compiles(), pytest.raises(ConfigError, match="does not exist") as e:
    validation.validate(c, "gs://no-such-bucket/run")
  assert e.value.field == "--workdir"
  c.teacher.init = "gs://no-such-bucket/teacher/params"
  with no_compiles(), pytest.raises(ConfigError) as e:
    validation.validate(c, f"{gcs_bucket[0]}/run")
  assert e.value.field == "teacher.init"


def test_a_launch_validates_its_config_once_and_reads_its_teacher_once(
  tmp_path, tiny_config, monkeypatch
):
  """job.run_with_teacher checks the student's config before a teacher could train, and its run takes
  that result: the config is not validated a second time in the loop. The teacher's weights are read
  once for the run and its end-of-run report."""
  from at_jax.experiment import runs  # pylint: disable=import-outside-toplevel

  calls, original = [], validation.validate
  counted = lambda config, workdir, **kw: calls.append(workdir) or original(config, workdir, **kw)
  monkeypatch.setattr(job, "validate", counted)
  monkeypatch.setattr(runs.validation, "validate", counted)
  from at_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from at_jax.models import vit  # pylint: disable=import-outside-toplevel

  teacher = vit.build({"variant": "Pico/7", "num_classes": 0})
  params = teacher.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), train=False)["params"]
  checkpoint.save_params(
    str(tmp_path / "teacher"), jax.device_get(params), vit.model_fields(teacher)
  )
  c = tiny_config(steps=2, mode="distill")
  c.teacher.init = str(tmp_path / "teacher")
  reads, load_params = [], checkpoint.load_params
  monkeypatch.setattr(
    checkpoint, "load_params", lambda path, *a: reads.append(path) or load_params(path, *a)
  )
  job.run_with_teacher(c, str(tmp_path / "run"))
  assert calls == [str(tmp_path / "run")]
  # The teacher's weights are read once: the run placed them; the attention report reused them.
  assert os.path.exists(tmp_path / "run" / "attention.png")
  assert reads.count(c.teacher.init) == 1, reads


def test_an_odd_batch_that_mixes_is_refused_on_one_device():
  """With mixup/CutMix drawn per batch (data.mix_group_size=0) the middle example of an odd batch
  would be paired with itself, never mixed. Only a mesh of an odd device count admits an odd batch:
  one GPU, here one of the emulated devices."""
  from at_jax import sharding  # pylint: disable=import-outside-toplevel

  one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  config = _demo(**{"data.batch_size": 127, "data.mixup": 0.8})
  with pytest.raises(ConfigError, match="127 examples is odd") as e:
    validation._check_micro_batches(config, one)  # pylint: disable=protected-access
  assert e.value.field == "data.batch_size"
  config = _demo(**{"data.batch_size": 127})  # the control: no mixing, any batch
  validation._check_micro_batches(config, one)  # pylint: disable=protected-access
