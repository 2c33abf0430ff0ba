"""Shared by the model tests: a tiny ViT (Pico/4 on 28 px images), its params and a batch of images."""

import jax
import pytest

from at_jax.models import vit

B, S = 3, 28


def build_model(**kw) -> vit.ViT:
  return vit.build({"variant": "Pico/4", "num_classes": 10, **kw})


@pytest.fixture(scope="module")
def setup():
  model = build_model()
  images = jax.random.normal(jax.random.key(0), (B, S, S, 3))
  params = model.init(jax.random.key(1), images, train=False)["params"]
  return model, params, images
