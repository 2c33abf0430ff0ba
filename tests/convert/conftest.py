"""What the at_jax.convert tests share: small timm ViTs with random weights, checkpoint files written from
them, and the comparison of a converted model against timm's.

timm models get random (seeded) weights, scaled so attention is far from uniform and with every LayerNorm,
bias, token and LayerScale moved off its init so that a mis-mapped one shows. Outputs are compared by
max |ours - timm| / max |timm|; attention probabilities of EVERY layer by max absolute difference, against
timm's own non-fused attention (a hook on `attn_drop`, whose input is timm's softmax).

Every test here needs torch, timm and safetensors; without them the folder is skipped, except on CI,
which installs requirements-test.txt: a missing dependency there must fail, not skip.
"""

import functools
import os
from collections.abc import Callable

import jax
import numpy as np
import pytest

if os.environ.get("CI"):
  import safetensors.torch as safetensors_torch
  import torch
  from timm.models import vision_transformer as timm_vit
else:
  torch = pytest.importorskip(
    "torch", reason="needs the test deps: pip install -r requirements-test.txt"
  )
  pytest.importorskip("timm", reason="needs the test deps: pip install -r requirements-test.txt")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  from timm.models import vision_transformer as timm_vit

from at_jax.models import vit

# Float32 conversions agree to ~1e-6; a wrong GELU (tanh for exact) moves both by ~1e-4.
OUT_RTOL = 1e-5  # max |ours - timm| / max |timm| of logits or features
ATTN_ATOL = 1e-5  # max |ours - timm| of attention probabilities, every layer
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
  """Random images [B, C, Y, X] (torch's NCHW)."""
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _timm_run(model: torch.nn.Module, images_BCYX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """timm's outputs [B, V] and attention probabilities [L, B, H, N, N] (its own softmax)."""
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
      out = model(torch.from_numpy(images_BCYX)).numpy()
  finally:
    for hook in hooks:
      hook.remove()
  return out, np.stack(probs)


def _our_run(config: dict, params: dict, images_BCYX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  model = vit.build(config)
  out, aux = jax.jit(functools.partial(model.apply, train=False))(
    {"params": params}, images_BCYX.transpose(0, 2, 3, 1)
  )  # NCHW -> NHWC
  return np.asarray(out), np.asarray(jax.nn.softmax(aux["attn_logits"], axis=-1))


def _assert_same(
  config: dict, params: dict, model: torch.nn.Module, images_BCYX: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Asserts our converted model and timm's agree; returns both outputs (ours, timm's)."""
  want_out, want_attn = _timm_run(model, images_BCYX)
  got_out, got_attn = _our_run(config, params, images_BCYX)
  assert got_out.shape == want_out.shape and got_attn.shape == want_attn.shape
  out_err = float(np.abs(got_out - want_out).max() / np.abs(want_out).max())
  attn_err = float(np.abs(got_attn - want_attn).max())
  print(
    f"output rel. err {out_err:.2e}, attention abs. err {attn_err:.2e} (max prob "
    f"{want_attn.max():.2f}, {want_attn.shape[0]} layers)"
  )
  assert out_err <= OUT_RTOL
  assert attn_err <= ATTN_ATOL
  # The weights make attention peaked, so the comparison means something.
  assert want_attn.max() > 0.3
  return got_out, want_out


def _sd(model: torch.nn.Module) -> dict:
  return {k: v.clone() for k, v in model.state_dict().items()}


def _save(sd: dict, path: str, wrap: Callable | None = None) -> str:
  if path.endswith(".safetensors"):
    safetensors_torch.save_file(sd, path)
  else:
    torch.save(wrap(sd) if wrap else sd, path)
  return path


def _big_vision_npz(model: torch.nn.Module, layout: str) -> dict[str, np.ndarray]:
  """A timm ViT's weights under big_vision's (or the original ViT's) flat '/'-joined names."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  legacy = layout == "vit_legacy"
  prefix = "" if legacy else "params/"
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
  heads = model.blocks[0].attn.num_heads
  blocks = [_big_vision_block(sd, i, heads, legacy) for i in range(len(model.blocks))]
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


def _big_vision_block(sd: dict, i: int, heads: int, legacy: bool) -> dict[str, np.ndarray]:
  """Block `i` of a timm state dict (numpy) under big_vision's names (legacy: numbered submodules)."""
  width = sd["cls_token"].shape[-1]
  mha, ln2, mlp = (
    ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if legacy
    else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  )
  b = lambda name: sd[f"blocks.{i}.{name}"]
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
  return block


@pytest.fixture(scope="session")
def make_vit() -> Callable[..., torch.nn.Module]:
  """`make_vit(seed=0, **timm_kwargs)`: a small timm ViT with random weights, in eval mode."""
  return _vit


@pytest.fixture(scope="session")
def randomize() -> Callable[[torch.nn.Module, int], None]:
  """`randomize(model, seed)`: moves every weight of a timm ViT off its init (as `make_vit` does)."""
  return _randomize


@pytest.fixture(scope="session")
def make_images() -> Callable[..., np.ndarray]:
  """`make_images(batch, size, seed=0)`: random NCHW images."""
  return _images


@pytest.fixture(scope="session")
def assert_same() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
  """`assert_same(config, params, timm_model, images_BCYX)`: outputs and every layer's attention agree."""
  return _assert_same


@pytest.fixture(scope="session")
def state_dict_of() -> Callable[[torch.nn.Module], dict]:
  """`state_dict_of(model)`: a copy of a timm model's state dict."""
  return _sd


@pytest.fixture(scope="session")
def save_checkpoint() -> Callable[..., str]:
  """`save_checkpoint(sd, path, wrap=None)`: `.safetensors`, or torch.save of `wrap(sd)`; the path."""
  return _save


@pytest.fixture(scope="session")
def big_vision_npz() -> Callable[[torch.nn.Module, str], dict[str, np.ndarray]]:
  """`big_vision_npz(model, layout)`: a timm ViT's weights as a big_vision .npz holds them
  (layout: "big_vision", "big_vision_scan" or "vit_legacy")."""
  return _big_vision_npz


@pytest.fixture
def write_state_dict(tmp_path) -> Callable[..., str]:
  """`write_state_dict(sd, name="bad.pth")`: saves a state dict under tmp_path; its path."""
  return lambda sd, name="bad.pth": _save(sd, str(tmp_path / name))


@pytest.fixture
def good_file(tmp_path) -> Callable[[str], str]:
  """`good_file(name)`: a convertible ViT (width 128, 2 heads, 10 classes) saved under tmp_path as `name`
  (.npz in big_vision's layout, else a timm state dict); its path."""

  def write(name: str) -> str:
    model = _vit(embed_dim=128, num_heads=2, num_classes=10)
    path = str(tmp_path / name)
    if name.endswith(".npz"):
      np.savez(path, **_big_vision_npz(model, "big_vision"))
      return path
    return _save(_sd(model), path)

  return write
