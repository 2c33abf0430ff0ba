"""The study's analysis job on real exports and real Fashion-MNIST images: probes of each model's frozen
features, and each student's attention similarity to the teacher."""

import jax
import jax.numpy as jnp
import numpy as np

from at_jax import checkpoint
from at_jax.models import vit
from configs import miniature
from projects.miniature import analysis as study_analysis


def _sharpened(params: dict) -> dict:
  """q and k kernels x10: a random init attends almost uniformly, and all such maps are alike."""
  qk = lambda path: (
    [getattr(k, "key", "") for k in path][-2:] in (["query", "kernel"], ["key", "kernel"])
  )
  return jax.tree_util.tree_map_with_path(lambda p, x: 10 * x if qk(p) else x, params)


def _export(path: str, seed: int, **fields) -> tuple[vit.ViT, dict]:
  model = vit.build({"variant": "Pico/7", **fields})
  params = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 3)), train=False)["params"]
  params = _sharpened(params)
  checkpoint.save_params(path, params, vit.model_fields(model))
  return model, params


def test_probes_and_similarity_of_real_exports(tmp_path):
  _, teacher_params = _export(str(tmp_path / "teacher"), 0, num_classes=0)
  # A student holding the teacher's encoder (plus a head) attends exactly as the teacher does.
  student = vit.build({"variant": "Pico/7", "num_classes": 10})
  head = student.init(jax.random.key(1), jnp.zeros((1, 28, 28, 3)), train=False)["params"]["head"]
  checkpoint.save_params(
    str(tmp_path / "same"), {**teacher_params, "head": head}, vit.model_fields(student)
  )
  _export(str(tmp_path / "other"), 2, num_classes=10)
  data = miniature.student_config(
    {}, {"data.train_split": "train[:200]"}, "", 0, 1, 1, "Mini/7"
  ).data
  data.unlock()
  data.eval_split, data.eval_batch_size = "test[:100]", 50
  exports = {n: str(tmp_path / n) for n in ("teacher", "same", "other")}
  found = study_analysis.analyse(exports, data)
  assert set(found["probes"]) == {"teacher", "same", "other"}
  for probed in found["probes"].values():
    assert set(probed) == {"knn", "linear"} and all(0 <= v <= 100 for v in probed.values())
  # Random-init features still separate Fashion-MNIST's classes far above chance (10%).
  assert found["probes"]["teacher"]["linear"] > 30
  # The probes read the pre-logits, before any head: the teacher's encoder probes as the teacher.
  assert found["probes"]["same"] == found["probes"]["teacher"] != found["probes"]["other"]
  assert set(found["jsd"]) == {"same", "other"}
  for scheme, per_layer in found["jsd"]["same"].items():
    assert len(per_layer) == 2 and max(per_layer) < 1e-5, scheme
  other = found["jsd"]["other"]
  assert min(other["no_matching"]) > 1e-2
  assert np.all(np.array(other["nearest"]) <= np.array(other["hungarian"]) + 1e-9)
