"""A params export (any run's `params/` or `params_ema/`, a teacher's) -> PyTorch: timm's
VisionTransformer or Hugging Face's ViT / DINOv2. The inverse of `load_checkpoint`:

  python -m at_jax.convert --export <workdir>/params /tmp/student_timm --to=timm
  python -m at_jax.convert --export <workdir>/params /tmp/student_hf --to=hf

timm: `<out>/model.safetensors` (timm's key names) and `<out>/timm_args.json`, the `timm.create_model`
name and kwargs that rebuild the architecture:

  args = json.load(open(f"{out}/timm_args.json"))
  model = timm.create_model(args["model_name"], pretrained=False, **args["kwargs"])
  model.load_state_dict(safetensors.torch.load_file(f"{out}/model.safetensors"), strict=True)

Hugging Face: what `save_pretrained` writes (config.json, model.safetensors); config.json's
`architectures` names the class (`transformers.AutoModel` / `AutoModelForImageClassification` find it):
  a plain ViT: `ViTForImageClassification.from_pretrained(out)` with a head (num_classes > 0, cls
    pooling), else `ViTModel.from_pretrained(out, add_pooling_layer=False)` (the export has no pooler;
    the pre-logits are `last_hidden_state[:, 0]`);
  LayerScale, SwiGLU or `cls_mean` pooling: DINOv2, `Dinov2ForImageClassification` / `Dinov2Model`
    (pre-logits: `pooler_output`); with registers `Dinov2WithRegistersForImageClassification` /
    `Dinov2WithRegistersModel`. Their classifier reads [cls | mean patch token]: a `cls_mean` head is
    written unchanged, a `cls` head into the cls half with zeros in the other (`export_hf`). timm has
    no such head: a `cls_mean` ViT (with a head) goes to Hugging Face only.

Both take NCHW float images normalised as the run's `data.normalization` did, at the export's image
size (the position grid times the patch size). What a target cannot express is refused before anything
is written, naming the fields and the target that can (`export_keys.unsupported`). Training-only heads
(`feature_proj`, `head_mix`) are not part of the ViT: found in a params dir, they are dropped with a note.
"""

import json
import os
from typing import Any

import jax
import numpy as np

from at_jax import checkpoint, storage
from at_jax.convert import export_hf, export_keys
from at_jax.errors import ConfigError
from at_jax.models import fit, vit

TARGETS = ("timm", "hf")
# The heads a training run adds beside the ViT (`vit.export_view` drops them from exports already).
_TRAINING_HEADS = ("feature_proj", "head_mix")
# A run's exports under its workdir (at_jax.experiment.paths, which convert may not import).
_RUN_EXPORTS = ("params", "params_ema")


def export(src: str, dst: str, to: str) -> tuple[dict[str, Any], list[str]]:
  """Writes the export `src` to `dst` for `to` ("timm" or "hf").

  Returns:
    (what rebuilds the architecture: timm_args.json's contents or HF's config.json, notes for the user).

  Raises:
    ConfigError: `src` is not a readable export (field: `src`), or the target cannot express its
      architecture (field: "to"; the message names what and which target can).
  """
  if to not in TARGETS:
    raise ConfigError("to", f"unknown target {to!r}; one of {TARGETS}")
  fields = read_fields(src)
  check_expressible(fields, to, src)
  params, notes = read_params(src, fields)
  image_size, channels = input_shape(fields, params, src)
  if to == "timm":
    state = export_keys.timm_state_dict(fields, params, image_size)
    meta_name, meta = (
      export_keys.TIMM_ARGS_FILE,
      export_keys.timm_args(fields, image_size, channels),
    )
  else:  # a plain ViT goes to ViTModel, one with LayerScale, registers or SwiGLU to DINOv2
    state = export_hf.hf_state_dict(fields, params, image_size)
    meta_name, meta = "config.json", export_hf.hf_config(fields, image_size, channels)
  _write(dst, state, {meta_name: meta})
  return meta, notes


