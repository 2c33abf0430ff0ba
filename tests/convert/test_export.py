"""at_jax.convert.export: a params export, written as timm's or Hugging Face's ViT / DINOv2, loads with the real
library and computes what ours computes (logits or pre-logits, and every layer's attention probabilities,
to ~1e-5); it reads back through at_jax's own importer unchanged; what a target cannot express is refused
naming the target that can; what is not an export is refused naming it; the CLI drives it.

Random small ViTs (width 32, 2 layers, 2 heads, 32 px) with every weight moved off its init and q/k
scaled so that attention is peaked, as tests/convert/conftest.py does for timm's.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import jax
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import transformers

from at_jax import checkpoint
from at_jax.convert import __main__ as cli
from at_jax.convert import export, export_hf, export_keys
from at_jax.convert.load import load_checkpoint
from at_jax.errors import ConfigError
from at_jax.models import vit
from tests.conftest import subprocess_env

OUT_RTOL = 1e-5  # max |ours - torch| / max |torch| of logits or pre-logits
ATTN_ATOL = 1e-5  # max |ours - torch| of attention probabilities, every layer
_BASE = dict(num_classes=5, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, pool="cls")
# Name -> the ViT fields it changes; every one goes to timm, those in _HF_KINDS to Hugging Face too.
KINDS = {
  "cls_head": {},
  "gap_fc_norm": dict(pool="gap"),
  "registers": dict(num_registers=2),
  "registers_no_prefix_slots_gap": dict(num_registers=2, posemb_prefix=False, pool="gap"),
  "layerscale_qk_norm": dict(layerscale_init=0.1, qk_norm=True, num_heads=4),
  # CLIP-like: no cls token, LayerNorm before the blocks (the patch bias folds into the table), eps 1e-5
  "no_cls_pre_norm_clip": dict(
    class_token=False, pool="gap", pre_norm=True, norm_eps=1e-5, mlp_act="quick_gelu"
  ),
  "sincos_quick_gelu": dict(posemb="sincos2d", mlp_act="quick_gelu"),
  "headless_tanh_no_qkv_bias": dict(num_classes=0, mlp_act="gelu_tanh", qkv_bias=False),
  "cls_without_prefix_slot": dict(posemb_prefix=False, norm_eps=1e-5),
  "scan_layout": dict(scan=True),
  "gray_28px": dict(patch_size=7, mlp_dim=48),
  # DINOv2-g-like (timm's SwiGLUPacked, 4 registers without table slots, LayerScale), 28 px; its
  # odd width makes float rounding truncate timm's int(88 * 458 / 88) to 457: the nudged mlp_ratio
  "swiglu_registers_layerscale": dict(
    mlp_act="swiglu",
    width=88,
    num_heads=4,
    mlp_dim=229,
    patch_size=7,
    layerscale_init=0.1,
    num_registers=4,
    posemb_prefix=False,
  ),
  # SwiGLU without LayerScale: timm's entrypoint defaults to LayerScale unless told 0.0 (None is dropped)
  "swiglu_no_layerscale_gap": dict(mlp_act="swiglu", mlp_dim=40, class_token=False, pool="gap"),
}
# Hugging Face's DINOv2 only (timm's parity has these architectures above), 28 px at patch 7: LayerScale
# with a head (Dinov2ForImageClassification), headless with registers (Dinov2WithRegistersModel), SwiGLU
# (mlp_ratio 4: 2/3 of 256 rounded up to 176) with a head; cls_mean heads (DINOv2's classifier as it is,
# which timm cannot express): with LayerScale, and with registers (in table slots, folded into the
# tokens) and no LayerScale (lambda1 = 1), a plain ViT otherwise, at _BASE's width.
_DINOV2_KINDS = {
  "dinov2_layerscale": dict(layerscale_init=0.1, width=64, num_heads=4, mlp_dim=256, patch_size=7),
  "dinov2_registers_layerscale": dict(
    layerscale_init=0.1,
    num_registers=4,
    posemb_prefix=False,
    num_classes=0,
    width=64,
    num_heads=4,
    mlp_dim=256,
    patch_size=7,
  ),
  "dinov2_swiglu": dict(
    mlp_act="swiglu", layerscale_init=0.1, width=64, num_heads=4, mlp_dim=176, patch_size=7
  ),
  "dinov2_cls_mean": dict(pool="cls_mean", layerscale_init=0.1, patch_size=7),
  "dinov2_registers_cls_mean": dict(pool="cls_mean", num_registers=2, patch_size=7),
}
_HF_KINDS = [
  "cls_head",
  "sincos_quick_gelu",
  "headless_tanh_no_qkv_bias",
  "cls_without_prefix_slot",
  "scan_layout",
  "gray_28px",
  # DINOv2 with registers, no LayerScale (lambda1 = 1), register slots folded into the tokens
  "registers",
  *_DINOV2_KINDS,
]


# What the importer reads off the keys (LayerNorm eps, activation and LayerScale's init it cannot).
# fmt: off
_ARCH_FIELDS = (
  "num_classes", "patch_size", "width", "depth", "mlp_dim", "num_heads", "pool", "class_token",
  "num_registers", "posemb_prefix", "pre_norm", "qkv_bias", "qk_norm",
)
# fmt: on


def _input(kind: str) -> tuple[int, int]:
  """(image size, channels)."""
  if kind in _DINOV2_KINDS:
    return 28, 3
  return {"gray_28px": (28, 1), "swiglu_registers_layerscale": (28, 3)}.get(kind, (32, 3))


def _randomized(params: dict, seed: int) -> dict:
  """Every leaf off its init: kernels redrawn (q/k at 1.3 / sqrt(fan_in): peaked attention), vectors,
  tokens and tables shifted."""
  rng = np.random.default_rng(seed)

  def redraw(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    leaf = np.asarray(leaf)
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if (
      names[-1] != "kernel"
    ):  # biases, LayerNorm scales, LayerScale, cls, registers, position table
      return leaf + (0.1 if names[-1] in ("cls", "registers", "pos_embedding") else 0.2) * noise
    qkv = names[-2] in ("query", "key", "value")
    fan_in = leaf.shape[0] if qkv else int(np.prod(leaf.shape[:-1]))
    return (1.3 if names[-2] in ("query", "key") else 0.7) * noise / fan_in**0.5

  return jax.tree_util.tree_map_with_path(redraw, params)


def _make_export(path: str, kind: str, seed: int = 0, **extra) -> tuple[dict, dict]:
  """Writes a random ViT of `kind` as a params export at `path`; (its fields, its params)."""
  fields = {**_BASE, **{**KINDS, **_DINOV2_KINDS}[kind], **extra}
  scan = fields.pop("scan", False)
  model = vit.build(fields)
  size, channels = _input(kind)
  images = np.zeros((1, size, size, channels), np.float32)
  params = _randomized(model.init(jax.random.key(seed), images, train=False)["params"], seed)
  if scan:
    model, params = model.clone(scan=True), vit.loop_to_scan(params)
  checkpoint.save_params(path, params, vit.model_fields(model))
  return vit.model_fields(model), params


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Callable[[str], tuple[str, dict, dict]]:
  """`exported(kind)`: (path, fields, params) of a random export of `kind`, written once per module."""
  cache = {}

  def get(kind: str) -> tuple[str, dict, dict]:
    if kind not in cache:
      path = str(tmp_path_factory.mktemp("exports") / kind)
      cache[kind] = (path, *_make_export(path, kind))
    return cache[kind]

  return get


def _images(kind: str, batch: int = 2) -> np.ndarray:
  """Random float images [B, C, Y, X] (torch's NCHW)."""
  size, channels = _input(kind)
  return np.random.default_rng(1).normal(size=(batch, channels, size, size)).astype(np.float32)


def _ours(fields: dict, params: dict, images_BCYX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Our logits (pre-logits when headless) and attention probabilities [L, B, H, N, N]."""
  model = vit.build(fields)
  apply = jax.jit(functools.partial(model.apply, train=False))
  out, aux = apply({"params": params}, images_BCYX.transpose(0, 2, 3, 1))  # NCHW -> NHWC
  return np.asarray(out), np.asarray(jax.nn.softmax(aux["attn_logits"], axis=-1))


def _timm_model(out_dir: str) -> torch.nn.Module:
  """The two lines of at_jax.convert.export's docstring."""
  with open(os.path.join(out_dir, "timm_args.json")) as f:
    args = json.load(f)
  model = timm.create_model(args["model_name"], pretrained=False, **args["kwargs"])
  model.load_state_dict(safetensors.torch.load_file(os.path.join(out_dir, "model.safetensors")))
  return model.eval()


def _timm_run(model: torch.nn.Module, images_BCYX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """timm's outputs and attention probabilities [L, B, H, N, N], from its explicit (unfused) softmax."""
  probs = []
  hooks = []
  for block in model.blocks:
    block.attn.fused_attn = False
    hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o)))
  try:
    with torch.no_grad():
      out = model(torch.from_numpy(images_BCYX)).numpy()
  finally:
    for hook in hooks:
      hook.remove()
  return out, np.stack([p.numpy() for p in probs])


