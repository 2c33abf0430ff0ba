"""launch/main.py end to end, as a user runs it: a tiny demo, then a resume, then a bad override."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env

# Real processes, whole runs: end-to-end (`pytest -m 'not slow'` skips them).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
TINY = [
  "--config.teacher.init=",  # pre-train the teacher first (the demo's committed one: test_demo_default)
  "--config.model.variant=Pico/7",
  "--config.transfer.layers=first:1",
  "--config.data.train_split=train[:640]",
  "--config.data.eval_split=test[:500]",
  "--config.schedule.steps=4",
  "--config.schedule.log_every_steps=2",
  "--config.teacher.pretrain.model.variant=Pico/7",
  "--config.teacher.pretrain.data.train_split=train[:640]",
  "--config.teacher.pretrain.data.eval_split=test[:500]",
  "--config.teacher.pretrain.schedule.steps=4",
]


def _main(*args):
  env = subprocess_env()  # one CPU device, as on a laptop
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch", "main.py"), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_demo_end_to_end_and_resume(tmp_path):
  workdir = str(tmp_path / "demo")
  proc = _main(f"--workdir={workdir}", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "No teacher" in out and "Student: distill" in out
  assert "| teacher" in out and "| student" in out  # the results table
  assert "train[distill]" in out and "img/s" in out  # progress lines
  assert "per-device memory estimate: params" in out
  # Libraries' absl INFO lines (orbax writes ~40 per checkpoint save) would bury the progress lines.
  assert not re.search(r"^I\d{4} ", proc.stderr, re.MULTILINE), proc.stderr[:2000]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert set(results) == {"teacher", "student"} and 0 <= results["student"]["top1"] <= 100
  assert "attention of student vs teacher" in out
  for path in (
    "metrics.jsonl",
    "tensorboard",
    "checkpoints/4",
    "params/model_config.json",
    "attention.png",
    "teacher/metrics.jsonl",
    "teacher/params/model_config.json",
  ):
    assert os.path.exists(os.path.join(workdir, path)), path
  # Running again on the same workdir resumes: no new teacher, the student restores step 4. Here the
  # first launch is as if killed between the teacher's export and its results: the teacher's run is
  # finished again (its last step evaluated once more) rather than read from a missing file.
  os.remove(os.path.join(workdir, "teacher", "results.json"))
  again = _main(f"--workdir={workdir}", *TINY)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "No teacher" not in again.stdout and "Resumed" in again.stdout
  assert "stopped before its results: finishing it" in again.stdout
  assert json.load(open(os.path.join(workdir, "results.json"))) == results
  history = json.load(open(os.path.join(workdir, "run.json")))["history"]
  assert [h["event"] for h in history] == ["start", "resume"]
  # A relaunch that changes the run, the student's or its teacher's, is refused before any compute.
  for change, says in (
    ("--config.transfer.mode=copy", "transfer.mode: 'distill' -> 'copy'"),
    (
      "--config.teacher.pretrain.mae.mask_ratio=0.5",
      "teacher.pretrain.mae.mask_ratio: 0.75 -> 0.5",
    ),
  ):
    other = _main(f"--workdir={workdir}", *TINY, change)
    assert other.returncode == 2 and says in other.stderr, other.stderr[-3000:]
    assert "Traceback" not in other.stderr
  assert json.load(open(os.path.join(workdir, "results.json"))) == results


def test_bad_override_is_a_clear_error(tmp_path):
  proc = _main(f"--workdir={tmp_path}", *TINY, "--config.transfer.layers=last:9")
  assert proc.returncode == 2
  assert "transfer.layers" in proc.stderr and "Traceback" not in proc.stderr
  broken, empty = tmp_path / "broken.py", tmp_path / "empty.py"
  broken.write_text("def get_config(:\n")
  empty.write_text("")
  for args, says in (
    (["--config.transfer.modee=copy"], "config.transfer has no field 'modee'; its fields: ["),
    (["--config=/nonexistent/config.py"], "/nonexistent/config.py: no such config file"),
    ([f"--config={broken}"], f"{broken}, line 1: "),
    ([f"--config={empty}"], f"{empty}: defines no get_config()"),
    (["--workdir="], "--workdir is empty"),
  ):
    proc = _main(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-3000:]
