"""Shared by the transfer tests: a student and a teacher (Pico/4, depth 4, on 16 px images), their params
and images, and the teacher's targets."""

import jax
import pytest

from at_jax.models import vit
from at_jax.transfer import spec, targets

B, S = 2, 16


def build_model(**kw) -> vit.ViT:
  return vit.build({"variant": "Pico/4", "num_classes": 10, "depth": 4, **kw})


@pytest.fixture(scope="module")
def setup():
  student, teacher = build_model(), build_model()
  images = jax.random.normal(jax.random.key(0), (B, S, S, 3))
  sp = student.init(jax.random.key(1), images, train=False)["params"]
  tp = teacher.init(jax.random.key(2), images, train=False)["params"]
  return student, teacher, sp, tp, images


def resolve_distill(student: vit.ViT, teacher: vit.ViT, **cfg) -> spec.Transfer:
  return spec.resolve({"mode": "distill", **cfg}, student, teacher, S)


def teacher_targets_and_out(teacher: vit.ViT, tp, images, transfer: spec.Transfer):
  """(the targets `transfer` takes from the teacher, the teacher's whole `out` with q/k/v)."""
  _, out = teacher.apply({"params": tp}, images, train=False, want_qkv=True)
  return targets.teacher_targets(out, transfer), out
