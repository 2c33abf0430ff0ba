"""The GPU run's plan and report: every command fits its 240 s with every timeout reached, a stage killed
mid-way keeps the figures it measured before, and RESULTS.md's GPU section is the report of the records it
names. (The whole dry run, every stage, is tests/benchmarks/test_gpu_dry_run.py.)"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import subprocess_env

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
ROOT = BENCHMARKS.parent


@pytest.fixture
def bench(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import each other by bare name
  import flops  # pylint: disable=import-outside-toplevel
  import gpu_plan  # pylint: disable=import-outside-toplevel
  import gpu_report  # pylint: disable=import-outside-toplevel

  return gpu_plan, gpu_report, flops


def test_every_command_ends_within_240_s_and_the_script_says_so(bench):
  gpu_plan, _, _ = bench
  script = (BENCHMARKS / "gpu.sh").read_text()
  for command in gpu_plan.COMMANDS:
    worst = gpu_plan.worst_case_s(command)
    assert worst <= gpu_plan.COMMAND_LIMIT_S == 240, (command, worst)
    # The comment's sum is the plan's, term by term.
    assert "#   " + gpu_plan.worst_case_terms(command) in script, gpu_plan.worst_case_terms(command)
    # Header (two timeouts), each stage and the report, each with its kill grace.
    stages = gpu_plan.COMMANDS[command]
    terms = sum(gpu_plan.HEADER_TIMEOUTS_S) + sum(s.budget_s for s in stages)
    terms += gpu_plan.REPORT_TIMEOUT_S + gpu_plan.KILL_GRACE_S * (len(stages) + 3)
    assert worst == terms
  # The script takes its limits from the plan: no number of its own beside the dry run's scale.
  assert re.findall(r"timeout -k \"\$grace\" ([^ ]+)", script) == [
    '"$smi_s"',
    "$((header_s",
    '"$limit"',
    "$((report_s",
  ]
  # The headline comes first: command 1 is the matmul ceiling, the ViT-L recipe, ours vs PyTorch.
  assert [s.name for s in gpu_plan.COMMANDS["1"]] == ["preflight", "recipe", "torch_headline"]


def test_the_plan_is_what_gpu_sh_reads():
  child = subprocess.run(
    [sys.executable, str(BENCHMARKS / "gpu_plan.py"), "stages", "1"],
    capture_output=True,
    text=True,
    check=True,
  )
  assert child.stdout.split() == ["preflight", "20", "recipe", "98", "torch_headline", "73"]
  bad = subprocess.run(
    [sys.executable, str(BENCHMARKS / "gpu_plan.py"), "stages", "9"], capture_output=True, text=True
  )
  assert bad.returncode == 2 and "usage" in bad.stderr


def test_both_lent_gpus_have_peaks(bench):
  """device_kind as jax reports the lent machines' chips (the device tool's KINDS.md)."""
  _, _, flops = bench
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
  assert flops.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
  assert flops.peak_tflops("NVIDIA H200", "float32") == 494.7  # XLA's default f32 dot: TF32


def _wait_for(path: pathlib.Path, kind: str, timeout: float) -> list[dict]:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.exists():
      records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
      if any(r["kind"] == kind for r in records):
        return records
    time.sleep(0.2)
  raise AssertionError(f"no {kind} record in {path} after {timeout} s")


@pytest.mark.slow
def test_a_stage_killed_mid_way_keeps_what_it_measured(bench, tmp_path):
  """The recipe stage, SIGTERMed (as `timeout` does) the moment its first setting has one timed
  repetition: the file keeps that setting's compile, step and time; the report derives its row, says
  the stage was killed and which row it was running."""
  _, gpu_report, _ = bench
  out = tmp_path / "results1.jsonl"
  child = subprocess.Popen(
    [
      sys.executable,
      str(BENCHMARKS / "gpu_bench.py"),
      "--stage=recipe",
      f"--out={out}",
      "--dry_run",
    ],
    env=subprocess_env(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    before = _wait_for(out, "step_time", timeout=240)
    child.send_signal(signal.SIGTERM)
    rc = child.wait(timeout=60)
  finally:
    child.kill()
  assert rc == -signal.SIGTERM
  # gpu.sh's record of a stage its timeout ended.
  with open(out, "a") as f:
    f.write(
      json.dumps({"stage": "recipe", "kind": "stage_failed", "rc": 124, "time": time.time()}) + "\n"
    )
  records = gpu_report.load([str(out)])
  assert [r for r in records if r["kind"] == "stage_done"] == []
  assert len(records) >= len(before) + 1  # everything written before the kill is still there
  assert any(r["kind"] == "compile" and r["fun"] == "jit(step)" for r in records)
  summary = gpu_report.summarize(records)
  (distill,) = [r for r in summary["train_steps"] if r["mode"] == "distill"]
  assert distill["reps"] >= 1 and distill["ms_median"] > 0 and distill["layers"] == [0, 1]
  recipe = {s["stage"]: s for s in summary["stages"]}["recipe"]
  assert recipe["status"] == "killed at budget" and recipe["compiles"] + recipe["cache_hits"] >= 1
  assert recipe["last_row"]["kind"] in ("step", "step_time")
  text = gpu_report.render(summary, str(out))
  assert "killed at budget" in text and "| recipe | Pico/7@28:8 | distill |" in text


def test_a_failing_row_is_recorded_as_an_error_and_reported(bench, tmp_path):
  """A row that raises (on a GPU: a Triton or cuDNN refusal, an OOM) is an `error` record carrying the
  row's fields, whatever kind the row measures; the stage goes on, and the report lists it."""
  _, gpu_report, _ = bench
  import gpu_stage  # pylint: disable=import-outside-toplevel

  out = tmp_path / "results2.jsonl"
  record = gpu_stage.Recorder(str(out), "kernels")
  record({"kind": "stage_start", "device_kind": "cpu", "backend": "cpu", "start_s": 1.0})
  with record.row(kind="ce_check", impl="pallas", n=197):
    raise RuntimeError("out of shared memory")
  record({"kind": "stage_done", "seconds": 2.0})
  records = gpu_report.load([str(out)])
  (error,) = [r for r in records if r["kind"] == "error"]
  assert error["impl"] == "pallas" and "out of shared memory" in error["error"]
  summary = gpu_report.summarize(records)
  assert {s["stage"]: s["errors"] for s in summary["stages"]}["kernels"] == 1
  assert "out of shared memory" in gpu_report.render(summary, str(out))


def test_results_md_gpu_section_is_the_report_of_its_records(bench):
  """RESULTS.md's GPU section is exactly what gpu_report renders from the committed records it names:
  no figure in it was typed by hand, and none can drift from its JSONL."""
  _, gpu_report, _ = bench
  text = (BENCHMARKS / "RESULTS.md").read_text()
  section = text.split(gpu_report.BEGIN, 1)[1].split(gpu_report.END, 1)[0]
  source = re.search(r"Records: `([^`]+)`", section).group(1)
  paths = [str(ROOT / p.strip()) for p in source.split(",")]
  assert all(os.path.exists(p) for p in paths), paths
  records = gpu_report.load(paths)
  assert section == "\n" + gpu_report.render(gpu_report.summarize(records), source)
