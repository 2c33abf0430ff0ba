"""Attention-map similarity (JSD under four head-matching schemes): the divergence against scipy, the
schemes' properties on random maps, and launch/attention_maps.py end to end on two tiny models."""

import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy.spatial import distance

from at_jax import checkpoint
from at_jax.evaluate import similarity
from at_jax.models import vit
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _logits(seed: int, shape=(3, 4, 4, 6, 6), scale=3.0) -> jax.Array:
  """Random attention logits [L, B, H, N, N], peaked enough that heads differ clearly."""
  return jax.random.normal(jax.random.key(seed), shape) * scale


def test_jsd_matches_scipy_and_survives_zeros():
  p = np.asarray(jax.random.dirichlet(jax.random.key(0), np.full(7, 0.5), (50,)), np.float64)
  q = np.asarray(jax.random.dirichlet(jax.random.key(1), np.full(7, 0.5), (50,)), np.float64)
  # scipy returns the Jensen-Shannon *distance*, sqrt(JSD), natural log by default (base=None).
  want = distance.jensenshannon(p, q, axis=-1) ** 2
  got = similarity.jsd(similarity.log_probs(p, "probs"), similarity.log_probs(q, "probs"))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  # Logits give the same as their softmax given as probabilities.
  logits = np.log(p) + 4.0
  np.testing.assert_allclose(
    similarity.jsd(similarity.log_probs(logits), similarity.log_probs(q, "probs")), want, rtol=2e-4
  )
  # Exact zeros (disjoint supports give the maximum ln 2; shared zeros contribute nothing) and -inf
  # logits (masked keys) give no NaN.
  one_hot = np.eye(4)[[0, 1]]
  pair = similarity.jsd(*similarity.log_probs(one_hot, "probs"))
  np.testing.assert_allclose(pair, np.log(2), rtol=1e-6)
  masked = np.array([[0.0, 1.0, -np.inf, -np.inf], [2.0, -1.0, -np.inf, 0.5]])
  out = similarity.jsd(similarity.log_probs(masked[:1]), similarity.log_probs(masked[1:]))
  ref = distance.jensenshannon(*np.asarray(jax.nn.softmax(masked, -1), np.float64)) ** 2
  assert np.isfinite(out).all() and float(out[0]) == pytest.approx(ref, rel=1e-4)
  with pytest.raises(ValueError, match="kind"):
    similarity.log_probs(p, "prob")


def test_pairwise_matches_a_numpy_transcription():
  a, b = _logits(0, (2, 5, 3, 4, 4)), _logits(1, (2, 5, 2, 4, 4))  # H_A = 3, H_B = 2
  mask = np.array([True, True, False, True, False])
  result = similarity.similarity(a, b, mask_B=mask, batch_size=2)  # chunks of 2, 2, 1 images
  p = np.asarray(jax.nn.softmax(a, -1), np.float64)[:, mask]
  q = np.asarray(jax.nn.softmax(b, -1), np.float64)[:, mask]
  js = lambda x, y: distance.jensenshannon(x, y, axis=-1) ** 2
  want = np.stack(
    [[[js(p[k, :, i], q[k, :, j]).mean() for j in range(2)] for i in range(3)] for k in range(2)]
  )
  np.testing.assert_allclose(result.pairwise, want, rtol=1e-4)
  averaged = js(p.mean(2), q.mean(2)).mean(axis=(1, 2))
  schemes = result.schemes()
  np.testing.assert_allclose(schemes["head_averaged"], averaged, rtol=1e-4)
  assert result.images == 3 and np.isnan(schemes["no_matching"]).all()  # head counts differ
  np.testing.assert_allclose(schemes["nearest"], want.min(2).mean(1), rtol=1e-6)
  # Rectangular Hungarian: both heads of B get distinct heads of A.
  best = [
    min(np.mean([w[i, 0], w[j, 1]]) for i, j in itertools.permutations(range(3), 2)) for w in want
  ]
  np.testing.assert_allclose(schemes["hungarian"], best, rtol=1e-6)
  with pytest.raises(ValueError, match="layers and tokens"):
    result.add(a, _logits(1, (2, 5, 2, 5, 5)))


def test_schemes_on_itself_and_on_permuted_heads():
  a = _logits(2)
  same = similarity.similarity(a, a).schemes()
  for scheme in similarity.SCHEMES:
    np.testing.assert_allclose(same[scheme], 0.0, atol=1e-6, err_msg=scheme)
  permutation = np.array([2, 0, 3, 1])
  permuted = similarity.similarity(a, a[:, :, permutation])
  values = permuted.schemes()
  assert np.all(values["no_matching"] > 0.05)
  for scheme in ("hungarian", "nearest", "head_averaged"):
    np.testing.assert_allclose(values[scheme], 0.0, atol=1e-6, err_msg=scheme)
  # The matching found is the inverse permutation: A's head i is B's head where permutation == i.
  for layer in permuted.pairwise:
    partner, _ = similarity.hungarian(layer)
    np.testing.assert_array_equal(permutation[partner], np.arange(4))


