"""Attention-map similarity of two models as the paper's appendix measures it: the Jensen-Shannon
divergence per layer under four head-matching schemes.

For two models A and B with attention [B, H, N, N] per layer (a distribution over the N keys for each
image, head and query), `pairwise` is the H_A x H_B matrix of JSDs between head i of A and head j of B,
averaged over images and queries. It is computed once per layer; three schemes are read off it:

- ``no_matching``: head h of A vs head h of B (the matrix's diagonal; needs H_A == H_B, else NaN);
- ``hungarian``: the one-to-one matching of heads with the smallest mean JSD (a permutation when
  H_A == H_B; otherwise every head of the model with fewer heads gets a distinct partner);
- ``nearest``: each head of A to the head of B nearest to it (any B head may be picked by several A heads);

and the fourth is its own reduction: ``head_averaged``, the JSD between the maps averaged over heads.
For H_A <= H_B, nearest <= hungarian; for H_A == H_B also hungarian <= no_matching. JSD uses the
natural log, so every value lies in [0, ln 2].
"""

import dataclasses
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize  # a dependency of jax itself, so always installed

from at_jax import metrics, storage
from at_jax.ops import attn_ce

Array = jax.Array

SCHEMES = ("no_matching", "hungarian", "nearest", "head_averaged")
_LOG2 = math.log(2.0)


def log_probs(maps: Array, kind: str = "logits") -> Array:
  """Log-probabilities over keys (last axis), in float32.

  Args:
    maps: attention logits (``kind="logits"``, as the ViT returns them in ``attn_logits``) or
      probabilities (``kind="probs"``: clipped at 0 and renormalised; zeros get log(float32 tiny), so
      no -inf reaches the divergence).
  """
  maps = maps.astype(jnp.float32)
  if kind == "logits":
    return jax.nn.log_softmax(maps, axis=-1)
  if kind == "probs":
    p = jnp.clip(maps, 0.0, None)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return attn_ce.logits_of(p)
  raise ValueError(f"kind must be 'logits' or 'probs', not {kind!r}")


def jsd(log_p: Array, log_q: Array) -> Array:
  """Jensen-Shannon divergence (natural log) between distributions over the last axis, given as
  log-probabilities; broadcasts over the leading axes.

  The mixture's log is taken in log space (logaddexp), so keys where both distributions underflow to 0
  give 0, not NaN; rounding below 0 is clipped (JSD >= 0).
  """
  log_m = jnp.logaddexp(log_p, log_q) - _LOG2
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  kl_pm = jnp.sum(jnp.where(p > 0, p * (log_p - log_m), 0.0), axis=-1)
  kl_qm = jnp.sum(jnp.where(q > 0, q * (log_q - log_m), 0.0), axis=-1)
  return jnp.maximum(0.5 * (kl_pm + kl_qm), 0.0)


@partial(jax.jit, static_argnames="kind")
def _sums(a_LBHNN: Array, b_LBHNN: Array, weight_B: Array, kind: str) -> tuple[Array, Array]:
  """Per layer, the weighted sums over images and queries of the pairwise JSDs [L, H_A, H_B] and of
  the head-averaged JSD [L].

  Layers and A's heads are mapped over (lax.map), so the largest intermediate is one layer's
  [B, H_B, N, N] and memory grows with the batch, not with L * H_A * H_B.
  """

  def layer(ab):
    la, lb = log_probs(ab[0], kind), log_probs(ab[1], kind)  # [B, H, N, N]

    def head_of_a(la_BNN):
      per_query = jsd(la_BNN[:, None], lb)  # [B, H_B, N]
      return jnp.einsum("bhn,b->h", per_query, weight_B)

    pairwise = jax.lax.map(head_of_a, jnp.moveaxis(la, 1, 0))  # [H_A, H_B]
    # Head-averaged maps: the mean of the probabilities, not of the logits.
    mean_a = jax.nn.logsumexp(la, axis=1) - jnp.log(la.shape[1])
    mean_b = jax.nn.logsumexp(lb, axis=1) - jnp.log(lb.shape[1])
    averaged = jnp.einsum("bn,b->", jsd(mean_a, mean_b), weight_B)
    return pairwise, averaged

  return jax.lax.map(layer, (a_LBHNN, b_LBHNN))


