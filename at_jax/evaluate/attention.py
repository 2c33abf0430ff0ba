"""Attention agreement of two models (cross-entropy, entropy, Jensen-Shannon per layer) and the
attention-map figure."""

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from at_jax import storage
from at_jax.evaluate import similarity
from at_jax.ops import attn_ce
from at_jax.transfer import loss, spec, targets

Array = jax.Array


def attention_agreement(
  teacher_logits_LBHNN: Array, student_logits_LBHNN: Array
) -> dict[str, np.ndarray]:
  """Per-layer agreement of two models' attention over keys, averaged over batch, heads and queries.

  Returns {"cross_entropy": [L], "teacher_entropy": [L], "jsd": [L]}: the distillation objective per layer
  (its minimum is the teacher's entropy) and the Jensen-Shannon divergence (natural log, in [0, ln 2]).
  """
  t = jax.nn.log_softmax(teacher_logits_LBHNN.astype(jnp.float32), axis=-1)
  s = jax.nn.log_softmax(student_logits_LBHNN.astype(jnp.float32), axis=-1)
  pt = jnp.exp(t)
  mean = lambda x: np.asarray(x.mean(axis=(1, 2, 3)))
  return {
    "cross_entropy": mean(loss.attention_cross_entropy(teacher_logits_LBHNN, student_logits_LBHNN)),
    "teacher_entropy": mean(-jnp.sum(pt * t, -1)),
    "jsd": mean(similarity.jsd(t, s)),
  }


# `head_statistics`' measures, as the tables of launch/teacher_heads.py name them.
HEAD_STATISTICS = {
  "entropy": "attention entropy over keys (nats; low is sharp)",
  "self": "attention mass on the query's own token",
  "prefix": "attention mass on the prefix tokens (cls, registers)",
}


def head_statistics(model: Any, params: Any, images_BHWC: Any) -> dict[str, np.ndarray]:
  """Per layer and head, [L, H], averaged over the images and query tokens (`HEAD_STATISTICS`): how
  sharp each head is, and how much of its mass sits on the query itself or on the prefix tokens. A sharp
  head whose mass sits there (an attention sink) says little about where in the image to look, which
  entropy alone does not show (`pairing.sharpest_heads` ranks by entropy)."""
  _, out = model.apply({"params": params}, jnp.asarray(images_BHWC), train=False)
  log_p = jax.nn.log_softmax(out["attn_logits"].astype(jnp.float32), -1)  # [L, B, H, N, N]
  p = jnp.exp(log_p)
  per_query = {
    "entropy": -(p * log_p).sum(-1),
    "self": jnp.diagonal(p, axis1=-2, axis2=-1),
    "prefix": p[..., : model.num_prefix].sum(-1),
  }
  return {k: np.asarray(v.mean(axis=(1, 3))) for k, v in per_query.items()}


def format_heads(
  values_LH: np.ndarray, teacher_layers: Sequence[int], picks: Mapping[str, str] | None = None
) -> str:
  """A `head_statistics` measure as a table, one row per teacher layer read (the student's distilled
  layers' order), one column per head, then each of `picks` (name: a `transfer.head_pick` string, one
  group per row) as a column of the heads it picks."""
  picks = picks or {}
  heads = values_LH.shape[1]
  groups = {name: pick.split(";") for name, pick in picks.items()}
  header = ["teacher layer"] + [f"head {h}" for h in range(heads)] + list(picks)
  rows = [
    [str(t)] + [f"{v:.3f}" for v in values_LH[t]] + [groups[name][s] for name in picks]
    for s, t in enumerate(teacher_layers)
  ]
  widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
  return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in [header, *rows])


def query_maps(logits_LBHNN: Array, *, num_prefix: int, query: int = 0) -> np.ndarray:
  """Attention of one query token over the patch tokens, head-averaged, as grids [L, B, g, g]."""
  probs = jax.nn.softmax(logits_LBHNN.astype(jnp.float32), axis=-1)[:, :, :, query, num_prefix:]
  probs = np.asarray(probs.mean(axis=2))
  grid = int(math.isqrt(probs.shape[-1]))
  return probs.reshape(probs.shape[:2] + (grid, grid))


