"""Metric logging (JSONL + TensorBoard), console progress, result tables and top-k hits.

Writers and printers are active on process 0 only by default, so a multi-process run logs every
metric once; `say` is the one "print on process 0". tensorboardX is imported when a writer opens, so
the training core imports without it.
"""

import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from at_jax import storage
from at_jax.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


# The evaluations whose running best a run reports next to its last (the reference logs the max accuracy
# over its per-epoch evaluations of the raw and of the EMA model), and which way is better.
BEST_OF = {"top1": "max", "ema_top1": "max", "loss": "min", "ema_loss": "min"}


def update_best(
  best: Mapping[str, float], step: int, evals: Mapping[str, float]
) -> dict[str, float]:
  """The running best after an evaluation at `step`: for each `BEST_OF` name in `evals`, best_<name> and
  best_<name>_step (the first step that reached it: a tie keeps the earlier one). `best` is not changed.

  Args:
    best: the running best so far ({} before the first evaluation), as this function returns it.
    step: the training step `evals` were computed at.
    evals: an evaluation's figures (top1, ema_top1, ... or MAE's loss, ema_loss).
  """
  new = dict(best)
  for name, direction in BEST_OF.items():
    if name not in evals:
      continue
    value, key = float(evals[name]), f"best_{name}"
    if math.isnan(value):  # a diverged evaluation is never the best, nor a bar the next must beat
      continue
    old = new.get(key)
    if old is None or (value > old if direction == "max" else value < old):
      new[key], new[f"{key}_step"] = value, int(step)
  return new


def _is_main_process() -> bool:
  return jax.process_index() == 0


def say(line: str) -> None:
  """Prints `line` (flushed) on process 0 only: a multi-process run says each thing once."""
  if _is_main_process():
    print(line, flush=True)


def top_k_hits(logits_BV: Any, labels_B: Any, ks: tuple[int, ...] = (1, 5)) -> dict[int, Any]:
  """{k: bool [B], whether the label is among the k highest logits} (k capped at the class count).

  jnp, so it runs inside a jitted eval step and on host numpy arrays alike.
  """
  top_BK = jax.lax.top_k(jnp.asarray(logits_BV), min(max(ks), logits_BV.shape[-1]))[1]
  correct_BK = top_BK == jnp.asarray(labels_B)[:, None]
  return {k: correct_BK[:, :k].any(-1) for k in ks}


def _to_float(name: str, value: Any) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
  return float(array.reshape(()))


def _format_number(value: float) -> str:
  # 4 significant digits, but no exponent for large values (e.g. img/s).
  return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


class MetricWriter:
  """Appends metrics to workdir/metrics.jsonl and to TensorBoard."""

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool | None = None,
    after_step: int | None = None,
    evals_at_step: bool = False,
  ):
    """Opens the writers.

    Args:
      workdir: run directory; created if missing.
      enabled: whether to write; default: only on process 0.
      after_step: a resumed run's first step - 1: lines of later steps (logged by a killed run past
        its last checkpoint, and about to be logged again) are dropped from metrics.jsonl first.
      evals_at_step: also drop the `eval/` lines of `after_step` itself (the resumed run evaluates
        that step again: a finished run's last, or one saved before its evaluation).
    """
    self.enabled = _is_main_process() if enabled is None else enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = None
    self._tensorboard = None
    if self.enabled:
      storage.makedirs(workdir)
      # Append: a resumed run continues the same file. A bucket object cannot be appended to, so there
      # the lines are kept and the object rewritten at each write (kilobytes, every log step).
      if after_step is not None and storage.exists(self.path):
        _drop_lines_after(self.path, after_step, evals_at_step)
      if storage.is_remote(self.path):
        self._text = ""
        if storage.exists(self.path):
          with storage.open_file(self.path) as f:
            self._text = f.read()
      else:
        self._file = open(self.path, "a")
      import tensorboardX  # here, not at the top: the training core imports without it

      # Event files are appended to in place: in a bucket, written locally and uploaded at each write.
      self._mirror = storage.LocalMirror(os.path.join(workdir, TENSORBOARD_DIR))
      # A unique suffix: two writers in one second on one host would otherwise share a file name.
      self._tensorboard = tensorboardX.SummaryWriter(
        logdir=self._mirror.local, filename_suffix=f".{uuid.uuid4().hex[:8]}"
      )

  def write(self, step: int, metrics: Mapping[str, float | int | np.ndarray | jax.Array]) -> None:
    """Writes one record of scalar metrics at `step`.

    Appends the JSON line {"step": step, **metrics} (values as floats) and
    writes each scalar to TensorBoard. Both are flushed, so a killed run keeps
    every record written so far.

    Args:
      step: training step.
      metrics: name -> scalar (python number, numpy or jax scalar/size-1 array).
    """
    if not self.enabled:
      return
    # One device-to-host transfer for all jax values, not one per metric.
    host_metrics = jax.device_get(dict(metrics))
    values = {name: _to_float(name, v) for name, v in host_metrics.items()}
    line = json.dumps({"step": int(step), **values}) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._text += line
      storage.write_atomic(self.path, self._text)
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, global_step=int(step))
    self._tensorboard.flush()
    self._mirror.sync()

  def close(self) -> None:
    if self._tensorboard is not None:
      if self._file is not None:
        self._file.close()
      self._tensorboard.close()
      self._mirror.close()
      self._file = self._tensorboard = None


