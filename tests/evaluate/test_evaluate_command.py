"""launch/evaluate.py --shift / --probe end to end on a real tiny export (a Pico/7 trained for 2 steps on
Fashion-MNIST with a 1000-way head), the shift sets as small JPEG folders in the releases' layouts; and
the config path of downstream transfer (fine-tuning that export on an image folder, iNaturalist's way)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from at_jax.evaluate import imagenet_info, shift
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jpeg(path: str, seed: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (30, 36, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, "JPEG")


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_config):
  from at_jax.experiment import loop  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path_factory.mktemp("run"))
  c = tiny_config(steps=2, mode="none")
  c.model.num_classes = 1000  # an ImageNet-1k head, as the shift sets need
  loop.train_and_evaluate(c, workdir)
  return workdir


def _evaluate(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "evaluate.py"),
      "--config.model.variant=Pico/7",
      "--config.data.train_split=train[:200]",
      "--config.data.eval_split=test[:100]",
      "--config.data.eval_batch_size=64",
      "--config.data.num_threads=0",
      *args,
    ],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow  # real processes
def test_shift_and_probes_end_to_end(export, tmp_path):
  a = imagenet_info.subset_indices("imagenet_a")
  synsets = imagenet_info.synsets()
  for j in range(3):
    _jpeg(str(tmp_path / "sets" / "imagenet-a" / synsets[a[j]] / f"{j}.jpg"), j)
    _jpeg(str(tmp_path / "sets" / "imagenetv2-matched-frequency-format-val" / str(j) / "x.jpeg"), j)
    _jpeg(str(tmp_path / "sets" / "val" / f"ILSVRC2012_val_{j + 1:08d}.JPEG"), j)
  output = str(tmp_path / "results.json")
  proc = _evaluate(
    f"--workdir={export}",
    "--shift=imagenet_a,imagenet_v2,imagenet2012_real",
    f"--shift_dir={tmp_path / 'sets'}",
    "--probe=knn,linear",
    f"--output={output}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| model" in proc.stdout and "imagenet_a" in proc.stdout and "knn" in proc.stdout
  results = json.load(open(output))
  model = os.path.join(export, "params")
  real = imagenet_info.real_labels()
  counts = {
    "imagenet_a": 3,
    "imagenet_v2": 3,
    "imagenet2012_real": sum(bool(real[j]) for j in range(3)),
  }
  for name, count in counts.items():
    r = results["shift"][name]
    assert r["source"] == str(tmp_path / "sets" / shift.SETS[name].folders[0])
    got = r["results"][model]
    assert got["count"] == count and 0 <= got["top1"] <= got["top5"] <= 100
  for probe in ("knn", "linear"):
    top1 = results["probe"][model][probe]["top1"]
    assert 10 < top1 <= 100  # 10 Fashion-MNIST classes; even 2 steps' features beat chance


@pytest.mark.slow
def test_bad_flags_are_config_errors(export, tmp_path):
  proc = _evaluate(f"--workdir={export}", "--shift=imagenet_c", f"--shift_dir={tmp_path}")
  assert proc.returncode == 2 and "--shift:" in proc.stderr
  proc = _evaluate(f"--workdir={export}", "--probe=svm")
  assert proc.returncode == 2 and "--probe:" in proc.stderr
  proc = _evaluate(f"--workdir={export}", "--shift=imagenet_a", f"--shift_dir={tmp_path}")
  assert proc.returncode == 2 and "--shift_dir:" in proc.stderr and "imagenet-a" in proc.stderr


def test_downstream_transfer_config_path(export, tmp_path, tiny_config):
  """Fine-tuning the export on an image folder (iNaturalist as JPEG folders, or a tfds name): model.init
  plus data fields; start-up validation accepts it and builds the run, its head re-sized to the folder's
  classes."""
  from at_jax.experiment import loop  # pylint: disable=import-outside-toplevel

  for split in ("train", "val"):
    for k, species in enumerate(("00000_Animalia_a", "00001_Animalia_b", "00002_Plantae_c")):
      for i in range(3):
        _jpeg(str(tmp_path / "inat" / split / species / f"{i}.jpg"), 10 * k + i)
  c = tiny_config(steps=1, mode="none")
  c.model.init = os.path.join(export, "params")
  c.model.num_classes = 3
  c.data.update(
    dict(name="imagefolder", dir=str(tmp_path / "inat"), train_split="train", eval_split="val")
  )
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  results = loop.train_and_evaluate(c, str(tmp_path / "ft"))
  assert all(0 <= v <= 100 for k, v in results.items() if "top1" in k)
