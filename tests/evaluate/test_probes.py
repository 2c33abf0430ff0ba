"""Frozen-feature probes: DINO's weighted k-NN (against a PyTorch port of its `knn_classifier`), the linear
probe, and the features being the pooled representation the head sees."""

import jax
import numpy as np
import pytest
import torch

from at_jax.evaluate import probes
from at_jax.models import vit


def _clusters(seed: int, n: int, classes: int = 5, dim: int = 16, spread: float = 0.1):
  """Separable features: one well-separated centre per class plus small noise."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(size=(classes, dim)) * 3
  labels = rng.integers(0, classes, n)
  return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def _dino_knn(train_x, train_y, test_x, test_y, k, t, classes):
  """DINO's eval_knn.knn_classifier (one block), in torch, on normalised features."""
  train = torch.nn.functional.normalize(torch.tensor(train_x), dim=1)
  test = torch.nn.functional.normalize(torch.tensor(test_x), dim=1)
  train_labels, targets = torch.tensor(train_y), torch.tensor(test_y)
  similarity = torch.mm(test, train.T)
  distances, indices = similarity.topk(k, largest=True, sorted=True)
  candidates = train_labels.view(1, -1).expand(len(test), -1)
  retrieved = torch.gather(candidates, 1, indices)
  one_hot = torch.zeros(len(test) * k, classes)
  one_hot.scatter_(1, retrieved.view(-1, 1), 1)
  transform = distances.clone().div_(t).exp_()
  probs = torch.sum(one_hot.view(len(test), -1, classes) * transform.view(len(test), -1, 1), 1)
  _, predictions = probs.sort(1, True)
  correct = predictions.eq(targets.data.view(-1, 1))
  return 100 * correct[:, :1].sum().item() / len(test), 100 * correct[:, :5].sum().item() / len(
    test
  )


def test_knn_matches_dino_reference_in_blocks():
  rng = np.random.default_rng(0)
  train_x, train_y = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 7, 300)
  test_x, test_y = rng.normal(size=(90, 8)).astype(np.float32), rng.integers(0, 7, 90)
  top1, top5 = _dino_knn(train_x, train_y, test_x, test_y, 20, 0.07, 7)
  for test_block, train_block in ((256, 8192), (32, 50), (7, 23)):  # chunks not dividing the splits
    got = probes.knn_accuracy(
      (train_x, train_y), (test_x, test_y), 7, test_block=test_block, train_block=train_block
    )
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)


def test_probes_separable_near_100_random_labels_near_chance():
  train, test = _clusters(0, 400), _clusters(1, 200)
  for probe in probes.PROBES.values():
    assert probe(train, test, 5)["top1"] >= 99
  rng = np.random.default_rng(2)
  classes = 10
  noise_train = (rng.normal(size=(600, 16)).astype(np.float32), rng.integers(0, classes, 600))
  noise_test = (rng.normal(size=(600, 16)).astype(np.float32), rng.integers(0, classes, 600))
  for name, probe in probes.PROBES.items():
    top1 = probe(noise_train, noise_test, classes)["top1"]
    assert 100 / classes - 6 <= top1 <= 100 / classes + 6, (name, top1)


def test_features_are_what_the_head_sees():
  model = vit.build({"variant": "Pico/7", "num_classes": 3})
  images = np.random.default_rng(0).normal(size=(6, 28, 28, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), images, train=False)["params"]
  batches = [
    {"image": images[:4], "label": np.arange(4), "mask": np.array([1, 1, 1, 1], bool)},
    {"image": images[2:], "label": np.arange(4), "mask": np.array([0, 0, 1, 1], bool)},
  ]
  feats, labels = probes.extract_features(model, params, batches)
  assert feats.shape == (6, 32) and labels.tolist() == [0, 1, 2, 3, 2, 3]
  logits = model.apply({"params": params}, images, train=False)[0]
  head = params["head"]
  np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], logits, rtol=1e-4, atol=1e-5)
