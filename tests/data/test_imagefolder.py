"""Image folders (at_jax.data.imagefolder) against torchvision's ImageFolder, their errors, the file-list
cache and fingerprint, and decoding real JPEGs (foolbox's ImageNet photographs) with and without
libjpeg's DCT scaling."""

import importlib.util
import io
import os

import numpy as np
import pytest
import torchvision
from PIL import Image
from torchvision import transforms as tv

from at_jax.data import imagefolder, pipeline, sources, transforms
from at_jax.errors import ConfigError


def _photos() -> list[str]:
  """foolbox's 20 ImageNet JPEGs (about 512 px; imagenet_10 is 1024 x 683)."""
  spec = importlib.util.find_spec("foolbox")
  assert spec is not None, "foolbox is missing: run `bash launch/setup.sh --tests`"
  folder = os.path.join(spec.submodule_search_locations[0], "data")
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("imagenet_"))


def _jpeg(path, size=(20, 16), seed=0, mode="RGB", fmt="JPEG"):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).convert(mode).save(path, fmt)


def _tree(root, splits=("train", "val"), classes=("cat", "ant", "bee"), per_class=3):
  """<root>/<split>/<class>/<i>.JPEG, created in unsorted class order."""
  for split in splits:
    for c, name in enumerate(classes):
      for i in range(per_class):
        _jpeg(os.path.join(root, split, name, f"{i}.JPEG"), seed=100 * c + i)
  return str(root)


def _source(root, split="train", **kw):
  field = "data.train_split" if split.startswith("train") else "data.eval_split"
  return sources.make_source("imagefolder", split, str(root), field=field, **kw)


def test_files_and_labels_match_torchvision_imagefolder(tmp_path, capsys):
  root = _tree(tmp_path)
  train = os.path.join(root, "train")
  _jpeg(os.path.join(train, "bee", "nested", "deep", "x.jpeg"), seed=7)  # nested: walked
  _jpeg(os.path.join(train, "preview.jpg"), seed=9)  # beside the class folders: left out, said
  Image.new("L", (9, 9)).save(os.path.join(train, "ant", "gray.png"))
  for ignored in ("notes.txt", "labels.csv", "README"):
    (tmp_path / "train" / "cat" / ignored).write_text("not an image")
  source = _source(root)
  reference = torchvision.datasets.ImageFolder(train)
  assert source.files.classes == tuple(reference.classes) == ("ant", "bee", "cat")
  expected = [(os.path.relpath(p, train), label) for p, label in reference.samples]
  assert list(zip(source.files.paths, source.files.labels.tolist())) == sorted(expected)
  assert "1 image(s) beside them (preview.jpg): those are left out" in capsys.readouterr().out
  example = source[0]
  assert isinstance(example["image"], Image.Image) and example["label"] == 0


