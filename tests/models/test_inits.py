"""at_jax.models.inits: timm's trunc-normal spread, MAE's xavier fans and sin-cos table, compared with the
PyTorch references (timm's trunc_normal_, torch's xavier_uniform_ on MAE's own model, MAE's formula)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.layers import trunc_normal_

from at_jax.errors import ConfigError
from at_jax.models import inits, mae, vit
from tests.models import torch_mae

N = 400_000  # samples per spread estimate: the std's standard error is std / sqrt(2N), 0.11%
S = 28
MAE_RECIPE = {"posemb": "sincos2d", "weight_init": "mae"}


def _torch_trunc_normal(std: float, n: int = N) -> np.ndarray:
  torch.manual_seed(0)
  return trunc_normal_(torch.empty(n), std=std).numpy()


@pytest.mark.parametrize("std", [0.02, 2e-5, 1.0])
def test_trunc_normal_spread_matches_timm(std):
  """timm cuts at +-2 absolute: at std 0.02 (100 sigma) and 2e-5 a plain normal; at std 1, +-2 sigma."""
  ours = np.asarray(inits.trunc_normal(std)(jax.random.key(0), (N,)))
  theirs = _torch_trunc_normal(std)
  se = 5 * ours.std() / np.sqrt(2 * N)  # 5 standard errors
  assert abs(ours.std() - theirs.std()) < np.sqrt(2) * se
  assert np.abs(ours).max() <= 2.0 and abs(ours.mean()) < 5 * ours.std() / np.sqrt(N)
  if std < 0.1:
    assert abs(ours.std() - std) < se
  else:  # within +-2 sigma the spread shrinks, for timm and us alike
    assert abs(ours.std() - 0.8796 * std) < se


def test_trunc_normal_differs_from_jax_truncated_normal():
  """jax.nn.initializers.truncated_normal(0.02) cuts at +-2 sigma: std 0.0176, not timm's 0.02."""
  old = np.asarray(jax.nn.initializers.truncated_normal(0.02)(jax.random.key(0), (N,)))
  ours = np.asarray(inits.trunc_normal(0.02)(jax.random.key(0), (N,)))
  se = 5 * 0.02 / np.sqrt(2 * N)
  assert abs(old.std() - 0.02 * 0.8796) < se and abs(old.std() - ours.std()) > 10 * se
  assert np.abs(old).max() < 0.04 < np.abs(ours).max()  # ours has tails beyond 2 sigma, as timm's


def test_zero_std_is_a_zero_init():
  assert not np.asarray(inits.trunc_normal(0.0)(jax.random.key(0), (3, 4))).any()


def _kernel_std(params, *path):
  leaf = params
  for key in path:
    leaf = leaf[key]
  return float(np.asarray(leaf).std())


def test_timm_init_of_the_vit_has_timms_spread():
  """The linears, the position table, the cls token and the head (head_init_std) all draw timm's
  normal(0.02); the old init would give 0.0176 (> 10 standard errors off at these sizes)."""
  model = vit.build({"variant": "Mu/7", "num_classes": 1000, "head_init_std": 0.02})
  params = model.init(jax.random.key(0), jnp.zeros((1, S, S, 3)), train=False)["params"]
  block = params["Transformer"]["encoderblock_0"]
  for std, n in (
    (_kernel_std(params, "head", "kernel"), 128 * 1000),
    (_kernel_std(block, "MlpBlock_0", "Dense_0", "kernel"), 128 * 512),
    (_kernel_std(block, "MultiHeadDotProductAttention_0", "query", "kernel"), 128 * 128),
  ):
    assert abs(std - 0.02) < 4 * 0.02 / np.sqrt(2 * n), std
  tables = np.concatenate([np.ravel(params["pos_embedding"]), np.ravel(params["cls"])])
  assert abs(tables.std() - 0.02) < 4 * 0.02 / np.sqrt(2 * tables.size)
  head = vit.build({"variant": "Mu/7", "num_classes": 1000, "head_init_std": 2e-5})
  p = head.init(jax.random.key(0), jnp.zeros((1, S, S, 3)), train=False)["params"]
  assert abs(_kernel_std(p, "head", "kernel") - 2e-5) < 4 * 2e-5 / np.sqrt(2 * 128 * 1000)


def _ours_and_torch(mae_params, torch_model, scan):
  """(our kernel [..., out], the torch weight it stands for) for every linear and the patch embedding."""
  pairs = [
    (mae_params["encoder"]["embedding"]["kernel"], torch_model.patch_embed.proj.weight),
    (mae_params["decoder_embed"]["kernel"], torch_model.decoder_embed.weight),
    (mae_params["decoder_pred"]["kernel"], torch_model.decoder_pred.weight),
  ]
  enc = mae_params["encoder"]["Transformer"]
  blocks = [(jax.tree.map(lambda a, i=i: a[i], enc["encoderblock"]) if scan else enc[f"encoderblock_{i}"], b)
            for i, b in enumerate(torch_model.blocks)]  # fmt: skip
  blocks.append((mae_params["decoderblock_0"], torch_model.decoder_blocks[0]))
  for ours, theirs in blocks:
    attn, mlp = ours["MultiHeadDotProductAttention_0"], ours["MlpBlock_0"]
    pairs += [(attn[name]["kernel"], theirs.attn.qkv.weight) for name in ("query", "key", "value")]
    pairs += [
      (attn["out"]["kernel"], theirs.attn.proj.weight),
      (mlp["Dense_0"]["kernel"], theirs.mlp.fc1.weight),
      (mlp["Dense_1"]["kernel"], theirs.mlp.fc2.weight),
    ]
  return pairs


