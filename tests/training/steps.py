"""What the train-step tests share (test_classify, test_accumulation): a Pico/4 student and teacher with
a resolved transfer, an optimizer and schedule; and a params comparison that knows Adam's noise."""

import jax
import jax.numpy as jnp
import numpy as np

from at_jax import optim
from at_jax.models import vit
from at_jax.transfer import spec
from tests.conftest import adamw

B, S = 16, 16  # batch and image size


def build_step(
  mode,
  *,
  drop_path=0.0,
  what="attn",
  source="jointly",
  layers="first:1",
  depth=2,
  loss_impl="direct",
):
  student = vit.build(
    {"variant": "Pico/4", "num_classes": 10, "drop_path": drop_path, "depth": depth}
  )
  teacher = vit.build({"variant": "Pico/4", "num_classes": 10, "depth": depth})
  t = spec.resolve(
    {"mode": mode, "what": what, "layers": layers, "source": source, "loss_impl": loss_impl},
    student,
    teacher,
    S,
  )
  schedule = optim.make_schedule(
    base_lr=1e-3, batch_size=B, warmup_steps=1, total_steps=10, min_lr=0.0
  )
  abstract = jax.eval_shape(
    lambda: student.init(jax.random.key(0), jnp.zeros((1, S, S, 3)), train=False)
  )
  tx = adamw(abstract["params"], depth=student.depth, schedule=schedule, b2=0.999, layer_decay=0.75)
  tp = teacher.init(jax.random.key(9), jnp.zeros((1, S, S, 3)), train=False)["params"]
  return student, teacher, t, schedule, tx, tp


def assert_params_close(a, b):
  """The key bias has an exactly-zero true gradient (softmax over keys ignores a per-query shift), so
  Adam turns float noise there into steps of up to ~lr; everything else must agree tightly."""

  def check(path, x, y):
    is_key_bias = [getattr(k, "key", "") for k in path][-2:] == ["key", "bias"]
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 if is_key_bias else 1e-6)

  jax.tree_util.tree_map_with_path(check, a, b)
