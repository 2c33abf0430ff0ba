"""Converts pretrained ViT checkpoints into at_jax params: `load_checkpoint`, the entry point.

Reads
  * timm-named PyTorch state dicts: `.pth`, `.pt`, `.bin`, `.pth.tar` (needs torch) or `.safetensors`
    (needs only `safetensors`). Covers DeiT, AugReg, MAE (fine-tuned with avg pool + `fc_norm`, and the
    pre-training release `{"model": ...}` whose decoder is dropped), MoCo-v3 (`module.base_encoder.`),
    DINO, DINOv2 (LayerScale, patch 14) and DINOv2 with registers (timm's or Meta's own key names), and
    timm's CLIP towers (`norm_pre`; pass `family`).
  * big_vision / google-research ViT `.npz` files (loop or scan layout).
  * training checkpoints, the PyTorch reference's dual (teacher + student) ones included: `FILE#SELECTOR`
    picks the entry (`model`, `model_ema`) and tower (`student`, `teacher`), e.g.
    `checkpoint-199.pth#model_ema.student` (`selection`).
  * Hugging Face `transformers` folders (`save_pretrained`, a hub-cache snapshot or cached repo root) of
    ViT, ViT-MAE, DINOv2 (with registers) and CLIP vision towers, their architecture read from config.json
    (`hf`, `hf_folder`).

The architecture is read off the keys and shapes. What a checkpoint does not store comes from a table:
the number of heads (`keymap.HEADS_BY_WIDTH`, or `num_heads`), LayerNorm epsilon and MLP activation
(`FAMILIES`). The result is a `vit.build` config and float32 numpy params in our layout (big_vision names,
position table with the prefix slots when the checkpoint has them):

  python -m at_jax.convert mae_pretrain_vit_large.pth /tmp/mae_l      # then --config.teacher.init=/tmp/mae_l
"""

import json
import os
from typing import Any

from at_jax import storage
from at_jax.convert import (
  big_vision,
  export_keys,
  hf,
  hf_folder,
  keymap,
  posemb,
  readers,
  selection,
  timm,
)
from at_jax.errors import ConfigError
from at_jax.models import fit, vit

# Per family, the architecture fields a checkpoint does not store. Empty: the reader's defaults fit (exact
# GELU and eps 1e-6 for PyTorch files; tanh GELU, flax's nn.gelu, for big_vision .npz).
FAMILIES: dict[str, dict[str, Any]] = {
  "vit": {},
  "deit": {},
  "augreg": {},
  "mae": {},
  "mocov3": {},
  "dino": {},
  "dinov2": {},
  "big_vision": {},
  # timm's CLIP towers use torch.nn.LayerNorm's eps; OpenAI's models also QuickGELU.
  "clip": {"norm_eps": 1e-5},
  "clip_openai": {"norm_eps": 1e-5, "mlp_act": "quick_gelu"},
}


