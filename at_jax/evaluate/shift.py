"""Robustness to distribution shift (the paper's out-of-distribution table): ImageNet-V2, ReaL, -A, -R and
-Sketch, read from tfds (ArrayRecord) or from the releases' JPEG folders, scored as their authors do.

Every set is scored in ImageNet-1k's label space (`imagenet_info.synsets`), except:

* ImageNet-A and -R hold 200 of the 1000 classes: the 1000-way logits are restricted to those 200
  (timm's `imagenet_{a,r}_indices.txt`, as Hendrycks et al.'s `indices_in_1k`) and labels are mapped to
  their position in that list, so a model is never wrong for picking a class the set cannot contain.
* ReaL (Beyer et al., "Are we done with ImageNet?") gives each validation image a set of correct labels:
  a prediction is right if it is in the set; images whose set is empty are left out (timm's
  `RealLabelsImagenet`). The example's label here is its validation image number - 1, which indexes
  the ReaL labels (`imagenet_info.real_labels`), for tfds (its `file_name`) and folders alike.

Layouts (`SETS`), under ``--shift_dir``: a set is read from the first of its folder names that exists
there, else from tfds prepared in ``--shift_dir`` (as its data dir: one folder can hold both). Folders are as the releases unpack:
ImageNet-A/R `imagenet-a/<wnid>/*.jpg` (200 wnid folders), Sketch `sketch/<wnid>/*.JPEG` (1000; or
`ImageNet-Sketch/sketch/`, as the Hugging Face archive unpacks),
V2 `imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg` (folders named by label index, as tfds'
builder reads them; `-threshold0.7-` and `-top-images-` for its other two samplings), ReaL the ImageNet validation images `val/` (flat or in wnid folders) named
`ILSVRC2012_val_<8 digits>.JPEG`. tfds: split ``test`` (``validation`` for `imagenet2012_real`), whose
labels are ImageNet-1k indices (tfds' ClassLabel over the same sorted wnids).
"""

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from at_jax import metrics, storage
from at_jax.data import imagefolder, sources
from at_jax.errors import ConfigError
from at_jax.evaluate import imagenet_info

FIELD_SETS, FIELD_DIR = "--shift", "--shift_dir"


class ShiftSet(NamedTuple):
  """One evaluation set.

  Attributes:
    split: its tfds split.
    folders: folder names under --shift_dir, as the release unpacks (never the tfds name: a tfds data
      dir holds a folder of that name, which is no image folder).
    layout: "wnid" (class folders named by WordNet id), "index" (folders named by label 0..999) or
      "val" (ImageNet validation file names, flat or in wnid folders).
    subset: "" (all 1000 classes) or the `imagenet_info.SUBSETS` entry whose 200 classes it holds.
  """

  split: str
  folders: tuple[str, ...]
  layout: str
  subset: str = ""


SETS: dict[str, ShiftSet] = {
  # ImageNet-V2's three samplings, by tfds' names; the default (matched frequency) is the one papers cite.
  "imagenet_v2": ShiftSet("test", ("imagenetv2-matched-frequency-format-val",), "index"),
  "imagenet_v2/threshold-0.7": ShiftSet("test", ("imagenetv2-threshold0.7-format-val",), "index"),
  "imagenet_v2/topimages": ShiftSet("test", ("imagenetv2-top-images-format-val",), "index"),
  "imagenet2012_real": ShiftSet("validation", ("val",), "val"),
  "imagenet_a": ShiftSet("test", ("imagenet-a",), "wnid", "imagenet_a"),
  "imagenet_r": ShiftSet("test", ("imagenet-r",), "wnid", "imagenet_r"),
  "imagenet_sketch": ShiftSet("test", ("sketch", "ImageNet-Sketch/sketch"), "wnid"),
}
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.jpe?g", re.IGNORECASE)


