"""The study's analysis jobs: what the trained students learned, beyond their accuracy.

Per seed of a group, after its students: the frozen-feature probes (k-NN and linear top-1 of each
model's pre-logits, `evaluate.probes`) of the teacher and the students, testing the paper's "the student
learns its own features" (a copy of the teacher's features would probe like the teacher), and each
student's attention similarity to the teacher (`evaluate.similarity`: Jensen-Shannon divergence per
layer under the appendix's four head matchings), testing that distillation, not training alone, is what
brings the maps close.
"""

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

# The students analysed: copy students are left out (their maps *are* the teacher's, and their features
# exist only with the teacher running beside them).
ANALYSED = ("scratch", "finetune", "distill", "feature_distill")
JSD_IMAGES = 256  # at least: whole eval batches from the start of the test split
PROBES = ("knn", "linear")


def _batches(data: ml_collections.ConfigDict, field: str, images: int = 0) -> Iterator[Any]:
  """Eval batches of `field`'s split; with `images`, only the first batches that cover that many."""
  from at_jax.data import options, pipeline, sources  # pylint: disable=import-outside-toplevel

  batches = pipeline.eval_iterator(
    sources.from_config(data, field, None),
    global_batch_size=data.eval_batch_size,
    **options.eval_view(data),
    num_threads=0,
  )
  return itertools.islice(batches, -(-images // data.eval_batch_size)) if images else batches


def analyse(exports: Mapping[str, str], data: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"probes": {model: {probe: top1}}, "jsd": {model: {scheme: [per layer]}}} of the models exported
  in `exports` (name -> export dir; "teacher" is the reference), on `data`'s train and eval splits."""
  from at_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from at_jax.evaluate import probes, similarity  # pylint: disable=import-outside-toplevel
  from at_jax.models import vit  # pylint: disable=import-outside-toplevel

  models = {}
  for name, path in exports.items():
    model_config, params = checkpoint.load_params(path)
    models[name] = (vit.build(model_config), params)
  probed: dict[str, dict[str, float]] = {}
  for name, (model, params) in models.items():
    train = probes.extract_features(model, params, _batches(data, "data.train_split"))
    test = probes.extract_features(model, params, _batches(data, "data.eval_split"))
    classes = int(max(train[1].max(), test[1].max())) + 1
    probed[name] = {p: probes.PROBES[p](train, test, classes)["top1"] for p in PROBES}
  pairs = similarity.model_similarity(
    models, ["teacher"], _batches(data, "data.eval_split", JSD_IMAGES)
  )
  jsd = {
    a: {scheme: [float(v) for v in per_layer] for scheme, per_layer in s.schemes().items()}
    for (a, _), s in pairs.items()
  }
  return {"probes": probed, "jsd": jsd}


def summarise(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """{group: {"probes": {model: {probe: [mean, std, n]}}, "jsd": {model: {scheme: [mean per layer]}}}}
  over the seeds of each group's analysis jobs (paths "<group>/analysis/seed<k>")."""
  by_group: dict[str, list[Mapping[str, Any]]] = {}
  for path, results in runs.items():
    group, kind, *_ = path.split("/") + [""]
    if kind == "analysis":
      by_group.setdefault(group, []).append(results)
  out = {}
  for group, found in sorted(by_group.items()):
    names = list(found[0]["probes"])
    probes = {
      n: {p: _stats([r["probes"][n][p] for r in found if n in r["probes"]]) for p in PROBES}
      for n in names
    }
    jsd = {
      n: {
        scheme: np.mean([r["jsd"][n][scheme] for r in found], axis=0).tolist()
        for scheme in found[0]["jsd"][n]
      }
      for n in found[0]["jsd"]
    }
    out[group] = {"probes": probes, "jsd": jsd, "seeds": len(found)}
  return out


def _stats(values: Sequence[float]) -> list[float]:
  return [float(np.mean(values)), float(np.std(values)), len(values)]