def _drop_lines_after(path: str, step: int, evals_at_step: bool = False) -> None:
  """Rewrites the metrics file `path` without its lines of steps after `step` (and a torn last line),
  and with `evals_at_step` without the evaluations of `step` either."""
  with storage.open_file(path) as f:
    lines = f.read().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
      at = record["step"]
    except (ValueError, KeyError):
      continue  # a line cut short by the kill
    evaluated = any(key.startswith("eval/") for key in record)
    if at < step or (at == step and not (evals_at_step and evaluated)):
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    storage.write_atomic(path, "".join(kept))


def read_jsonl(path: str) -> list[dict]:
  """Reads a metrics.jsonl file written by `MetricWriter`.

  A truncated last line (the run was killed mid-write) is skipped.

  Args:
    path: the .jsonl file.

  Returns:
    One dict per line, in file order.

  Raises:
    ConfigError: the file is missing or a line other than the last is not JSON.
  """
  if not storage.isfile(path):
    raise ConfigError(path, "no such metrics file")
  with storage.open_file(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        break
      raise ConfigError(path, f"line {i + 1} is not JSON: {e}") from e
  return records


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{seconds:02d}s"
  return f"{seconds}s"


class Progress:
  """Console progress for long loops, process 0 only.

  Prints one full line per update, e.g.
  'train   120/900 [#---------]  13% | loss 1.234 | acc 0.51 | 512 img/s |
  eta 2m31s' (on one line), with flush=True and no carriage-return tricks, so
  it reads the same in a terminal, a log file and colab.

  Throughput and eta are averaged since construction, so they include the
  first step's compile time; they settle as the loop runs.
  """

  _BAR_WIDTH = 10

  def __init__(
    self,
    name: str,
    total: int,
    *,
    start: int = 0,
    unit_per_step: int = 1,
    enabled: bool | None = None,
  ):
    """Starts the clock.

    Args:
      name: loop name, first on the line ('train', 'eval').
      total: last step of the loop.
      start: step the loop starts from (> 0 when resuming).
      unit_per_step: images per step (the global batch size); > 1 shows
        'img/s', otherwise steps per second ('it/s').
      enabled: whether to print; default: only on process 0.
    """
    self.name = name
    self.total = total
    self.start = start
    self.unit_per_step = unit_per_step
    self.enabled = _is_main_process() if enabled is None else enabled
    self._start_time = time.monotonic()

  def update(
    self, step: int, metrics: Mapping[str, float] | None = None, *, name: str | None = None
  ) -> str:
    """Prints (if enabled) and returns the progress line for `step`; `name` renames the loop from here
    (a run that changes phase, e.g. a distillation that stops)."""
    self.name = name or self.name
    fraction = min(max(step / self.total, 0.0), 1.0) if self.total else 1.0
    filled = int(fraction * self._BAR_WIDTH)
    bar = "#" * filled + "-" * (self._BAR_WIDTH - filled)
    width = len(str(self.total))
    parts = [f"{self.name:<7} {step:>{width}}/{self.total} [{bar}] {fraction * 100:3.0f}%"]
    for name, value in (metrics or {}).items():
      parts.append(f"{name} {_format_number(_to_float(name, value))}")
    elapsed = time.monotonic() - self._start_time
    steps_done = step - self.start
    if steps_done > 0 and elapsed > 0:
      steps_per_s = steps_done / elapsed
      if self.unit_per_step > 1:
        parts.append(f"{steps_per_s * self.unit_per_step:.0f} img/s")
      else:
        parts.append(f"{steps_per_s:.2f} it/s")
      eta = max(self.total - step, 0) / steps_per_s
      parts.append(f"eta {_format_duration(eta)}")
    else:
      parts.append("eta ?")
    line = " | ".join(parts)
    if self.enabled:
      print(line, flush=True)
    return line


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  try:
    return _format_number(_to_float("cell", value))
  except (TypeError, ValueError):
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
  """Formats rows as an aligned markdown table (also fine as plain text).

  Args:
    rows: one dict per row; a missing column is left blank.
    columns: column names, in order; also the header.

  Returns:
    The table, one line per row after a header and separator line.
  """
  cells = [[_cell(row.get(column)) for column in columns] for row in rows]
  widths = [max([len(column)] + [len(row[i]) for row in cells]) for i, column in enumerate(columns)]

  def line(values: list[str]) -> str:
    return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

  separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(columns), separator] + [line(row) for row in cells])


def evals_table(results: Mapping[str, float], step: int) -> str:
  """A finished run's evaluations (what `train_and_evaluate` returns) as a table: a row per figure, its
  value at the last step and, for the `BEST_OF` ones, the running best and the step that reached it."""
  last = f"last (step {step})"
  rows = [
    {
      "eval": name,
      last: value,
      "best": results.get(f"best_{name}"),
      "best at step": results.get(f"best_{name}_step"),
    }
    for name, value in results.items()
    if not name.startswith("best_")
  ]
  return format_table(rows, ["eval", last, "best", "best at step"])