def load_checkpoint(
  path: str,
  *,
  image_size: int | None = None,
  resample_posemb: bool = False,
  family: str | None = None,
  num_heads: int | None = None,
  default_tower: str | None = None,
) -> tuple[dict, dict]:
  """Reads a pretrained ViT checkpoint as (model_config, params) for `vit.build`.

  Args:
    path: a `.pth`/`.pt`/`.bin`/`.pth.tar`/`.safetensors` file with timm key names, or a big_vision `.npz`;
      optionally `#SELECTOR`, the weights to take from a training checkpoint (`selection`); or a Hugging
      Face folder (`hf_folder.is_hf_folder`), whose config.json states what `family` and `num_heads` would.
    image_size: the input size the teacher will see; None keeps the checkpoint's (grid * patch size).
    resample_posemb: resample the position table bicubically (as timm's `resample_abs_pos_embed`; for a
      Hugging Face folder as transformers' `interpolate_pos_encoding`) when its grid differs from
      `image_size`; otherwise that is an error.
    family: a `FAMILIES` name, for what the keys do not tell (LayerNorm eps, MLP activation).
    num_heads: the number of attention heads, for widths missing from `keymap.HEADS_BY_WIDTH`.
    default_tower: the tower ("student" or "teacher") of a dual checkpoint whose path names none; None
      (the default): such a path is an error asking for one.

  Returns:
    model_config: plain dict of `vit.ViT` fields (loop layout, `num_classes` 0 when there is no head).
    params: nested dict of float32 numpy arrays in `vit.ViT`'s layout.

  Raises:
    ConfigError: unreadable file, unsupported architecture, missing/unknown keys, shape mismatches, or a
      position grid that does not fit `image_size` (field: the path or the argument to fix).
  """
  if family is not None and family not in FAMILIES:
    raise ConfigError("family", f"unknown family {family!r}; one of {sorted(FAMILIES)}")
  if num_heads is not None and num_heads < 1:
    raise ConfigError("num_heads", f"must be >= 1, got {num_heads}")
  if default_tower not in (None, *selection.TOWERS):
    raise ValueError(f"default_tower: {default_tower!r} is not None or one of {selection.TOWERS}")
  file, selector = selection.split(path)
  if hf_folder.is_hf_folder(file):
    if selector is not None or family is not None:
      raise ConfigError(
        "family" if selector is None else path,
        f"{file} is a Hugging Face folder: its config.json states the architecture and it holds one "
        "model; pass neither family nor a #selector",
      )
    config, params = hf.from_hf(file, num_heads, image_size, resample_posemb)
  else:
    config, params = _from_file(path, family, num_heads, default_tower)
  image_size = posemb.fit_posemb(params, config, path, image_size, resample_posemb)
  _check_against_model(config, params, image_size, path)
  return config, params


def _from_file(
  path: str, family: str | None, num_heads: int | None, default_tower: str | None
) -> tuple[dict, dict]:
  """A checkpoint file (timm-named PyTorch/safetensors or big_vision .npz) -> (config, params)."""
  file, selector = selection.split(path)
  contents = readers.read(file)
  if file.lower().endswith(".npz"):
    if selector is not None:
      raise ConfigError(
        path,
        "a selector (#...) picks weights of a PyTorch or safetensors file; a .npz holds one model",
      )
    config, params = big_vision.from_big_vision(contents, path, num_heads)
  else:
    flat = selection.pick(contents, selector, path, default_tower)
    config, params = timm.from_timm(flat, path, num_heads or _heads_beside(file, flat))
  config.update(FAMILIES.get(family, {}))
  if config["pre_norm"] and family is None:
    raise ConfigError(
      "family",
      f"{path}: a LayerNorm before the blocks (norm_pre) marks a CLIP tower, whose "
      "LayerNorm eps and MLP activation the checkpoint does not store; pass family='clip' "
      "(GELU, eps 1e-5) or 'clip_openai' (QuickGELU, eps 1e-5)",
    )
  return config, params


def _heads_beside(file: str, flat: dict[str, Any]) -> int | None:
  """The head count our timm export records beside its weights (<dir>/timm_args.json), which the
  weights cannot tell for a width outside `keymap.HEADS_BY_WIDTH`; None without one, or when it
  describes another width than these weights (another model's file in the same folder)."""
  args_file = os.path.join(os.path.dirname(file), export_keys.TIMM_ARGS_FILE)
  if not storage.isfile(args_file):
    return None
  with storage.open_file(args_file) as f:
    kwargs = json.load(f).get("kwargs", {})
  patch = flat.get("patch_embed.proj.weight")
  if patch is None or kwargs.get("embed_dim") != patch.shape[0]:
    return None
  return kwargs.get("num_heads")


def _check_against_model(config: dict, params: dict, image_size: int, path: str) -> None:
  """Guards against drift between this converter and `vit.ViT`: same tree, same shapes."""
  channels = params["embedding"]["kernel"].shape[2]
  differ = fit.mismatches(vit.build(config), params, image_size, channels)
  if differ:
    raise RuntimeError(
      f"at_jax.convert bug: params converted from {path} do not fit vit.ViT({config}): "
      + ", ".join(differ[: keymap.MAX_LISTED])
    )