def test_scheme_order_permutation_invariance_and_brute_force():
  a, b = _logits(3), _logits(4)
  result = similarity.similarity(a, b, batch_size=3)
  values = result.schemes()
  assert np.all(values["nearest"] <= values["hungarian"] + 1e-7)
  assert np.all(values["hungarian"] <= values["no_matching"] + 1e-7)
  assert np.all(
    values["nearest"] < values["no_matching"]
  )  # random heads: strictly, for the test to bite
  # Hungarian equals the best of all 4! permutations.
  for layer, got in zip(result.pairwise, values["hungarian"]):
    brute = min(layer[np.arange(4), list(p)].mean() for p in itertools.permutations(range(4)))
    assert got == pytest.approx(brute, rel=1e-9)
  # Permuting B's heads changes nothing but no_matching.
  shuffled = similarity.similarity(a, b[:, :, [3, 1, 0, 2]], batch_size=3).schemes()
  for scheme in ("hungarian", "nearest", "head_averaged"):
    np.testing.assert_allclose(shuffled[scheme], values[scheme], rtol=1e-5, err_msg=scheme)
  assert not np.allclose(shuffled["no_matching"], values["no_matching"], rtol=1e-3)
  # Batching does not change the result.
  whole = similarity.similarity(a, b, batch_size=4).schemes()
  for scheme in similarity.SCHEMES:
    np.testing.assert_allclose(whole[scheme], values[scheme], rtol=1e-5)


def test_table_and_plot(tmp_path):
  results = {
    ("student", "teacher"): similarity.similarity(_logits(5), _logits(6)),
    ("student", "finetuned"): similarity.similarity(_logits(5), _logits(7)),
  }
  table = similarity.format_similarity(results).splitlines()
  assert table[0].split("|")[1:-1] == [
    f" {c} " for c in ("model  ", "vs       ", "layer", *similarity.SCHEMES)
  ]
  assert len(table) == 2 + 2 * (3 + 1)  # header, separator, 3 layers + mean per pair
  path = str(tmp_path / "jsd.png")
  similarity.save_similarity_plot(path, results)
  png = open(path, "rb").read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _export(path: str, seed: int, swap_heads: bool = False, **fields) -> None:
  """A random-init Pico/7 export with queries and keys scaled up (peaked, distinct maps: at init they are near
  uniform); `swap_heads` swaps each layer's two heads, which permutes its maps and keeps its outputs."""
  model = vit.build({"variant": "Pico/7", "num_classes": 10, **fields})
  params = model.init(jax.random.key(seed), np.zeros((1, 28, 28, 3)), train=False)["params"]
  params = jax.tree_util.tree_map(np.asarray, params)
  for name, block in params["Transformer"].items():
    attention = block["MultiHeadDotProductAttention_0"]
    for part in ("query", "key"):
      attention[part]["kernel"] = attention[part]["kernel"] * 10
    if swap_heads:
      for part in ("query", "key", "value"):
        attention[part] = {k: v[..., ::-1, :] for k, v in attention[part].items()}
      attention["out"]["kernel"] = attention["out"]["kernel"][::-1]
    assert name.startswith("encoderblock_")
  checkpoint.save_params(path, params, vit.model_fields(model))


@pytest.mark.slow
def test_command_end_to_end(tmp_path):
  """Two Pico/7 exports and the first with its heads swapped, through launch/attention_maps.py."""
  paths = [str(tmp_path / name) for name in ("a", "b", "a_swapped")]
  _export(paths[0], 0)
  _export(paths[1], 1)
  _export(paths[2], 0, swap_heads=True)
  out = str(tmp_path / "maps.png")
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "attention_maps.py"),
      "--params=" + ",".join(paths),
      "--names=a,b,a_swapped",
      "--references=a,b",
      f"--out={out}",
      "--num_images=2",
      "--jsd_images=10",
      "--batch_size=4",  # 3 batches, the last one part padding
    ],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "over 10 images" in proc.stdout
  rows = {
    tuple(cell.strip() for cell in line.split("|")[1:4]): [float(v) for v in line.split("|")[4:-1]]
    for line in proc.stdout.splitlines()
    if line.startswith("| a") or line.startswith("| b")
  }
  # Pairs: (b, a), (a_swapped, a), then vs b only a_swapped (a vs b was measured once, as b vs a).
  assert {(m, r) for m, r, _ in rows} == {("b", "a"), ("a_swapped", "a"), ("a_swapped", "b")}
  depth = vit.build({"variant": "Pico/7", "num_classes": 10}).depth
  assert sum(layer == "mean" for _, _, layer in rows) == 3 and len(rows) == 3 * (depth + 1)
  for layer in [*map(str, range(depth)), "mean"]:
    no_matching, *matched = rows["a_swapped", "a", layer]
    assert no_matching > 0.05, layer  # the same maps in other heads
    np.testing.assert_allclose(matched, 0.0, atol=1e-5, err_msg=layer)
  assert all(v > 0.01 for v in rows["b", "a", "mean"])
  # Swapping a's heads changes nothing but no_matching; JSD is symmetric, so (a_swapped, b) has (b, a)'s
  # Hungarian and head-averaged values (nearest goes from each head of the model to the reference's).
  np.testing.assert_allclose(
    np.take(rows["a_swapped", "b", "mean"], [1, 3]),
    np.take(rows["b", "a", "mean"], [1, 3]),
    rtol=1e-3,
  )
  assert os.path.getsize(str(tmp_path / "maps_jsd.png")) > 5000
  # A reference that is not a model is refused before any model loads; models whose maps cover other
  # tokens (registers) are refused before any map is computed.
  _export(str(tmp_path / "registers"), 0, num_registers=2)
  for flags, field in (
    ([f"--params={paths[0]}", "--references=x"], "--references"),
    ([f"--params={paths[0]},{tmp_path / 'registers'}", f"--out={out}"], "--params"),
  ):
    bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "attention_maps.py"), *flags],
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert bad.returncode != 0 and f"ConfigError: {field}:" in bad.stderr, bad.stderr[-2000:]
