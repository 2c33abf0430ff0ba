"""The PyTorch reference's own training checkpoints (at_jax.convert.selection): a dual teacher + student
model saved as its util/misc.save_model does, with optimizer, epoch, scaler, EMA and a pickled argparse
Namespace. None were released, so each test writes one from timm parts (as models_dual_vit.py builds it:
`DualVisionTransformer.teacher` / `.student`, global_pool=True, i.e. timm's avg pool + fc_norm).

Each selection converts to what its timm tower computes; exports evaluate and ensemble on the eval split
as timm's towers do; selectors the file lacks, a dual file without a tower where one must be named, a
copy-mode student, and pickled code are ConfigErrors, the last without running anything.
"""

import argparse
import copy
import os

import jax
import numpy as np
import pytest
import torch

from at_jax import checkpoint
from at_jax.convert import __main__ as cli
from at_jax.convert.load import load_checkpoint
from at_jax.errors import ConfigError

# Pico/7 (the tiny_config student): Fashion-MNIST's 28x28 images, 10 classes; width 32 needs num_heads.
_TOWER = dict(
  img_size=28,
  patch_size=7,
  embed_dim=32,
  num_heads=2,
  mlp_ratio=2.0,
  num_classes=10,
  global_pool="avg",
)


class _Dual(torch.nn.Module):
  """The reference's DualVisionTransformer as its state dict sees it: `teacher.*` and `student.*`."""

  def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module):
    super().__init__()
    self.teacher, self.student = teacher, student


class _Opaque:
  """An arbitrary class: weights-only loading must refuse to build it."""


class _RunsCode:
  """Unpickling calls os.system: a checkpoint that would run a command."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def _args(mode: str) -> argparse.Namespace:
  """Some of main_finetune.py's arguments, as a run records them (None, tuples, lists and all)."""
  return argparse.Namespace(
    model="dual_vit_base_patch16",
    mode=mode,
    end_layer=-6,
    atd_weight=3.0,
    input_size=28,
    nb_classes=10,
    global_pool=True,
    drop_path=0.2,
    blr=1e-4,
    lr=None,
    cutmix_minmax=None,
    aa="rand-m9-mstd0.5-inc1",
    betas=(0.9, 0.95),
    output_dir="./output_dir",
    gpu_ids=[0, 1],
  )


@pytest.fixture
def reference_checkpoint(tmp_path, make_vit):
  """`write(mode="distill", ema=True, **extra)`: (path, {tower name: timm model}) of a reference checkpoint
  {"model", "optimizer", "epoch", "scaler", "args"[, "model_ema"]}; `extra` entries are added or replace."""

  def write(mode: str = "distill", ema: bool = True, **extra) -> tuple[str, dict]:
    teacher, student = make_vit(0, **_TOWER), make_vit(1, **_TOWER)
    dual = _Dual(teacher, student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95))
    student(torch.zeros(2, 3, 28, 28)).sum().backward()
    optimizer.step()
    # ModelEmaV2 averages the whole dual model; its teacher is frozen, so equal to the raw teacher.
    ema_dual = _Dual(copy.deepcopy(teacher), make_vit(2, **_TOWER))
    to_save = {
      "model": dual.state_dict(),
      "optimizer": optimizer.state_dict(),
      "epoch": 3,
      "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
      "args": _args(mode),
    }
    if ema:
      to_save["model_ema"] = ema_dual.state_dict()
    to_save.update(extra)
    path = str(tmp_path / f"checkpoint-{mode}-{len(os.listdir(tmp_path))}.pth")
    torch.save(to_save, path)
    models = {"teacher": teacher, "student": student, "ema_student": ema_dual.student}
    return path, models

  return write