def check_names(names: Iterable[str]) -> list[str]:
  """The set names, checked against `SETS` (ConfigError naming --shift)."""
  names = list(names)
  unknown = [n for n in names if n not in SETS]
  if unknown or not names:
    raise ConfigError(FIELD_SETS, f"unknown sets {unknown}; choose from {sorted(SETS)}")
  return names


def _val_number(name: str, where: str) -> int:
  """0-based validation image number of `ILSVRC2012_val_00000001.JPEG` (0)."""
  match = _VAL_NAME.fullmatch(os.path.basename(name))
  if match is None or int(match.group(1)) == 0:
    raise ConfigError(
      where, f"{name!r} is not an ImageNet validation file name (ILSVRC2012_val_<8 digits>.JPEG)"
    )
  return int(match.group(1)) - 1


def _folder_list(root: str, spec: ShiftSet, cache_dir: str | None) -> imagefolder.FileList:
  """The images of a set's folder, labelled in ImageNet-1k's space (ReaL: by validation number)."""
  entries = storage.scandir(root)
  flat = any(not is_folder and imagefolder.is_image(n) for n, is_folder in entries)
  if spec.layout == "val" and flat:
    paths = tuple(n for n, is_folder in entries if not is_folder and imagefolder.is_image(n))
    labels = np.array([_val_number(p, root) for p in paths], np.int32)
    return imagefolder.FileList(root, (), paths, labels, {"": storage.mtime_ns(root)})
  if flat:
    raise ConfigError(
      FIELD_DIR, f"{root} holds images directly; this set is <folder>/<class>/<image>"
    )
  if spec.layout == "index":
    classes = tuple(str(i) for i in range(imagenet_info.NUM_CLASSES))
  else:
    classes = imagenet_info.synsets()
  files = imagefolder.file_list(root, classes, labels_path="", cache_dir=cache_dir, field=FIELD_DIR)
  if spec.subset:
    allowed = set(imagenet_info.subset_indices(spec.subset).tolist())
    outside = sorted({classes[i] for i in files.labels.tolist()} - {classes[i] for i in allowed})
    if outside:
      raise ConfigError(
        FIELD_DIR, f"{root} has class folders outside {spec.subset}'s 200 classes: {outside[:5]}"
      )
  if spec.layout == "val":
    numbers = np.array([_val_number(p, root) for p in files.paths], np.int32)
    files = files._replace(labels=numbers)
  return files


