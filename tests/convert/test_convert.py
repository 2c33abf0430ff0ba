"""Tests for at_jax.convert: each family's checkpoint, converted, must compute what timm computes.

timm models get random (seeded) weights, scaled so attention is far from uniform and with every LayerNorm,
bias, token and LayerScale moved off its init so that a mis-mapped one shows. Outputs are compared by
max |ours - timm| / max |timm|; attention probabilities of EVERY layer by max absolute difference, against
timm's own non-fused attention (a hook on `attn_drop`, whose input is timm's softmax).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never wait for the hub.

import argparse
import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

if os.environ.get(
  "CI"
):  # CI installs requirements-test.txt: a missing dep there must fail, not skip.
  import safetensors.torch as safetensors_torch
  import timm
  import torch
else:
  torch = pytest.importorskip(
    "torch", reason="needs the test deps: pip install -r requirements-test.txt"
  )
  timm = pytest.importorskip(
    "timm", reason="needs the test deps: pip install -r requirements-test.txt"
  )
  safetensors_torch = pytest.importorskip("safetensors.torch")

from timm.layers import resample_abs_pos_embed
from timm.models import beit as timm_beit
from timm.models import vision_transformer as timm_vit

from at_jax import checkpoint
from at_jax.convert import load as convert
from at_jax.data import pipeline as data
from at_jax.errors import ConfigError
from at_jax.models import vit

OUT_RTOL = 1e-3  # max |ours - timm| / max |timm| of logits or features
ATTN_ATOL = 1e-4  # max |ours - timm| of attention probabilities, every layer
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SMALL = dict(img_size=32, patch_size=8, depth=2)


def _vit(seed: int = 0, **kwargs) -> torch.nn.Module:
  """A timm VisionTransformer (small unless told) with random weights, in eval mode."""
  torch.manual_seed(seed)
  model = timm_vit.VisionTransformer(**{**_SMALL, **kwargs}).eval()
  _randomize(model, seed)
  return model


def _randomize(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  randn = lambda p: torch.randn(p.shape, generator=gen)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.split(".")[-1] in ("cls_token", "reg_token", "pos_embed"):
        p.add_(0.1 * randn(p))
      elif p.ndim == 1:  # LayerNorm scales/biases, Linear biases, LayerScale gammas.
        p.add_(0.2 * randn(p))
      else:  # q and k at 2 / sqrt(fan_in): logits of a few units, so attention is peaked, not uniform.
        p.copy_((1.3 if "qkv" in name else 0.7) * randn(p) / p[0].numel() ** 0.5)


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)  # NCHW


def _timm_run(model: torch.nn.Module, images_BCHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """timm's outputs [B, K] and attention probabilities [L, B, H, N, N] (its own softmax)."""
  probs, hooks = [], []
  for block in model.blocks:
    block.attn.fused_attn = (
      False  # The explicit path, which materialises softmax(q k^T) for attn_drop.
    )
    hooks.append(
      block.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o.numpy()))
    )
  try:
    with torch.no_grad():
      out = model(torch.from_numpy(images_BCHW)).numpy()
  finally:
    for hook in hooks:
      hook.remove()
  return out, np.stack(probs)