def check_expressible(fields: dict[str, Any], to: str, src: str) -> None:
  """ConfigError (field "to") listing what of `fields` target `to` cannot express, and who can."""
  problems = export_keys.unsupported(fields)
  if not problems[to]:
    return
  others = [t for t in TARGETS if t != to and not problems[t]]
  hint = (
    f"export with --to={others[0]}, which can take it"
    if others
    else "neither timm nor Hugging Face can take it: "
    + "; ".join(f"{t}: {', '.join(problems[t])}" for t in TARGETS if t != to)
  )
  raise ConfigError(
    "to",
    f"{src}: {export_keys.TARGET_NAMES[to]} cannot express {'; '.join(problems[to])}; {hint}",
  )


def read_fields(src: str) -> dict[str, Any]:
  """The complete `vit.ViT` fields of the export `src`, as exported (no training heads, loop layout)."""
  if not checkpoint.is_export(src):
    raise ConfigError(src, _not_an_export(src))
  checkpoint.check_standalone(src, src, "an export to PyTorch")
  config = checkpoint.read_model_config(src)
  # The training heads' fields describe no part of the exported ViT; scan is a layout read_params undoes.
  config = {**config, "feature_dim": 0, "projected": "features", "head_mix": (), "scan": False}
  try:
    return vit.model_fields(vit.build(config))
  except ConfigError as e:
    raise ConfigError(src, f"model_config.json does not build a ViT: {e}") from e


def _not_an_export(src: str) -> str:
  """Why `src` is not an export, and what the user may have meant."""
  what = (
    "a params export (a directory with model_config.json and params/, written by "
    "at_jax.checkpoint.save_params: a run leaves <workdir>/params and <workdir>/params_ema)"
  )
  if not storage.exists(src):
    return f"does not exist; --export takes {what}"
  if storage.isfile(src):
    return (
      f"a file, not {what}; to read a checkpoint file INTO an export, run "
      "python -m at_jax.convert FILE OUT_DIR (without --export)"
    )
  found = [d for d in _RUN_EXPORTS if checkpoint.is_export(os.path.join(src, d))]
  if found:
    return (
      f"a run's workdir, not an export; its exports are {', '.join(f'{src}/{d}' for d in found)}"
    )
  parent = os.path.dirname(os.path.normpath(src))
  if checkpoint.is_export(parent):
    return f"the params folder inside the export {parent}; pass {parent}"
  return f"no model_config.json: not {what} (or an unfinished one)"


def read_params(src: str, fields: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(float32 params of `src` as {'/'-joined path: array} in the loop layout, notes); checks they are
  the params of the ViT `fields` describe."""
  _, params = checkpoint.load_params(src)
  params = dict(params)
  notes = []
  dropped = [k for k in _TRAINING_HEADS if k in params]
  if dropped:
    notes.append(
      f"dropped the training-only {' and '.join(dropped)} (not part of the ViT's forward pass)"
    )
    params = {k: v for k, v in params.items() if k not in dropped}
  if "encoderblock" in params.get("Transformer", {}):
    params = vit.scan_to_loop(params)
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  _check_fits(fields, flat, src)
  return flat, notes


def input_shape(fields: dict[str, Any], params: dict[str, np.ndarray], src: str) -> tuple[int, int]:
  """(image size, channels) of the square images `params` are for (`fit.input_shape`)."""
  try:
    return fit.input_shape(vit.build(fields), params)
  except ValueError as e:
    raise ConfigError(src, str(e)) from None


def _check_fits(fields: dict[str, Any], params: dict[str, np.ndarray], src: str) -> None:
  """ConfigError unless `params` has exactly the leaves and shapes of the ViT `fields` describes."""
  differ = fit.mismatches(vit.build(fields), params, *input_shape(fields, params, src))
  if differ:
    raise ConfigError(
      src, "its params do not match its model_config.json: " + ", ".join(differ[:10])
    )


def _write(dst: str, state: dict[str, np.ndarray], jsons: dict[str, Any]) -> None:
  """`state` as dst/model.safetensors and each of `jsons` as dst/NAME."""
  try:
    from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(
      dst, "writing .safetensors needs the safetensors package: pip install safetensors"
    ) from e
  dst = storage.absolute(dst)
  storage.makedirs(dst)
  # {"format": "pt"}: transformers refuses a safetensors file whose metadata names no framework.
  blob = save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata={"format": "pt"})
  storage.write_atomic(os.path.join(dst, "model.safetensors"), blob)
  for name, content in jsons.items():
    storage.write_atomic(os.path.join(dst, name), json.dumps(content, indent=2, sort_keys=True))
