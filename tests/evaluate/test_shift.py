"""Distribution-shift sets: timm's class lists and ReaL labels as read, each set's folder and tfds layouts
(small fixtures in the releases' formats: the real sets cannot be downloaded here), 200-class masking and
ReaL scoring against hand-computed expectations."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from at_jax.data import pipeline
from at_jax.errors import ConfigError
from at_jax.evaluate import imagenet_info, shift

TIMM_INFO = os.path.join(
  os.path.dirname(__import__("timm").__file__), "data", "_info"
)  # the test may import timm; the code under test must not need to


def _jpeg(path, seed: int, size=(20, 24)) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, "JPEG")


def _words(name: str) -> list[str]:
  with open(os.path.join(TIMM_INFO, name)) as f:
    return f.read().split()


def test_reads_timms_files():
  assert imagenet_info.info_dir() == TIMM_INFO
  assert list(imagenet_info.synsets()) == _words("imagenet_synsets.txt")
  for subset in ("imagenet_a", "imagenet_r"):
    indices = imagenet_info.subset_indices(subset)
    assert indices.tolist() == [int(w) for w in _words(f"{subset}_indices.txt")]
    assert len(indices) == 200
    assert [imagenet_info.synsets()[i] for i in indices] == _words(f"{subset}_synsets.txt")
  real = imagenet_info.real_labels()
  with open(os.path.join(TIMM_INFO, "imagenet_real_labels.json")) as f:
    raw = json.load(f)
  assert len(real) == 50000 and [list(e) for e in real] == raw
  assert all(isinstance(i, int) for e in real for i in e)
  assert sum(1 for e in real if not e) > 0  # images ReaL's raters left without a label exist


def test_bad_real_label_file_names_the_file(tmp_path):
  for content in ('{"a": 1}', "[[1], [1000]]", "[[1], 2]", "not json"):
    path = tmp_path / "real.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
      imagenet_info.read_real_labels(str(path))
    assert e.value.field == str(path)


def test_a_r_masking_hand_computed():
  """A's first classes (timm's file): 6, 11, 13. The 1000-way argmax (class 0, not in A) is ignored."""
  scorer = shift.Scorer("imagenet_a")
  assert scorer.indices[:3].tolist() == [6, 11, 13]
  logits = np.zeros((3, 1000), np.float32)
  logits[:, 0] = 10.0  # the unrestricted winner, which A cannot contain
  logits[:, 11] = 5.0
  logits[:, 6] = 4.0
  restricted = scorer.restrict(logits)
  assert restricted.shape == (3, 200)
  np.testing.assert_array_equal(restricted[0, :3], [4.0, 5.0, 0.0])
  labels = np.array([11, 6, 13])  # in ImageNet-1k space, as tfds and our folders give them
  # 11 -> position 1, the argmax: top-1 hit; 6 -> position 0, second: top-5 only; 13: the third
  # example is padding (mask False) and not counted.
  hits = scorer.hits(restricted, labels, np.array([True, True, False]))
  np.testing.assert_array_equal(hits, [1, 2, 2])
  with pytest.raises(ConfigError):  # class 0 is not one of A's 200
    scorer.hits(restricted, np.array([0, 6, 13]), np.ones(3, bool))
  r = shift.Scorer("imagenet_r")
  assert 0 not in r.indices.tolist() and len(r.indices) == 200
  plain = shift.Scorer("imagenet_sketch")
  assert plain.restrict(logits) is logits
  # all 1000 classes: class 0 wins every row, so only the first (label 0) is a top-1 hit
  np.testing.assert_array_equal(
    plain.hits(logits, np.array([0, 11, 6]), np.ones(3, bool)), [1, 3, 3]
  )


def test_real_scoring_hand_computed():
  real = ((3,), (1, 2), (), (7,))  # the file's structure: image n+1's labels; image 3 has none
  scorer = shift.Scorer("imagenet2012_real", real=real)
  logits = np.zeros((4, 1000), np.float32)
  logits[0, 3] = 1  # image 1: top-1 3, in {3}: hit
  logits[1, 2] = 1  # image 2: top-1 2, in {1, 2}: hit (its original label might be 1)
  logits[2, 5] = 1  # image 3: empty set, left out
  logits[3, [9, 8, 7]] = [3, 2, 1]  # image 4: 7 is third: top-5 only
  labels = np.array([0, 1, 2, 3])  # validation image number - 1
  np.testing.assert_array_equal(scorer.hits(logits, labels, np.ones(4, bool)), [2, 3, 3])
  np.testing.assert_array_equal(
    scorer.hits(logits, labels, np.array([True, False, True, True])), [1, 2, 2]
  )


def test_wnid_folders_of_a_and_r_and_sketch(tmp_path):
  a, sketch = _words("imagenet_a_synsets.txt"), _words("imagenet_synsets.txt")
  picked = {"imagenet-a": [a[0], a[7], a[199]], "sketch": [sketch[0], sketch[999]]}
  for folder, wnids in picked.items():
    for j, w in enumerate(wnids):
      _jpeg(str(tmp_path / folder / w / f"{j}.jpg"), j)
      _jpeg(str(tmp_path / folder / w / f"{j}b.JPEG"), 10 + j)
  source, where = shift.make_source("imagenet_a", str(tmp_path))
  assert where == str(tmp_path / "imagenet-a")
  got = sorted(source[i]["label"] for i in range(len(source)))
  assert got == sorted(2 * [sketch.index(w) for w in picked["imagenet-a"]])
  source, _ = shift.make_source("imagenet_sketch", str(tmp_path))
  assert sorted(source[i]["label"] for i in range(len(source))) == [0, 0, 999, 999]
  _jpeg(str(tmp_path / "imagenet-r" / _words("imagenet_r_synsets.txt")[3] / "x.jpg"), 5)
  source, where = shift.make_source("imagenet_r", str(tmp_path))
  assert where == str(tmp_path / "imagenet-r") and source[0]["label"] == int(
    _words("imagenet_r_indices.txt")[3]
  )
  _jpeg(str(tmp_path / "imagenet-r" / sketch[0] / "x.jpg"), 5)  # tench: not one of R's classes
  with pytest.raises(ConfigError, match="outside imagenet_r") as e:
    shift.make_source("imagenet_r", str(tmp_path))
  assert e.value.field == "--shift_dir"


@pytest.mark.parametrize(
  "name, folder",
  [
    ("imagenet_v2", "imagenetv2-matched-frequency-format-val"),
    ("imagenet_v2/threshold-0.7", "imagenetv2-threshold0.7-format-val"),
    ("imagenet_v2/topimages", "imagenetv2-top-images-format-val"),
  ],
)
def test_v2_folders_are_label_indices(tmp_path, name, folder):
  root = tmp_path / folder
  for label in (7, 10, 999):  # sorted as text "10" < "7" < "999": the label must not be the rank
    _jpeg(str(root / str(label) / "abc.jpeg"), label)
  source, _ = shift.make_source(name, str(tmp_path))
  assert sorted(source[i]["label"] for i in range(3)) == [7, 10, 999]
  batch = next(
    pipeline.eval_iterator(
      source, global_batch_size=4, image_size=16, normalization="imagenet", num_threads=0
    )
  )
  assert batch["image"].shape == (4, 16, 16, 3) and batch["mask"].tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("layout", ["flat", "wnid"])
def test_real_folder_labels_are_validation_numbers(tmp_path, layout):
  synsets = imagenet_info.synsets()
  for n in (1, 2, 50000):
    where = "" if layout == "flat" else synsets[n % 3]
    _jpeg(str(tmp_path / "val" / where / f"ILSVRC2012_val_{n:08d}.JPEG"), n)
  source, _ = shift.make_source("imagenet2012_real", str(tmp_path))
  assert sorted(source[i]["label"] for i in range(3)) == [0, 1, 49999]
  _jpeg(str(tmp_path / "val" / ("" if layout == "flat" else synsets[0]) / "other.JPEG"), 0)
  with pytest.raises(ConfigError, match="not an ImageNet validation file name"):
    shift.make_source("imagenet2012_real", str(tmp_path))


def test_missing_set_says_folder_or_tfds(tmp_path):
  with pytest.raises(ConfigError, match="imagenet-a.*tfds") as e:
    shift.make_source("imagenet_a", str(tmp_path))
  assert e.value.field == "--shift_dir"
  with pytest.raises(ConfigError) as e:
    shift.check_names(["imagenet_c"])
  assert e.value.field == "--shift"
  _jpeg(str(tmp_path / "sketch" / "flat.jpg"), 0)
  with pytest.raises(ConfigError, match="holds images directly"):
    shift.make_source("imagenet_sketch", str(tmp_path))


def _prepare_tfds(data_dir: str, name: str, split: str, examples: list[dict]) -> None:
  """Prepares `examples` as ArrayRecord under tfds' own builder of `name` ("dataset" or
  "dataset/config": its features, its label names, its version), generated from the given records
  instead of the release's download."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  name, _, config = name.partition("/")
  base = tfds.builder_cls(name)
  with tfds.core.registered.skip_registration():

    class StandIn(base):
      # No checksums file to look up (tfds' lookup needs importlib_resources, not installed).
      code_path = None

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples()}

      def _generate_examples(self):  # no TensorFlow here: the real one lists with tf.io.gfile
        for i, record in enumerate(examples):
          yield str(i), record

  StandIn.name = name
  kwargs = {"config": config} if config else {}
  StandIn(data_dir=data_dir, file_format="array_record", **kwargs).download_and_prepare()