@pytest.mark.parametrize(
  "selector, default_tower, tower",
  [
    ("", "student", "student"),  # model.init and evaluation: the raw student
    ("#student", None, "student"),
    ("#model.student", None, "student"),
    ("#teacher", None, "teacher"),
    ("#model_ema.student", None, "ema_student"),
    ("#model_ema", "student", "ema_student"),
    ("#model_ema.teacher", None, "teacher"),
  ],
)
def test_each_selection_computes_its_towers_logits(
  selector, default_tower, tower, reference_checkpoint, make_images, assert_same
):
  path, models = reference_checkpoint()
  config, params = load_checkpoint(path + selector, num_heads=2, default_tower=default_tower)
  assert (config["pool"], config["num_classes"], config["depth"]) == ("gap", 10, 2)
  assert_same(config, params, models[tower], make_images(3, 28))


def test_a_dual_checkpoint_without_a_tower_asks_for_one(reference_checkpoint):
  path, _ = reference_checkpoint()
  with pytest.raises(ConfigError, match=r"name the tower.*#student.*#teacher") as e:
    load_checkpoint(path, num_heads=2)  # the converter's (and teacher.init's) default: no guess
  assert e.value.field == path
  assert cli.main([path, path + ".export", "--num_heads", "2"]) == 2
  assert not os.path.exists(path + ".export")


def test_selectors_the_file_does_not_have_are_named(reference_checkpoint, good_file):
  path, _ = reference_checkpoint(ema=False)
  for selector, message in (
    (
      "#studnt",
      r"'studnt'.*neither an entry.*model, optimizer, epoch.*nor a key prefix.*student, teacher",
    ),
    ("#model_ema.student", r"'model_ema'.*neither an entry.*nor a key prefix.*student, teacher"),
    ("#student.student", r"'student'.*key prefix of its state dict \(blocks, cls_token"),
    ("#epoch", r"'epoch'.*neither an entry of the file holding weights"),
    ("#model..student", r"empty name"),
  ):
    with pytest.raises(ConfigError, match=message) as e:
      load_checkpoint(path + selector, num_heads=2)
    assert e.value.field == path + selector
  plain = good_file("plain.pth")  # one timm ViT: nothing under `student.`
  with pytest.raises(ConfigError, match=r"'student'.*key prefix.*blocks, cls_token"):
    load_checkpoint(plain + "#student", num_heads=2)
  npz = good_file("bv.npz")
  with pytest.raises(ConfigError, match=r"a \.npz holds one model") as e:
    load_checkpoint(npz + "#teacher")
  assert e.value.field == npz + "#teacher"


def test_a_copy_mode_student_is_refused_its_teacher_converts(reference_checkpoint):
  path, _ = reference_checkpoint(mode="copy")
  for selector in ("#student", "#model_ema.student"):
    with pytest.raises(ConfigError, match=r"'copy' run.*not converted.*#teacher"):
      load_checkpoint(path + selector, num_heads=2)
  with pytest.raises(ConfigError, match=r"'copy' run"):
    load_checkpoint(path, num_heads=2, default_tower="student")
  config, _ = load_checkpoint(path + "#teacher", num_heads=2)
  assert config["width"] == 32


@pytest.mark.parametrize("where", ["args", "in_namespace", "in_optimizer"])
def test_pickled_code_is_refused_and_never_runs(where, tmp_path, reference_checkpoint):
  marker = str(tmp_path / "ran")
  payload = _RunsCode(marker)
  extra = {
    "args": {"args": payload},
    "in_namespace": {"args": argparse.Namespace(model="dual_vit_base_patch16", hook=payload)},
    "in_optimizer": {"optimizer": {"state": {}, "param_groups": [{"lr": payload}]}},
  }[where]
  path, _ = reference_checkpoint(**extra)
  with pytest.raises(ConfigError, match=r"holds a Python object \((posix|os)\.system\)") as e:
    load_checkpoint(path + "#student", num_heads=2)
  assert e.value.field == path
  assert not os.path.exists(marker)
  opaque, _ = reference_checkpoint(args=_Opaque())
  with pytest.raises(ConfigError, match=r"holds a Python object \(\S+_Opaque\).*nothing of it ran"):
    load_checkpoint(opaque + "#student", num_heads=2)


