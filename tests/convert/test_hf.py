"""Hugging Face `transformers` folders (at_jax.convert.hf, hf_folder) against transformers itself.

Each family is built in transformers from a small config with random weights (every weight moved off its
init, q and k scaled so attention is peaked), written by `save_pretrained` and converted; then our ViT
and transformers' (eager attention) must agree to `ATOL` on the tokens before and after the final
LayerNorm, the pooled output or logits, every layer's attention probabilities, and the attention-transfer
loss against the same fixed student maps. Everything is offline: nothing is fetched from the hub.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  # after the skips: needs torch

from at_jax.convert import __main__ as cli  # noqa: E402
from at_jax.convert import hf, hf_posemb, posemb  # noqa: E402
from at_jax.convert.load import load_checkpoint  # noqa: E402
from at_jax.errors import ConfigError  # noqa: E402
from at_jax.models import vit  # noqa: E402
from at_jax.transfer import loss  # noqa: E402

ATOL = 1e-5
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28)
_DINO = dict(_SMALL, patch_size=14, mlp_ratio=2, layer_norm_eps=1e-6)


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """`model` in eval mode with every weight moved off its init: a mis-mapped bias, LayerNorm, token or
  LayerScale shows, and q/k at ~2/sqrt(fan_in) make attention peaked."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim <= 1 or "token" in name or ("embedding" in name and "patch" not in name):
        p.add_(0.2 * noise)
      else:
        qk = any(s in name for s in ("query", "key", "q_proj", "k_proj"))
        p.copy_((2.0 if qk else 0.7) * noise / p[0].numel() ** 0.5)
  return model.eval()


def _build(cls_name: str, config_cls: str, seed: int = 0, **config) -> torch.nn.Module:
  torch.manual_seed(seed)
  cfg = getattr(transformers, config_cls)(**config)
  cfg._attn_implementation = (
    "eager"  # the explicit softmax, whose probabilities output_attentions gives
  )
  return _randomized(getattr(transformers, cls_name)(cfg), seed)


def _images(size: int, batch: int = 2) -> np.ndarray:
  """Random images [B, C, Y, X] (torch's NCHW)."""
  return np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)


def _ours(config: dict, params: dict, images_BCYX: np.ndarray) -> tuple[np.ndarray, dict]:
  model = vit.build(config)
  out, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
    params, images_BCYX.transpose(0, 2, 3, 1)
  )
  return np.asarray(out), jax.tree.map(np.asarray, aux)


def _layer_norm(x: np.ndarray, norm: dict, eps: float) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * norm["scale"] + norm["bias"]


def _close(got: np.ndarray, want, what: str) -> float:
  want = np.asarray(want.detach() if hasattr(want, "detach") else want)
  assert got.shape == want.shape, f"{what}: {got.shape} vs {want.shape}"
  err = float(np.abs(got - want).max())
  assert err <= ATOL, f"{what}: max |ours - transformers| = {err:.2e}"
  return err


def _check_parity(
  config: dict, params: dict, hf_out, images_BCYX: np.ndarray, *, normed=None, pooled=None
) -> None:
  """Our converted model against transformers' outputs `hf_out` (output_attentions and
  output_hidden_states on): tokens before the final norm, `normed` (the sequence after it), `pooled`
  (pooler output or logits, against our head output), attention maps and the transfer loss."""
  out, aux = _ours(config, params, images_BCYX)
  errs = {"tokens": _close(aux["tokens"], hf_out.hidden_states[-1], "tokens before the final norm")}
  if normed is not None:
    got = _layer_norm(aux["tokens"], params["encoder_norm"], config["norm_eps"])
    errs["normed"] = _close(got, normed, "tokens after the final norm")
  if pooled is not None:
    errs["pooled"] = _close(out, pooled, "pooled output / logits")
  probs_LBHNN = torch.stack(hf_out.attentions).numpy()
  got = np.asarray(jax.nn.softmax(aux["attn_logits"], axis=-1))
  errs["attention"] = _close(got, probs_LBHNN, "attention probabilities")
  assert probs_LBHNN.max() > 0.3  # peaked: the comparison means something
  # The transfer loss with our converted teacher's maps vs the same formula in torch on transformers'.
  student_LBHNN = np.random.default_rng(1).normal(size=probs_LBHNN.shape).astype(np.float32)
  ours = np.asarray(loss.attention_cross_entropy(aux["attn_logits"], student_LBHNN))
  theirs = -(torch.from_numpy(probs_LBHNN) * torch.log_softmax(torch.from_numpy(student_LBHNN), -1))
  errs["loss"] = _close(ours, theirs.sum(-1), "attention cross-entropy")
  print(", ".join(f"{k} {v:.1e}" for k, v in errs.items()), f"({len(probs_LBHNN)} layers)")