@dataclasses.dataclass
class Similarity:
  """Accumulated JSDs of model A vs model B: sums over (image, query), and how many were summed."""

  pairwise_sum: np.ndarray  # [L, H_A, H_B] float64
  averaged_sum: np.ndarray  # [L] float64
  images: float = 0.0  # real (unmasked) images summed over
  count: float = 0.0  # images x queries

  @classmethod
  def empty(cls, depth: int, heads_a: int, heads_b: int) -> "Similarity":
    return cls(np.zeros((depth, heads_a, heads_b)), np.zeros(depth))

  def add(self, a_LBHNN: Array, b_LBHNN: Array, mask_B: Array | None = None, kind: str = "logits"):
    """Adds one batch of both models' maps (same images, same tokens); `mask_B` False drops padding."""
    if a_LBHNN.shape[0] != b_LBHNN.shape[0] or a_LBHNN.shape[3:] != b_LBHNN.shape[3:]:
      raise ValueError(
        f"maps [L, B, H, N, N] must agree in layers and tokens: {a_LBHNN.shape} vs {b_LBHNN.shape}"
      )
    batch, tokens = a_LBHNN.shape[1], a_LBHNN.shape[3]
    weight = jnp.ones(batch) if mask_B is None else jnp.asarray(mask_B, jnp.float32)
    pairwise, averaged = jax.device_get(_sums(a_LBHNN, b_LBHNN, weight, kind))
    self.pairwise_sum += pairwise
    self.averaged_sum += averaged
    images = float(np.sum(jax.device_get(weight)))
    self.images += images
    self.count += images * tokens

  @property
  def pairwise(self) -> np.ndarray:
    """[L, H_A, H_B]: mean JSD between head i of A and head j of B."""
    return self.pairwise_sum / self.count

  def schemes(self) -> dict[str, np.ndarray]:
    """The four schemes, each [L] (see the module docstring)."""
    pairwise = self.pairwise
    heads_a, heads_b = pairwise.shape[1:]
    diagonal = np.einsum("lhh->l", pairwise) / heads_a if heads_a == heads_b else None
    return {
      "no_matching": np.full(len(pairwise), np.nan) if diagonal is None else diagonal,
      "hungarian": np.array([hungarian(layer)[1] for layer in pairwise]),
      "nearest": pairwise.min(axis=2).mean(axis=1),
      "head_averaged": self.averaged_sum / self.count,
    }


def hungarian(cost_HH: np.ndarray) -> tuple[np.ndarray, float]:
  """The one-to-one head matching with the smallest mean cost (scipy's exact linear_sum_assignment).

  Returns (partner, mean): partner[i] is A's head i's head in B (for H_A > H_B, -1 for the A heads left
  over), mean the mean cost over the matched pairs.
  """
  rows, cols = optimize.linear_sum_assignment(cost_HH)
  partner = np.full(cost_HH.shape[0], -1)
  partner[rows] = cols
  return partner, float(cost_HH[rows, cols].mean())


def similarity(
  a_LBHNN: Array,
  b_LBHNN: Array,
  *,
  mask_B: Array | None = None,
  kind: str = "logits",
  batch_size: int = 16,
) -> Similarity:
  """The `Similarity` of two models' maps already in memory, `batch_size` images at a time."""
  depth, batch, heads_a = a_LBHNN.shape[:3]
  result = Similarity.empty(depth, heads_a, b_LBHNN.shape[2])
  for start in range(0, batch, batch_size):
    chunk = slice(start, start + batch_size)
    mask = None if mask_B is None else mask_B[chunk]
    result.add(a_LBHNN[:, chunk], b_LBHNN[:, chunk], mask, kind)
  return result