def _our_run(config: dict, params: dict, images_BCHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  model = vit.build(config)
  out, aux = jax.jit(functools.partial(model.apply, train=False))(
    {"params": params}, images_BCHW.transpose(0, 2, 3, 1)
  )  # NCHW -> NHWC
  return np.asarray(out), np.asarray(jax.nn.softmax(aux["attn_logits"], axis=-1))


def _assert_same(
  config: dict, params: dict, model: torch.nn.Module, images_BCHW: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Asserts our converted model and timm's agree; returns both outputs (ours, timm's)."""
  want_out, want_attn = _timm_run(model, images_BCHW)
  got_out, got_attn = _our_run(config, params, images_BCHW)
  assert got_out.shape == want_out.shape and got_attn.shape == want_attn.shape
  out_err = float(np.abs(got_out - want_out).max() / np.abs(want_out).max())
  attn_err = float(np.abs(got_attn - want_attn).max())
  print(
    f"output rel. err {out_err:.2e}, attention abs. err {attn_err:.2e} (max prob "
    f"{want_attn.max():.2f}, {want_attn.shape[0]} layers)"
  )
  assert out_err <= OUT_RTOL
  assert attn_err <= ATTN_ATOL
  assert (
    want_attn.max() > 0.3
  )  # The weights make attention peaked, so the comparison means something.
  return got_out, want_out


def _sd(model: torch.nn.Module) -> dict:
  return {k: v.clone() for k, v in model.state_dict().items()}


def _meta_dinov2(sd: dict) -> dict:
  """timm's DINOv2-with-registers state dict in Meta's own names (inverse of timm's _convert_dinov2)."""
  sd = dict(sd)
  pos0 = 0.1 * torch.randn(
    1, 1, sd["pos_embed"].shape[-1]
  )  # Meta's cls position, folded in by timm.
  sd["cls_token"] = sd["cls_token"] - pos0
  sd["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
  sd["register_tokens"] = sd.pop("reg_token")
  sd["mask_token"] = torch.zeros(1, sd["pos_embed"].shape[-1])
  return sd


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


def _save(sd: dict, path: str, wrap=None) -> str:
  if path.endswith(".safetensors"):
    safetensors_torch.save_file(sd, path)
  else:
    torch.save(wrap(sd) if wrap else sd, path)
  return path


_FAMILIES = {
  # name: (timm kwargs, file name, state-dict wrapper, load_teacher kwargs, expected config fields)
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
def test_family_matches_timm(family, tmp_path):
  kwargs, name, wrap, load_kwargs, expected = _FAMILIES[family]
  model = _vit(**kwargs)
  path = _save(_sd(model), str(tmp_path / name), wrap)

  config, params = convert.load_teacher(path, **load_kwargs)

  assert {k: config[k] for k in expected} == expected
  assert config["scan"] is False and config["depth"] == len(model.blocks)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  _assert_same(config, params, model, _images(2, model.patch_embed.img_size[0]))


@pytest.mark.parametrize("layout", ["big_vision", "big_vision_scan", "vit_legacy"])
def test_big_vision_npz_matches_timms_own_loader(layout, tmp_path):
  # big_vision's table covers the patches only (timm's no_embed_class); the original ViT's the cls slot.
  kwargs = dict(
    embed_dim=128,
    num_heads=2,
    num_classes=10,
    act_layer="gelu_tanh",
    no_embed_class=layout != "vit_legacy",
  )
  source = _vit(**kwargs)
  path = str(tmp_path / f"{layout}.npz")
  np.savez(path, **_big_vision_npz(source, layout))
  model = _vit(seed=1, **kwargs)
  timm_vit._load_weights(model, path)  # timm's own, independent reading of the same file.
  for key, value in source.state_dict().items():  # The writer below is right (else timm disagrees).
    np.testing.assert_array_equal(model.state_dict()[key].numpy(), value.numpy(), err_msg=key)

  config, params = convert.load_teacher(path)

  assert config["mlp_act"] == "gelu_tanh" and config["num_heads"] == 2
  assert config["posemb_prefix"] == (layout == "vit_legacy")
  _assert_same(config, params, model, _images(2, 32))


def _big_vision_npz(model: torch.nn.Module, layout: str) -> dict[str, np.ndarray]:
  """A timm ViT's weights under big_vision's (or the original ViT's) flat '/'-joined names."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  width, heads = sd["cls_token"].shape[-1], model.blocks[0].attn.num_heads
  legacy = layout == "vit_legacy"
  prefix = "" if legacy else "params/"
  mha, ln2, mlp = (
    ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if legacy
    else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  )
  out = {
    "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
    "embedding/bias": sd["patch_embed.proj.bias"],
    "cls": sd["cls_token"],
    "Transformer/posembed_input/pos_embedding" if legacy else "pos_embedding": sd["pos_embed"],
    "Transformer/encoder_norm/scale": sd["norm.weight"],
    "Transformer/encoder_norm/bias": sd["norm.bias"],
    "head/kernel": sd["head.weight"].T,
    "head/bias": sd["head.bias"],
  }
  blocks = []
  for i in range(len(model.blocks)):
    b = lambda name, i=i: sd[f"blocks.{i}.{name}"]
    qkv_w = b("attn.qkv.weight").reshape(3, heads, width // heads, width)
    qkv_b = b("attn.qkv.bias").reshape(3, heads, width // heads)
    block = {
      "LayerNorm_0/scale": b("norm1.weight"),
      "LayerNorm_0/bias": b("norm1.bias"),
      f"{ln2}/scale": b("norm2.weight"),
      f"{ln2}/bias": b("norm2.bias"),
      f"{mha}/out/kernel": b("attn.proj.weight").T.reshape(heads, width // heads, width),
      f"{mha}/out/bias": b("attn.proj.bias"),
      f"{mlp}/Dense_0/kernel": b("mlp.fc1.weight").T,
      f"{mlp}/Dense_0/bias": b("mlp.fc1.bias"),
      f"{mlp}/Dense_1/kernel": b("mlp.fc2.weight").T,
      f"{mlp}/Dense_1/bias": b("mlp.fc2.bias"),
    }
    for j, name in enumerate(("query", "key", "value")):
      block[f"{mha}/{name}/kernel"] = qkv_w[j].transpose(2, 0, 1)
      block[f"{mha}/{name}/bias"] = qkv_b[j]
    blocks.append(block)
  if layout == "big_vision_scan":
    out.update(
      {f"Transformer/encoderblock/{k}": np.stack([blk[k] for blk in blocks]) for k in blocks[0]}
    )
  else:
    out.update(
      {
        f"Transformer/encoderblock_{i}/{k}": v
        for i, blk in enumerate(blocks)
        for k, v in blk.items()
      }
    )
  return {prefix + k: v for k, v in out.items()}


def test_vit_b16_same_predictions_on_fashion_mnist(tmp_path):
  model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).eval()
  _randomize(model, 0)
  path = _save(_sd(model), str(tmp_path / "vit_b16.safetensors"))

  config, params = convert.load_teacher(path)

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
  images = data.load_fashion_mnist()["test"][0][:8]  # uint8 [8, 28, 28], real images.
  x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
  x = torch.nn.functional.interpolate(
    x, size=(224, 224), mode="bilinear", align_corners=False
  ).repeat(1, 3, 1, 1)
  mean, std = data.NORMALIZATIONS["imagenet"]
  x = ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]).numpy()
  got, want = _assert_same(config, params, model, x)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize(
  "kwargs,num_prefix",
  [
    (dict(), 1),  # cls slot
    (dict(reg_tokens=2), 3),  # cls + register slots
    (dict(reg_tokens=4, no_embed_class=True), 0),  # patches only
  ],
  ids=["cls", "cls_registers", "no_embed_class"],
)
def test_resample_posemb_matches_timm(kwargs, num_prefix, tmp_path):
  model = _vit(embed_dim=128, num_heads=2, num_classes=0, **kwargs)  # 32 px, patch 8: 4x4 grid
  path = _save(_sd(model), str(tmp_path / "vit32.pth"))

  config, params = convert.load_teacher(path, num_heads=2, image_size=48, resample_posemb=True)

  want = resample_abs_pos_embed(
    model.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=num_prefix
  )
  assert params["pos_embedding"].shape == tuple(want.shape)
  np.testing.assert_allclose(params["pos_embedding"], want.numpy(), atol=1e-5)
  np.testing.assert_array_equal(
    params["pos_embedding"][:, :num_prefix], model.pos_embed[:, :num_prefix].detach()
  )
  assert vit.build(config).tokens_for(48) == 36 + config["num_registers"] + 1

  with pytest.raises(ConfigError, match=r"4x4 patch grid.*resample_posemb=True.*--resample") as e:
    convert.load_teacher(path, num_heads=2, image_size=48)
  assert e.value.field == path
  _, same = convert.load_teacher(
    path, num_heads=2, image_size=32
  )  # Same grid: nothing to resample.
  np.testing.assert_array_equal(same["pos_embedding"], model.pos_embed.detach().numpy())


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_518_resampled_to_224_matches_timm(registers, tmp_path):
  kwargs = dict(
    img_size=518,
    patch_size=14,
    embed_dim=128,
    num_heads=2,
    num_classes=0,
    init_values=1e-5,
    reg_tokens=registers,
    no_embed_class=bool(registers),
  )
  native = _vit(**kwargs)
  path = _save(_sd(native), str(tmp_path / "dinov2.pth"))

  config, params = convert.load_teacher(
    path, num_heads=2
  )  # The checkpoint's own size: 37x37 patches.
  assert params["pos_embedding"].shape == (1, 37 * 37 + (0 if registers else 1), 128)
  with pytest.raises(ConfigError, match="resample"):
    convert.load_teacher(path, num_heads=2, image_size=224)

  config, params = convert.load_teacher(path, num_heads=2, image_size=224, resample_posemb=True)

  model = timm_vit.VisionTransformer(**{**_SMALL, **kwargs, "img_size": 224}).eval()
  model.load_state_dict(timm_vit.checkpoint_filter_fn(_sd(native), model))  # timm's own resampling.
  _assert_same(config, params, model, _images(2, 224))


# ---------------------------------------------------------------------------------------------------------
# Bad input.


def _good_file(tmp_path, name: str) -> str:
  model = _vit(embed_dim=128, num_heads=2, num_classes=10)
  path = str(tmp_path / name)
  if name.endswith(".npz"):
    np.savez(path, **_big_vision_npz(model, "big_vision"))
    return path
  return _save(_sd(model), path)


@pytest.mark.parametrize("name", ["a.pth", "a.safetensors", "a.npz"])
@pytest.mark.parametrize("damage", ["truncated", "random_bytes"])
def test_damaged_file(name, damage, tmp_path):
  path = _good_file(tmp_path, name)
  with open(path, "rb") as f:
    content = f.read()
  content = (
    content[: len(content) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096)
  )
  with open(path, "wb") as f:
    f.write(content)
  with pytest.raises(ConfigError, match=r"cannot read .*truncated or not a checkpoint") as e:
    convert.load_teacher(path, num_heads=2)
  assert e.value.field == path


def test_pickled_objects_are_refused(tmp_path):
  # DINO's full checkpoints carry an argparse.Namespace; weights_only loading never runs pickled code.
  path = str(tmp_path / "dino_full.pth")
  torch.save(
    {"args": argparse.Namespace(arch="vit_small"), "model": _sd(_vit(embed_dim=128, num_heads=2))},
    path,
  )
  with pytest.raises(
    ConfigError, match=r"holds a Python object \(argparse.Namespace\).*save just its state"
  ) as e:
    convert.load_teacher(path, num_heads=2)
  assert e.value.field == path


def _sd_file(tmp_path, sd: dict, name: str = "bad.pth") -> str:
  return _save(sd, str(tmp_path / name))


def test_resnet_is_not_a_vit(tmp_path):
  path = _sd_file(tmp_path, timm.create_model("resnet18", pretrained=False).state_dict())
  with pytest.raises(
    ConfigError, match=r"not a ViT checkpoint: no 'patch_embed.proj.weight'.*conv1\.weight"
  ) as e:
    convert.load_teacher(path)
  assert e.value.field == path


def test_beit_relative_position_bias_is_unsupported(tmp_path):
  beit = timm_beit.Beit(
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=1,
    num_heads=2,
    use_abs_pos_emb=False,
    use_rel_pos_bias=True,
    init_values=0.1,
  )
  path = _sd_file(tmp_path, beit.state_dict())
  with pytest.raises(
    ConfigError,
    match=r"unsupported architecture: relative position bias.*"
    r"blocks\.0\.attn\.relative_position_bias_table",
  ) as e:
    convert.load_teacher(path)
  assert e.value.field == path


@pytest.mark.parametrize(
  "edit,pattern",
  [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing keys blocks\.1\.mlp\.fc2\.bias"),
    (
      lambda sd: sd.update({"blocks.0.attn.extra.weight": torch.zeros(3)}),
      r"unknown keys blocks\.0\.attn\.extra\.weight",
    ),
    (
      lambda sd: sd.update({"blocks.1.mlp.fc1.bias": torch.zeros(7)}),
      r"blocks\.1\.mlp\.fc1\.bias has shape \(7,\), expected \(512,\)",
    ),
    (lambda sd: sd.update({"pos_embed": torch.zeros(1, 15, 128)}), r"pos_embed has 15 positions"),
    (
      lambda sd: sd.update({"fc_norm.weight": torch.ones(128), "fc_norm.bias": torch.zeros(128)}),
      r"exactly one final LayerNorm.*found both",
    ),
  ],
  ids=["missing", "unknown", "shape", "positions", "two_norms"],
)
def test_key_problems_are_named(edit, pattern, tmp_path):
  sd = _sd(_vit(embed_dim=128, num_heads=2, num_classes=10))
  edit(sd)
  path = _sd_file(tmp_path, sd)
  with pytest.raises(ConfigError, match=pattern) as e:
    convert.load_teacher(path, num_heads=2)
  assert e.value.field == path


def test_arguments_to_fix(tmp_path):
  path = _sd_file(tmp_path, _sd(_vit(embed_dim=128, num_heads=2, num_classes=10)))
  with pytest.raises(ConfigError, match="width 128 is not a known ViT size.*--num_heads") as e:
    convert.load_teacher(path)
  assert e.value.field == "num_heads"
  with pytest.raises(ConfigError, match="not a positive multiple of the patch size 8") as e:
    convert.load_teacher(path, num_heads=2, image_size=36)
  assert e.value.field == "image_size"
  with pytest.raises(ConfigError, match="unknown family") as e:
    convert.load_teacher(path, num_heads=2, family="resnet")
  assert e.value.field == "family"
  clip = _sd_file(tmp_path, _sd(_vit(embed_dim=128, num_heads=2, pre_norm=True)), "clip.pth")
  with pytest.raises(ConfigError, match="family='clip'") as e:
    convert.load_teacher(clip, num_heads=2)
  assert e.value.field == "family"
  missing = str(tmp_path / "nope.pth")
  with pytest.raises(ConfigError, match="no such file") as e:
    convert.load_teacher(missing)
  assert e.value.field == missing
  lightning = str(tmp_path / "model.ckpt")
  open(lightning, "wb").close()
  with pytest.raises(
    ConfigError, match=r"unknown checkpoint type; expected a file ending in .npz"
  ) as e:
    convert.load_teacher(lightning)
  assert e.value.field == lightning


def test_torch_only_needed_for_pytorch_files(tmp_path, monkeypatch):
  model = _vit(embed_dim=128, num_heads=2, num_classes=10)
  pth = _sd_file(tmp_path, _sd(model), "a.pth")
  st = _sd_file(tmp_path, _sd(model), "a.safetensors")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  with pytest.raises(ConfigError, match="pip install torch") as e:
    convert.load_teacher(pth, num_heads=2)
  assert e.value.field == pth
  config, _ = convert.load_teacher(st, num_heads=2)
  assert config["width"] == 128


# ---------------------------------------------------------------------------------------------------------
# Command line.


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "at_jax.convert", *args],
    cwd=_REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_writes_an_export_that_loads_back(tmp_path):
  src = _good_file(tmp_path, "a.safetensors")
  dst = str(tmp_path / "export")
  result = _cli(src, dst, "--num_heads", "2", "--image_size", "48", "--resample")
  assert result.returncode == 0, result.stderr
  config, params = convert.load_teacher(src, num_heads=2, image_size=48, resample_posemb=True)
  assert json.loads(result.stdout) == config
  loaded_config, loaded = checkpoint.load_params(dst)
  assert loaded_config == config
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_cli_bad_file_exits_2_without_traceback(tmp_path):
  src = str(tmp_path / "bad.safetensors")
  with open(src, "wb") as f:
    f.write(b"not a checkpoint at all")
  result = _cli(src, str(tmp_path / "export"))
  assert result.returncode == 2
  assert "cannot read the file (truncated or not a checkpoint)" in result.stderr
  assert src in result.stderr and "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "export")


def test_timm_file_as_teacher_init_in_a_distill_run(tmp_path):
  """config.teacher.init may name a timm checkpoint file: converted on the fly, mirrored by the student."""
  from at_jax.experiment import loop as train
  from tests.experiment.test_loop import tiny_config

  torch.manual_seed(0)
  model = timm_vit.VisionTransformer(
    img_size=28,
    patch_size=7,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
    num_classes=0,
    global_pool="token",
    reg_tokens=1,
    no_embed_class=True,
    init_values=0.1,
  )
  path = str(tmp_path / "teacher.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  c = tiny_config(steps=2, mode="distill")
  c.teacher.init = path
  c.model.arch = "teacher"
  with pytest.raises(ConfigError, match="num_heads"):  # width 32 is no standard ViT size
    train.setup(c, str(tmp_path / "student"))
  c.teacher.num_heads = 2
  run = train.setup(c, str(tmp_path / "student"))
  assert (run.model.num_registers, run.model.posemb_prefix, run.model.layerscale_init > 0) == (
    1,
    False,
    True,
  )
  assert 0 <= train.train_and_evaluate(c, str(tmp_path / "student"))["top1"] <= 100