def _run(model: torch.nn.Module, images_BCYX: np.ndarray, **kwargs):
  with torch.no_grad():
    return model(
      torch.from_numpy(images_BCYX), output_attentions=True, output_hidden_states=True, **kwargs
    )


def _save(model: torch.nn.Module, folder, **kwargs) -> str:
  model.save_pretrained(str(folder), **kwargs)
  return str(folder)


@pytest.mark.parametrize(
  "cls_name, extra",
  [
    ("ViTForImageClassification", dict(num_labels=5)),
    # ViTModel: its pooler is dropped; no q/k/v biases; the tanh GELU.
    ("ViTModel", dict(qkv_bias=False, hidden_act="gelu_pytorch_tanh")),
  ],
)
def test_vit(tmp_path, cls_name, extra):
  model = _build(cls_name, "ViTConfig", **_SMALL, patch_size=7, intermediate_size=64, **extra)
  folder = _save(model, tmp_path)
  stored = load_file(os.path.join(folder, "model.safetensors"))
  assert ("pooler.dense.weight" in stored) == (
    cls_name == "ViTModel"
  )  # dropped: no map depends on it
  config, params = load_checkpoint(folder)
  assert config["qkv_bias"] == extra.get("qkv_bias", True)
  assert config["num_classes"] == extra.get("num_labels", 0)
  images = _images(28)
  out = _run(model, images)
  base = model if cls_name == "ViTModel" else model.vit
  normed = _run(base, images).last_hidden_state
  _check_parity(config, params, out, images, normed=normed, pooled=getattr(out, "logits", None))


def test_vit_mae_encoder(tmp_path):
  """ViTMAEForPreTraining: the encoder converts, the decoder is dropped. Its forward shuffles and drops
  patches by `noise`; mask_ratio 0 and increasing noise keep every patch in order."""
  model = _build(
    "ViTMAEForPreTraining",
    "ViTMAEConfig",
    **_SMALL,
    patch_size=7,
    intermediate_size=64,
    mask_ratio=0.0,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
  )
  config, params = load_checkpoint(_save(model, tmp_path))
  assert (config["norm_eps"], config["pool"], "decoder" in params) == (1e-12, "cls", False)
  images = _images(28)
  noise = torch.arange(16, dtype=torch.float32).expand(2, 16)
  out = _run(model.vit, images, noise=noise)
  _check_parity(config, params, out, images, normed=out.last_hidden_state)


