"""Ensembles of standalone classifiers: the paper's fine-tuned teacher + distilled student (86.3).

(A run's own top-1/top-5 for raw and EMA params is computed by its eval step,
`at_jax.training.classify.make_eval_step`, and re-computed for any checkpoint by
`at_jax.experiment.loop.evaluate_checkpoint`. A run exports both: <workdir>/params and
<workdir>/params_ema, either one a member here.)
"""

from collections.abc import Iterable, Mapping

import jax
import numpy as np

from at_jax import metrics


def ensemble_accuracy(
  members: Mapping[str, tuple[object, object]], batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
  """Top-1/top-5 (%) of each member and of their ensemble: the average of the members' softmax
  probabilities (the paper's fine-tuned teacher + distilled student, 86.3 on ImageNet).

  Args:
    members: name -> (ViT, params) of standalone classifiers over the same classes.
    batches: eval batches {"image", "label", "mask"} (pipeline.eval_iterator).
  """
  applies = {
    name: jax.jit(lambda p, x, m=model: jax.nn.softmax(m.apply({"params": p}, x, train=False)[0]))
    for name, (model, _) in members.items()
  }
  hits = {name: np.zeros(2) for name in list(members) + ["ensemble"]}
  count = 0.0
  for batch in batches:
    probs = {
      name: np.asarray(applies[name](params, batch["image"]))
      for name, (_, params) in members.items()
    }
    probs["ensemble"] = np.mean(list(probs.values()), axis=0)
    mask = np.asarray(batch["mask"], np.float64)
    count += mask.sum()
    for name, p in probs.items():
      correct = metrics.top_k_hits(p, batch["label"])
      hits[name] += [(np.asarray(correct[1]) * mask).sum(), (np.asarray(correct[5]) * mask).sum()]
  return {
    name: {"top1": 100 * h[0] / count, "top5": 100 * h[1] / count} for name, h in hits.items()
  }