def test_cli_writes_student_and_teacher_exports(tmp_path, reference_checkpoint):
  path, _ = reference_checkpoint()
  for tower in ("student", "teacher"):
    dst = str(tmp_path / tower)
    assert cli.main([f"{path}#{tower}", dst, "--num_heads", "2"]) == 0
    config, params = load_checkpoint(f"{path}#{tower}", num_heads=2)
    loaded_config, loaded = checkpoint.load_params(dst)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_exports_evaluate_and_ensemble_as_timm_does(
  tmp_path, tiny_config, reference_checkpoint, assert_same
):
  """launch/evaluate.py --ensemble's path (teachers.load_vit, ensembles.ensemble_accuracy) on the eval
  split: each member's and the ensemble's top-1/top-5 are timm's, the export as the file."""
  from at_jax.data import options, pipeline, sources
  from at_jax.evaluate import ensembles
  from at_jax.experiment import teachers
  from at_jax.models import vit

  c = tiny_config()
  c.teacher.num_heads = 2
  path, models = reference_checkpoint()
  exported = str(tmp_path / "student_export")
  assert cli.main([f"{path}#student", exported, "--num_heads", "2"]) == 0
  loaded = {
    "student": teachers.load_vit(exported, c),
    "teacher": teachers.load_vit(f"{path}#teacher", c),
  }
  default_config, default_params = teachers.load_vit(path, c)  # evaluation's default: the student
  assert default_config == loaded["student"][0]
  jax.tree.map(np.testing.assert_array_equal, default_params, loaded["student"][1])
  d = c.data
  batches = list(
    pipeline.eval_iterator(
      sources.from_config(d, "data.eval_split", str(tmp_path)),
      global_batch_size=d.eval_batch_size,
      **options.eval_view(d),
      num_threads=0,
    )
  )
  got = ensembles.ensemble_accuracy(
    {name: (vit.build(cfg), params) for name, (cfg, params) in loaded.items()}, batches
  )
  images_BCYX = [b["image"].transpose(0, 3, 1, 2) for b in batches]
  for name, (cfg, params) in loaded.items():
    assert_same(cfg, params, models[name], images_BCYX[0][:16])
  with torch.no_grad():
    probs = {
      name: [torch.softmax(models[name](torch.from_numpy(x)), -1).numpy() for x in images_BCYX]
      for name in loaded
    }
  probs["ensemble"] = [(s + t) / 2 for s, t in zip(probs["student"], probs["teacher"], strict=True)]
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask]
  for name, ps in probs.items():
    ranked = np.argsort(-np.concatenate(ps)[mask], axis=-1)
    want = {
      "top1": 100 * np.mean(ranked[:, 0] == labels),
      "top5": 100 * np.mean((ranked[:, :5] == labels[:, None]).any(-1)),
    }
    # float32 vs float32 on another backend: at most one near-tie may rank differently.
    assert got[name] == pytest.approx(want, abs=100 / mask.sum() + 1e-9), name


def test_a_run_config_names_the_tower_for_teacher_init(tmp_path, tiny_config, reference_checkpoint):
  """teacher.init must name a dual checkpoint's tower; model.init defaults to the student; a selector
  the file lacks fails in start-up validation, before compiling."""
  from at_jax.experiment import validation

  path, _ = reference_checkpoint()
  c = tiny_config(mode="distill")
  c.teacher.update(dict(init=path, num_heads=2))
  c.model.arch = "teacher"
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError, match=r"name the tower.*#teacher") as e:
    validation.validate(c, workdir)
  assert e.value.field == path
  c.teacher.init = f"{path}#teacher"
  assert validation.validate(c, workdir).model.width == 32
  c.model.init = f"{path}#model_ema.studnt"
  with pytest.raises(ConfigError, match=r"'studnt'.*student, teacher") as e:
    validation.validate(c, workdir)
  assert e.value.field == c.model.init
  c.model.init = path
  assert validation.validate(c, workdir).model.num_classes == 10
