"""Tests for at_jax.metrics."""

import glob
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import metrics
from at_jax.errors import ConfigError


def test_writer_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  writer = metrics.MetricWriter(workdir)  # Process 0: enabled by default.
  writer.write(
    1, {"loss": jnp.float32(2.5), "acc": np.float64(0.25), "count": 3, "lr": jnp.array([1e-3])}
  )
  writer.write(2, {"loss": 1.5})
  # Flushed before close, so a killed run keeps its lines.
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert records == [
    {"step": 1, "loss": 2.5, "acc": 0.25, "count": 3.0, "lr": pytest.approx(1e-3)},
    {"step": 2, "loss": 1.5},
  ]
  assert all(isinstance(v, float) for k, v in records[0].items() if k != "step")
  writer.close()
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents*"))

  # A resumed run appends to the same file.
  writer = metrics.MetricWriter(workdir)
  writer.write(3, {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(writer.path)] == [1, 2, 3]


def test_writer_rejects_non_scalar(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  with pytest.raises(ValueError, match="'logits'"):
    writer.write(1, {"logits": jnp.ones((2, 3))})
  writer.close()


def test_writer_disabled_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = metrics.MetricWriter(str(workdir), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not workdir.exists()


def test_read_jsonl_skips_truncated_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "lo')
  assert metrics.read_jsonl(str(path)) == [{"step": 1, "loss": 2.0}]
  path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
  with pytest.raises(ConfigError, match="line 1"):
    metrics.read_jsonl(str(path))
  with pytest.raises(ConfigError) as e:
    metrics.read_jsonl(str(tmp_path / "missing.jsonl"))
  assert e.value.field == str(tmp_path / "missing.jsonl")


def test_progress_line(capsys, monkeypatch):
  now = [100.0]
  monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
  progress = metrics.Progress("train", 900, unit_per_step=512)
  assert progress.update(0).endswith("eta ?")
  now[0] += 60.0  # 120 steps in 60 s: 2 steps/s, 1024 img/s.
  line = progress.update(120, {"loss": jnp.float32(1.2341), "acc": 0.51})
  assert line == (
    "train   120/900 [#---------]  13% | loss 1.234 | acc 0.51 | 1024 img/s | eta 6m30s"
  )
  printed = capsys.readouterr().out.splitlines()
  assert printed[-1] == line and "\r" not in line


def test_progress_resume_and_units(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
  progress = metrics.Progress("eval", 10_000, start=5_000, enabled=False)
  now[0] = 10.0
  line = progress.update(6_000)  # 1000 steps since the resume, in 10 s.
  assert " 6000/10000 " in line and " 60%" in line
  assert "100.00 it/s" in line and "eta 40s" in line
  assert progress.update(10_000).endswith(" 100% | 500.00 it/s | eta 0s")
  now[0] = 1.0
  assert progress.update(5_001).endswith("eta 1h23m")  # 4999 s left.


def test_progress_disabled_prints_nothing(capsys):
  metrics.Progress("train", 10, enabled=False).update(5, {"loss": 1.0})
  assert capsys.readouterr().out == ""


def test_format_table():
  rows = [
    {"model": "vit-b/16", "top1": 83.1234, "epochs": 100},
    {"model": "vit-l", "top1": np.float32(85.5), "img/s": 12345.6},
  ]
  table = metrics.format_table(rows, ["model", "top1", "epochs", "img/s"])
  assert table.splitlines() == [
    "| model    | top1  | epochs | img/s |",
    "|----------|-------|--------|-------|",
    "| vit-b/16 | 83.12 | 100    |       |",
    "| vit-l    | 85.5  |        | 12346 |",
  ]
  widths = {len(line) for line in table.splitlines()}
  assert len(widths) == 1
  assert re.fullmatch(r"\| a +\|\n\|-+\|", metrics.format_table([], ["a"]))
