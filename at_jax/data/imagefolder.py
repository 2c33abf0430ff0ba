"""Image folders as torchvision's ``ImageFolder`` reads them: ``<root>/<split>/<class>/**/<image>``.

Classes are the sorted sub-folder names of the training split (torchvision's ``find_classes``); an
image's label is its class's index in that list. The evaluation split is either class folders (its
classes a subset of the training split's) or a flat folder of images with a label file (`read_labels`).
Files are those with torchvision's image extensions, case-insensitive; anything else is ignored.

Listing a split of 1.28M files takes minutes on a network disk, so each split's file list is written
once to a cache folder (`cache_path`) and reused while it is fresh: until a listed folder's mtime
changes (a file or class added, removed or renamed in it), or the cache is deleted. A folder in a bucket
(``gs://``) has no mtime: there the cache holds until it is deleted. The list's
`FileList.fingerprint` (count and a hash of the sorted relative paths and their labels) is recorded
by every checkpoint and by stored teacher targets, so that resuming on an edited folder is refused.

Examples are ``{"image": <PIL image, opened but not decoded>, "label": int}``: decoding waits for the
transform (`transforms.decode`), which knows the crop and so can let libjpeg decode at 1/2, 1/4 or 1/8
of the size (``draft``). A file that is not a readable image raises there, and the pipeline skips it
(`skipping`).
"""

import hashlib
import io
import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from at_jax import storage
from at_jax.data.splits import parse_split
from at_jax.errors import ConfigError

# torchvision.datasets.folder.IMG_EXTENSIONS, compared lower-case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT = 1


class FileList(NamedTuple):
  """One split's images, in a fixed order: depth-first, each folder's entries sorted by name.

  Attributes:
    root: the split's folder.
    classes: the training split's class names; label i is classes[i].
    paths: the images, relative to `root`.
    labels: int32 [len(paths)].
    folders: every folder listed (relative to `root`, "" for `root`) -> its mtime in ns, to tell a
      stale cache.
  """

  root: str
  classes: tuple[str, ...]
  paths: tuple[str, ...]
  labels: np.ndarray
  folders: dict[str, int]

  @property
  def fingerprint(self) -> str:
    """``"<count>:<sha256 of the sorted 'path<TAB>label' lines, 16 hex digits>"``."""
    digest = hashlib.sha256()
    for path, label in zip(self.paths, self.labels.tolist()):
      digest.update(f"{path}\t{label}\n".encode())
    return f"{len(self.paths)}:{digest.hexdigest()[:16]}"


def is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(train_root: str, field: str = "data.train_split") -> tuple[str, ...]:
  """The sorted class folder names of the training split's folder `train_root`.

  Raises:
    ConfigError: (field `field`) the folder is missing or holds no class folders.
  """
  if not storage.isdir(train_root):
    raise ConfigError(
      field, f"{train_root} is not a folder (expected <data.dir>/<split>/<class>/)."
    )
  classes = [name for name, is_folder in storage.scandir(train_root) if is_folder]
  if not classes:
    raise ConfigError(
      field, f"{train_root} holds no class folders; an image folder is <split>/<class>/<image>."
    )
  return tuple(classes)


def _walk(root: str, relative: str, folders: dict[str, int]) -> Iterator[str]:
  """Image paths under root/relative (relative to root), recursively; records each folder's mtime."""
  here = os.path.join(root, relative) if relative else root
  folders[relative] = storage.mtime_ns(here)
  for name, is_folder in storage.scandir(here):
    path = os.path.join(relative, name) if relative else name
    if is_folder:
      yield from _walk(root, path, folders)
    elif is_image(name):
      yield path


def list_class_folders(root: str, classes: tuple[str, ...], field: str) -> FileList:
  """Images of the split folder `root` in class folders named like `classes` (a subset of them).

  Raises:
    ConfigError: (field `field`) a class folder the training split lacks, or one without images.
  """
  folders: dict[str, int] = {}
  present = find_classes(root, field)
  unknown = sorted(set(present) - set(classes))
  if unknown:
    raise ConfigError(
      field,
      f"{root} has class folders the training split lacks: {unknown[:5]}"
      f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)}); their labels would be undefined.",
    )
  folders[""] = storage.mtime_ns(root)
  paths, labels = [], []
  for name in present:
    found = list(_walk(root, name, folders))
    if not found:
      raise ConfigError(
        field,
        f"class folder {os.path.join(root, name)} holds no images ({', '.join(IMAGE_EXTENSIONS)}).",
      )
    paths += found
    labels += [classes.index(name)] * len(found)
  return FileList(root, classes, tuple(paths), np.array(labels, np.int32), folders)