def _attention_logits(model, params, images_BHWC: Array) -> Array:
  return model.apply({"params": params}, images_BHWC, train=False)[1]["attn_logits"]


def model_similarity(
  models: Mapping[str, tuple[object, object]],
  references: Sequence[str],
  batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[tuple[str, str], Similarity]:
  """Each model's attention similarity to each reference model, accumulated over `batches`.

  Args:
    models: name -> (ViT module, params), as for `attention.compare_attention`.
    references: names in `models` to compare against (e.g. the pre-trained and the fine-tuned teacher);
      every other model is compared with each, and references with each other.
    batches: {"image": [B, H, W, C], "mask": [B] (optional)}, e.g. from `pipeline.eval_iterator`;
      every model sees the same images.

  Returns:
    (model, reference) -> its `Similarity`.
  """
  missing = [r for r in references if r not in models]
  if missing:
    raise ValueError(f"references {missing} are not among the models {list(models)}")
  # Each pair of references once (the earlier one as the reference), every other model against each.
  pairs = [
    (a, r) for i, r in enumerate(references) for a in models if a != r and a not in references[:i]
  ]
  applies = {
    name: jax.jit(partial(_attention_logits, model)) for name, (model, _) in models.items()
  }
  results: dict[tuple[str, str], Similarity] = {}
  for batch in batches:
    logits = {name: applies[name](params, batch["image"]) for name, (_, params) in models.items()}
    for a, r in pairs:
      if (a, r) not in results:
        results[a, r] = Similarity.empty(logits[a].shape[0], logits[a].shape[2], logits[r].shape[2])
      results[a, r].add(logits[a], logits[r], batch.get("mask"))
  return results


def format_similarity(results: Mapping[tuple[str, str], Similarity]) -> str:
  """A table: per (model, reference) pair, one row per layer and a mean over layers, one column per
  scheme (no_matching is blank where the head counts differ)."""
  rows = []
  for (a, r), result in results.items():
    values = result.schemes()
    depth = len(values["head_averaged"])
    for layer in [*range(depth), "mean"]:
      pick = slice(None) if layer == "mean" else layer
      row = {"model": a, "vs": r, "layer": str(layer)}
      for scheme, per_layer in values.items():
        value = float(np.mean(per_layer[pick]))
        row[scheme] = None if math.isnan(value) else value
      rows.append(row)
  return metrics.format_table(rows, ["model", "vs", "layer", *SCHEMES])


def save_similarity_plot(path: str, results: Mapping[tuple[str, str], Similarity]) -> None:
  """A PNG like the paper's appendix figure: one panel per (model, reference) pair, layers on x, JSD on
  y, one line per head-matching scheme."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(
    1, len(results), figsize=(3.2 * len(results), 2.8), sharey=True, squeeze=False
  )
  # Distinct markers and dashes: with few heads, hungarian and nearest often coincide.
  styles = dict(zip(SCHEMES, [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]))
  for ax, ((a, r), result) in zip(axes[0], results.items()):
    for scheme, per_layer in result.schemes().items():
      if not np.all(np.isnan(per_layer)):
        marker, dashes = styles[scheme]
        ax.plot(per_layer, marker=marker, linestyle=dashes, markersize=3, label=scheme)
    ax.set_title(f"{a} vs {r}", fontsize=8)
    ax.set_xlabel("layer", fontsize=8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.tick_params(labelsize=7)
  axes[0, 0].set_ylabel("Jensen-Shannon divergence (nats)", fontsize=8)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(SCHEMES), fontsize=7, frameon=False)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  buffer = io.BytesIO()  # a path in a bucket too
  fig.savefig(buffer, format="png", dpi=110)
  storage.write_atomic(path, buffer.getvalue())
  plt.close(fig)