def test_flat_eval_split_with_label_files(tmp_path):
  root = _tree(tmp_path, splits=("train",))
  for i in range(4):
    _jpeg(str(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"), seed=i)
  os.makedirs(
    tmp_path / "val" / ".ipynb_checkpoints"
  )  # a sub-folder is no class of a labelled split
  names = [f"ILSVRC2012_val_{i:08d}" for i in range(4)]
  formats = {
    # ImageNet's LOC_val_solution.csv: a header, names without extension, the class first.
    "loc.csv": "ImageId,PredictionString\n"
    + "".join(f"{n},{c} 1 2 3 4\n" for n, c in zip(names, ("bee", "ant", "cat", "bee"))),
    "names.txt": "".join(f"{n}.JPEG {c}\n" for n, c in zip(names, ("bee", "ant", "cat", "bee"))),
    "indices.txt": "".join(f"{n}.JPEG\t{i}\n\n" for n, i in zip(names, (1, 0, 2, 1))),
  }
  for file_name, text in formats.items():
    (tmp_path / file_name).write_text(text)
    labels_path = str(tmp_path / file_name)
    source = _source(root, "val", labels=labels_path)
    assert source.files.labels.tolist() == [1, 0, 2, 1], file_name
    assert source.files.paths[0] == "ILSVRC2012_val_00000000.JPEG"


def _flat_val(root, labels=""):
  """A flat eval split <root>/val_flat/{0,1}.JPEG; returns make_source's (split, options)."""
  for i in range(2):
    _jpeg(str(root / "val_flat" / f"{i}.JPEG"), seed=i)
  return "val_flat", {"labels": labels}


def _labels(tmp_path, text: str | bytes):
  path = tmp_path / "labels.txt"
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  return str(path)


def _no_data_dir(root):
  return root / "absent", "train", {}


def _no_train_split(root):
  os.rename(root / "train", root / "training")
  return root, "val", {}


def _empty_class_folder(root):
  os.makedirs(root / "train" / "dog")
  return root, "train", {}


def _eval_class_the_train_split_lacks(root):
  _jpeg(str(root / "val" / "dog" / "0.JPEG"))
  return root, "val", {}


def _flat_eval_split_without_labels(root):
  return root, *_flat_val(root)


def _labels_for_class_folders(root):
  return root, "val", {"labels": _labels(root, "0.JPEG cat\n")}


ERRORS = {
  _no_data_dir: "data.dir",
  _no_train_split: "data.train_split",
  _empty_class_folder: "data.train_split",
  _eval_class_the_train_split_lacks: "data.eval_split",
  _flat_eval_split_without_labels: "data.eval_labels",
  _labels_for_class_folders: "data.eval_labels",
}


@pytest.mark.parametrize("change", ERRORS, ids=lambda f: f.__name__[1:])
def test_errors_name_the_field(tmp_path, change):
  data_dir, split, kw = change(_tree(tmp_path / "data") and tmp_path / "data")
  with pytest.raises(ConfigError) as e:
    _source(data_dir, split, **kw)
  assert e.value.field == ERRORS[change]


@pytest.mark.parametrize(
  "text",
  [
    b"\xff\xfe\x00bad bytes",  # not text
    "0.JPEG cat\n1.JPEG zebra\n",  # a class the training split lacks
    "0.JPEG cat\n1.JPEG 3\n",  # an index out of range
    "0.JPEG cat\n",  # no label for 1.JPEG
  ],
)
def test_bad_label_files_name_the_file(tmp_path, text):
  root = tmp_path / "data"
  _tree(root)
  labels = _labels(tmp_path, text)
  _flat_val(root, labels)
  with pytest.raises(ConfigError) as e:
    _source(root, "val_flat", labels=labels)
  assert e.value.field == labels
  with pytest.raises(ConfigError) as e:
    _source(root, "val_flat", labels=str(tmp_path / "missing.txt"))
  assert "cannot read the label file" in str(e.value)


def test_file_list_cache_is_reused_until_a_folder_changes(tmp_path, capsys):
  root = _tree(tmp_path / "data")
  cache = str(tmp_path / "cache")
  first = _source(root, cache_dir=cache)
  assert "Listing" in capsys.readouterr().out
  assert len(os.listdir(cache)) == 1
  again = _source(root, cache_dir=cache)
  assert "Listing" not in capsys.readouterr().out  # read from the cache
  assert again.fingerprint == first.fingerprint and again.files.paths == first.files.paths
  fingerprints = {first.fingerprint}
  edits = (
    lambda: _jpeg(os.path.join(root, "train", "ant", "new.JPEG")),  # a file added
    lambda: os.rename(  # a file renamed
      os.path.join(root, "train", "bee", "0.JPEG"), os.path.join(root, "train", "bee", "9.JPEG")
    ),
    lambda: os.remove(os.path.join(root, "train", "cat", "1.JPEG")),  # a file removed
  )
  for edit in edits:
    os.utime(os.path.join(root, "train", "ant"), ns=(1, 1))  # mtimes differ even within one tick
    edit()
    relisted = _source(root, cache_dir=cache)
    assert "Listing" in capsys.readouterr().out
    fingerprints.add(relisted.fingerprint)
  assert len(fingerprints) == 4
  # A torn cache (a writer killed mid-write) is listed again; an unwritable cache folder only warns.
  (path,) = (os.path.join(cache, f) for f in os.listdir(cache))
  with open(path, "r+") as f:
    f.truncate(10)
  assert _source(root, cache_dir=cache).fingerprint == relisted.fingerprint
  (tmp_path / "file").write_text("")
  assert len(_source(root, cache_dir=str(tmp_path / "file" / "cache"))) == len(relisted)
  assert "cannot write the file list cache" in capsys.readouterr().out


def test_splits_slice_the_sorted_list(tmp_path):
  root = _tree(tmp_path, per_class=4)
  whole, half = _source(root), _source(root, "train[:50%]")
  assert half.files.paths == whole.files.paths[:6] and half.fingerprint != whole.fingerprint


def test_other_modes_decode_to_rgb_like_torchvisions_loader(tmp_path):
  files = {
    "gray.jpg": ("L", "JPEG"),
    "cmyk.jpg": ("CMYK", "JPEG"),
    "palette.png": ("P", "PNG"),
    "rgba.png": ("RGBA", "PNG"),
    "la.png": ("LA", "PNG"),
    "i16.png": ("I;16", "PNG"),
  }
  for name, (mode, fmt) in files.items():
    path = str(tmp_path / name)
    _jpeg(path, size=(24, 20), mode=mode, fmt=fmt)
    with open(path, "rb") as f:
      image = Image.open(io.BytesIO(f.read()))
    assert image.mode == mode
    decoded, box = transforms.decode(image, (0, 0, 24, 20), (24, 20), downscale=True)
    assert decoded.mode in ("L", "RGB") and box == (0, 0, 24, 20)
    reference = torchvision.datasets.folder.pil_loader(path)  # Image.open(f).convert("RGB")
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), np.asarray(reference))