def read_labels(path: str, classes: tuple[str, ...]) -> dict[str, int]:
  """A label file: one ``<file name> <label>`` line per image, comma- or whitespace-separated.

  The file name may omit its extension (ImageNet's ``LOC_val_solution.csv``: ``ImageId`` without
  ``.JPEG``); the label is a class folder name or a 0-based index into `classes`, and only its first
  word counts (``LOC_val_solution.csv``'s ``PredictionString`` starts with the class). A first line
  whose label is neither is a header.

  Returns:
    file name (as written) -> label index.

  Raises:
    ConfigError: (field: the file) unreadable, or a line without a valid label.
  """
  try:
    with storage.open_file(path) as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(path, f"cannot read the label file (data.eval_labels): {e}") from e
  index = {name: i for i, name in enumerate(classes)}
  labels = {}
  for number, line in enumerate(lines, 1):
    fields = [f.strip() for f in line.split(",")] if "," in line else line.split(None, 1)
    words = fields[1].split() if len(fields) > 1 else []
    label = words[0] if words else ""
    value = index.get(label, int(label) if label.isdigit() else -1)
    if 0 <= value < len(classes):
      labels[fields[0]] = value
    elif not line.strip() or (number == 1 and label):
      continue  # a blank line, or a header such as "ImageId,PredictionString"
    else:
      raise ConfigError(
        path,
        f"line {number} ({line[:80]!r}): expected '<file name> <label>' with the label a class "
        f"folder name of the training split or an index in [0, {len(classes)}).",
      )
  if not labels:
    raise ConfigError(path, "holds no labels (data.eval_labels).")
  return labels


def list_flat(root: str, classes: tuple[str, ...], labels_path: str, field: str) -> FileList:
  """Images directly in the split folder `root`, labelled by the file `labels_path` (`read_labels`).

  Raises:
    ConfigError: an image without a label (naming the label file), or no images (field `field`).
  """
  by_name = read_labels(labels_path, classes)
  folders = {"": storage.mtime_ns(root)}
  paths = [name for name, is_folder in storage.scandir(root) if not is_folder and is_image(name)]
  if not paths:
    raise ConfigError(field, f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
  labels = [by_name.get(p, by_name.get(os.path.splitext(p)[0], -1)) for p in paths]
  missing = [p for p, label in zip(paths, labels) if label < 0]
  if missing:
    raise ConfigError(
      labels_path,
      f"has no label for {len(missing)} of the {len(paths)} images in {root}, e.g. {missing[:3]}.",
    )
  return FileList(root, classes, tuple(paths), np.array(labels, np.int32), folders)


def cache_path(cache_dir: str, root: str, labels_path: str = "") -> str:
  """The cache file of the split folder `root` (with its label file): named by both absolute paths."""
  key = f"{storage.absolute(root)}\n{storage.absolute(labels_path) if labels_path else ''}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(root))}-{digest}.json")


def _read_cache(
  path: str, root: str, classes: tuple[str, ...], labels_path: str
) -> FileList | None:
  """The cached list if it describes `root` as it is now (every listed folder's mtime unchanged)."""
  try:
    with storage.open_file(path) as f:
      cached = json.load(f)
  except (OSError, ValueError):
    return None  # absent, or torn by a killed writer: list again
  fresh = (
    cached.get("format") == CACHE_FORMAT
    and cached["root"] == storage.absolute(root)
    and tuple(cached["classes"]) == classes
    and cached["labels_file_mtime"] == (storage.mtime_ns(labels_path) if labels_path else None)
    and all(storage.mtime_ns(os.path.join(root, d)) == t for d, t in cached["folders"].items())
  )
  if not fresh:
    return None
  labels = np.array(cached["labels"], np.int32)
  return FileList(root, classes, tuple(cached["paths"]), labels, cached["folders"])


