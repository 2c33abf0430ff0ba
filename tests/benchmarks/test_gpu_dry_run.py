"""`bash benchmarks/gpu.sh --dry-run`: both GPU commands' stages on tiny shapes, on the CPU, with the same
files, so that no stage can crash on the one GPU run for a reason a CPU could have shown."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import subprocess_env

# Real processes (one per stage, under gpu.sh's timeouts): end-to-end.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = {
  "1": ("preflight", "kernels", "recipe", "loss_memory"),
  "2": ("fused", "torch_b16", "torch_l16"),
}


def _records(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict[str, list[dict]]:
  out = tmp_path_factory.mktemp("gpu_out")
  # One device, as the lent GPU; gpu.sh keeps the caller's compilation cache (conftest's).
  env = subprocess_env(OUT=str(out), PYTHON=sys.executable)
  child = subprocess.run(
    ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--dry-run"],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
  files = sorted(os.listdir(out))
  assert {"command1.log", "command2.log", "results1.jsonl", "results2.jsonl"} <= set(files), files
  return {n: _records(os.path.join(out, f"results{n}.jsonl")) for n in STAGES}


def test_every_stage_finishes_without_an_error(dry_run):
  for command, stages in STAGES.items():
    records = dry_run[command]
    bad = [r for r in records if r["kind"] in ("error", "stage_failed")]
    assert not bad, bad
    done = [r["stage"] for r in records if r["kind"] == "stage_done"]
    assert done == list(stages), (command, done)


def test_kernel_checks_agree_with_the_direct_loss(dry_run):
  checks = [r for r in dry_run["1"] if r["kind"] == "ce_check"]
  assert {(r["impl"], r["dtype"]) for r in checks} == {
    (impl, dtype) for impl in ("blockwise", "pallas") for dtype in ("float32", "bfloat16")
  }
  for r in checks:
    # bf16 inputs against the f32 reference: q/k rounded to 8 bits of mantissa.
    tol = 1e-5 if r["dtype"] == "float32" else 3e-2
    assert max(r["rel_diff_value"], r["rel_diff_dq"], r["rel_diff_dk"]) < tol, r
  (tests,) = [r for r in dry_run["1"] if r["kind"] == "pallas_tests"]
  assert tests["rc"] == 0, tests["tail"]
  small = {r["loss_impl"]: r for r in dry_run["1"] if r["kind"] == "small_step"}
  np.testing.assert_allclose(
    small["pallas"]["first_distill"], small["direct"]["first_distill"], 1e-4
  )
  np.testing.assert_allclose(small["pallas"]["first_ce"], small["direct"]["first_ce"], 1e-5)


def test_step_rows_have_their_figures(dry_run):
  recipe = {r["mode"]: r for r in dry_run["1"] if r["kind"] == "recipe_step" and "ms_median" in r}
  assert set(recipe) == {"none", "distill"}
  assert recipe["none"]["vs_first"] == 1.0 and recipe["distill"]["layers"] == [
    0,
    1,
  ]  # "all" of Pico
  assert recipe["distill"]["mfu_measured_ceiling"] > 0  # preflight's ceiling was found
  fused = [r for r in dry_run["2"] if r["kind"] == "fused_step" and "ms_median" in r]
  assert len(fused) == 3
  memory = [r for r in dry_run["1"] if r["kind"] == "loss_memory"]
  assert {r["impl"] for r in memory} == {"direct", "blockwise", "pallas"}


def test_ours_and_pytorch_start_from_the_same_losses(dry_run):
  """torch_reference.compare on the scan layout (the converter's loop layout stacked): the same weights
  give the same first-step losses, and every row has both sides' times."""
  records = dry_run["2"]
  assert [r["kind"] for r in records if r["kind"] == "weights"] == ["weights"] * 2  # once per stage
  firsts = [r for r in records if r["kind"] == "first_step_losses"]
  # torch_b16: 3 modes x 2 dtypes; torch_l16: 2 modes x 1 dtype.
  assert len(firsts) == 8, firsts
  for r in firsts:
    # float32: the same function in two frameworks; bf16: torch.autocast vs our dtype_mm (other casts).
    tol = 1e-4 if r["dtype"] == "float32" else 2e-2
    for loss in ("ce", "distill"):
      np.testing.assert_allclose(r["ours"][loss], r["torch"][loss], rtol=tol, atol=1e-5)
    if r["mode"] == "none":
      np.testing.assert_allclose(r["torch_native"]["ce"], r["torch"]["ce"], rtol=tol)
    if r["mode"] == "distill":
      assert r["ours"]["distill"] > 0
  rows = [r for r in records if r["kind"] == "torch_vs_ours"]
  assert len(rows) == 8 and all(r["speedup"] > 0 for r in rows)
  assert all(r["ours_precision"] in ("ieee", "bf16") for r in rows)  # CPU float32 is full precision
  assert len([r for r in records if r["kind"] == "torch_native_scratch"]) == 3
