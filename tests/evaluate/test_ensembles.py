"""Ensembles average the members' softmax probabilities."""

import jax
import numpy as np
import pytest

from at_jax.evaluate import ensembles
from at_jax.models import vit


def test_ensemble_averages_probabilities():
  models = {
    name: vit.build({"variant": "Pico/7", "num_classes": 10, "depth": d})
    for name, d in (("a", 1), ("b", 2))
  }
  rng = np.random.default_rng(0)
  batches = [
    {
      "image": rng.normal(size=(16, 28, 28, 3)).astype(np.float32),
      "label": rng.integers(0, 10, 16),
      "mask": np.array([True] * 12 + [False] * 4),
    }
    for _ in range(2)
  ]
  members = {
    n: (m, m.init(jax.random.key(i), batches[0]["image"], train=False)["params"])
    for i, (n, m) in enumerate(models.items())
  }
  got = ensembles.ensemble_accuracy(members, batches)
  probs = {
    n: [
      np.asarray(jax.nn.softmax(m.apply({"params": p}, b["image"], train=False)[0]))
      for b in batches
    ]
    for n, (m, p) in members.items()
  }
  labels = np.concatenate([b["label"][:12] for b in batches])
  for name, ps in list(probs.items()) + [
    ("ensemble", [(x + y) / 2 for x, y in zip(probs["a"], probs["b"])])
  ]:
    top1 = np.concatenate([p[:12] for p in ps]).argmax(-1)
    assert got[name]["top1"] == pytest.approx(100 * np.mean(top1 == labels))
  solo = ensembles.ensemble_accuracy({"a": members["a"]}, batches)
  assert solo["ensemble"] == solo["a"]