def _write_cache(path: str, files: FileList, labels_path: str) -> None:
  """Writes atomically (a killed writer leaves no torn cache); a read-only cache folder only warns."""
  content = dict(
    format=CACHE_FORMAT,
    root=storage.absolute(files.root),
    labels_file_mtime=storage.mtime_ns(labels_path) if labels_path else None,
    classes=list(files.classes),
    folders=files.folders,
    fingerprint=files.fingerprint,
    paths=list(files.paths),
    labels=files.labels.tolist(),
  )
  try:
    storage.write_atomic(path, json.dumps(content))
  except OSError as e:
    print(f"WARNING: cannot write the file list cache {path} ({e}); the next start lists again.")


def _is_flat(root: str, labels_path: str) -> bool:
  """Whether `root` is a flat folder of images. With a label file, any images directly in it make it
  one (its sub-folders are no classes: e.g. .ipynb_checkpoints). Without one, images beside class
  folders are left out, as torchvision's ImageFolder leaves them, and said."""
  entries = list(storage.scandir(root))
  images = [name for name, is_folder in entries if not is_folder and is_image(name)]
  if images and not labels_path and any(is_folder for _, is_folder in entries):
    print(
      f"Note: {root} holds class folders and {len(images)} image(s) beside them "
      f"({', '.join(sorted(images)[:3])}{' ...' if len(images) > 3 else ''}): those are left out",
      flush=True,
    )
    return False
  return bool(images)


def file_list(
  root: str, classes: tuple[str, ...], *, labels_path: str, cache_dir: str | None, field: str
) -> FileList:
  """The images of the split folder `root`, from the cache in `cache_dir` if fresh, else listed
  (class folders, or flat with `labels_path`) and cached; `cache_dir` None: listed, not cached.

  Raises:
    ConfigError: `root` missing (field `field`), a flat folder without `labels_path` or class folders
      with one (``data.eval_labels``), or what `list_class_folders` / `list_flat` refuse.
  """
  if not storage.isdir(root):
    raise ConfigError(field, f"{root} is not a folder (expected <data.dir>/<split>/).")
  path = cache_path(cache_dir, root, labels_path) if cache_dir else None
  cached = _read_cache(path, root, classes, labels_path) if path else None
  if cached is not None:
    return cached
  flat = _is_flat(root, labels_path)
  if flat != bool(labels_path):
    raise ConfigError(
      "data.eval_labels",
      f"{root} is a flat folder of images: set data.eval_labels to its label file"
      if flat
      else f"is {labels_path!r}, but {root} holds class folders, which are their own labels: set ''",
    )
  print(
    f"Listing the images in {root} (cached in {path})" if path else f"Listing {root}", flush=True
  )
  listed = (
    list_flat(root, classes, labels_path, field)
    if flat
    else list_class_folders(root, classes, field)
  )
  if path:
    _write_cache(path, listed, labels_path)
  return listed


class ImageFolderSource:
  """A `FileList` (or a slice of it) as a random-access source of undecoded images."""

  def __init__(self, files: FileList, part: slice = slice(None)):
    self.files = files._replace(paths=files.paths[part], labels=files.labels[part])
    self.fingerprint = self.files.fingerprint
    self.num_classes = len(files.classes)  # the training split's class folders

  def __len__(self) -> int:
    return len(self.files.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    # Read whole (ImageNet's average is 110 kB) so no file handle outlives the call; PIL reads only the
    # header here, and raises for a file that is no image (the pipeline skips it).
    with storage.open_file(os.path.join(self.files.root, self.files.paths[index]), "rb") as f:
      image = Image.open(io.BytesIO(f.read()))
    return {"image": image, "label": int(self.files.labels[index])}


def make_source(
  data_dir: str | None,
  split: str,
  field: str,
  *,
  train_split: str,
  labels: str,
  cache_dir: str | None,
) -> ImageFolderSource:
  """The split `split` (``name`` or ``name[from:to]``, sliced in sorted order) of the image folder
  `data_dir` (see `file_list`); classes from the training split's folder."""
  if not data_dir or not storage.isdir(data_dir):
    raise ConfigError(
      "data.dir",
      f"{data_dir!r} is not a folder; with data.name='imagefolder' it holds one folder per split, "
      "<data.dir>/<split>/<class>/<image> (torchvision's ImageFolder layout).",
    )
  name, bounds = parse_split(split, field)
  classes = find_classes(os.path.join(data_dir, parse_split(train_split, "data.train_split")[0]))
  files = file_list(
    os.path.join(data_dir, name), classes, labels_path=labels, cache_dir=cache_dir, field=field
  )
  return ImageFolderSource(files, bounds(len(files.paths)))
