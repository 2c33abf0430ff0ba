"""Which weights of a checkpoint file to convert: `FILE#SELECTOR`, e.g. the PyTorch reference's training
checkpoints, which hold a teacher and a student, raw and EMA.

The reference's `util/misc.save_model` writes {"model": state dict, "optimizer", "epoch", "scaler",
"args": argparse.Namespace} plus "model_ema" (ModelEmaV2's module, over the whole dual model), and its
`DualVisionTransformer` prefixes every key by its tower: `teacher.` (the frozen pretrained ViT) or
`student.` (the ViT it trained). A selector is dot-separated names, followed from the top of the file:

  checkpoint-199.pth#student            the raw student ("model", the first of WRAPPERS present)
  checkpoint-199.pth#model_ema.student  the EMA student
  checkpoint-199.pth#teacher            the teacher it was trained with
  checkpoint.pth#model_ema              the EMA weights of a one-model checkpoint (timm, DeiT, MAE)
  dino_full.pth#teacher                 DINO's full checkpoint: its top-level "teacher" entry

Each name is an entry of the file that holds a dict (descended into), else a key prefix of the state
dict reached (kept and stripped; a `module.` from DistributedDataParallel is stripped first). Without a
selector: the first of WRAPPERS the file has, and in a dual state dict `default_tower` -- None (the
converter's default) makes the caller name one, as a file with two models gives no safe guess. A name the
file does not have is a ConfigError naming the path, selector included.
"""

import argparse
import re
from collections.abc import Mapping
from typing import Any

from at_jax.convert import keymap
from at_jax.errors import ConfigError

SEPARATOR = "#"
# Checkpoints that nest the state dict; the first one present wins (so the raw weights over the EMA).
WRAPPERS = ("model", "state_dict", "model_ema", "state_dict_ema")
# The reference's dual model: `DualVisionTransformer.teacher` / `.student`.
TOWERS = ("student", "teacher")
# A selector follows the file's name, so a '#' elsewhere in a path is part of the path.
_SELECTED = re.compile(r"(.+\.(?:pth|pt|bin|pth\.tar|safetensors|npz))#([^/#]*)", re.IGNORECASE)


def split(path: str) -> tuple[str, str | None]:
  """(the file, its selector or None) of `path`, e.g. ("ckpt.pth", "model_ema.student")."""
  found = _SELECTED.fullmatch(path)
  return (found.group(1), found.group(2)) if found else (path, None)


def is_state_dict(obj: Any) -> bool:
  """A non-empty dict of tensors/arrays, keyed by parameter name."""
  return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def pick(obj: Any, selector: str | None, spec: str, default_tower: str | None) -> Mapping[str, Any]:
  """The state dict that `selector` names in a file's top-level object `obj` (see the module docstring).

  Args:
    obj: what the file holds (a state dict, or a dict of entries such as the reference's checkpoints).
    selector: the part after '#', or None.
    spec: the path as given, for errors.
    default_tower: the tower of a dual state dict when `selector` names none; None: an error.
  """
  node, tower = obj, None
  names = [] if selector is None else selector.split(".")
  if selector is not None and not all(names):
    raise ConfigError(spec, f"empty name in the selector {selector!r}; e.g. '#model_ema.student'")
  for name in names:
    node = _step(node, name, spec)
    tower = name if name in TOWERS else tower
  if not is_state_dict(node):
    node = _default_entry(node, spec)
  node = _unwrapped(node)
  if _is_dual(node):
    if tower is not None:  # A dual state dict inside a selected tower: say which is meant.
      raise ConfigError(spec, f"still holds both {TOWERS} after {selector!r}; name one more")
    if default_tower is None:
      file = split(spec)[0]
      raise ConfigError(
        spec,
        "a dual (teacher + student) checkpoint of the PyTorch reference: name the tower, "
        f"{file}#student (the model it trained) or {file}#teacher (the frozen teacher it "
        f"trained with), and for EMA weights {file}#model_ema.student",
      )
    tower = default_tower
    node = _step(node, tower, spec)
  if tower == "student":
    _check_standalone(obj, spec)
  return node


def _step(node: Any, name: str, spec: str) -> Mapping[str, Any]:
  """`node[name]` when it is an entry holding a dict, else the keys under the prefix `name.`."""
  if not isinstance(node, Mapping):
    raise ConfigError(
      spec, f"selects {name!r} inside a {type(node).__name__}, which has no entries"
    )
  entries = ""
  if not is_state_dict(node):
    if isinstance(node.get(name), Mapping):
      return node[name]
    entries = f" (it has {keymap.listed([str(k) for k in node])})"
    node = _default_entry(node, spec, name)
  prefix = name + "."
  node = _unwrapped(node)
  under = {k[len(prefix) :]: v for k, v in node.items() if k.startswith(prefix)}
  if not under:
    raise ConfigError(
      spec,
      f"the selector names {name!r}, which is neither an entry of the file holding weights{entries} "
      f"nor a key prefix of its state dict ({keymap.listed(_prefixes(node))})",
    )
  return under


def _default_entry(node: Any, spec: str, name: str | None = None) -> Mapping[str, Any]:
  """The first of WRAPPERS that `node` has (raw weights over EMA); else an error listing its entries."""
  if isinstance(node, Mapping):
    for key in WRAPPERS:
      if is_state_dict(node.get(key)):
        return node[key]
  found = (
    keymap.listed([str(k) for k in node]) if isinstance(node, Mapping) else type(node).__name__
  )
  if name is not None:
    raise ConfigError(
      spec, f"the selector names {name!r}; the file has no such entry: it has {found}"
    )
  raise ConfigError(
    spec,
    f"no state dict found: expected a dict of tensors, or one under any of {WRAPPERS} (or name "
    f"the entry: FILE#ENTRY); found {found}",
  )


def _unwrapped(sd: Mapping[str, Any]) -> Mapping[str, Any]:
  """`sd` without DistributedDataParallel's `module.` prefix, which sits before a tower's."""
  if not all(isinstance(k, str) and k.startswith("module.") for k in sd):
    return sd
  return _unwrapped({k[len("module.") :]: v for k, v in sd.items()})


def _prefixes(sd: Mapping[str, Any]) -> list[str]:
  return sorted({str(k).split(".", 1)[0] for k in sd})


def _is_dual(sd: Mapping[str, Any]) -> bool:
  """Keys of the reference's DualVisionTransformer: every one under `teacher.` or `student.`."""
  return bool(sd) and set(_prefixes(sd)) <= set(TOWERS) and all("." in str(k) for k in sd)


def _check_standalone(obj: Any, spec: str) -> None:
  """Refuses the student of a copy-mode run (the recorded args.mode): it is not a model on its own."""
  args = obj.get("args") if isinstance(obj, Mapping) else None
  fields = vars(args) if isinstance(args, argparse.Namespace) else args
  mode = fields.get("mode") if isinstance(fields, Mapping) else None
  if isinstance(mode, str) and mode.startswith("copy"):
    raise ConfigError(
      spec,
      f"the student of a {mode!r} run (its args.mode) takes attention from the teacher at test "
      "time too, and its own queries and keys in the copied layers were never trained: on its "
      f"own it is not the model that run evaluated, so it is not converted; its teacher is "
      f"{split(spec)[0]}#teacher",
    )
