"""Tests for at_jax.metrics."""

import glob
import json
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


def test_a_resumed_writer_drops_later_lines_and_with_evals_at_step_that_steps_evaluation(tmp_path):
  """A resume after step 4 logs steps 5.. again: their lines go. With `evals_at_step` it evaluates
  step 4 again too, so step 4's eval line goes, its train line stays."""
  lines = [{"step": s, "train/loss": float(s)} for s in (2, 4, 6)]
  lines += [{"step": s, "eval/top1": 10.0 * s} for s in (2, 4, 6)]
  lines.sort(key=lambda x: x["step"])
  text = "".join(json.dumps(x) + "\n" for x in lines)

  def resumed(evals_at_step):
    (tmp_path / "metrics.jsonl").write_text(text)
    metrics.MetricWriter(str(tmp_path), after_step=4, evals_at_step=evals_at_step).close()
    return [
      (x["step"], "eval/top1" in x) for x in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    ]

  kept = [(2, False), (2, True), (4, False)]  # (step, an eval line)
  assert resumed(False) == kept + [(4, True)]
  assert resumed(True) == kept


def test_update_best_keeps_the_running_best_and_its_first_step():
  """The reference's max accuracy over evaluations, raw and EMA apart; MAE's losses are best lowest."""
  evals = [
    (2, {"top1": 10.0, "ema_top1": 9.0, "top5": 50.0}),
    (4, {"top1": 30.0, "ema_top1": 9.0, "top5": 60.0}),  # EMA ties: its first step stays
    (6, {"top1": 20.0, "ema_top1": 12.5, "top5": 70.0}),  # raw falls: its best stays at 4
  ]
  best = {}
  for step, e in evals:
    before = dict(best)
    new = metrics.update_best(best, step, e)
    assert best == before  # the argument is not changed
    best = new
  assert best == {
    "best_top1": 30.0,
    "best_top1_step": 4,
    "best_ema_top1": 12.5,
    "best_ema_top1_step": 6,
  }  # top5 is no BEST_OF figure: the reference reports the max top-1 alone
  assert all(isinstance(best[k], int) for k in best if k.endswith("_step"))
  mae = metrics.update_best({}, 1, {"loss": 0.5, "ema_loss": 0.7})
  mae = metrics.update_best(mae, 2, {"loss": 0.6, "ema_loss": 0.4})
  mae = metrics.update_best(mae, 3, {"loss": float("nan"), "ema_loss": float("nan")})
  assert mae == {
    "best_loss": 0.5,
    "best_loss_step": 1,
    "best_ema_loss": 0.4,
    "best_ema_loss_step": 2,
  }


def test_update_best_a_tie_last_keeps_the_first_step():
  """The best's step is the first that reached it, also when the run ends on a tie."""
  best = metrics.update_best({}, 2, {"top1": 30.0, "loss": 0.5})
  best = metrics.update_best(best, 4, {"top1": 30.0, "loss": 0.5})
  assert best == {"best_top1": 30.0, "best_top1_step": 2, "best_loss": 0.5, "best_loss_step": 2}


def test_update_best_a_diverged_first_evaluation_is_no_best():
  """A NaN first evaluation sets no bar: NaN compares false with anything, and would stay the best."""
  best = metrics.update_best({}, 1, {"top1": float("nan"), "loss": float("nan")})
  assert best == {}
  best = metrics.update_best(best, 2, {"top1": 5.0, "loss": 5.0})
  assert best == {"best_top1": 5.0, "best_top1_step": 2, "best_loss": 5.0, "best_loss_step": 2}


def test_evals_table_shows_last_and_best():
  results = {"top1": 20.0, "ema_top1": 12.5, "top5": 70.0, "best_top1": 30.0, "best_top1_step": 4}
  assert metrics.evals_table(results, 6).splitlines() == [
    "| eval     | last (step 6) | best | best at step |",
    "|----------|---------------|------|--------------|",
    "| top1     | 20            | 30   | 4            |",
    "| ema_top1 | 12.5          |      |              |",
    "| top5     | 70            |      |              |",
  ]