def test_unreadable_files_are_skipped_deterministically(tmp_path):
  root = _tree(tmp_path, per_class=4)
  good = os.path.join(root, "train", "ant", "0.JPEG")
  data = open(good, "rb").read()
  with open(os.path.join(root, "train", "ant", "1.JPEG"), "wb") as f:
    f.write(data[: len(data) // 2])  # truncated: the header reads, the pixels don't
  with open(os.path.join(root, "val", "bee", "2.JPEG"), "wb") as f:
    f.write(b"not a JPEG at all")
  kw = dict(global_batch_size=6, image_size=8, seed=0, normalization="imagenet", num_threads=2)

  def epoch():
    it = pipeline.train_iterator(_source(root), **kw)
    return [next(it) for _ in range(2)]

  a, b = epoch(), epoch()
  assert sum(int(x["skipped"].sum()) for x in a) == 1  # the truncated file, once per epoch
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  kw.pop("seed")
  batches = list(pipeline.eval_iterator(_source(root, "val"), **kw))
  mask = np.concatenate([x["mask"] for x in batches])
  assert mask.sum() == 11 and np.concatenate([x["skipped"] for x in batches]).sum() == 1


def _eval(path, size, downscale, resize_to=None):
  with open(path, "rb") as f:
    image = Image.open(io.BytesIO(f.read()))
  unit = dict(mean=np.zeros(3, np.float32), std=np.full(3, 1 / 255, np.float32))
  resize_to = resize_to or round(size / 0.875)
  out = transforms.eval_example(
    {"image": image, "label": 0},
    image_size=size,
    resize_to=resize_to,
    jpeg_downscale=downscale,
    **unit,
  )
  return out["image"]


def test_eval_view_matches_torchvision_and_draft_stays_close():
  photos = _photos()
  reference = tv.Compose([tv.Resize(256, tv.InterpolationMode.BICUBIC), tv.CenterCrop(224)])
  draft_errors = []
  for path in photos[:6] + photos[10:11]:
    full = _eval(path, 224, downscale=False)
    theirs = np.asarray(reference(torchvision.datasets.folder.pil_loader(path)), np.float32)
    # One resize of the crop's box resamples what resize-then-crop does: at most 1 level apart.
    assert np.abs(full - theirs).max() <= 1
    draft_errors.append(np.abs(_eval(path, 224, downscale=True) - full).mean())
  # The crop (448 px of a 512 px photo) is twice the output: libjpeg decodes at 1/2. Measured on
  # these photographs: 0.7 to 1.7 levels of 255 on average.
  assert 0.2 < np.mean(draft_errors) < 2.5


def test_draft_decodes_at_the_largest_reduction_that_keeps_the_crop_at_least_the_output():
  assert transforms.dct_reduction((448, 448), (224, 224)) == 2
  assert transforms.dct_reduction((447, 900), (224, 224)) == 1
  assert transforms.dct_reduction((1000, 900), (112, 112)) == 8
  big = _photos()[10]  # 1024 x 683
  with open(big, "rb") as f:
    image = Image.open(io.BytesIO(f.read()))
  decoded, box = transforms.decode(image, (0, 0, 1024, 683), (160, 160), downscale=True)
  assert decoded.size == (256, 171) and box == (0, 0, 256, 170.75)  # 1/4: 170.75 >= 160


def test_a_folder_in_a_bucket_reads_as_on_disk(tmp_path, gcs_bucket, capsys):
  """data.dir=gs://...: listed through gcsfs (one listing per folder), files read as objects, the list
  cached in the bucket too; the batches equal those of the same folder on disk."""
  import fsspec  # pylint: disable=import-outside-toplevel

  root = _tree(tmp_path / "data", per_class=2)
  remote = f"{gcs_bucket[0]}/imagefolder"
  fsspec.filesystem("gs").put(root, remote, recursive=True)
  cache = f"{gcs_bucket[0]}/imagefolder_cache"
  local_source = _source(root)
  bucket_source = _source(remote, cache_dir=cache)
  assert "Listing" in capsys.readouterr().out
  assert bucket_source.fingerprint == local_source.fingerprint
  assert _source(remote, cache_dir=cache).files.paths == local_source.files.paths
  assert "Listing" not in capsys.readouterr().out  # the cached list, from the bucket
  kw = dict(global_batch_size=6, image_size=8, seed=0, normalization="imagenet", num_threads=2)
  a = next(pipeline.train_iterator(local_source, **kw))
  b = next(pipeline.train_iterator(bucket_source, **kw))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_eval_class_folders_take_the_training_splits_labels(tmp_path):
  """An eval split with fewer class folders keeps the training split's indices (torchvision's
  class_to_idx from train), not indices into its own folders."""
  root = _tree(tmp_path, splits=("train",))
  _tree(tmp_path, splits=("val",), classes=("ant", "cat"), per_class=2)
  val = _source(root, "val")
  classes = torchvision.datasets.ImageFolder(os.path.join(root, "train")).class_to_idx
  assert classes == {"ant": 0, "bee": 1, "cat": 2}
  expected = [classes[os.path.dirname(p)] for p in val.files.paths]
  assert val.files.labels.tolist() == expected == [0, 0, 2, 2]
  assert val.files.classes == ("ant", "bee", "cat") and val.num_classes == 3


def test_file_list_cache_is_listed_again_when_the_training_classes_change(tmp_path, capsys):
  """The cached labels index the classes they were listed with: other classes make it stale."""
  root = _tree(tmp_path / "data", splits=("val",), classes=("ant", "cat"), per_class=2)
  val, cache = os.path.join(root, "val"), str(tmp_path / "cache")

  def listed(classes):
    return imagefolder.file_list(
      val, classes, labels_path="", cache_dir=cache, field="data.eval_split"
    )

  assert listed(("ant", "cat")).labels.tolist() == [0, 0, 1, 1]
  assert "Listing" in capsys.readouterr().out
  assert listed(("ant", "cat")).labels.tolist() == [0, 0, 1, 1]
  assert "Listing" not in capsys.readouterr().out  # the cache, while the classes are the same
  wider = listed(("ant", "bee", "cat"))
  assert "Listing" in capsys.readouterr().out
  assert wider.classes == ("ant", "bee", "cat") and wider.labels.tolist() == [0, 0, 2, 2]
