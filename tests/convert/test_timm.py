"""at_jax.convert.timm: every family's timm-named checkpoint, converted, computes what timm computes
(logits and every layer's attention; see conftest.py)."""

import functools

import jax
import numpy as np
import pytest
import timm
import torch
from timm import layers as timm_layers

from at_jax.convert.load import load_checkpoint
from at_jax.data import sources, transforms


def _meta_dinov2(sd: dict) -> dict:
  """timm's DINOv2-with-registers state dict in Meta's own names (inverse of timm's _convert_dinov2)."""
  sd = dict(sd)
  # Meta's cls position, folded in by timm.
  pos0 = 0.1 * torch.randn(1, 1, sd["pos_embed"].shape[-1])
  sd["cls_token"] = sd["cls_token"] - pos0
  sd["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
  sd["register_tokens"] = sd.pop("reg_token")
  sd["mask_token"] = torch.zeros(1, sd["pos_embed"].shape[-1])
  return sd


def _meta_dinov2_g(sd: dict) -> dict:
  """timm's DINOv2-g (SwiGLUPacked, registers) in Meta's names: its fused SwiGLU fc1/fc2 are w12/w3."""
  sd = _meta_dinov2(sd)
  return {
    k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in sd.items()
  }


def _mae_pretrain(sd: dict) -> dict:
  """MAE's pre-training release: {"model": encoder + decoder + mask token}."""
  width = sd["cls_token"].shape[-1]
  decoder = {
    "mask_token": torch.randn(1, 1, 32),
    "decoder_embed.weight": torch.randn(32, width),
    "decoder_embed.bias": torch.randn(32),
    "decoder_pos_embed": torch.randn(1, 17, 32),
    "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32),
    "decoder_norm.weight": torch.ones(32),
    "decoder_pred.weight": torch.randn(192, 32),
  }
  return {"model": {**sd, **decoder}}


def _mocov3(sd: dict) -> dict:
  """MoCo-v3's release: DDP- and base_encoder-prefixed, with momentum encoder, projector and predictor."""
  state = {f"module.base_encoder.{k}": v for k, v in sd.items()}
  state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()})
  state.update(
    {
      "module.base_encoder.head.0.weight": torch.randn(64, 96),
      "module.base_encoder.head.1.running_mean": torch.zeros(64),
      "module.base_encoder.head.1.num_batches_tracked": torch.tensor(5),
      "module.predictor.0.weight": torch.randn(64, 64),
    }
  )
  return {
    "epoch": 300,
    "arch": "vit_small",
    "state_dict": state,
    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
  }


# A small DINOv2-g: a SiLU-gated MLP (timm's vit_giant_patch14_dinov2 passes act_layer=SiLU).
_DINOV2_G = dict(
  img_size=56,
  patch_size=14,
  embed_dim=128,
  num_heads=2,
  num_classes=0,
  init_values=1e-5,
  act_layer=torch.nn.SiLU,
)

