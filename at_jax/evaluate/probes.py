"""Frozen-feature probes: how good a model's own features are, without its head (the paper's claim that the
student of attention transfer learns its own features, and why its ensemble with the teacher helps).

The features are the pooled representation the head sees (`ViT`'s ``out["pre_logits"]``: the gap
tokens' `fc_norm`, the cls token after `encoder_norm`, or with `cls_mean` pooling that token and the mean
patch token after it, 2 x width), of the eval view, on a train and a test split.

* k-NN: DINO's weighted k-NN (Caron et al. 2021, `eval_knn.py`'s `knn_classifier`): L2-normalised
  features, cosine similarity, the k=20 most similar training examples vote with weight exp(sim / T),
  T = 0.07. Run in blocks of test rows against chunks of training rows, keeping a running top-k, so
  memory is bounded by the block sizes, not by the split sizes.
* Linear probe: multinomial logistic regression on the features standardised by the training split's
  mean and std, trained full-batch with Adam and a small L2 penalty for a few hundred steps (one
  jitted loop). It holds the whole training split's features on the device (N x D floats).
"""

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from at_jax import metrics


def extract_features(
  model: Any, params: Any, batches: Iterable[Mapping[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
  """(float32 [N, D] pre-logits, int32 [N] labels) of the examples with mask True.

  Args:
    model: a `vit.ViT` (any `num_classes`, 0 included: its pre-logits are what a head would see).
    params: its params, frozen.
    batches: eval batches {"image", "label", "mask"} (`pipeline.eval_iterator`).
  """
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[1]["pre_logits"])
  feats, labels = [], []
  for batch in batches:
    mask = np.asarray(batch["mask"], bool)
    feats.append(np.asarray(apply(params, batch["image"]), np.float32)[mask])
    labels.append(np.asarray(batch["label"], np.int32)[mask])
  return np.concatenate(feats), np.concatenate(labels)


@functools.partial(jax.jit, static_argnames=("k",))
def _nearest(query_QD: jax.Array, train_CTD: jax.Array, valid_CT: jax.Array, k: int):
  """The k largest cosine similarities [Q, k] and their training indices, over training chunks."""

  def merge(best, chunk):
    feats_TD, valid_T, offset = chunk
    sim_QT = jnp.where(valid_T, query_QD @ feats_TD.T, -jnp.inf)
    sim_QK, idx_QK = jax.lax.top_k(sim_QT, k)
    sims = jnp.concatenate([best[0], sim_QK], axis=1)
    idxs = jnp.concatenate([best[1], idx_QK + offset], axis=1)
    top_QK, pos_QK = jax.lax.top_k(sims, k)
    return (top_QK, jnp.take_along_axis(idxs, pos_QK, axis=1)), None

  q = query_QD.shape[0]
  chunk_size = train_CTD.shape[1]
  offsets = jnp.arange(train_CTD.shape[0]) * chunk_size
  init = (jnp.full((q, k), -jnp.inf), jnp.zeros((q, k), jnp.int32))
  (sims, idxs), _ = jax.lax.scan(merge, init, (train_CTD, valid_CT, offsets))
  return sims, idxs


def _normalise(x_ND: np.ndarray) -> np.ndarray:
  return x_ND / np.maximum(np.linalg.norm(x_ND, axis=1, keepdims=True), 1e-12)  # torch's normalize


def knn_accuracy(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  num_classes: int,
  *,
  k: int = 20,
  temperature: float = 0.07,
  test_block: int = 256,
  train_block: int = 8192,
) -> dict[str, float]:
  """Top-1/top-5 (%) of DINO's weighted k-NN classifier (see the module doc).

  Args:
    train, test: (features [N, D], labels [N]).
    num_classes: C, the labels' range.
    k, temperature: DINO's defaults (20 neighbours, T = 0.07).
    test_block, train_block: rows per block of test and chunk of training features: the similarity
      matrix held at once is test_block x train_block.
  """
  train_x, train_y = train
  k = min(k, len(train_x))
  chunk = max(min(train_block, len(train_x)), k)
  chunks = -(-len(train_x) // chunk)
  padded = np.zeros((chunks * chunk, train_x.shape[1]), np.float32)
  padded[: len(train_x)] = _normalise(train_x)
  valid = (np.arange(chunks * chunk) < len(train_x)).reshape(chunks, chunk)
  train_CTD = jnp.asarray(padded.reshape(chunks, chunk, -1))
  labels = np.asarray(train_y)
  test_x, test_y = _normalise(test[0]), np.asarray(test[1])
  hits = np.zeros(2)
  for start in range(0, len(test_x), test_block):
    query = test_x[start : start + test_block]
    sims, idxs = jax.device_get(_nearest(jnp.asarray(query), train_CTD, jnp.asarray(valid), k))
    weights_QK = np.exp(sims / temperature)
    votes_QC = np.zeros((len(query), num_classes))
    np.add.at(votes_QC, (np.arange(len(query))[:, None], labels[idxs]), weights_QK)
    correct = metrics.top_k_hits(votes_QC, test_y[start : start + test_block])
    hits += [np.sum(correct[1]), np.sum(correct[5])]
  return {"top1": 100 * hits[0] / len(test_x), "top5": 100 * hits[1] / len(test_x)}


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_linear(x_ND, y_N, num_classes: int, steps: int, learning_rate, weight_decay):
  """Weights [D, C] and bias [C] of the L2-penalised logistic regression, by full-batch Adam."""
  params = (jnp.zeros((x_ND.shape[1], num_classes)), jnp.zeros(num_classes))
  opt = optax.adam(learning_rate)

  def loss(p):
    logits_NC = x_ND @ p[0] + p[1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_NC, y_N).mean()
    return ce + 0.5 * weight_decay * jnp.sum(p[0] ** 2)

  def step(_, carry):
    p, state = carry
    updates, state = opt.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  return jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))[0]


def linear_probe_accuracy(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  num_classes: int,
  *,
  steps: int = 300,
  learning_rate: float = 0.05,
  weight_decay: float = 1e-4,
) -> dict[str, float]:
  """Top-1/top-5 (%) on `test` of a logistic regression fitted on standardised `train` features.

  Args:
    train, test: (features [N, D], labels [N]).
    num_classes: C, the labels' range.
    steps, learning_rate: full-batch Adam steps and step size.
    weight_decay: the L2 penalty's coefficient, 0.5 * wd * |W|^2 (the bias is not penalised).
  """
  mean = train[0].mean(axis=0)
  std = train[0].std(axis=0) + 1e-6  # a constant feature stays 0 instead of dividing by 0
  x = jnp.asarray((train[0] - mean) / std)
  w, b = _fit_linear(x, jnp.asarray(train[1]), num_classes, steps, learning_rate, weight_decay)
  logits = jnp.asarray((test[0] - mean) / std) @ w + b
  correct = metrics.top_k_hits(logits, test[1])
  return {
    k: 100 * np.mean(np.asarray(correct[n]), dtype=float) for k, n in (("top1", 1), ("top5", 5))
  }


PROBES = {"knn": knn_accuracy, "linear": linear_probe_accuracy}
