"""MAE's pre-training recipe end to end, small: the fixed sin-cos table survives training bit for bit, and
the encoder export (posemb="sincos2d" in its model_config) loads back as a teacher, at its own image
size or resampled to another."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from at_jax import checkpoint
from at_jax.experiment import teachers
from at_jax.models import inits, mae, vit
from at_jax.training import mae as mae_steps
from configs import mae_fmnist
from tests.conftest import adamw

S, STEPS = 28, 3
ENCODER = {"variant": "Pico/7", "num_classes": 0, "pool": "cls"}


def _module():
  c = mae_fmnist.get_config()  # MAE's recipe fields, as the config sets them
  encoder = {**ENCODER, "posemb": c.model.posemb, "weight_init": c.model.weight_init}
  return mae.MAE(
    encoder=encoder, decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64
  ), c


def _train():
  """(initial state, state after STEPS steps at a high lr and weight decay) of the recipe's MAE."""
  module, c = _module()
  schedule = optax.constant_schedule(1e-2)
  tx = adamw(
    jax.eval_shape(mae_steps.params_initializer(module, S), jax.random.key(0)),
    depth=2,
    schedule=schedule,
    weight_decay=0.5,
    decay_rule=c.optim.decay_rule,
    frozen_posemb=c.model.posemb == "sincos2d",
  )
  state = jax.jit(lambda r: mae_steps.init_mae_state(module, tx, r, S))(jax.random.key(0))
  step = jax.jit(mae_steps.make_mae_train_step(module, tx, schedule=schedule, ema_decay=0.5))
  images = np.random.default_rng(0).normal(size=(8, S, S, 3)).astype(np.float32)
  first = state
  for _ in range(STEPS):
    state, _ = step(state, {"image": images, "label": np.zeros(8, np.int32)}, None)
  return module, first, state


def test_training_leaves_the_fixed_table_and_moves_the_rest(tmp_path):
  module, first, state = _train()
  before, after = first.params["encoder"], state.params["encoder"]
  np.testing.assert_array_equal(after["pos_embedding"], before["pos_embedding"])
  table = np.asarray(after["pos_embedding"][0])
  np.testing.assert_array_equal(table[1:], inits.sincos_posemb_2d(4, 4, 32, "model.posemb"))
  assert not table[0].any()
  # The EMA of a constant stays it, to rounding.
  np.testing.assert_allclose(state.ema_params["encoder"]["pos_embedding"], table[None], atol=1e-7)
  for name in ("cls", "embedding"):
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), before[name], after[name])
    assert min(jax.tree.leaves(moved)) > 0, name
  assert float(jnp.abs(state.params["mask_token"] - first.params["mask_token"]).max()) > 0

  # The export: a ViT whose model_config says its table is fixed; it loads back as a teacher.
  export = str(tmp_path / "params")
  checkpoint.save_params(export, mae.encoder_params(state.params), mae.encoder_config(module))
  config = mae_fmnist.get_config()
  config.unlock()
  config.data.image_size = S
  model_config, params = teachers.load_vit(export, config)
  assert model_config["posemb"] == "sincos2d" and model_config["weight_init"] == "mae"
  np.testing.assert_array_equal(params["pos_embedding"], after["pos_embedding"])
  teacher = vit.build(model_config)
  images = np.random.default_rng(1).normal(size=(2, S, S, 3)).astype(np.float32)
  _, out = teacher.apply({"params": params}, images, train=False)
  assert out["attn_logits"].shape == (2, 2, 2, 17, 17)

  # At another image size, the table resamples as any (timm's bicubic); the cls slot stays zero.
  config.data.image_size, config.teacher.resample_posemb = 42, True
  _, bigger = teachers.load_vit(export, config)
  assert (
    bigger["pos_embedding"].shape == (1, 1 + 36, 32) and not bigger["pos_embedding"][0, 0].any()
  )
  _, out = teacher.apply({"params": bigger}, np.zeros((1, 42, 42, 3), np.float32), train=False)
  assert out["attn_logits"].shape == (2, 1, 2, 37, 37)