_FAMILIES = {
  # name: (timm kwargs, file name, state-dict wrapper, load_checkpoint kwargs, expected config fields)
  "deit": (
    dict(embed_dim=192, num_heads=3, num_classes=10),
    "deit.pth",
    lambda sd: {"model": sd},
    {},
    dict(pool="cls", num_classes=10, num_heads=3, class_token=True, posemb_prefix=True),
  ),
  "augreg": (
    dict(patch_size=4, embed_dim=128, num_heads=2, depth=3, num_classes=7),
    "augreg.safetensors",
    None,
    dict(num_heads=2),
    dict(pool="cls", num_classes=7, depth=3, patch_size=4),
  ),
  "mae_finetuned": (
    dict(global_pool="avg", embed_dim=192, num_heads=3, num_classes=10),
    "mae_ft.pth",
    lambda sd: {"model": sd},
    {},
    dict(pool="gap", num_classes=10, class_token=True),
  ),
  "mae_pretrained": (
    dict(embed_dim=128, num_heads=2, num_classes=0),
    "mae_pretrain.pth",
    _mae_pretrain,
    dict(num_heads=2),
    dict(pool="cls", num_classes=0),
  ),
  "mocov3": (
    dict(embed_dim=96, num_heads=3, num_classes=0),
    "vit-s-300ep.pth.tar",
    _mocov3,
    dict(num_heads=3),
    dict(pool="cls", num_classes=0, num_heads=3),
  ),
  "dino": (
    dict(embed_dim=192, num_heads=3, num_classes=0),
    "dino.pth",
    None,
    {},
    dict(pool="cls", num_classes=0),
  ),
  "dinov2": (
    dict(img_size=56, patch_size=14, embed_dim=128, num_heads=2, num_classes=0, init_values=1e-5),
    "dinov2.pth",
    None,
    dict(num_heads=2),
    dict(patch_size=14, layerscale_init=1e-5, num_registers=0, posemb_prefix=True),
  ),
  "dinov2_reg": (
    dict(
      img_size=56,
      patch_size=14,
      embed_dim=128,
      num_heads=2,
      num_classes=0,
      init_values=1e-5,
      reg_tokens=4,
      no_embed_class=True,
    ),
    "dinov2_reg.safetensors",
    None,
    dict(num_heads=2),
    dict(num_registers=4, posemb_prefix=False, layerscale_init=1e-5),
  ),
  "dinov2_reg_meta": (
    dict(
      img_size=56,
      patch_size=14,
      embed_dim=128,
      num_heads=2,
      num_classes=0,
      init_values=1e-5,
      reg_tokens=4,
      no_embed_class=True,
    ),
    "dinov2_reg_meta.pth",
    _meta_dinov2,
    dict(num_heads=2),
    dict(num_registers=4, posemb_prefix=False),
  ),
  # DINOv2-g's SwiGLU MLP: timm's SwiGLUPacked (fc1 [gate | value], as vit_giant_patch14_dinov2: 2 x
  # 2.66667 x width wide), timm's unpacked SwiGLU (fc1_g, fc1_x) and Meta's w12/w3 (SwiGLUFFNFused).
  "dinov2_g_packed": (
    dict(_DINOV2_G, mlp_ratio=2.66667 * 2, mlp_layer=timm_layers.SwiGLUPacked),
    "dinov2_g.safetensors",
    None,
    dict(num_heads=2),
    dict(mlp_act="swiglu", mlp_dim=341, layerscale_init=1e-5),
  ),
  "dinov2_g_unpacked": (
    dict(_DINOV2_G, mlp_ratio=2.66667, mlp_layer=timm_layers.SwiGLU),
    "dinov2_g_unpacked.pth",
    None,
    dict(num_heads=2),
    dict(mlp_act="swiglu", mlp_dim=341),
  ),
  "dinov2_g_reg_meta": (
    dict(
      _DINOV2_G,
      mlp_ratio=2.66667 * 2,
      mlp_layer=timm_layers.SwiGLUPacked,
      reg_tokens=4,
      no_embed_class=True,
    ),
    "dinov2_g_reg_meta.pth",
    _meta_dinov2_g,
    dict(num_heads=2),
    dict(mlp_act="swiglu", mlp_dim=341, num_registers=4, posemb_prefix=False),
  ),
  "qk_norm_no_qkv_bias": (
    dict(embed_dim=128, num_heads=4, qk_norm=True, qkv_bias=False, num_classes=5),
    "qknorm.safetensors",
    None,
    {},  # heads come from q_norm's shape
    dict(qk_norm=True, qkv_bias=False, num_heads=4),
  ),
  "clip_openai": (
    dict(
      embed_dim=128,
      num_heads=2,
      pre_norm=True,
      act_layer="quick_gelu",
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5),
      num_classes=10,
    ),
    "clip.safetensors",
    None,
    dict(num_heads=2, family="clip_openai"),
    dict(pre_norm=True, mlp_act="quick_gelu", norm_eps=1e-5),
  ),
}


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_family_matches_timm(
  family, tmp_path, make_vit, make_images, assert_same, state_dict_of, save_checkpoint
):
  kwargs, name, wrap, load_kwargs, expected = _FAMILIES[family]
  model = make_vit(**kwargs)
  path = save_checkpoint(state_dict_of(model), str(tmp_path / name), wrap)

  config, params = load_checkpoint(path, **load_kwargs)

  assert {k: config[k] for k in expected} == expected
  assert config["scan"] is False and config["depth"] == len(model.blocks)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  assert_same(config, params, model, make_images(2, model.patch_embed.img_size[0]))


def test_vit_b16_same_predictions_on_fashion_mnist(
  tmp_path, randomize, assert_same, state_dict_of, save_checkpoint
):
  model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).eval()
  randomize(model, 0)
  path = save_checkpoint(state_dict_of(model), str(tmp_path / "vit_b16.safetensors"))

  config, params = load_checkpoint(path)

  assert config == dict(
    num_classes=10,
    patch_size=16,
    width=768,
    depth=12,
    mlp_dim=3072,
    num_heads=12,
    pool="cls",
    class_token=True,
    num_registers=0,
    posemb_prefix=True,
    pre_norm=False,
    qkv_bias=True,
    qk_norm=False,
    layerscale_init=0.0,
    mlp_act="gelu",
    norm_eps=1e-6,
    scan=False,
  )
  images = sources.load_fashion_mnist()["test"][0][:8]  # uint8 [8, 28, 28], real images.
  x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
  x = torch.nn.functional.interpolate(
    x, size=(224, 224), mode="bilinear", align_corners=False
  ).repeat(1, 3, 1, 1)
  mean, std = transforms.NORMALIZATIONS["imagenet"]
  x = ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]).numpy()
  got, want = assert_same(config, params, model, x)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