def _pil(seed: int) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8))


def test_tfds_imagenet_a_and_real(tmp_path):
  a = _words("imagenet_a_synsets.txt")
  # As tfds' builder writes them: the label is the wnid (ClassLabel over ImageNet's sorted wnids).
  records = [{"image": _pil(j), "label": a[j], "file_name": f"{j}.jpg"} for j in (0, 5, 199)]
  _prepare_tfds(str(tmp_path), "imagenet_a", "test", records)
  source, where = shift.make_source("imagenet_a", str(tmp_path))
  assert where == f"tfds:{tmp_path}"
  expected = sorted(imagenet_info.synsets().index(a[j]) for j in (0, 5, 199))
  assert sorted(source[i]["label"] for i in range(3)) == expected
  assert source[0]["image"].shape == (20, 24, 3)
  real = [
    {
      "image": _pil(n),
      "original_label": 3,
      "real_label": [3, 4][: n % 3],
      "file_name": f"ILSVRC2012_val_{n:08d}.JPEG",
    }
    for n in (1, 2, 7)
  ]
  _prepare_tfds(str(tmp_path), "imagenet2012_real", "validation", real)
  source, _ = shift.make_source("imagenet2012_real", str(tmp_path))
  assert sorted(source[i]["label"] for i in range(3)) == [0, 1, 6]
  # A V2 sampling other than the default is its tfds config: labels are ImageNet-1k indices.
  v2 = [{"image": _pil(j), "label": j, "file_name": f"{j}.jpeg"} for j in (3, 998)]
  _prepare_tfds(str(tmp_path), "imagenet_v2/topimages", "test", v2)
  source, where = shift.make_source("imagenet_v2/topimages", str(tmp_path))
  assert where == f"tfds:{tmp_path}" and sorted(source[i]["label"] for i in range(2)) == [3, 998]