def _hf_run(out_dir: str, head: bool, images_BCYX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """transformers' logits (pre-logits when headless: ViTModel's cls token of last_hidden_state,
  DINOv2's pooler_output) and attention probabilities [L, B, H, N, N], from the class config.json
  names; asserts every weight was loaded."""
  with open(os.path.join(out_dir, "config.json")) as f:
    (name,) = json.load(f)["architectures"]
  kwargs = dict(add_pooling_layer=False) if name == "ViTModel" else {}
  model, info = getattr(transformers, name).from_pretrained(
    out_dir, attn_implementation="eager", output_loading_info=True, **kwargs
  )
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  with torch.no_grad():
    result = model.eval()(pixel_values=torch.from_numpy(images_BCYX), output_attentions=True)
  if head:
    out = result.logits
  elif name == "ViTModel":
    out = result.last_hidden_state[:, 0]
  else:
    out = result.pooler_output
    torch.testing.assert_close(out, result.last_hidden_state[:, 0], rtol=0, atol=0)
  return out.numpy(), np.stack([a.numpy() for a in result.attentions])


def _assert_close(got: tuple, want: tuple) -> None:
  (got_out, got_attn), (want_out, want_attn) = got, want
  assert got_out.shape == want_out.shape and got_attn.shape == want_attn.shape
  out_err = float(np.abs(got_out - want_out).max() / np.abs(want_out).max())
  attn_err = float(np.abs(got_attn - want_attn).max())
  print(f"output rel. err {out_err:.1e}, attention abs. err {attn_err:.1e}")
  assert out_err <= OUT_RTOL and attn_err <= ATTN_ATOL
  assert want_attn.max() > 0.3  # peaked maps: the comparison means something


@pytest.mark.parametrize("kind", list(KINDS))
def test_timm_computes_what_we_compute(kind, exported, tmp_path):
  src, fields, params = exported(kind)
  export.export(src, str(tmp_path), "timm")
  model = _timm_model(str(tmp_path))
  norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
  assert norms and all(m.eps == pytest.approx(fields["norm_eps"]) for m in norms)
  if fields["mlp_act"] == "swiglu":  # timm's SwiGLUPacked: act(fc1's first half) * second half
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, timm.layers.GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
    assert not mlp.gate_last and mlp.fc2.in_features == fields["mlp_dim"]
  images_BCYX = _images(kind)
  _assert_close(_ours(fields, params, images_BCYX), _timm_run(model, images_BCYX))


@pytest.mark.parametrize("kind", _HF_KINDS)
def test_hugging_face_computes_what_we_compute(kind, exported, tmp_path):
  src, fields, params = exported(kind)
  config, _ = export.export(src, str(tmp_path), "hf")
  head = fields["num_classes"] > 0
  family = {"vit": "ViT", "dinov2": "Dinov2", "dinov2_with_registers": "Dinov2WithRegisters"}
  assert config["model_type"] == export_keys.hf_model_type(fields)
  want_class = family[config["model_type"]] + ("ForImageClassification" if head else "Model")
  assert config["architectures"] == [want_class]
  assert (config["model_type"] == "vit") == (kind not in ("registers", *_DINOV2_KINDS))
  images_BCYX = _images(kind)
  want = _hf_run(str(tmp_path), head, images_BCYX)
  _assert_close(_ours(fields, params, images_BCYX), want)


@pytest.mark.parametrize(
  "kind",
  [
    "cls_head",
    "registers_no_prefix_slots_gap",
    "layerscale_qk_norm",
    "scan_layout",
    "swiglu_registers_layerscale",
  ],
)
def test_timm_export_reads_back_unchanged(kind, exported, tmp_path):
  src, fields, _ = exported(kind)
  export.export(src, str(tmp_path), "timm")
  want, _ = export.read_params(src, export.read_fields(src))  # loop layout, "/" paths
  # The heads come from the timm_args.json beside the weights, as `python -m at_jax.convert` reads it.
  config, params = load_checkpoint(str(tmp_path / "model.safetensors"))
  got = {
    "/".join(str(getattr(k, "key", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert {k: config[k] for k in _ARCH_FIELDS} == {k: fields[k] for k in _ARCH_FIELDS}


@pytest.mark.parametrize(
  "kind",
  [
    "cls_head",
    "headless_tanh_no_qkv_bias",
    "scan_layout",
    *(k for k in _DINOV2_KINDS if k != "dinov2_registers_cls_mean"),  # it reads back LayerScale 1
  ],
)
def test_hugging_face_export_reads_back_unchanged(kind, exported, tmp_path):
  """Through at_jax's Hugging Face importer (`hf`, its own table of transformers' names), heads too: a
  DINOv2 classifier whose mean-patch half is zero, as ours are written, reads back as our cls head; a
  cls_mean head as itself."""
  pytest.importorskip("at_jax.convert.hf_folder", reason="needs at_jax's Hugging Face importer")
  src, fields, _ = exported(kind)
  export.export(src, str(tmp_path), "hf")
  want, _ = export.read_params(src, export.read_fields(src))
  config, params = load_checkpoint(str(tmp_path))
  got = {
    "/".join(str(getattr(k, "key", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  arch = (*_ARCH_FIELDS, "mlp_act", "norm_eps", "layerscale_init")
  assert {k: config[k] for k in arch} == {k: fields[k] for k in arch}


def test_timm_args_name_a_stock_model_when_there_is_one():
  fields = vit.model_fields(vit.build({"num_classes": 1000, "variant": "B/16", "pool": "cls"}))
  args = export_keys.timm_args(fields, 224, 3)
  assert args["model_name"] == "vit_base_patch16_224"
  assert args["kwargs"]["embed_dim"] == 768 and args["kwargs"]["global_pool"] == "token"
  clip = export_keys.timm_args({**fields, "norm_eps": 1e-5, "pre_norm": True}, 224, 3)
  assert clip["model_name"] == "vit_base_patch16_clip_224"  # the name carries eps 1e-5
  odd = export_keys.timm_args({**fields, "width": 96, "mlp_dim": 250}, 224, 3)
  assert odd["model_name"] == "vit_base_patch16_224"  # no stock model: the kwargs say it all
  assert int(96 * odd["kwargs"]["mlp_ratio"]) == 250


def test_timm_args_build_swiglu_on_the_dinov2_g_entrypoints():
  """timm builds SwiGLUPacked only through DINOv2-g's names; the kwargs override its architecture."""
  giant = dict(width=1536, depth=40, num_heads=24, patch_size=14, mlp_dim=4096, mlp_act="swiglu")
  fields = vit.model_fields(vit.build({**giant, "num_classes": 0, "layerscale_init": 1e-5}))
  args = export_keys.timm_args(fields, 518, 3)
  assert args["model_name"] == "vit_giant_patch14_dinov2"
  assert int(1536 * args["kwargs"]["mlp_ratio"]) == 2 * 4096  # fc1: [gate | value]
  assert args["kwargs"]["act_layer"] == "silu" and args["kwargs"]["init_values"] == 1e-5
  regs = {**fields, "num_registers": 4, "posemb_prefix": False}
  assert export_keys.timm_args(regs, 518, 3)["model_name"] == "vit_giant_patch14_reg4_dinov2"
  small = export_keys.timm_args({**fields, "width": 88, "num_heads": 4, "mlp_dim": 229}, 28, 3)
  assert small["model_name"] == "vit_giant_patch14_dinov2"
  assert small["kwargs"]["embed_dim"] == 88 and int(88 * small["kwargs"]["mlp_ratio"]) == 458


def _config_only(path, **fields) -> str:
  """A directory with only model_config.json: enough for the refusals, which come before the params."""
  os.makedirs(path)
  with open(os.path.join(path, "model_config.json"), "w") as f:
    json.dump(vit.model_fields(vit.build({**_BASE, **fields})), f)
  return str(path)


def test_hugging_face_refuses_what_it_cannot_express_and_names_timm(tmp_path):
  src = _config_only(
    tmp_path / "x", num_registers=4, layerscale_init=1e-5, qk_norm=True, pre_norm=True, pool="gap"
  )
  with pytest.raises(ConfigError) as e:
    export.export(src, str(tmp_path / "out"), "hf")
  assert e.value.field == "to"
  for what in ("QK-norm", "pre_norm", "'gap' pooling"):
    assert what in e.value.message
  # registers and LayerScale are DINOv2's, which Hugging Face takes
  assert "register" not in e.value.message and "LayerScale" not in e.value.message
  assert src in e.value.message and "--to=timm, which can take it" in e.value.message
  assert not os.path.exists(tmp_path / "out")


def test_hugging_face_refuses_an_mlp_dinov2_cannot_state_and_names_timm(tmp_path):
  """DINOv2's config states int(width * mlp_ratio) hidden units, a whole ratio (transformers 5 takes
  no other); SwiGLU 2/3 of them rounded up to a multiple of 8. ViTModel states any width."""
  swiglu = _config_only(tmp_path / "s", mlp_act="swiglu", width=88, num_heads=4, mlp_dim=229)
  layerscale = _config_only(tmp_path / "l", layerscale_init=0.1, mlp_dim=48)
  for src, what in ((swiglu, "an MLP 229 wide at width 88"), (layerscale, "an MLP 48 wide")):
    with pytest.raises(ConfigError, match=rf"{what}.*\(mlp_dim;.*--to=timm, which can take") as e:
      export.export(src, str(tmp_path / "out"), "hf")
    assert e.value.field == "to"
  assert not export_keys.unsupported(export.read_fields(layerscale) | {"layerscale_init": 0.0})[
    "hf"
  ]


def test_hugging_face_config_states_dinov2_sizes():
  """The hub's DINOv2 sizes get their whole mlp_ratio 4 back; transformers' strict configs take it."""
  for width, mlp_dim, act in ((384, 1536, "gelu"), (1024, 4096, "gelu"), (1536, 4096, "swiglu")):
    size = dict(width=width, num_heads=width // 64, mlp_dim=mlp_dim, mlp_act=act)
    fields = vit.model_fields(vit.build(dict(num_classes=0, layerscale_init=1e-5, **size)))
    assert export_keys.dinov2_mlp_ratio(fields) == 4
  config = export_hf.hf_config({**fields, "num_registers": 4, "posemb_prefix": False}, 518, 3)
  assert config["architectures"] == ["Dinov2WithRegistersModel"]
  built = transformers.Dinov2WithRegistersConfig.from_dict(config)
  assert built.use_swiglu_ffn and built.num_register_tokens == 4 and built.layerscale_value == 1e-5
  head = export_hf.hf_config({**fields, "num_classes": 3, "layerscale_init": 0.0}, 518, 3)
  assert head["architectures"] == ["Dinov2ForImageClassification"]
  assert transformers.Dinov2Config.from_dict(head).num_labels == 3


def test_cls_mean_pooling_goes_to_hugging_face_only(tmp_path):
  """timm's heads read the cls token or the patch mean, not both: refused, naming model.pool and the
  target that takes it. Hugging Face takes it as DINOv2's classifier, which a headless DINOv2 lacks."""
  src = _config_only(tmp_path / "x", pool="cls_mean")
  with pytest.raises(
    ConfigError, match=r"'cls_mean' pooling \(model.pool;.*--to=hf, which can"
  ) as e:
    export.export(src, str(tmp_path / "out"), "timm")
  assert e.value.field == "to" and not os.path.exists(tmp_path / "out")
  assert (
    export_keys.hf_model_type(export.read_fields(src)) == "dinov2"
  )  # no LayerScale: still DINOv2
  headless = _config_only(tmp_path / "h", pool="cls_mean", num_classes=0)
  with pytest.raises(ConfigError, match=r"'cls_mean' pooling without a head.*neither timm nor"):
    export.export(headless, str(tmp_path / "out"), "hf")
  with pytest.raises(
    ConfigError, match="model.pool"
  ) as e:  # as 'cls' pooling, it needs a cls token
    _config_only(tmp_path / "n", pool="cls_mean", class_token=False)
  assert e.value.field == "model.pool"


def test_timm_refuses_swiglu_with_an_eps_dinov2_g_does_not_fix(tmp_path):
  src = _config_only(tmp_path / "x", mlp_act="swiglu", norm_eps=1e-5)
  with pytest.raises(
    ConfigError, match=r"LayerNorm eps 1e-05 with SwiGLU.*--to=hf, which can"
  ) as e:
    export.export(src, str(tmp_path / "out"), "timm")
  assert e.value.field == "to"


def test_hugging_face_refuses_a_vit_without_cls_token(tmp_path):
  src = _config_only(tmp_path / "x", class_token=False, pool="gap")
  with pytest.raises(ConfigError, match=r"class_token=False.*--to=timm") as e:
    export.export(src, str(tmp_path / "out"), "hf")
  assert e.value.field == "to"


def test_timm_refuses_an_eps_no_entrypoint_has_and_names_hugging_face(tmp_path):
  src = _config_only(tmp_path / "x", norm_eps=1e-3)
  with pytest.raises(ConfigError, match=r"LayerNorm eps 0.001.*--to=hf, which can take it") as e:
    export.export(src, str(tmp_path / "out"), "timm")
  assert e.value.field == "to"


def test_a_vit_neither_target_can_express_is_refused_saying_so(tmp_path):
  src = _config_only(tmp_path / "x", norm_eps=1e-3, qk_norm=True)
  with pytest.raises(ConfigError, match=r"neither timm nor Hugging Face.*hf: QK-norm"):
    export.export(src, str(tmp_path / "out"), "timm")


def test_what_is_not_an_export_is_refused_naming_it(tmp_path, exported):
  src, _, _ = exported("cls_head")
  workdir = tmp_path / "workdir"
  shutil.copytree(src, workdir / "params")
  (tmp_path / "empty").mkdir()
  (tmp_path / "model.pth").write_bytes(b"weights")
  cases = {
    str(tmp_path / "missing"): "does not exist",
    str(tmp_path / "empty"): "no model_config.json: not a params export",
    str(tmp_path / "model.pth"): "without --export",
    str(workdir): f"a run's workdir, not an export; its exports are {workdir}/params",
    str(workdir / "params" / "params"): f"pass {workdir}/params",
  }
  for path, message in cases.items():
    with pytest.raises(ConfigError) as e:
      export.export(path, str(tmp_path / "out"), "timm")
    assert e.value.field == path and message in e.value.message, e.value.message


def test_params_that_do_not_fit_their_config_are_refused(tmp_path, exported):
  src, fields, _ = exported("cls_head")
  shutil.copytree(src, tmp_path / "x")
  with open(tmp_path / "x" / "model_config.json", "w") as f:
    json.dump({**fields, "mlp_dim": 128}, f)
  with pytest.raises(ConfigError, match=r"do not match its model_config.json: .*Dense_0") as e:
    export.export(str(tmp_path / "x"), str(tmp_path / "out"), "timm")
  assert e.value.field == str(tmp_path / "x")


def test_training_heads_are_dropped_with_a_note(tmp_path, capsys):
  src = str(tmp_path / "x")
  fields, _ = _make_export(src, "cls_head", feature_dim=16, head_mix=(1, 2, 2))
  assert fields["feature_dim"] == 16
  code = cli.main(["--export", src, str(tmp_path / "out"), "--to=timm"])
  assert code == 0
  assert "note: dropped the training-only feature_proj and head_mix" in capsys.readouterr().err
  _timm_model(str(tmp_path / "out"))  # strict: nothing extra, nothing missing


def test_cli_exports_and_prints_what_rebuilds_the_model(tmp_path, exported, capsys):
  src, _, _ = exported("cls_head")
  for to, meta in (("timm", "timm_args.json"), ("hf", "config.json")):
    dst = tmp_path / to
    assert cli.main(["--export", src, str(dst), f"--to={to}"]) == 0
    with open(dst / meta) as f:
      assert json.loads(capsys.readouterr().out) == json.load(f)
    assert (dst / "model.safetensors").exists()


def test_cli_refusals_exit_2_naming_the_problem(tmp_path, capsys):
  missing = str(tmp_path / "missing")
  assert cli.main(["--export", missing, str(tmp_path / "out"), "--to=hf"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {missing}: does not exist")
  for argv, message in (
    (["--export", missing, "out"], "--export needs --to=timm or --to=hf"),
    ([missing, "out", "--to=hf"], "--to goes with --export"),
    (["--export", missing, "out", "--to=hf", "--num_heads=2"], "--num_heads: not for --export"),
  ):
    with pytest.raises(SystemExit) as e:
      cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_subprocess_exports_to_hugging_face(tmp_path, exported):
  src, _, _ = exported("headless_tanh_no_qkv_bias")
  dst = str(tmp_path / "hf")
  result = subprocess.run(
    [sys.executable, "-m", "at_jax.convert", "--export", src, dst, "--to=hf"],
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["architectures"] == ["ViTModel"]
  assert os.path.exists(os.path.join(dst, "model.safetensors"))
