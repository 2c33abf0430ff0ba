"""`bash benchmarks/gpu.sh --dry-run`: every GPU command's stages on tiny shapes, on the CPU, with the same
files, so that no stage can crash on the one GPU run for a reason a CPU could have shown."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import subprocess_env

# Real processes (one per stage, under gpu.sh's timeouts): end-to-end.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
  """Every command's records, the report modules, and the combined report's text."""
  out = tmp_path_factory.mktemp("gpu_out")
  # One device, as the lent GPU; gpu.sh keeps the caller's compilation cache (conftest's).
  env = subprocess_env(OUT=str(out), PYTHON=sys.executable)
  child = subprocess.run(
    ["bash", os.path.join(BENCHMARKS, "gpu.sh"), "--dry-run"],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
  with pytest.MonkeyPatch.context() as m:  # as the other benchmark tests: scripts, not a package
    m.syspath_prepend(BENCHMARKS)  # they import each other by bare name
    import gpu_plan  # pylint: disable=import-outside-toplevel
    import gpu_report  # pylint: disable=import-outside-toplevel
  commands = list(gpu_plan.COMMANDS)
  files = set(os.listdir(out))
  for n in commands:
    assert {f"command{n}.log", f"results{n}.jsonl", f"report{n}.md"} <= files, files
  records = gpu_report.load([str(out)])
  return {
    "plan": gpu_plan,
    "records": records,
    "summary": gpu_report.summarize(records),
    "report": (out / "report.md").read_text(),
    "stdout": child.stdout,
  }


def test_every_stage_finishes_without_an_error_and_names_the_device(dry_run):
  records, plan = dry_run["records"], dry_run["plan"]
  bad = [r for r in records if r["kind"] in ("error", "stage_failed")]
  assert not bad, bad
  for command, stages in plan.COMMANDS.items():
    mine = [r for r in records if r["command"] == command]
    assert [r["stage"] for r in mine if r["kind"] == "stage_done"] == [s.name for s in stages]
    assert {r["device_kind"] for r in mine if r["kind"] == "stage_start"} == {"cpu"}


def test_the_dry_run_reports_each_stage_beside_its_budget(dry_run):
  """Each stage's programs and CPU seconds beside its GPU budget, in the combined report it prints."""
  for s in dry_run["summary"]["stages"]:
    assert s["status"] == "done" and s["seconds"] > 0, s
    assert s["compiles"] + s["cache_hits"] > 0, s  # every stage compiles something
    row = f"| {s['command']} | {s['stage']} | done |"
    assert row in dry_run["report"] and f"| {s['budget_s']} | {s['model_s']} |" in dry_run["report"]
  assert dry_run["report"] in dry_run["stdout"]


def test_kernel_checks_agree_with_the_direct_loss(dry_run):
  summary = dry_run["summary"]
  checks = summary["ce_checks"]
  small, large = 17, 50  # DRY.kernel_tokens: f32 and bf16 at the first, bf16 at the second
  assert {(r["impl"], r["dtype"], r["tokens"]) for r in checks} == {
    (impl, dtype, n)
    for impl in ("blockwise", "pallas")
    for dtype, n in (("float32", small), ("bfloat16", small), ("bfloat16", large))
  }
  for r in checks:
    # bf16 inputs against the f32 reference: q/k rounded to 8 bits of mantissa.
    tol = 1e-5 if r["dtype"] == "float32" else 3e-2
    assert max(r["rel_diff_value"], r["rel_diff_dq"], r["rel_diff_dk"]) < tol, r
  steps = {r["loss_impl"]: r for r in summary["small_steps"]}
  np.testing.assert_allclose(
    steps["pallas"]["first_distill"], steps["direct"]["first_distill"], 1e-4
  )
  np.testing.assert_allclose(steps["pallas"]["first_ce"], steps["direct"]["first_ce"], 1e-5)
  memory = summary["loss_memory"]
  assert {(r["impl"], r["tokens"]) for r in memory} == {
    (impl, n) for impl in ("direct", "blockwise", "pallas") for n in (small, large)
  }


def test_train_step_rows_are_derived_from_their_repetitions(dry_run):
  rows = {(r["group"], r["mode"], r["attention"]): r for r in dry_run["summary"]["train_steps"]}
  assert set(rows) == {
    ("recipe", "distill", "materialized"),
    ("recipe", "none", "materialized"),
    ("fused", "none", "fused"),
    ("fused", "distill", "fused"),
  }
  for r in rows.values():
    assert r["reps"] == 2 and r["ms_min"] <= r["ms_median"] and r["tflops"] > 0, r
    assert r["mfu_pct"] is None  # no datasheet peak for a CPU
    assert r["mfu_ceiling_pct"] > 0  # against preflight's measured matmul ceiling
  assert rows[("recipe", "none", "materialized")]["vs_scratch"] == 1.0
  assert rows[("recipe", "distill", "materialized")]["layers"] == [0, 1]  # "all" of Pico
  assert rows[("fused", "distill", "fused")]["loss_impl"] == "pallas"


def test_ours_and_pytorch_start_from_the_same_losses(dry_run):
  """torch_compare.compare on the scan layout (the converter's loop layout stacked): the same weights
  give the same first-step losses, and every row has both sides' times."""
  records = dry_run["records"]
  # Weights made once per stage.
  assert [r["stage"] for r in records if r["kind"] == "weights"] == [
    "torch_headline",
    "torch_l16",
    "torch_b16",
  ]
  firsts = [r for r in records if r["kind"] == "first_step_losses"]
  # torch_headline: distill x 2 dtypes; torch_l16: 2 modes x bf16; torch_b16: 2 modes x 2 dtypes.
  assert len(firsts) == 8, firsts
  for r in firsts:
    # float32: the same function in two frameworks; bf16: torch.autocast vs our dtype_mm (other casts).
    tol = 1e-4 if r["dtype"] == "float32" else 2e-2
    for loss in ("ce", "distill"):
      np.testing.assert_allclose(r["ours"][loss], r["torch"][loss], rtol=tol, atol=1e-5)
    if r["mode"] == "none" and r["stage"] == "torch_b16":
      np.testing.assert_allclose(r["torch_native"]["ce"], r["torch"]["ce"], rtol=tol)
    if r["mode"] == "distill":
      assert r["ours"]["distill"] > 0
  rows = dry_run["summary"]["torch"]
  assert len(rows) == 8 and all(r["speedup"] > 0 and r["reps"] == 2 for r in rows)
  assert {(r["stage"], r["dtype"], r["mode"]) for r in rows if r["stage"] == "torch_headline"} == {
    ("torch_headline", "float32", "distill"),
    ("torch_headline", "bfloat16", "distill"),
  }
  # CPU float32 is full precision on both sides.
  assert all(r["precision"] in ("ieee / ieee", "bf16 / bf16") for r in rows), rows
  assert len([r for r in rows if r["native_ms"] is not None]) == 2  # torch_b16's scratch rows
