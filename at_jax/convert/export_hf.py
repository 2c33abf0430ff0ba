"""Our params -> Hugging Face's ViT or DINOv2 (`export_keys.hf_model_type`): plain ViTs as ViTModel, those
with LayerScale, registers, SwiGLU or `cls_mean` pooling as DINOv2.

  model_type             headless                  with a head (cls or cls_mean pooling)
  vit                    ViTModel                  ViTForImageClassification
  dinov2                 Dinov2Model               Dinov2ForImageClassification
  dinov2_with_registers  Dinov2WithRegistersModel  Dinov2WithRegistersForImageClassification

The key names are the importer's own (`hf.key_rules`, inverted by `export_keys.invert`): transformers 4's
names (`attention.attention.query`, `layer_scale1.lambda1`, `mlp.weights_in` [gate | value] as our
Dense_0), which transformers 5 renames on loading. What the importer undoes is done here:
  position table  transformers' always has the cls slot and adds it to the cls token only: a table without
                  prefix slots gets a zero there; register slots (`posemb_prefix`) are added to the
                  register tokens, the sum our forward pass makes (it reads back patches-only, as equal).
  LayerScale      DINOv2 always has it: a ViT without gets lambda1 = 1 (it reads back as LayerScale 1.0).
  mask token      DINOv2's: zeros, as transformers initialises it (only `bool_masked_pos` reads it).
  head            ViT's classifier reads the cls token, as ours. DINOv2's reads [cls | mean of the patch
                  tokens] (2 * width inputs): a `cls_mean` head is that classifier as it is; a `cls`
                  head, with zeros for the mean half, gives our logits exactly. The importer reads
                  either back as it was (`hf_dinov2.classifier`).
config.json's `image_size` is the export's: the table then has exactly that size's grid, which
`interpolate_pos_encoding` returns unchanged (at other sizes transformers resamples it: bicubic,
antialiased with registers, as `hf_posemb` does). DINOv2's `mlp_ratio` is whole
(`export_keys.dinov2_mlp_ratio`).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from at_jax.convert import export_keys, hf

# model_type -> the transformers class names' stem, e.g. Dinov2WithRegistersModel.
_CLASSES = {"vit": "ViT", "dinov2": "Dinov2", "dinov2_with_registers": "Dinov2WithRegisters"}
_HEAD = ("head/kernel", "head/bias")


def _arch(f: Mapping[str, Any], image_size: int, channels: int) -> hf.Architecture:
  """The importer's description of the ViT or DINOv2 that `f` is exported as."""
  model_type = export_keys.hf_model_type(f)
  return hf.Architecture(
    model_type=model_type,
    width=f["width"],
    depth=f["depth"],
    heads=f["num_heads"],
    mlp_dim=f["mlp_dim"],
    patch=f["patch_size"],
    grid=image_size // f["patch_size"],
    channels=channels,
    act=f["mlp_act"],
    eps=f["norm_eps"],
    qkv_bias=f["qkv_bias"],
    layerscale=0.0 if model_type == "vit" else _layerscale_value(f),
    registers=f["num_registers"],
  )


def _layerscale_value(f: Mapping[str, Any]) -> float:
  return float(f["layerscale_init"]) if f["layerscale_init"] > 0 else 1.0


def _as_imported(f: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`params` without the head, as `hf.key_rules` reads them: a table [cls slot, patches], register tokens
  carrying their slots' positions, LayerScale (ones where `f` has none)."""
  ours = {k: v for k, v in params.items() if k not in _HEAD}
  table_BND = ours["pos_embedding"]
  slots = f["class_token"] + f["num_registers"] if f["posemb_prefix"] else 0
  cls_slot_BED = table_BND[:, :1] if slots else np.zeros_like(table_BND[:, :1])
  if slots > 1:  # transformers gives registers no position: fold theirs in (our forward's sum)
    ours["registers"] = ours["registers"] + table_BND[:, 1:slots]
  ours["pos_embedding"] = np.concatenate([cls_slot_BED, table_BND[:, slots:]], axis=1)
  if f["layerscale_init"] <= 0 and export_keys.hf_model_type(f) != "vit":
    for i in range(f["depth"]):
      for j in (0, 1):
        ours[f"Transformer/encoderblock_{i}/layerscale_{j}"] = np.ones(f["width"], np.float32)
  return ours


def hf_state_dict(
  f: Mapping[str, Any], params: Mapping[str, np.ndarray], image_size: int
) -> dict[str, np.ndarray]:
  """The ViT or DINOv2 state dict holding `params` ({'/' path: array}; `unsupported(f)["hf"]` must be
  empty)."""
  channels = params["embedding/kernel"].shape[2]
  a = _arch(f, image_size, channels)
  out = export_keys.invert(hf.key_rules(a, num_classes=0), _as_imported(f, params))
  if a.model_type != "vit":
    out["embeddings.mask_token"] = np.zeros((1, f["width"]), np.float32)
  if f["num_classes"] == 0:
    return out
  # The task classes keep the encoder under their base_model_prefix: `vit.`, `dinov2.`, ...
  out = {f"{a.model_type}.{k}": v for k, v in out.items()}
  kernel_VD = np.asarray(params["head/kernel"]).T
  if a.model_type != "vit" and f["pool"] == "cls":  # [cls | mean patch token]: ours reads cls only
    kernel_VD = np.concatenate([kernel_VD, np.zeros_like(kernel_VD)], axis=1)
  out["classifier.weight"] = kernel_VD
  out["classifier.bias"] = np.asarray(params["head/bias"])
  return out


def hf_config(f: Mapping[str, Any], image_size: int, channels: int) -> dict[str, Any]:
  """config.json for the ViT or DINOv2 class that holds `f` (module docstring's table)."""
  model_type = export_keys.hf_model_type(f)
  head = f["num_classes"] > 0
  config = dict(
    model_type=model_type,
    architectures=[_CLASSES[model_type] + ("ForImageClassification" if head else "Model")],
    hidden_size=f["width"],
    num_hidden_layers=f["depth"],
    num_attention_heads=f["num_heads"],
    # SwiGLU's SiLU is built in (hidden_act is then unused).
    hidden_act=export_keys.HF_ACTS.get(f["mlp_act"], "silu"),
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=f["norm_eps"],
    image_size=image_size,
    patch_size=f["patch_size"],
    num_channels=channels,
    qkv_bias=f["qkv_bias"],
  )
  if model_type == "vit":
    config["intermediate_size"] = f["mlp_dim"]
  else:
    config.update(
      mlp_ratio=export_keys.dinov2_mlp_ratio(f),
      use_swiglu_ffn=f["mlp_act"] == "swiglu",
      layerscale_value=_layerscale_value(f),
      drop_path_rate=0.0,
    )
  if f["num_registers"]:
    config["num_register_tokens"] = f["num_registers"]
  if head:  # HF reads the number of labels off id2label
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(f["num_classes"])}
    config["label2id"] = {f"LABEL_{i}": i for i in range(f["num_classes"])}
  return config
