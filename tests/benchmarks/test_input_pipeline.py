"""benchmarks/photos.py's tree of real photographs, and benchmarks/input_pipeline.py --source=photos (ours
against torchvision + timm on the same files) end to end on a tiny tree, so that the benchmark cannot break
unnoticed before the run that fills benchmarks/RESULTS.md."""

import os
import pathlib
import subprocess
import sys
import time

import pytest
from PIL import Image

from at_jax.data import sources
from tests.conftest import subprocess_env

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def photos(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import each other by bare name
  import photos  # pylint: disable=import-outside-toplevel

  return photos


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_build_tree_writes_a_deterministic_image_folder_with_large_photos(photos, tmp_path):
  info = photos.build_tree(str(tmp_path / "a"), classes=2, per_class=5, large=0.2)
  again = photos.build_tree(str(tmp_path / "b"), classes=2, per_class=5, large=0.2)
  assert info["files"] == 10 and info["classes"] == 2 and info["large"] == 2
  assert info["train"] == str(tmp_path / "a" / "train")
  files = _files(info["train"])
  assert files == _files(again["train"])  # the same bytes
  assert sorted(os.listdir(info["train"])) == ["n00000000", "n00000001"]
  assert all(name.endswith(".JPEG") for name in files)
  opened = [Image.open(os.path.join(info["train"], name)) for name in files]
  assert all(im.format == "JPEG" and not im.info.get("progressive") for im in opened)  # baseline
  large = [im for im in opened if max(im.size) >= 1000 and im.size != (1024, 683)]
  assert len(large) == 2  # upsampled ones; the one 1024 x 683 photograph is large as it is
  assert info["max_side"] >= 1024 and info["mean_kb"] > 10
  # The layout at_jax (and torchvision) read: labels are the sorted class folders.
  source = sources.make_source("imagefolder", "train", info["root"], cache_dir=None)
  assert len(source) == 10
  assert [source[i]["label"] for i in range(10)] == [0] * 5 + [1] * 5


def _table_rows(lines: list[str], first_cell: str) -> list[list[str]]:
  rows = [line.strip("|").split("|") for line in lines if line.startswith(f"| {first_cell} |")]
  return [[cell.strip() for cell in row] for row in rows]


# A real process, as a run of the benchmark is.
@pytest.mark.slow
def test_photos_mode_times_ours_and_torch_side_by_side():
  child = subprocess.run(
    [
      sys.executable,
      str(BENCHMARKS / "input_pipeline.py"),
      "--source=photos",
      "--classes=2",
      "--per_class=4",
      "--large=0.25",
      "--seconds=0.3",
      "--warmup=1",
      "--num_threads=1",
      "--batch=224:4",
      "--profile_images=4",
      "--quality_crops=8",
      "--configs=",
    ],
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
  lines = child.stdout.splitlines()

  throughput = _table_rows(lines, "224")
  timed = [r for r in throughput if len(r) == 10]
  assert {(r[2], r[3]) for r in timed} == {
    (setting, pipeline)
    for setting in ("crop+flip", "full recipe", "eval view")
    for pipeline in (
      "ours, jpeg_downscale",
      "ours, full decode",
      "torchvision ImageFolder + timm, DataLoader",
    )
  }
  for r in timed:
    img_s, cpu_ms, busy, per_cpu_s = map(float, r[5:9])
    assert img_s > 0 and cpu_ms > 0 and busy > 0 and per_cpu_s > 0, r
    assert int(r[4]) == 1  # one grain thread, or one DataLoader worker
  ratios = [r for r in throughput if len(r) == 8]
  assert [r[1] for r in ratios] == ["crop+flip", "full recipe", "eval view"]
  for r in ratios:
    assert all(float(cell.rstrip("x")) > 0 for cell in r[2:]), r

  profile = {r[0]: r[1:] for r in _table_rows(lines, "**total, full recipe**")}
  profile.update({r[0]: r[1:] for r in _table_rows(lines, "**total, crop+flip**")})
  assert len(profile) == 2
  for cells in profile.values():
    assert all(float(c) > 0 for c in cells), cells  # ours draft, ours full decode, torch

  quality = {r[0]: r for r in _table_rows(lines, "train crops, all")}
  quality.update({r[0]: r for r in _table_rows(lines, "eval view, all files")})
  assert set(quality) == {"train crops, all", "eval view, all files"}
  assert quality["train crops, all"][1] == "8" and quality["eval view, all files"][1] == "8"
  for r in quality.values():
    assert 0 <= float(r[3]) <= 255 and 0 <= int(r[5]) <= 255, r


def test_process_cpu_seconds_reads_a_running_child(monkeypatch):
  """The DataLoader workers' CPU time comes from /proc/<pid>/stat: a child that spins 0.5 s reads so."""
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import pipeline_timing  # pylint: disable=import-outside-toplevel

  spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(60)"
  child = subprocess.Popen([sys.executable, "-c", spin])
  try:
    deadline = time.monotonic() + 30
    while pipeline_timing.process_cpu_seconds([child.pid]) < 0.5 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert 0.5 <= pipeline_timing.process_cpu_seconds([child.pid]) < 5
  finally:
    child.kill()
    child.wait()
  assert pipeline_timing.process_cpu_seconds([child.pid]) == 0.0  # gone: counts nothing
