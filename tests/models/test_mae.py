"""MAE pre-training: patchify, masking, the masked loss, the encoder export, sharded training on real data."""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from at_jax import sharding
from at_jax.data import sources, transforms
from at_jax.errors import ConfigError
from at_jax.models import inits, mae, vit
from at_jax.training import mae as mae_steps
from at_jax.training import state as train_state
from tests.conftest import adamw

S = 28  # Image size: 4 x 4 = 16 patches of 7 px.
ENCODER = {"variant": "Pico/7", "num_classes": 0, "pool": "cls"}
requires_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(sources.FASHION_MNIST_SYSTEM_DIR),
  reason="needs `sudo apt-get install dataset-fashion-mnist`",
)


def _mae(**kw) -> mae.MAE:
  """A small MAE for the unit tests; `kw` overrides its fields."""
  fields = {
    "encoder": ENCODER,
    "decoder_width": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
    "decoder_mlp_dim": 64,
  }
  return mae.MAE(**{**fields, **kw})


def _images(b=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, S, S, 3)).astype(np.float32))


def _init(model):
  return model.init(jax.random.key(0), _images(1), train=False, mask_rng=jax.random.key(0))[
    "params"
  ]


def test_patchify_unpatchify_round_trip():
  x = _images(2)
  patches = mae.patchify(x, 7)
  assert patches.shape == (2, 16, 7 * 7 * 3)
  # Patch 1 is the top row's second patch, pixels in (row, col, channel) order.
  np.testing.assert_array_equal(patches[1, 1], x[1, :7, 7:14].reshape(-1))
  np.testing.assert_array_equal(mae.unpatchify(patches, 7), x)
  np.testing.assert_array_equal(mae.unpatchify(mae.patchify(x[..., :1], 4), 4), x[..., :1])
  # Patches and pixels are in the order of the ViT's patch embedding (a stride-p conv, then a reshape), so
  # the decoder's patch i is the encoder's patch i.
  conv = flax.linen.Conv(5, (7, 7), strides=(7, 7), padding="VALID")
  variables = conv.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"].reshape(-1, 5)
  np.testing.assert_allclose(
    conv.apply(variables, x).reshape(2, 16, 5),
    patches @ kernel + variables["params"]["bias"],
    rtol=1e-5,
    atol=1e-5,
  )


def test_masking_keeps_k_per_sample_and_is_deterministic():
  model = _mae()
  params = _init(model)
  run = lambda key: model.apply(
    {"params": params},
    _images(8),
    train=True,
    mask_rng=jax.random.key(key),
  )[1]["mask"]
  mask = np.asarray(run(1))
  keep = mae.num_kept(16, 0.75)
  assert keep == 4
  np.testing.assert_array_equal((1 - mask).sum(1), np.full(8, keep))
  assert len({tuple(row) for row in mask}) == 8  # A different mask per sample.
  np.testing.assert_array_equal(run(1), mask)
  assert not np.array_equal(run(2), mask)
  # The returned indices, ranks and mask agree.
  keep_BT, restore_BP, mask_BP = mae.random_masking(jax.random.key(1), 8, 16, keep)
  np.testing.assert_array_equal(mask_BP, mask)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(mask_BP), np.asarray(keep_BT), 1), 0)
  np.testing.assert_array_equal(
    np.take_along_axis(np.asarray(restore_BP), np.asarray(keep_BT), 1),
    np.tile(np.arange(keep), (8, 1)),
  )
  with pytest.raises(ConfigError, match="mask_ratio"):
    mae.num_kept(16, 1.0)
  # MAE's len_keep = int(L * (1 - mask_ratio)): truncated, not rounded.
  assert [mae.num_kept(196, 0.9), mae.num_kept(49, 0.6), mae.num_kept(16, 0.7)] == [19, 19, 4]


def test_encoder_sees_only_visible_patches():
  model = _mae()
  params = _init(model)
  images = _images(3)
  (_, aux), state = model.apply(
    {"params": params},
    images,
    train=False,
    mask_rng=jax.random.key(5),
    capture_intermediates=lambda m, _: isinstance(m, vit.ViT),
  )
  ((_, out),) = state["intermediates"]["encoder"]["__call__"]
  assert out["attn_logits"].shape == (2, 3, 2, 1 + 4, 1 + 4)  # [L, B, H, cls + K, cls + K]
  # Pixels of masked patches never reach the encoder, hence not the prediction either.
  visible_pixels = mae.unpatchify(
    jnp.broadcast_to(1 - aux["mask"][..., None], (3, 16, 7 * 7 * 3)), 7
  )
  noisy = images + 5.0 * (1 - visible_pixels) * _images(3, seed=1)
  _, aux_noisy = model.apply({"params": params}, noisy, train=False, mask_rng=jax.random.key(5))
  np.testing.assert_allclose(aux_noisy["pred"], aux["pred"], atol=1e-6)
  assert abs(float(aux_noisy["loss"]) - float(aux["loss"])) > 1e-5  # ...but they are its targets.


