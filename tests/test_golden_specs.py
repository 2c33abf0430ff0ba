"""Pins how ViT-L/16 student + optimizer state + EMA and the MAE ViT-L teacher shard on a 16x16 mesh.

Computed abstractly (jax.eval_shape, no memory). A change in the sharding rule or the param/optimizer
layout shows up here as a diff; regenerate deliberately with AT_JAX_UPDATE_GOLDEN=1.
"""

import json
import os

import jax
import numpy as np

from at_jax import optim, sharding
from at_jax.experiment import teachers
from at_jax.models import vit
from at_jax.training import classify as train_step
from configs import distill_vitl
from tests.conftest import adamw

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "vitl_specs_16x16.json")


def _specs(tree, fsdp):
  return {
    jax.tree_util.keystr(k): str(sharding.spec_for(tuple(v.shape), fsdp))
    for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_vitl_student_teacher_optimizer_specs_16x16():
  c = distill_vitl.get_config()
  student = vit.build(teachers.model_config(c, "/nonexistent"))
  teacher = vit.build(
    {"variant": "L/16", "num_classes": 0, "pool": "cls"}
  )  # as converted from MAE's .pth
  images = np.zeros((1, 224, 224, 3), np.float32)
  params = jax.eval_shape(lambda: student.init(jax.random.key(0), images, train=False)["params"])
  schedule = optim.make_schedule(
    base_lr=1e-4, batch_size=2048, warmup_steps=20 * 625, total_steps=200 * 625, min_lr=1e-6
  )
  tx = adamw(params, depth=24, schedule=schedule, weight_decay=0.3)
  state = jax.eval_shape(lambda r: train_step.init_state(student, tx, r, 224), jax.random.key(0))
  teacher_params = jax.eval_shape(
    lambda: teacher.init(jax.random.key(0), images, train=False)["params"]
  )
  got = {"state": _specs(state, 16), "teacher": _specs(teacher_params, 16)}
  if os.environ.get("AT_JAX_UPDATE_GOLDEN"):
    with open(GOLDEN, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
  with open(GOLDEN) as f:
    assert got == json.load(f)
  # Spot checks that make the golden file readable: big matrices are split over fsdp, small vectors not.
  mlp = "['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']"
  for part in (".params", ".ema_params", ".opt_state[0].mu", ".opt_state[0].nu"):
    assert (
      got["state"][f"{part}{mlp}['kernel']"] == "P(None, None, 'fsdp')"
    )  # [L, D, 4D]: the 4096 axis
  query = "['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']['query']['kernel']"
  assert got["teacher"][query] == "P('fsdp',)"  # [D, H, Dh]: the 1024 axis
  assert got["state"][".step"] == "P()"
  # Per device, the student's params + Adam moments + EMA come to 1/16 of their total.
  total = sum(np.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(state))
  assert (
    4.8e9 < total < 4.95e9
  )  # 304M float32 params x 4 (params, EMA, Adam mu and nu): ~305 MB a device