def save_attention_figure(
  path: str,
  images_BHWC: np.ndarray,
  maps: Mapping[str, np.ndarray],
  *,
  layers: Sequence[int] | None = None,
  title: str = "",
  column_titles: Sequence[str] | None = None,
) -> None:
  """A PNG grid: per image, one row per model: the image, then that model's map in each layer.

  Args:
    images_BHWC: images to show, any range (rescaled per image to [0, 1]).
    maps: model name -> [L, B, g, g] from `query_maps`.
    layers: which layers to show (default all that every model has).
    column_titles: one per shown layer (default "layer i").
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(maps)
  depth = min(m.shape[0] for m in maps.values())  # a shallower student: the layers both models have
  layers = list(range(depth)) if layers is None else list(layers)
  rows = len(images_BHWC) * len(names)
  fig, axes = plt.subplots(
    rows, len(layers) + 1, figsize=(1.3 * (len(layers) + 1), 1.3 * rows + 0.4), squeeze=False
  )
  for b, image in enumerate(images_BHWC):
    shown = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    for m, name in enumerate(names):
      r = b * len(names) + m
      axes[r, 0].imshow(shown.squeeze() if shown.shape[-1] == 1 else shown, cmap="gray")
      axes[r, 0].set_ylabel(name, fontsize=7)
      for c, layer in enumerate(layers):
        axes[r, c + 1].imshow(maps[name][layer, b], cmap="viridis")
        if r == 0:
          label = f"layer {layer}" if column_titles is None else column_titles[c]
          axes[r, c + 1].set_title(label, fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()  # a path in a bucket too
  fig.savefig(buffer, format="png", dpi=110)
  storage.write_atomic(path, buffer.getvalue())
  plt.close(fig)


def compare_attention(
  models: Mapping[str, tuple[object, object]], images_BHWC: np.ndarray, out_png: str | None
) -> dict[str, dict[str, np.ndarray]]:
  """Draws `models`' cls-token maps on `images` and returns each model's agreement with the first, per
  layer that both have (head-averaged where their head counts differ).

  Args:
    models: name -> (ViT module, params); the first entry is the reference (the teacher).
    images_BHWC: normalised images, as the models expect them.
    out_png: where the figure goes (None: no figure).
  """
  maps, logits = {}, {}
  for name, (model, params) in models.items():
    _, out = model.apply({"params": params}, images_BHWC, train=False)
    logits[name] = out["attn_logits"]
    maps[name] = query_maps(out["attn_logits"], num_prefix=model.num_prefix)
  if out_png:
    save_attention_figure(
      out_png, images_BHWC, maps, title="cls-token attention over patches, head-averaged, per layer"
    )
  first, *rest = list(models)
  tokens = logits[first].shape[-1]  # models of another token grid are drawn, not compared
  return {
    name: attention_agreement(*_comparable(logits[first], logits[name]))
    for name in rest
    if logits[name].shape[-1] == tokens
  }


def compare_with_teacher(
  student: Any,
  student_params: Any,
  teacher: Any,
  teacher_params: Any,
  images_BHWC: np.ndarray,
  transfer: spec.Transfer,
  out_png: str | None,
  head_mix_SHT: Any = None,
) -> dict[str, np.ndarray]:
  """The student's attention in each transferred layer against the teacher's maps it was taught there:
  the teacher layer `transfer.layer_map` pairs with it, heads picked or mixed and tokens resampled as in
  training (`targets.run_teacher`), over the tokens the loss saw (`transfer.prefix`). A learned head mix
  is dropped from exports: given its logits (`head_mix_SHT`, e.g. from a checkpoint) each student head
  is compared with its mix, as trained; without them both sides are averaged over their heads. Draws
  both into `out_png` (None: no figure); returns the agreement per transferred layer, with
  "student_layer" and "teacher_layer"."""
  as_maps = dataclasses.replace(transfer, mode="copy", average="none")  # maps, per image
  taught = targets.run_teacher(teacher, teacher_params, jnp.asarray(images_BHWC), as_maps)
  taught_SBHNN = taught["attn_logits"]
  if head_mix_SHT is not None:  # each student head's mix of the teacher's maps, as trained
    mixed = targets.learned_mix(taught, jnp.asarray(head_mix_SHT), transfer)
    taught_SBHNN = attn_ce.logits_of(mixed["attn_probs"])
  _, out = student.apply({"params": student_params}, images_BHWC, train=False)
  skip = transfer.student_prefix
  own_SBHNN = out["attn_logits"][np.asarray(transfer.layers)][..., skip:, skip:]
  prefix = 0 if skip else student.num_prefix
  maps = {
    "teacher": query_maps(taught_SBHNN, num_prefix=prefix),
    "student": query_maps(own_SBHNN, num_prefix=prefix),
  }
  pairs = zip(transfer.layers, transfer.teacher_layers, strict=True)
  if out_png:
    save_attention_figure(
      out_png,
      images_BHWC,
      maps,
      title=f"{'first patch' if skip else 'cls'}-token attention, head-averaged: each student layer "
      "and the teacher's maps it was taught",
      column_titles=[f"s{s} <- t{t}" for s, t in pairs],
    )
  return {
    **attention_agreement(*_comparable(taught_SBHNN, own_SBHNN)),
    "student_layer": np.asarray(transfer.layers),
    "teacher_layer": np.asarray(transfer.teacher_layers),
  }


def _comparable(a_LBHNN: Array, b_LBHNN: Array) -> tuple[Array, Array]:
  """Two models' logits over the layers both have; where their head counts differ (a feature-distilled
  student may have its own), the head-averaged maps, as log-probabilities (which are logits too)."""
  depth = min(a_LBHNN.shape[0], b_LBHNN.shape[0])
  a_LBHNN, b_LBHNN = a_LBHNN[:depth], b_LBHNN[:depth]
  if a_LBHNN.shape[2] != b_LBHNN.shape[2]:
    averaged = lambda x: jnp.log(jax.nn.softmax(x.astype(jnp.float32), -1).mean(2, keepdims=True))
    a_LBHNN, b_LBHNN = averaged(a_LBHNN), averaged(b_LBHNN)
  return a_LBHNN, b_LBHNN


def format_agreement(agreement: Mapping[str, Mapping[str, np.ndarray]], reference: str) -> str:
  lines = []
  for name, values in agreement.items():
    lines.append(f"attention of {name} vs {reference}, per layer:")
    for key, per_layer in values.items():
      shown = (f"{v:5d}" if key.endswith("_layer") else f"{v:.3f}" for v in np.asarray(per_layer))
      lines.append(f"  {key:16s} " + " ".join(shown))
  return "\n".join(lines)