def test_mask_tokens_fill_exactly_the_masked_positions():
  """Without decoder blocks each output depends on its own token: a mask token (the same for any image)
  exactly where the mask says 1, an encoder token elsewhere."""
  model = _mae(decoder_depth=0)
  params = _init(model)
  _, a = model.apply(
    {"params": params}, _images(2, seed=0), train=False, mask_rng=jax.random.key(2)
  )
  _, b = model.apply(
    {"params": params}, _images(2, seed=1), train=False, mask_rng=jax.random.key(2)
  )
  same_BP = np.all(np.isclose(a["pred"], b["pred"], rtol=0, atol=1e-6), axis=-1)
  np.testing.assert_array_equal(same_BP, a["mask"] == 1)


def test_encoder_drop_path_needs_no_rng_stream():
  model = _mae(encoder={**ENCODER, "drop_path": 0.5})
  params = _init(model)
  run = lambda key: model.apply(
    {"params": params},
    _images(4),
    train=True,
    mask_rng=jax.random.key(key),
  )[0]
  assert float(run(1)) == float(run(1)) and float(run(1)) != float(run(2))


def test_loss_counts_only_masked_patches():
  model = _mae()
  params = _init(model)
  images = _images(4)
  loss, aux = model.apply({"params": params}, images, train=True, mask_rng=jax.random.key(7))
  target = mae.patchify(images, 7)
  np.testing.assert_allclose(
    mae.reconstruction_loss(aux["pred"], target, aux["mask"], True).mean(), loss, rtol=1e-6
  )
  # Any change of the prediction on visible patches leaves the loss alone.
  changed = aux["pred"] + 100.0 * (1 - aux["mask"])[..., None]
  np.testing.assert_allclose(
    mae.reconstruction_loss(changed, target, aux["mask"], True), aux["example_loss"], rtol=1e-6
  )
  # Gradients w.r.t. the prediction vanish on visible patches.
  g = jax.grad(lambda p: mae.reconstruction_loss(p, target, aux["mask"], True).sum())(aux["pred"])
  assert float(jnp.abs(g * (1 - aux["mask"])[..., None]).max()) == 0.0
  assert float(jnp.abs(g).max()) > 0


def test_norm_pix_loss_matches_numpy():
  rng = np.random.default_rng(3)
  pred, target = rng.normal(size=(2, 3, 4)), 2.0 + 3.0 * rng.normal(size=(2, 3, 4))
  mask = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  normed = (target - target.mean(-1, keepdims=True)) / np.sqrt(
    target.var(-1, ddof=1, keepdims=True) + 1e-6
  )
  per_patch = ((pred - normed) ** 2).mean(-1)
  expected = [(per_patch[0, 0] + per_patch[0, 2]) / 2, per_patch[1, 1]]
  got = mae.reconstruction_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), True)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  raw = mae.reconstruction_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), False)
  np.testing.assert_allclose(raw[1], ((pred[1, 1] - target[1, 1]) ** 2).mean(), rtol=1e-5)


def test_decoder_posemb_is_mae_sincos():
  table = inits.sincos_posemb_2d(2, 3, 8, "mae.decoder_width")
  assert table.shape == (6, 8)
  # Patch 5 is row 1, column 2: the column is encoded first, then the row; frequencies 1 and 1/100.
  np.testing.assert_allclose(
    table[5],
    [
      np.sin(2),
      np.sin(0.02),
      np.cos(2),
      np.cos(0.02),
      np.sin(1),
      np.sin(0.01),
      np.cos(1),
      np.cos(0.01),
    ],
    rtol=1e-6,
  )


def test_encoder_export_is_a_working_vit_teacher():
  model = _mae()
  params = _init(model)
  teacher = vit.build(mae.encoder_config(model))
  assert mae.encoder_config(model)["num_classes"] == 0
  exported = mae.encoder_params(params)
  expected = teacher.init(jax.random.key(1), _images(1), train=False)["params"]
  assert jax.tree.map(jnp.shape, exported) == jax.tree.map(jnp.shape, expected)
  np.testing.assert_array_equal(exported["encoder_norm"]["scale"], params["encoder_norm"]["scale"])
  _, out = teacher.apply({"params": exported}, _images(2), train=False)
  assert out["attn_logits"].shape == (2, 2, 2, 16 + 1, 16 + 1)  # [L, B, H, N, N], all patches + cls


# Sharded training on real Fashion-MNIST.

B, STEPS, IMAGES = 64, 60, 2048
# MAE's recipe (configs/mae_fmnist.py): fixed sin-cos table, xavier-uniform init.
TRAIN_MAE = dict(
  encoder={
    "variant": "Mu/7",
    "num_classes": 0,
    "pool": "cls",
    "depth": 2,
    "posemb": "sincos2d",
    "weight_init": "mae",
  }
)