@pytest.mark.parametrize(
  "cls_name, swiglu, table_size, image_size",
  [
    ("Dinov2Model", False, 28, 28),  # LayerScale, its own image size
    # SwiGLU, patch 14, a table made for 56 px seen at 28 px (as DINOv2's 518-px table at 224 px), with
    # Dinov2ForImageClassification's classifier on [cls | mean patch token]: our cls_mean head.
    ("Dinov2ForImageClassification", True, 56, 28),
  ],
)
def test_dinov2(tmp_path, cls_name, swiglu, table_size, image_size):
  model = _build(
    cls_name, "Dinov2Config", **{**_DINO, "image_size": table_size}, use_swiglu_ffn=swiglu
  )
  folder = _save(model, tmp_path)
  head = cls_name != "Dinov2Model"
  config, params = load_checkpoint(folder, image_size=image_size, resample_posemb=True)
  assert config["layerscale_init"] == 1.0 and config["num_classes"] == (2 if head else 0)
  assert config["pool"] == ("cls_mean" if head else "cls")  # 2 labels: transformers' default
  assert config["mlp_act"] == ("swiglu" if swiglu else "gelu")
  if swiglu:  # transformers' Dinov2SwiGLUFFN: 2/3 of 64, to a multiple of 8
    assert config["mlp_dim"] == 48
    mlp = params["Transformer"]["encoderblock_0"]["MlpBlock_0"]
    assert mlp["Dense_0"]["kernel"].shape == (32, 96)  # [gate | value], as weights_in
  images = _images(image_size)
  out = _run(model, images)  # Dinov2 resizes its table itself at another image size
  normed = _run(model.dinov2, images).last_hidden_state if head else out.last_hidden_state
  pooled = out.logits if head else out.pooler_output
  _check_parity(config, params, out, images, normed=normed, pooled=pooled)
  if table_size != image_size:  # what timm's resampling would have given instead
    table = load_checkpoint(folder)[1]["pos_embedding"]
    timm_like = posemb.resample_posemb(table, image_size // 14, 1)
    print(
      f"timm-style vs transformers resampling: {np.abs(timm_like - params['pos_embedding']).max():.3f}"
    )
    assert np.abs(timm_like - params["pos_embedding"]).max() > 1e-2


@pytest.mark.parametrize("image_size", [28, 42, 70])
def test_dinov2_with_registers(tmp_path, image_size):
  """Registers (no position slots: pos[0] folded into the cls token), LayerScale; the 42-px table seen
  down- and upsampled, antialiased as this model's interpolate_pos_encoding does."""
  model = _build(
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersConfig",
    **{**_DINO, "image_size": 42},
    num_register_tokens=3,
  )
  config, params = load_checkpoint(
    _save(model, tmp_path), image_size=image_size, resample_posemb=True
  )
  assert (config["num_registers"], config["posemb_prefix"]) == (3, False)
  images = _images(image_size)
  out = _run(model, images)
  _check_parity(config, params, out, images, normed=out.last_hidden_state, pooled=out.pooler_output)


def test_dinov2_classifier_on_cls_and_mean_patch_token(tmp_path):
  """Dinov2WithRegistersForImageClassification's classifier reads [cls | mean patch token] (registers
  not averaged): our cls_mean head, read exactly. Its mean half zeroed (as our exports write a cls head),
  it is our cls head, its cls half."""
  model = _build(
    "Dinov2WithRegistersForImageClassification",
    "Dinov2WithRegistersConfig",
    **_DINO,
    num_register_tokens=2,
    num_labels=3,
  )
  config, params = load_checkpoint(_save(model, tmp_path / "cls_mean"))
  assert (config["pool"], config["num_classes"], config["num_registers"]) == ("cls_mean", 3, 2)
  weight_VD = model.classifier.weight.detach().numpy().copy()  # [3, 2 * 32]
  np.testing.assert_array_equal(params["head"]["kernel"], weight_VD.T)
  # Saved in bf16 as pytorch_model.bin (torch tensors numpy cannot hold): the same head, bf16-rounded.
  bf16 = shutil.copytree(tmp_path / "cls_mean", tmp_path / "bf16_bin")
  state = load_file(os.path.join(bf16, "model.safetensors"))
  state = {k: v.to(torch.bfloat16) for k, v in state.items()}
  torch.save(state, os.path.join(bf16, "pytorch_model.bin"))
  os.remove(os.path.join(bf16, "model.safetensors"))
  config_bf16, params_bf16 = load_checkpoint(str(bf16))
  assert config_bf16 == config
  np.testing.assert_array_equal(
    params_bf16["head"]["kernel"], state["classifier.weight"].float().numpy().T
  )
  images = _images(28)
  out = _run(model, images)
  normed = _run(model.dinov2_with_registers, images).last_hidden_state
  _check_parity(config, params, out, images, normed=normed, pooled=out.logits)
  with torch.no_grad():
    model.classifier.weight[:, 32:] = 0
  config, params = load_checkpoint(_save(model, tmp_path / "cls"))
  assert (config["pool"], config["num_classes"]) == ("cls", 3)
  np.testing.assert_array_equal(params["head"]["kernel"], weight_VD[:, :32].T)
  out = _run(model, images)
  _check_parity(config, params, out, images, pooled=out.logits)


@pytest.mark.parametrize("whole", [False, True])
def test_clip_vision_tower(tmp_path, whole):
  """CLIPVisionModel (model_type clip_vision_model), and CLIPModel (clip) whose text tower and
  projections are dropped; pre-LayerNorm, hidden_act and eps from the config."""
  vision = dict(_SMALL, patch_size=7, intermediate_size=64, hidden_act="quick_gelu")
  if whole:
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    text.update(vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = _build(
      "CLIPModel", "CLIPConfig", vision_config=vision, text_config=text, projection_dim=16
    )
  else:
    model = _build("CLIPVisionModel", "CLIPVisionConfig", **vision)
  config, params = load_checkpoint(_save(model, tmp_path))
  assert (config["pre_norm"], config["mlp_act"], config["norm_eps"]) == (True, "quick_gelu", 1e-5)
  images = _images(28)
  out = _run(getattr(model, "vision_model", model), images)  # CLIPModel: its vision tower
  _check_parity(config, params, out, images, pooled=out.pooler_output)


def _small_vit(seed: int = 0) -> torch.nn.Module:
  return _build("ViTModel", "ViTConfig", seed, **_SMALL, patch_size=7, intermediate_size=64)


def test_sharded_safetensors_and_pytorch_model_bin(tmp_path):
  model = _small_vit()
  sharded = _save(model, tmp_path / "sharded", max_shard_size="20KB")
  names = sorted(os.listdir(sharded))
  assert "model.safetensors.index.json" in names and len([n for n in names if "-of-" in n]) > 1
  want_config, want = load_checkpoint(_save(model, tmp_path / "single"))
  # The older format: the same keys in pytorch_model.bin (read with torch.load(weights_only=True)).
  old = shutil.copytree(tmp_path / "single", tmp_path / "bin")
  torch.save(
    load_file(os.path.join(old, "model.safetensors")), os.path.join(old, "pytorch_model.bin")
  )
  os.remove(os.path.join(old, "model.safetensors"))
  for folder in (sharded, str(old)):
    config, params = load_checkpoint(folder)
    assert config == want_config
    jax.tree.map(np.testing.assert_array_equal, params, want)
  images = _images(28)
  _check_parity(config, params, _run(model, images), images)


def _hub_cache(tmp_path, folder: str, revision: str = "0123abc") -> str:
  """`folder` laid out as the hub cache does: files in blobs/, linked from snapshots/<revision>/."""
  root = tmp_path / "hub" / "models--org--tiny-vit"
  for name in ("blobs", f"snapshots/{revision}", "refs"):
    (root / name).mkdir(parents=True)
  for i, name in enumerate(sorted(os.listdir(folder))):
    shutil.copy(os.path.join(folder, name), root / "blobs" / f"blob{i}")
    os.symlink(f"../../blobs/blob{i}", root / "snapshots" / revision / name)
  (root / "refs" / "main").write_text(revision)
  return str(root)


def test_hub_cache_snapshot_and_repo_root(tmp_path):
  want_config, want = load_checkpoint(_save(_small_vit(), tmp_path / "saved"))
  root = _hub_cache(tmp_path, str(tmp_path / "saved"))
  (tmp_path / "hub" / "models--org--tiny-vit" / "snapshots" / "older").mkdir()  # refs/main decides
  for folder in (os.path.join(root, "snapshots", "0123abc"), root):
    config, params = load_checkpoint(folder)
    assert config == want_config
    jax.tree.map(np.testing.assert_array_equal, params, want)


def _config_json(folder, **config) -> str:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  return str(folder)


def test_refusals(tmp_path):
  bert = _config_json(tmp_path / "bert", model_type="bert", hidden_size=32)
  with pytest.raises(ConfigError) as e:
    load_checkpoint(bert)
  assert e.value.field == os.path.join(bert, "config.json")
  assert "'bert'" in e.value.message
  assert all(name in e.value.message for name in hf.FAMILIES)
  empty = _config_json(tmp_path / "no_weights", model_type="vit", **_SMALL)
  with pytest.raises(ConfigError, match="no weights.*model.safetensors.*pytorch_model.bin") as e:
    load_checkpoint(empty)
  assert e.value.field == empty
  # A config.json that does not describe its weights: named key by key.
  folder = _save(_small_vit(), tmp_path / "vit")
  with pytest.raises(ConfigError, match="family") as e:
    load_checkpoint(folder, family="clip")
  assert e.value.field == "family"
  with pytest.raises(ConfigError, match="says 2 heads, not 4") as e:
    load_checkpoint(folder, num_heads=4)
  assert e.value.field == "num_heads"
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  _config_json(folder, **{**config, "num_hidden_layers": 3})
  with pytest.raises(ConfigError, match=r"missing keys encoder\.layer\.2\.") as e:
    load_checkpoint(folder)
  assert e.value.field == folder
  with pytest.raises(ConfigError, match="position embeddings are for a 4x4 patch grid"):
    load_checkpoint(_save(_small_vit(), tmp_path / "vit2"), image_size=56)  # no resample_posemb


def test_teacher_and_model_init_and_the_converter_cli(tmp_path, tiny_config, capsys):
  """An HF folder as teacher.init / model.init (taken for a checkpoint to convert, not an export: ours
  has model_config.json), and through `python -m at_jax.convert FOLDER OUT`."""
  from at_jax import checkpoint
  from at_jax.experiment import teachers

  folder = _save(_small_vit(), tmp_path / "vit")
  want_config, want = load_checkpoint(folder)
  assert teachers.is_checkpoint_file(folder)
  c = tiny_config()
  c.data.image_size = 28
  c.teacher.init = folder
  config, params = teachers.load_vit(folder, c)
  assert config == want_config
  jax.tree.map(np.testing.assert_array_equal, params, want)
  assert teachers.teacher_model_config(c, str(tmp_path)) == want_config
  export = str(tmp_path / "export")
  assert cli.main([folder, export]) == 0
  assert json.loads(capsys.readouterr().out) == want_config
  assert not teachers.is_checkpoint_file(export)  # model_config.json: our export
  config, params = checkpoint.load_params(export)
  assert config == want_config
  jax.tree.map(np.testing.assert_array_equal, params, want)


def test_resampling_matches_torch_interpolate():
  """`hf_posemb` is torch.nn.functional.interpolate(bicubic, align_corners=False), with and without
  antialias, up and down, on a DINOv2-sized case (37 -> 16) too."""
  rng = np.random.default_rng(0)
  for old, new in ((37, 16), (4, 7), (7, 4), (3, 2)):
    table = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
    for antialias in (False, True):
      got = hf_posemb.resample_like_hf(table, 1, new, antialias)
      grid = torch.from_numpy(table[:, 1:].reshape(1, old, old, 8)).permute(0, 3, 1, 2)
      want = torch.nn.functional.interpolate(
        grid, size=(new, new), mode="bicubic", align_corners=False, antialias=antialias
      )
      np.testing.assert_array_equal(got[:, :1], table[:, :1])
      _close(got[:, 1:], want.permute(0, 2, 3, 1).reshape(1, new * new, 8), f"{old}->{new}")