class _RealTfds:
  """tfds' `imagenet2012_real` with label = validation image number - 1 (from its `file_name`)."""

  def __init__(self, raw: Any):
    self._raw = raw

  def __len__(self) -> int:
    return len(self._raw)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._raw[index]
    name = record["file_name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return sources.to_example({"image": record["image"], "label": _val_number(name, "file_name")})


def make_source(name: str, shift_dir: str, cache_dir: str | None = None) -> tuple[Any, str]:
  """(source, where it was read: a folder or "tfds:<data dir>") of the set `name` (see the module doc).

  Raises:
    ConfigError: neither a folder nor a prepared tfds copy is there (field --shift_dir, naming both).
  """
  spec = SETS[check_names([name])[0]]
  for folder in spec.folders:
    root = os.path.join(shift_dir, folder)
    if storage.isdir(root):
      return imagefolder.ImageFolderSource(_folder_list(root, spec, cache_dir)), root
  try:
    source = sources.make_source(name, spec.split, shift_dir, field=FIELD_SETS)
  except ConfigError as e:
    raise ConfigError(
      FIELD_DIR,
      f"{name}: no folder {' or '.join(spec.folders)} in {shift_dir!r}, nor a tfds copy ({e})",
    ) from e
  if spec.layout == "val":
    # The tfds records lack a "label" field (they have "real_label"); read them raw.
    source = _RealTfds(source.records)
  return source, f"tfds:{shift_dir}"


class Scorer:
  """Hits of one set's predictions: in the 200-class space of A/R, or against ReaL's label sets."""

  def __init__(self, name: str, real: tuple[tuple[int, ...], ...] | None = None):
    spec = SETS[check_names([name])[0]]
    self.indices = imagenet_info.subset_indices(spec.subset) if spec.subset else None
    self.real = None
    if spec.layout == "val":
      self.real = imagenet_info.real_labels() if real is None else real
    if self.indices is not None:
      self._position = np.full(imagenet_info.NUM_CLASSES, -1, np.int32)
      self._position[self.indices] = np.arange(len(self.indices))

  def restrict(self, logits_BV: Any) -> Any:
    """Logits over the set's classes: the 200 of A/R (in `indices` order), else all of them."""
    return logits_BV if self.indices is None else logits_BV[..., self.indices]

  def hits(self, scores_BC: np.ndarray, labels_B: np.ndarray, mask_B: np.ndarray) -> np.ndarray:
    """[top-1 hits, top-5 hits, examples counted] of a batch of `restrict`-ed scores."""
    mask_B = np.asarray(mask_B, bool)
    labels_B = np.asarray(labels_B)
    if self.real is not None:
      if labels_B[mask_B].size and labels_B[mask_B].max() >= len(self.real):
        raise ConfigError(FIELD_DIR, f"validation images past the {len(self.real)} ReaL labels")
      top_BK = np.argsort(-np.asarray(scores_BC), axis=-1, kind="stable")[:, :5]
      sets = [set(self.real[i]) if m else set() for i, m in zip(labels_B.tolist(), mask_B)]
      top1 = np.array([int(t[0]) in s for t, s in zip(top_BK, sets)])
      top5 = np.array([bool(s.intersection(t.tolist())) for t, s in zip(top_BK, sets)])
      counted = np.array([bool(s) for s in sets])
      return np.array([top1.sum(), top5.sum(), counted.sum()], np.float64)
    if self.indices is not None:
      labels_B = np.where(mask_B, self._position[np.where(mask_B, labels_B, 0)], 0)
      if np.any(labels_B < 0):
        raise ConfigError(FIELD_DIR, "labels outside the set's 200 classes: is this A/R data?")
    correct = metrics.top_k_hits(np.asarray(scores_BC), labels_B)
    return np.array(
      [(np.asarray(correct[k]) & mask_B).sum() for k in (1, 5)] + [mask_B.sum()], float
    )


def evaluate(
  members: Mapping[str, tuple[Any, Any]],
  scorer: Scorer,
  batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, dict[str, float]]:
  """Top-1/top-5 (%) and the examples counted, of each member and, with two or more, of their ensemble
  (the mean of the members' softmax over the set's classes, as `ensembles.ensemble_accuracy`).

  Args:
    members: name -> (ViT, params) of ImageNet-1k classifiers.
    scorer: the set's `Scorer`.
    batches: eval batches {"image", "label", "mask"} (`pipeline.eval_iterator` of `make_source`).
  """
  for name, (model, _) in members.items():
    if model.num_classes != imagenet_info.NUM_CLASSES:
      raise ConfigError(
        "--models",
        f"{name} has {model.num_classes} classes; the shift sets need ImageNet-1k's 1000",
      )
  applies: dict[str, Callable] = {
    name: jax.jit(
      lambda p, x, m=model: jax.nn.softmax(
        scorer.restrict(m.apply({"params": p}, x, train=False)[0])
      )
    )
    for name, (model, _) in members.items()
  }
  names = list(members) + (["ensemble"] if len(members) > 1 else [])
  totals = {name: np.zeros(3) for name in names}
  for batch in batches:
    probs = {
      n: np.asarray(applies[n](params, batch["image"])) for n, (_, params) in members.items()
    }
    if len(members) > 1:
      probs["ensemble"] = np.mean(list(probs.values()), axis=0)
    for name in names:
      totals[name] += scorer.hits(probs[name], batch["label"], batch["mask"])
  return {
    n: {"top1": 100 * t[0] / max(t[2], 1), "top5": 100 * t[1] / max(t[2], 1), "count": int(t[2])}
    for n, t in totals.items()
  }