def _fashion_mnist(n):
  images, labels = sources.load_fashion_mnist()["train"]
  mean, std = transforms.NORMALIZATIONS["fashion_mnist"]
  x = (images[:n].astype(np.float32) / 255 - mean[0]) / std[0]
  return np.repeat(x[..., None], 3, axis=-1), labels[:n]


@functools.cache
def _jitted(num_devices, fsdp):
  """(mesh, init, train, evaluate) for the first `num_devices` devices; cached so each compiles once."""
  model = mae.MAE(**TRAIN_MAE)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 5, STEPS, end_value=1e-4)
  # AdamW with MAE's decay set; the fixed table is never decayed (optax.adamw alone would decay it).
  tx = adamw(
    jax.eval_shape(mae_steps.params_initializer(model, S), jax.random.key(0)),
    depth=2,
    schedule=schedule,
    decay_rule="mae",
    frozen_posemb=True,
  )
  mesh = sharding.make_mesh(-1, fsdp, jax.devices()[:num_devices])
  init = lambda r: mae_steps.init_mae_state(model, tx, r, S)
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init, jax.random.key(0)))
  # The ViT's jit_steps as is: no teacher (None, an empty pytree, needs no shardings).
  train, evaluate = train_state.jit_steps(
    mae_steps.make_mae_train_step(model, tx, schedule=schedule, ema_decay=0.9),
    mae_steps.make_mae_eval_step(model),
    mesh,
    shardings,
    None,
  )
  return mesh, jax.jit(init, out_shardings=shardings), train, evaluate


def _run(num_devices, fsdp, steps, images, labels):
  """`steps` jitted steps on a (-1, fsdp) mesh; returns (losses, params, eval sums, eval sums at init)."""
  mesh, init, train, evaluate = _jitted(num_devices, fsdp)
  state = init(jax.random.key(0))
  eval_batch = sharding.global_batch(
    {"image": images[:B], "label": labels[:B], "mask": np.arange(B) < B - 8}, mesh
  )  # 8 padding rows.
  first = jax.device_get(evaluate(state.params, state.ema_params, eval_batch, None))
  losses = []
  for i in range(steps):
    lo = (i * B) % len(images)
    batch = sharding.global_batch(
      {"image": images[lo : lo + B], "label": labels[lo : lo + B]}, mesh
    )
    state, m = train(state, batch, None)
    losses.append({k: float(v) for k, v in m.items()})
  sums = evaluate(state.params, state.ema_params, eval_batch, None)
  return losses, state.params, jax.device_get(sums), first


@requires_fashion_mnist
def test_training_on_fashion_mnist_lowers_reconstruction_loss():
  images, labels = _fashion_mnist(IMAGES)
  losses, params, sums, first = _run(8, 2, STEPS, images, labels)
  # The fixed table is where it started, bit for bit: MAE's sin-cos, zero in the cls slot.
  table = np.asarray(params["encoder"]["pos_embedding"])[0]
  np.testing.assert_array_equal(table[1:], inits.sincos_posemb_2d(4, 4, 128, "model.posemb"))
  assert not table[0].any()
  assert first["count"] == B - 8 and first["loss"] == first["ema_loss"]
  initial = np.mean([x["loss"] for x in losses[:3]])
  final = np.mean([x["loss"] for x in losses[-5:]])
  assert final < 0.8 * initial, (initial, final)
  # Shrinking the initial (xavier) prediction towards 0, i.e. each patch's mean, alone reaches ~0.80 on
  # these images (blank patches normalise to 0); beating that shows actual reconstruction.
  target = mae.patchify(jnp.asarray(images), 7)
  predict_mean = float(
    mae.reconstruction_loss(jnp.zeros_like(target), target, jnp.ones(target.shape[:2]), True).mean()
  )
  assert final < 0.9 * predict_mean, (final, predict_mean)
  assert sums["loss"] < 0.8 * first["loss"], (first, sums)
  assert losses[0]["lr"] == 0.0 and all(x["grad_norm"] > 0 for x in losses)


@requires_fashion_mnist
def test_one_device_equals_eight_device_mesh():
  images, labels = _fashion_mnist(3 * B)
  l1, p1, e1, _ = _run(1, 1, 3, images, labels)
  l8, p8, e8, _ = _run(8, 2, 3, images, labels)
  kernel = p8["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  for a, b in zip(l1, l8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)

  # Key biases have an exactly-zero true gradient (a per-query shift of the logits), so Adam turns float
  # noise there into steps of up to ~lr (as in test_train_step); everything else agrees tightly.
  def check(path, x, y):
    is_key_bias = [getattr(k, "key", "") for k in path][-2:] == ["key", "bias"]
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-3 if is_key_bias else 1e-5)

  jax.tree_util.tree_map_with_path(check, jax.device_get(p1), jax.device_get(p8))
  for k in e1:
    np.testing.assert_allclose(e1[k], e8[k], rtol=1e-5)
