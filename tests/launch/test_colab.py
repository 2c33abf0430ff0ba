"""launch/colab.ipynb executes headless, top to bottom, in its quick mode (AT_JAX_NOTEBOOK_QUICK=1).

The kernel is this interpreter (sys.executable), through a kernelspec written into the test's tmp_path and
a KernelSpecManager that looks only there: nothing is registered globally and no user/system `python3`
kernelspec (which may point at another Python) is consulted. Needs nbclient and ipykernel
(requirements-test.txt).
"""

import json
import os
import re
import sys

import pytest

from tests.conftest import subprocess_env

if os.environ.get(
  "CI"
):  # CI installs requirements-test.txt: a missing dep there must fail, not skip.
  import ipykernel  # noqa: F401
  import nbclient
  import nbformat
else:
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

# Real processes, whole runs: end-to-end (`pytest -m 'not slow'` skips them).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
KERNEL = "at_jax_test"


def _kernel_manager(tmp_path) -> KernelManager:
  spec_dir = tmp_path / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "at_jax (test)",
        "language": "python",
      }
    )
  )
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _text(cell) -> str:
  parts = []
  for o in cell.get("outputs", []):
    if o["output_type"] == "stream":
      parts.append(o["text"])
    elif o["output_type"] in ("execute_result", "display_data"):
      parts.append(o["data"].get("text/plain", ""))
  return "".join(parts)


def test_committed_notebook_is_clean_nbformat4():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs"


def test_notebook_runs_quick(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "work"
  # One CPU device, as in a fresh Colab/laptop kernel (conftest.py emulates 8 for the other tests).
  env = subprocess_env(
    AT_JAX_NOTEBOOK_QUICK="1", AT_JAX_NOTEBOOK_WORKDIR=str(workdir), JAX_PLATFORMS="cpu"
  )
  client = nbclient.NotebookClient(
    nb,
    km=_kernel_manager(tmp_path),
    timeout=300,
    allow_errors=False,
    resources={"metadata": {"path": ROOT}},
  )
  client.execute(env=env)  # raises CellExecutionError, with the traceback, if a cell fails

  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert not any(o["output_type"] == "error" for o in cell.outputs), _text(cell)
  text = "".join(_text(c) for c in code)
  assert "QUICK=True" in text and str(workdir) in text
  assert f"python {sys.executable}" in text  # the kernel ran this interpreter (the venv's)
  # Three training runs (MAE teacher, distilled and scratch students), each printed its progress.
  assert "train[mae]" in text and "train[distill]" in text and "train[none]" in text
  top1 = dict(re.findall(r"top-1 (scratch|distilled): ([0-9.]+)", text))
  assert set(top1) == {"scratch", "distilled"}, text[-3000:]
  assert all(0 <= float(v) <= 100 for v in top1.values()), top1
  assert "attention of distilled vs teacher" in text and "jsd" in text
  # Figures: shown inline, and written to the workdir the notebook printed.
  assert any("image/png" in o.get("data", {}) for o in code[-1].outputs)
  pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  assert pngs == 4, pngs  # teacher maps, curves, top-1 bars, teacher vs students
  for name in ("teacher_attention.png", "curves.png", "top1.png", "attention_compare.png"):
    assert (workdir / name).stat().st_size > 1000, name
  for run in ("teacher", "distill", "scratch"):
    assert (workdir / run / "params" / "model_config.json").exists(), run
