"""A demo-sized run from a folder of JPEGs (Fashion-MNIST written as grayscale JPEGs, one truncated):
it trains, skips the broken file, resumes bitwise, refuses to resume on an edited folder, and refuses
bad folders before anything compiles."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from at_jax import checkpoint, metrics
from at_jax.data import sources
from at_jax.errors import ConfigError
from at_jax.experiment import job, loop, paths, validation

CLASSES = (
  "t-shirt",
  "trouser",
  "pullover",
  "dress",
  "coat",
  "sandal",
  "shirt",
  "sneaker",
  "bag",
  "boot",
)


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
  """<root>/{train,val}/<class>/<i>.JPEG: 80 + 40 Fashion-MNIST images upscaled to 56 px (so that
  libjpeg's 1/2 scale serves the eval view), and a truncated train/bag/broken.JPEG."""
  root = tmp_path_factory.mktemp("jpegs")
  arrays = sources.load_fashion_mnist()
  for split, (images, labels), n in (("train", arrays["train"], 80), ("val", arrays["test"], 40)):
    for i in range(n):
      folder = root / split / CLASSES[labels[i]]
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(images[i]).resize((56, 56), Image.BICUBIC).save(
        folder / f"{i}.JPEG", quality=90
      )
  data = (root / "train" / CLASSES[arrays["train"][1][0]] / "0.JPEG").read_bytes()
  (root / "train" / "bag" / "broken.JPEG").write_bytes(data[: len(data) // 2])
  (root / "train" / "bag" / "notes.txt").write_text("ignored: not an image extension")
  return root


def _config(tiny_config, root, steps=6):
  c = tiny_config(steps=steps, mode="none")
  c.data.update(dict(name="imagefolder", dir=str(root), train_split="train", eval_split="val"))
  c.data.eval_batch_size = 40
  return c


def _kill_after_step_4(straight, workdir):
  """What a run killed after its step-4 checkpoint leaves: checkpoints and metrics up to step 4."""
  shutil.copytree(straight, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  shutil.rmtree(workdir / paths.EXPORT_DIR)
  kept = [x for x in metrics.read_jsonl(str(workdir / "metrics.jsonl")) if x["step"] <= 4]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))


@pytest.mark.slow
def test_trains_from_jpegs_skips_a_broken_file_and_resumes_bitwise(
  tmp_path, tiny_config, jpeg_tree, capsys
):
  c = _config(tiny_config, jpeg_tree)  # 6 steps of 16 pass all 81 files: the broken one is met
  straight = tmp_path / "straight"
  evals = loop.train_and_evaluate(c, str(straight))
  lines = metrics.read_jsonl(str(straight / "metrics.jsonl"))
  assert max(x.get("train/skipped_examples", 0) for x in lines) >= 1
  # Named by its file, not by its index in the source.
  assert (
    f"WARNING: {jpeg_tree / 'train' / 'bag' / 'broken.JPEG'} is unreadable"
    in capsys.readouterr().out
  )
  assert sorted(os.listdir(straight / sources.FILE_LIST_DIR))[0].startswith("train-")
  resumed = tmp_path / "resumed"
  _kill_after_step_4(straight, resumed)
  assert loop.train_and_evaluate(c, str(resumed)) == evals
  _, a = checkpoint.load_params(str(straight / paths.EXPORT_DIR))
  _, b = checkpoint.load_params(str(resumed / paths.EXPORT_DIR))
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise on CPU: same files, order and steps
  assert metrics.read_jsonl(str(resumed / "metrics.jsonl"))[-1] == lines[-1]
  # A file renamed in (or added to) the training folder changes the data stream: resuming is refused.
  edited = tmp_path / "edited"
  _kill_after_step_4(straight, edited)
  old = next((jpeg_tree / "train" / "coat").glob("*.JPEG"))
  old.rename(old.with_name("renamed.JPEG"))
  try:
    with pytest.raises(
      ConfigError, match=r"fingerprint='81:.*this run has '81:.* they changed"
    ) as e:
      loop.train_and_evaluate(c, str(edited))
  finally:
    old.with_name("renamed.JPEG").rename(old)
  assert e.value.field == "data.dir"


def test_bad_folders_stop_before_anything_compiles(tmp_path, tiny_config, jpeg_tree, no_compiles):
  flat = tmp_path / "flat"
  shutil.copytree(jpeg_tree / "train", flat / "train")
  (flat / "val").mkdir()
  shutil.copy(next((jpeg_tree / "val" / "coat").glob("*.JPEG")), flat / "val" / "v0.JPEG")
  cases = (
    (dict(dir=str(tmp_path / "absent")), "data.dir"),
    (dict(eval_split="test"), "data.eval_split"),  # no such folder
    (dict(dir=str(flat)), "data.eval_labels"),  # a flat val folder needs its label file
    (dict(dir=str(flat), eval_labels=str(tmp_path / "labels.txt")), str(tmp_path / "labels.txt")),
  )
  for change, field in cases:
    c = _config(tiny_config, jpeg_tree)
    c.data.update(change)
    with no_compiles(), pytest.raises(ConfigError) as e:
      job.run_with_teacher(c, str(tmp_path / "workdir"))
    assert e.value.field == field, change


def test_the_label_range_of_an_image_folder_is_its_class_folders(tmp_path, tiny_config, jpeg_tree):
  """A head with fewer outputs than the folder has classes is refused, naming both counts."""
  c = _config(tiny_config, jpeg_tree)
  c.model.num_classes = 2
  with pytest.raises(ConfigError, match=r"has 10 classes .* from the class folders of") as e:
    validation.validate(c, str(tmp_path))
  assert e.value.field == "model.num_classes"
