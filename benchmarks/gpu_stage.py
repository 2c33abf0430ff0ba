"""What every stage of benchmarks/gpu_bench.py works with: the shapes it measures (`Sizes`: the GPU's, or
the dry run's tiny ones), the `Recorder` its figures go through (one JSONL record each, the moment it
exists), and two measuring helpers: the seconds of a compiled call, and whether a compiled program calls
cuDNN's fused attention."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The shapes each stage measures: the GPU's, or the dry run's."""

  matmul: int  # square matmul side for the ceiling
  kernel_tokens: tuple[int, int]  # attention-CE checks: (f32 and bf16, bf16 only)
  kernel_heads: int
  kernel_head_dim: int
  recipe: str  # VARIANT@IMAGE:BATCH of the recipe step
  recipe_layers: str  # the distilled layers
  loss_tokens: tuple[int, ...]  # loss_memory's token counts (image side = (tokens - 1) ** 0.5 * 16)
  loss_batch: int
  small_step: str  # the kernels stage's end-to-end step
  torch_b: str
  torch_l: str
  torch_remat: str
  steps: int
  reps: int


GPU = Sizes(
  matmul=8192,
  kernel_tokens=(197, 1601),
  kernel_heads=16,
  kernel_head_dim=64,
  recipe="L/16@224:32",
  recipe_layers="end_layer:-6",
  loss_tokens=(197, 785, 1601),
  loss_batch=32,
  small_step="Ti/16@224:16",
  torch_b="B/16@224:64",
  torch_l="L/16@224:32",
  torch_remat="none",  # as PyTorch's step: no activation checkpointing
  steps=5,
  reps=3,
)
# Head dim 8 and tokens that no block divides: the dry run also exercises the kernels' padding. Every
# step of the dry run is one of four programs (scratch/distill x materialised/fused+pallas, Pico/7 at
# the recipe's settings), so the persistent compilation cache compiles each once across the stages.
DRY = Sizes(
  matmul=256,
  kernel_tokens=(17, 50),
  kernel_heads=2,
  kernel_head_dim=8,
  recipe="Pico/7@28:8",
  recipe_layers="all",
  loss_tokens=(17, 50),
  loss_batch=2,
  small_step="Pico/7@28:8",
  torch_b="Pico/7@28:8",
  torch_l="Pico/7@28:8",
  torch_remat="dots",
  steps=1,
  reps=2,
)
COMPILE_EVENT = (
  "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Recorder:
  """Appends one JSON object per figure to a file the moment it exists (flushed, fsynced), and prints it.

  Each record carries the stage, the time and the row being run (`row()`), so a compile or an error is
  attributed to the setting that caused it."""

  def __init__(self, path: str, stage: str):
    self.path, self.stage = path, stage
    self.current: dict[str, Any] = {}

  def __call__(self, record: dict[str, Any]) -> None:
    record = {"stage": self.stage, "time": round(time.time(), 2), **record}
    if self.current and "row" not in record:
      record["row"] = self.current
    line = json.dumps(record, default=_plain)
    with open(self.path, "a") as f:
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())
    print(line, flush=True)

  @contextlib.contextmanager
  def row(self, **what: Any) -> Iterator[None]:
    """Records `row_start` (what is about to run), and an exception inside the block as `kind: "error"`
    (with `what`), then carries on."""
    self({"kind": "row_start", "row": what})
    self.current = what
    try:
      yield
    except Exception as e:  # one failing row must not cost the rest of the stage
      # `kind` last: the row's own kind (ce_check, step, ...) would otherwise hide the failure.
      self({**what, "kind": "error", "error": f"{type(e).__name__}: {e}"[:2000]})
      traceback.print_exc()
    finally:
      self.current = {}

  def watch_compiles(self) -> None:
    """One `compile` record per XLA program this process compiles or reads from the persistent cache,
    with its seconds (jax.monitoring's backend-compile event, which covers the cache lookup)."""
    import jax

    hit = []

    def on_event(event: str, **kwargs: Any) -> None:
      del kwargs
      if event == CACHE_HIT_EVENT:
        hit.append(True)

    def on_duration(event: str, seconds: float, **kwargs: Any) -> None:
      if event == COMPILE_EVENT:
        self(
          {
            "kind": "compile",
            "fun": kwargs.get("fun_name"),
            "seconds": seconds,
            "cache_hit": bool(hit),
          }
        )
        hit.clear()

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)


def _plain(x: Any) -> Any:
  """JSON for numpy/jax scalars and arrays."""
  import numpy as np

  value = np.asarray(x)
  return value.item() if value.ndim == 0 else value.tolist()


def time_call(fn: Callable[[], Any], reps: int) -> float:
  """Seconds per call of `fn` (already compiled), after one untimed call."""
  import jax

  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def cudnn_in(compiled: Any) -> bool:
  """Whether a compiled GPU program calls cuDNN's fused attention (its custom call's name)."""
  text = compiled.as_text().lower()
  return "cudnn" in text and "fmha" in text
