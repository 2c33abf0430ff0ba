"""Attention distillation into your own Flax model: a small ViT-like written with plain flax
(`nn.MultiHeadDotProductAttention`, no at_jax model), trained on labels plus the paper's attention loss
against an at_jax teacher ViT.

  python examples/own_flax_model.py

`capture.apply_linen` runs the model as `model.apply` does and hands back the pre-softmax attention
logits of each of its flax attention layers; `capture.distill_loss` scores them against the teacher's
(weight 3, summed over the paired layers). The model needs no change: same tokens (16 patches + cls)
and heads as the teacher in the paired layers is all it takes. An NNX model works the same through
`capture.call_nnx(model, images)`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from at_jax.models import vit
from at_jax.transfer import capture

IMAGE, PATCH, WIDTH, HEADS, DEPTH, CLASSES = 28, 7, 64, 2, 2, 10  # Pico/7's tokens and heads


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(HEADS)(nn.LayerNorm()(x))
    return x + nn.Dense(WIDTH)(nn.gelu(nn.Dense(2 * WIDTH)(nn.LayerNorm()(x))))


class MyViT(nn.Module):
  @nn.compact
  def __call__(self, images):
    x = nn.Conv(WIDTH, (PATCH, PATCH), strides=PATCH)(images)  # [B, 4, 4, D]
    x = x.reshape(x.shape[0], -1, WIDTH)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, WIDTH))
    x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], WIDTH))
    for _ in range(DEPTH):
      x = Block()(x)
    return nn.Dense(CLASSES)(nn.LayerNorm()(x[:, 0]))


def fashion_like_batch(key, batch=64):
  """28x28 grey images whose class lights up its own band of rows, under noise (Fashion-MNIST-sized)."""
  labels = jax.random.randint(key, (batch,), 0, CLASSES)
  rows = jnp.arange(IMAGE)[None, :, None, None]
  band = (rows // 3 == labels[:, None, None, None]).astype(jnp.float32)
  noise = jax.random.normal(jax.random.fold_in(key, 1), (batch, IMAGE, IMAGE, 1))
  return band + 0.5 * noise, labels


def main(steps=40):
  images, labels = fashion_like_batch(jax.random.key(0))
  # A random teacher keeps the example self-contained; a real one is a params export
  # (`checkpoint.load_params(path)` -> (model_config, params)) or a converted timm/big_vision checkpoint.
  teacher = vit.build({"variant": "Pico/7", "num_classes": 0})
  teacher_params = teacher.init(jax.random.key(1), images, train=False)["params"]
  model = MyViT()
  params = model.init(jax.random.key(2), images)["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(params, images, labels):
    logits, captured = capture.apply_linen(model, {"params": params}, images)
    teacher_logits = capture.teacher_attention(teacher, teacher_params, images)  # [L, B, H, N, N]
    distill = capture.distill_loss(captured, teacher_logits, pairs={0: 0, 1: 1})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + distill, (ce, distill)

  @jax.jit
  def step(params, opt_state, images, labels):
    grads, (ce, distill) = jax.grad(loss_fn, has_aux=True)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce, distill

  for i in range(steps):
    params, opt_state, ce, distill = step(params, opt_state, images, labels)
    if i % 5 == 0 or i == steps - 1:
      print(f"step {i:3d}  ce {float(ce):.4f}  distill {float(distill):.4f}", flush=True)


if __name__ == "__main__":
  main()
