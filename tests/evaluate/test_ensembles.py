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


class _FixedLogits:
  """A stand-in classifier: its params are a logits table, its images the rows to return."""

  def apply(self, variables, x, train):
    del train
    return (variables["params"][x],)


def _fixed_members(logits):
  return {name: (_FixedLogits(), np.asarray(table, np.float32)) for name, table in logits.items()}


def test_ensemble_top1_follows_averaged_probabilities_not_logits():
  """A member with large logits would outvote the other in a logit average, not in a probability
  average (softmax caps its confidence at 1): the ensemble is the latter."""
  a = np.full((4, 10), -30.0)
  a[:, 0], a[:, 1] = 0.0, 20.0  # sure of class 1
  b = np.full((4, 10), -30.0)
  b[:, 0], b[:, 2] = 3.0, 0.0  # ~0.95 on class 0; its class-1 logit -30 sinks the logit mean of 1
  a[2:, 0], a[2:, 1] = 20.0, -30.0  # rows 2, 3: both sure of class 0, and both averages agree
  members = _fixed_members({"a": a, "b": b})
  labels = np.array([1, 1, 0, 0])
  batches = [{"image": np.arange(4), "label": labels, "mask": np.ones(4, bool)}]
  mean_probs = np.mean([np.asarray(jax.nn.softmax(t)) for t in (a, b)], axis=0)
  mean_logits = (a + b) / 2
  assert (mean_probs.argmax(-1) != mean_logits.argmax(-1)).any()  # the case under test
  got = ensembles.ensemble_accuracy(members, batches)
  assert got["ensemble"]["top1"] == pytest.approx(100 * np.mean(mean_probs.argmax(-1) == labels))
  assert got["ensemble"]["top1"] == pytest.approx(100.0)


def test_ensemble_top5_counts_only_unpadded_rows():
  """Padding rows (mask False) count toward neither top-1 nor top-5, even where they would hit."""
  logits = np.tile(np.arange(10, dtype=np.float32), (8, 1))  # top-5: classes 9, 8, 7, 6, 5
  labels = np.array([0, 0, 0, 9, 5, 5, 5, 5])  # rows 4-7, all top-5 hits, are padding
  mask = np.array([True] * 4 + [False] * 4)
  batches = [{"image": np.arange(8), "label": labels, "mask": mask}]
  got = ensembles.ensemble_accuracy(_fixed_members({"a": logits}), batches)
  for name in ("a", "ensemble"):
    assert got[name]["top1"] == pytest.approx(25.0)  # row 3 alone, of the 4 real rows
    assert got[name]["top5"] == pytest.approx(25.0)