@pytest.mark.parametrize("scan", [False, True])
def test_mae_init_has_torchs_xavier_fans_on_maes_model(scan):
  """Each kernel is uniform within torch.nn.init.xavier_uniform_'s bound for the weight it stands for in
  MAE's model (q, k, v: the fused qkv Linear(D, 3D); the patch conv viewed as [D, C*p*p]), reaches it, and
  spreads as MAE's own initialised weight does."""
  model = mae.MAE(
    encoder={"variant": "Pico/7", "num_classes": 0, "pool": "cls", "scan": scan, **MAE_RECIPE},
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=2,
    decoder_mlp_dim=64,
  )
  images = jnp.zeros((1, S, S, 3))
  params = model.init(jax.random.key(0), images, train=False, mask_rng=jax.random.key(0))["params"]
  torch.manual_seed(0)
  reference = torch_mae.MaskedAutoencoderViT(S, 7, 32, 2, 2, 2.0, 32, 1, 2)
  for ours, theirs in _ours_and_torch(params, reference, scan):
    ours = np.asarray(ours).reshape(-1, np.shape(ours)[-1])
    bound, spread = torch_mae.xavier_bound(theirs), float(theirs.detach().std())
    assert np.abs(ours).max() <= bound * (1 + 1e-6) and np.abs(ours).max() > 0.9 * bound
    assert abs(ours.std() - spread) < 0.1 * spread, (ours.shape, ours.std(), spread)
  # cls and mask tokens: normal(0.02), as MAE's normal_(std=.02).
  tokens = np.concatenate([np.ravel(params["encoder"]["cls"]), np.ravel(params["mask_token"])])
  assert 0.01 < tokens.std() < 0.03


def _mae_numpy_table(embed_dim, grid_size):
  """MAE's util/pos_embed.py get_2d_sincos_pos_embed(cls_token=True), transcribed (np.float = float64)."""

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
  emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize("scan", [False, True])
def test_sincos_table_is_maes(scan):
  """The ViT's initial table: MAE's formula in numpy and in torch, with a zero cls row."""
  model = vit.build({"variant": "Pico/4", "num_classes": 0, "scan": scan, **MAE_RECIPE})
  params = model.init(jax.random.key(3), jnp.zeros((1, S, S, 3)), train=False)["params"]
  table = np.asarray(params["pos_embedding"][0])
  assert table.shape == (1 + 49, 32) and not table[0].any()
  np.testing.assert_allclose(table, _mae_numpy_table(32, 7), rtol=0, atol=1e-6)
  np.testing.assert_allclose(
    table, torch_mae.get_2d_sincos_pos_embed(32, 7, cls_token=True).numpy(), rtol=0, atol=1e-6
  )
  # The same at any key: a function of the grid, not a draw.
  again = model.init(jax.random.key(4), jnp.zeros((1, S, S, 3)), train=False)["params"]
  np.testing.assert_array_equal(again["pos_embedding"], params["pos_embedding"])
  # Without the prefix slots the table is the patches' alone.
  patches_only = vit.build(
    {"variant": "Pico/4", "num_classes": 0, "posemb_prefix": False, **MAE_RECIPE}
  )
  p = patches_only.init(jax.random.key(3), jnp.zeros((1, S, S, 3)), train=False)["params"]
  np.testing.assert_allclose(p["pos_embedding"][0], table[1:], atol=1e-6)


@pytest.mark.parametrize("posemb", ["learned", "sincos2d"])
def test_only_the_fixed_table_gets_no_gradient(posemb):
  model = vit.build({"variant": "Pico/4", "num_classes": 10, "posemb": posemb})
  images = jax.random.normal(jax.random.key(0), (2, S, S, 3))
  params = model.init(jax.random.key(1), images, train=False)["params"]
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images, train=False)[0] ** 2))(
    params
  )
  assert float(jnp.abs(grads["cls"]).max()) > 0
  assert (float(jnp.abs(grads["pos_embedding"]).max()) == 0) == (posemb == "sincos2d")


@pytest.mark.parametrize(
  "fields,field",
  [
    ({"posemb": "sincos"}, "model.posemb"),
    ({"weight_init": "xavier"}, "model.weight_init"),
    ({"posemb": "sincos2d", "width": 30, "num_heads": 2}, "model.posemb"),  # not divisible by 4
    ({"head_init_std": -0.02}, "model.head_init_std"),
  ],
)
def test_build_refuses_unknown_recipes(fields, field):
  with pytest.raises(ConfigError) as e:
    vit.build({"variant": "Pico/4", "num_classes": 10, **fields})
  assert e.value.field == field


def test_a_mirroring_student_keeps_its_own_table_and_init():
  """posemb and weight_init are recipe fields: a student mirroring a sin-cos MAE teacher learns its table."""
  teacher = {"variant": "Pico/4", "num_classes": 0, **MAE_RECIPE, "num_registers": 2}
  student = vit.mirror(teacher, {"num_classes": 10, "posemb": "learned", "weight_init": "timm"})
  assert student["posemb"] == "learned" and student["weight_init"] == "timm"
  assert student["num_registers"] == 2
  assert vit.build(teacher).posemb == "sincos2d"


def test_an_export_without_posemb_is_a_learned_table():
  """Exports written before these fields (tests/fixtures/legacy) build with the learned table."""
  config_file = pathlib.Path(__file__).parents[1] / "fixtures/legacy/run/params/model_config.json"
  config = json.loads(config_file.read_text())
  assert "posemb" not in config and "weight_init" not in config
  model = vit.build(config)
  assert model.posemb == "learned" and model.weight_init == "timm"
