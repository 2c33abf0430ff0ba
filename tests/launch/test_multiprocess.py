"""Multi-host for real on CPU: two processes (4 devices each) joined by jax.distributed over loopback run
the same training as one process with 8 devices, on the same (4, 2) mesh with FSDP across the processes,
reading a folder of JPEGs (Fashion-MNIST written as files) that process 0 alone lists."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from at_jax import checkpoint, metrics
from at_jax.data import sources
from tests.conftest import subprocess_env

# Real processes, whole runs: end-to-end (`pytest -m 'not slow'` skips them).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
STEPS = 40  # long enough for a SIGTERM to land mid-run
ARGS = [
  "--config.transfer.mode=none",
  "--config.model.variant=Pico/7",
  "--config.model.drop_path=0.1",
  "--config.data.name=imagefolder",
  "--config.data.train_split=train",
  "--config.data.eval_split=val",
  "--config.data.batch_size=32",
  "--config.data.eval_batch_size=80",
  "--config.data.num_threads=0",
  f"--config.schedule.steps={STEPS}",
  "--config.schedule.log_every_steps=2",
  "--config.mesh.data=4",
  "--config.mesh.fsdp=2",
  "--config.ckpt.every_steps=10",
]


def _env(devices):
  return subprocess_env(devices)


def _main(workdir, *extra, devices):
  return subprocess.Popen(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "main.py"),
      f"--workdir={workdir}",
      *ARGS,
      *extra,
    ],
    cwd=ROOT,
    env=_env(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _jpeg_tree(root, counts=(("train", "train", 640), ("test", "val", 400))):
  """<root>/<split>/<label>/<i>.JPEG from the first Fashion-MNIST images of each split."""
  arrays = sources.load_fashion_mnist()
  for name, split, n in counts:
    images, labels = arrays[name]
    for i in range(n):
      folder = root / split / f"class_{labels[i]}"
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(images[i]).save(folder / f"{i}.JPEG", quality=95)
  return f"--config.data.dir={root}"


def _two_processes(workdir, *extra):
  port = _free_port()
  return [
    _main(
      workdir,
      *extra,
      "--multihost",
      f"--coordinator=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      devices=4,
    )
    for i in range(2)
  ]


def _finish(procs, code=0):
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == code, err[-3000:]
  return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The data flag, and the workdirs and outputs of uninterrupted runs on 1 process (8 devices) and on
  2 processes (4 devices each), run side by side."""
  root = tmp_path_factory.mktemp("multiprocess")
  data = _jpeg_tree(root / "jpegs")
  one, two = str(root / "one"), str(root / "two")
  procs = [_main(one, data, devices=8), *_two_processes(two, data)]
  outs = _finish(procs)
  return data, one, two, outs[1:]


def test_two_processes_equal_one(runs):
  _, one, two, outs = runs
  assert "| classify" in outs[0][0] and "| classify" not in outs[1][0]  # only process 0 reports
  # Process 0 listed the folder and cached the list in the shared workdir; process 1 read the cache.
  assert "Listing the images" in outs[0][0] and "Listing" not in outs[1][0]
  logged = [
    [x for x in metrics.read_jsonl(os.path.join(w, "metrics.jsonl")) if "train/loss" in x]
    for w in (one, two)
  ]
  assert [x["step"] for x in logged[1]] == list(range(2, STEPS + 1, 2))  # one writer: no duplicates
  for a, b in zip(*logged):
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
  evals = [
    [x for x in metrics.read_jsonl(os.path.join(w, "metrics.jsonl")) if "eval/top1" in x][-1]
    for w in (one, two)
  ]
  assert evals[0]["eval/top1"] == evals[1]["eval/top1"]

  def close(path, x, y):
    # The key bias has a zero true gradient: Adam turns float noise into ~lr steps.
    key_bias = [getattr(k, "key", "") for k in path][-2:] == ["key", "bias"]
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 if key_bias else 1e-6)

  params = [checkpoint.load_params(os.path.join(w, "params"))[1] for w in (one, two)]
  jax.tree_util.tree_map_with_path(close, *params)


def _logged_step(workdir):
  try:
    return max(
      [x["step"] for x in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))] or [0]
    )
  except (OSError, ValueError):
    return 0


def test_a_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, runs):
  """Only process 1 gets SIGTERM: both save the same step and exit with 143; the relaunch resumes
  bitwise to what the uninterrupted two-process run ended with, even when process 1 is signalled again
  after the last step."""
  data, _, straight, _ = runs
  stopped = str(tmp_path / "stopped")
  procs = _two_processes(stopped, data)
  deadline = time.time() + 300
  while _logged_step(stopped) < 6:
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.02)
  procs[1].terminate()
  outs = _finish(procs, code=143)
  said = [re.search(r"preempted at step (\d+)", err) for _, err in outs]
  assert all(said), [err[-2000:] for _, err in outs]
  step = int(said[0][1])
  assert int(said[1][1]) == step and step < STEPS
  assert str(step) in os.listdir(os.path.join(stopped, "checkpoints"))
  # The relaunch is signalled too, once its last step is saved: during the final evaluation (in
  # batches of 8 here: an evaluation setting, not part of the run's identity, so it may change). Both
  # finish the evaluation and the export together; the signalled one then exits with 143.
  procs = _two_processes(stopped, data, "--config.data.eval_batch_size=8")
  final = os.path.join(stopped, "checkpoints", str(STEPS))
  while not os.path.isdir(final):
    assert all(p.poll() is None for p in procs) and time.time() < deadline + 300
    time.sleep(0.02)
  procs[1].terminate()
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 143], [err[-2000:] for _, err in outs]
  assert f"at step {step}" in outs[0][0]  # "Resumed from ... at step N"
  assert "stopped after finishing" in outs[1][1]
  params = [checkpoint.load_params(os.path.join(w, "params"))[1] for w in (straight, stopped)]
  jax.tree.map(np.testing.assert_array_equal, *params)


def test_a_held_workdir_stops_every_process_with_the_same_line(tmp_path, runs):
  """Process 0 finds the workdir locked by a live run (this test's own process stands in for it);
  process 1 learns it from process 0, and both exit with 2 and the one line naming the holder, before
  anything is written or compiled."""
  data = runs[0]
  held = tmp_path / "held"
  held.mkdir()
  now = time.time()
  holder = dict(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now, token="t")
  (held / "run.lock").write_text(json.dumps({**holder, "command": "another launch"}))
  outs = _finish(_two_processes(str(held), data), code=2)
  for _, err in outs:
    said = [line for line in err.splitlines() if "is in use by another run" in line]
    assert len(said) == 1 and f"pid {os.getpid()}" in said[0], err[-3000:]
    assert "Traceback" not in err
  assert sorted(os.listdir(held)) == ["run.lock"]


def test_a_sigterm_before_the_loop_to_one_process_stops_both_promptly(tmp_path, runs):
  """Process 1 is signalled while the job starts (process 0 has printed its memory estimate: both are
  compiling or at their first step). Process 1 exits at once; process 0 learns it from the coordination
  service within a second or two and exits too, rather than waiting at its next collective."""
  data = runs[0]
  procs = _two_processes(str(tmp_path / "early"), data)
  for line in procs[0].stdout:
    if line.startswith("per-device memory estimate"):
      break
  sent = time.monotonic()
  procs[1].terminate()
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [143, 143], [err[-2000:] for _, err in outs]
  assert time.monotonic() - sent < 30
  assert "SIGTERM outside the training loop" in outs[1][1]
  assert (
    "process 1 (" in outs[0][1]
    and "got SIGTERM outside the training loop: process 0 stops" in outs[0][1]
  )
