"""Every config loads, is locked, and builds (abstractly); the ImageNet configs stop at once without data."""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import optim
from at_jax.errors import ConfigError
from at_jax.experiment import build, runs, teachers
from at_jax.models import vit
from at_jax.transfer import spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  os.path.splitext(os.path.basename(p))[0]
  for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
  if "def get_config" in open(p).read()  # common.py and miniature.py are helpers, not configs
)
IMAGENET_TRAIN = 1_281_167


def _load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def test_config_list():
  assert {"demo", "mae_fmnist", "mae_vitl"} | {
    f"{m}_vit{s}" for m in ("distill", "copy", "scratch", "finetune") for s in ("l", "b")
  } <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_locked_and_builds(name):
  c = _load(name)
  with pytest.raises(AttributeError):
    c.transfer.modee = "copy"  # locked: typos in overrides fail
  assert (
    "python launch/main.py --config=configs/" + name
    in importlib.import_module(f"configs.{name}").__doc__
  )
  model = vit.build(teachers.model_config(c, "/nonexistent-workdir"))
  size = c.data.image_size
  assert size % model.patch_size == 0
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  t = spec.resolve(c.transfer.to_dict(), model, model, size)  # teacher of the same architecture
  n = IMAGENET_TRAIN if c.data.name == "imagenet2012" else 60_000
  steps_per_epoch = n // c.data.batch_size
  schedule = optim.make_schedule(
    base_lr=c.optim.base_lr,
    batch_size=c.data.batch_size,
    warmup_steps=int(c.schedule.warmup_epochs * steps_per_epoch),
    total_steps=int(c.schedule.epochs * steps_per_epoch),
    min_lr=c.optim.min_lr,
  )
  optim.make_optimizer(
    abstract["params"],
    schedule=schedule,
    b1=c.optim.b1,
    b2=c.optim.b2,
    eps=c.optim.eps,
    weight_decay=c.optim.weight_decay,
    layer_decay=c.optim.layer_decay,
    depth=model.depth,
  )
  if c.teacher.pretrain is not None:
    vit.build(teachers.model_config(c.teacher.pretrain, "/nonexistent-workdir"))
  if name.endswith(("vitl", "vitb")) and not name.startswith("mae"):
    depth = 24 if name.endswith("vitl") else 12
    assert model.depth == depth and c.data.batch_size == (
      1024 if name.startswith("finetune") else 2048
    )
    assert (t.mode, len(t.layers)) == {
      "distill": ("distill", depth * 3 // 4),
      "copy": ("copy", depth),
      "scratch": ("none", 0),
      "finetune": ("none", 0),
    }[name.split("_")[0]]


def test_paper_recipe_values():
  d, cp = _load("distill_vitl"), _load("copy_vitl")
  assert (
    d.schedule.epochs,
    d.schedule.warmup_epochs,
    d.optim.base_lr,
    d.optim.b2,
    d.optim.weight_decay,
    d.model.drop_path,
    d.transfer.weight,
    d.optim.ema_decay,
  ) == (200, 20, 1e-4, 0.95, 0.3, 0.2, 3.0, 0.9999)
  assert (
    cp.schedule.epochs,
    cp.schedule.warmup_epochs,
    cp.optim.base_lr,
    cp.optim.b2,
    cp.optim.weight_decay,
    cp.optim.layer_decay,
    cp.model.drop_path,
  ) == (100, 5, 1e-3, 0.999, 0.05, 0.75, 0.0)
  assert np.isclose(d.optim.base_lr * d.data.batch_size / 256, 8e-4)


def test_paper_recipe_steps_round_an_epoch_down():
  """An epoch is the full batches of ImageNet's 1,281,167 images (training batches drop the
  remainder): 625 steps of 2048, so 200 epochs are 125,000 steps, 20 of warm-up 12,500."""
  d = _load("distill_vitl")
  assert (d.data.batch_size, d.schedule.epochs, d.schedule.steps) == (2048, 200, 0)
  assert build.steps_per_epoch(d, IMAGENET_TRAIN) == 625
  assert build.schedule(d, IMAGENET_TRAIN)[1] == 200 * 625
  assert build.warmup_steps(d, IMAGENET_TRAIN) == 20 * 625


@pytest.mark.parametrize(
  "name", ["distill_vitl", "copy_vitl", "scratch_vitl", "mae_vitl", "scratch_vitb"]
)
def test_imagenet_configs_stop_at_once_without_data(name, tmp_path):
  c = _load(name)
  c.data.dir = str(tmp_path)  # no ImageNet prepared here
  with pytest.raises(ConfigError) as e:
    runs.setup(c, str(tmp_path))
  assert e.value.field == "data.dir" and "imagenet2012" in str(e.value)


@pytest.mark.parametrize("name", ["finetune_vitl", "finetune_vitb"])
def test_finetune_configs_stop_at_once_without_weights(name, tmp_path):
  with pytest.raises(ConfigError) as e:
    runs.setup(_load(name), str(tmp_path))
  assert e.value.field == "model.init" and "--config.model.init=" in str(e.value)


@pytest.mark.parametrize("name", ["distill_vitl", "copy_vitl", "distill_vitb"])
def test_imagenet_configs_stop_at_once_without_teacher(name, tmp_path):
  c = _load(name)
  # Real images at hand (Fashion-MNIST), but no teacher checkpoint set.
  c.data.update(
    dict(
      name="fashion_mnist", train_split="train", eval_split="test", normalization="fashion_mnist"
    )
  )
  with pytest.raises(ConfigError) as e:
    runs.setup(c, str(tmp_path))
  assert e.value.field == "teacher.init"
