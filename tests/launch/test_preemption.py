"""Nothing lost: a real run killed with SIGTERM (preemption notice) or SIGKILL resumes to the same params
as an uninterrupted run, bitwise on CPU."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from at_jax import checkpoint, metrics, storage
from at_jax.data import sources
from tests.conftest import subprocess_env

# Real processes, whole runs: end-to-end (`pytest -m 'not slow'` skips them).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
STEPS = 300
ARGS = [
  "--config.transfer.mode=none",
  "--config.model.variant=Pico/7",
  "--config.model.drop_path=0.1",
  "--config.data.train_split=train[:2560]",
  "--config.data.eval_split=test[:500]",
  "--config.data.batch_size=32",
  "--config.data.num_threads=0",
  f"--config.schedule.steps={STEPS}",
  "--config.schedule.log_every_steps=5",
  "--config.ckpt.every_steps=25",
]


def _launch(workdir, *extra):
  env = subprocess_env()
  return subprocess.Popen(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "main.py"),
      f"--workdir={workdir}",
      *ARGS,
      *extra,
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _logged_step(workdir):
  try:  # local or in a bucket
    return max([x["step"] for x in metrics.read_jsonl(f"{workdir}/metrics.jsonl")] or [0])
  except (OSError, ValueError):
    return 0


def _interrupt(workdir, sig, after_step, *extra):
  proc = _launch(workdir, *extra)
  deadline = time.time() + 300
  while _logged_step(workdir) < after_step:
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  proc = _launch(workdir)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  return checkpoint.load_params(os.path.join(workdir, "params"))[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_exactly(tmp_path, straight, sig):
  workdir = str(tmp_path / "run")
  # SIGKILL later: async saves commit atomically, so the kill must come after some have finished.
  code, err = _interrupt(workdir, sig, after_step=40 if sig == signal.SIGTERM else 150)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  if sig == signal.SIGTERM:
    assert code == 143 and "preempted at step" in err, err[-2000:]
    assert (
      steps[-1] % 25 != 0 or steps[-1] > 40
    )  # a save at the interrupted step, not only periodic ones
  else:
    assert code == -signal.SIGKILL
  assert steps and steps[-1] < STEPS
  proc = _launch(workdir)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  assert f"Resumed from {workdir}/checkpoints at step {steps[-1]}" in out
  resumed = checkpoint.load_params(os.path.join(workdir, "params"))[1]
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_sigterm_before_the_first_step_exits_at_once(tmp_path):
  """A SIGTERM while the run starts (here: right after the memory check, before compiling) ends it
  promptly with 143, saving nothing; it is not deferred to a step boundary."""
  workdir = str(tmp_path / "run")
  proc = _launch(workdir)
  for line in proc.stdout:
    if line.startswith("per-device memory estimate"):
      break
  sent = time.monotonic()
  proc.terminate()
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143 and "outside the training loop" in err, err[-2000:]
  assert time.monotonic() - sent < 30
  checkpoints = os.path.join(workdir, "checkpoints")
  assert not os.path.isdir(checkpoints) or not any(d.isdigit() for d in os.listdir(checkpoints))


def test_a_sigterm_after_the_loop_lets_the_run_finish(tmp_path):
  """A SIGTERM during the final save, evaluation or export (here: once the last step's checkpoint is
  committed, during the final evaluation of the 10,000 test images) waits for them: the export is
  written, then the process exits with 143 saying the run is complete. It used to exit at once as if
  the run had not started, leaving no export (and, on a pod, the other hosts in the final evaluation)."""
  workdir = str(tmp_path / "run")
  steps = 10
  proc = _launch(workdir, f"--config.schedule.steps={steps}", "--config.data.eval_split=test")
  final = os.path.join(workdir, "checkpoints", str(steps))
  deadline = time.time() + 300
  while not os.path.isdir(final):
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.time() < deadline
    time.sleep(0.02)
  proc.terminate()
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143 and "stopped after finishing" in err, err[-2000:]
  assert checkpoint.is_export(os.path.join(workdir, "params"))
  evals = [
    x for x in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/top1" in x
  ]
  assert evals[-1]["step"] == steps
  assert not os.path.exists(os.path.join(workdir, "run.lock"))  # released


def _tear(step_dir: str) -> None:
  """Halves the newest checkpoint's array manifests and metadata, as an upload cut off would leave."""
  import fsspec  # pylint: disable=import-outside-toplevel

  fs = fsspec.filesystem("gs")
  torn = [
    name
    for name in fs.find(f"{step_dir}/state")
    if os.path.basename(name) in ("manifest.ocdbt", "_METADATA")
  ]
  assert torn, step_dir
  for name in torn:
    data = fs.cat(name)
    fs.pipe(name, data[: len(data) // 2])


def test_a_run_in_a_bucket_killed_resumes_exactly(straight, gcs_bucket):
  """--workdir=gs://...: checkpoints, metrics and the export live in the (emulated) bucket, and the
  data (Fashion-MNIST's IDX files) is read from it; after kill -9 and a torn newest checkpoint, the
  relaunch resumes from the one before, bitwise."""
  import fsspec  # pylint: disable=import-outside-toplevel

  data = f"{gcs_bucket[0]}/fashion_mnist"
  fsspec.filesystem("gs").put(sources.FASHION_MNIST_SYSTEM_DIR, data, recursive=True)
  workdir = f"{gcs_bucket[0]}/killed"
  code, err = _interrupt(workdir, signal.SIGKILL, 150, f"--config.data.dir={data}")
  assert code == -signal.SIGKILL, err[-2000:]
  # The step being uploaded at the kill has no commit marker: orbax lists only committed steps.
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", save_every=25, keep=100)
  committed = ckpt.all_steps()
  ckpt.close()
  assert len(committed) >= 2 and committed[-1] < STEPS
  _tear(f"{workdir}/checkpoints/{committed[-1]}")
  proc = _launch(workdir, f"--config.data.dir={data}")
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  said = [line for line in out.splitlines() if "Resumed" in line or "WARNING" in line]
  assert f"checkpoint step {committed[-1]}" in out and f"at step {committed[-2]}" in out, said
  resumed = checkpoint.load_params(f"{workdir}/params")[1]
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  assert storage.listdir(f"{workdir}/tensorboard")
