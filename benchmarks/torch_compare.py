"""Ours against PyTorch for one size, every dtype x mode row: `compare`, the library entry point of
benchmarks/torch_reference.py (whose command line prints its rows as a table; benchmarks/gpu_bench.py's
torch stages record them). One row builds both steps on the same weights, images and labels (ours:
benchmarks/step.py's JaxStep; PyTorch: benchmarks/torch_step.py's TorchStep), records the first step's
losses of both, then times them in interleaved repetitions, recording each the moment it is timed."""

import dataclasses
import gc
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import flops  # benchmarks/flops.py
import quiet  # benchmarks/quiet.py
import step as jax_step  # benchmarks/step.py
import torch_models  # benchmarks/torch_models.py
import torch_step  # benchmarks/torch_step.py


@dataclasses.dataclass(frozen=True)
class RowSettings:
  """What every row of one `compare` shares: its arguments of these names (see there), PyTorch's float32
  matmul precision as set on the device, and the device kind the peaks are looked up by."""

  device: str
  torch_fp32: str  # torch_step.set_torch_precision's answer: "tf32" or "ieee"
  device_kind: str  # the CUDA device's name for PyTorch on a GPU, else JAX's device kind
  scan: bool
  remat: str
  attention: str
  optimizer: str
  native_scratch: bool
  steps: int
  reps: int
  warmup: int
  quiet_wait: float
  peak_override: float


def _side(name: str, times: list[float], batch: int, flop: float, peak: float) -> dict[str, Any]:
  """One side's timing fields of a row (flops.step_figures, prefixed `name`_), and its peak."""
  figures = flops.step_figures(times, batch, flop, peak)
  return {f"{name}_{k}": v for k, v in figures.items()} | {f"{name}_peak_tflops": peak}


def _interleaved(
  steps: Sequence[Any],
  n: int,
  reps: int,
  warmup: int,
  quiet_wait: float,
  on_rep: Callable[[int, int, float], None] = lambda i, rep, seconds: None,
) -> None:
  """Warms up every step, then `reps` rounds of `n` steps each, one step after another; `on_rep(step
  index, repetition, seconds per step)` hears each repetition the moment it is timed."""
  if warmup > 0:
    for s in steps:
      s.run(warmup)
  for rep in range(reps):
    for i, s in enumerate(steps):
      quiet.wait_for_quiet(quiet_wait)
      s.times.append(s.run(n))
      on_rep(i, rep, s.times[-1])


def _free(device: str) -> None:
  gc.collect()  # JAX buffers and torch tensors held by reference cycles
  if device.startswith("cuda"):
    torch_models.import_torch().cuda.empty_cache()


def compare(
  variant: str,
  image_size: int,
  batch: int,
  *,
  modes: Sequence[str],
  dtypes: Sequence[str],
  device: str,
  scan: bool,
  remat: str,
  tf32: bool,
  steps: int,
  reps: int,
  warmup: int,
  native_scratch: bool,
  record: Callable[[dict], None],
  quiet_wait: float = 0.0,
  optimizer: str = "fused",
  attention: str = "materialized",
  peak_override: float = 0.0,
  seed: int = 0,
) -> None:
  """Ours vs PyTorch for one size, every dtype x mode; hands each record to `record` as it is made.

  Records (plain JSON-serialisable dicts), by "kind":
    weights: once, after the weights are made and converted (convert_s).
    first_step_losses: per row, before timing: "ours" and "torch" {"ce", "distill"} of the same weights
      and batch (and "torch_native" in scratch rows with native_scratch).
    torch_vs_ours: per row: ours_* and torch_* ms/step median and min, img/s, TFLOP/s, peak, MFU;
      speedup (torch ms / ours ms), gflop_per_img, the precision of each side, ours_compile_s.
    torch_row: per row, before timing: its facts (FLOPs per image, each side's precision and peak
      TFLOP/s, our compile time, the settings).
    torch_rep: per row, side ("ours", "torch", "torch_native") and repetition, the moment it is timed:
      ms per step (benchmarks/gpu_report.py builds its tables from these and torch_row alone).
    torch_native_scratch: with native_scratch, for mode "none": the same fields, torch = timm's own
      fused-SDPA attention, timed in the same interleaved rounds as ours and the exposed step.
    error: a row that raised (e.g. out of memory): its traceback; the next row still runs.

  Args:
    device: the PyTorch device ("cpu", "cuda", "cuda:0"); ours runs on JAX's default device.
    remat, attention: our step's remat policy and model.attention_impl.
    tf32: PyTorch's float32 matmuls on CUDA use TF32 (ours follow XLA's default).
    steps, reps, warmup: steps per timed repetition, repetitions, untimed steps before.
    quiet_wait: quiet.wait_for_quiet's wait before each repetition (shared CPU hosts).
    peak_override: peak TFLOP/s for MFU; 0 looks the device kind up in flops.py.
  """
  settings = RowSettings(
    device=device,
    torch_fp32=torch_step.set_torch_precision(device, tf32),
    device_kind=_device_kind(device),
    scan=scan,
    remat=remat,
    attention=attention,
    optimizer=optimizer,
    native_scratch=native_scratch,
    steps=steps,
    reps=reps,
    warmup=warmup,
    quiet_wait=quiet_wait,
    peak_override=peak_override,
  )
  base = dict(model=variant, image_size=image_size, batch=batch)
  weights, images, labels = _inputs(variant, image_size, batch, modes, scan, seed, device, record)
  for dtype in dtypes:
    for mode in modes:
      row = dict(base, dtype=dtype, mode=mode)
      made: list[Any] = []  # closed whatever happens, so a failed row leaves the memory free
      try:
        ts, native, js = _build_steps(row, settings, weights, images, labels, made)
        record(_first_losses(row, ts, native, js))
        _time_row(row, settings, ts, native, js, record)
      except Exception:  # pylint: disable=broad-except  # one failed row must not cost the others
        record({"kind": "error", **row, "error": traceback.format_exc()[-4000:]})
      finally:
        for s in made:
          s.close()
        _free(device)


def _device_kind(device: str) -> str:
  """The kind the peaks are looked up by: the CUDA device's name for PyTorch on a GPU, else JAX's."""
  import jax  # pylint: disable=import-outside-toplevel

  torch = torch_models.import_torch()
  return (
    torch.cuda.get_device_name(torch.device(device))
    if device.startswith("cuda")
    else jax.devices()[0].device_kind
  )


def _inputs(
  variant: str,
  image_size: int,
  batch: int,
  modes: Sequence[str],
  scan: bool,
  seed: int,
  device: str,
  record: Callable[[dict], None],
) -> tuple[torch_models.Weights, Any, Any]:
  """The size's weights, made once (a teacher too when a mode needs one) and recorded with the seconds
  they took, and one random batch of images and labels that every row uses."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  base = dict(model=variant, image_size=image_size, batch=batch)
  t0 = time.perf_counter()
  weights = torch_models.make_weights(
    variant,
    image_size,
    teacher=any(m != "none" for m in modes),
    scan=scan,
    seed=seed,
    device=device,
  )
  record({"kind": "weights", **base, "scan": scan, "convert_s": time.perf_counter() - t0})
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, batch).astype(np.int32)
  return weights, images, labels


def _build_steps(
  row: dict[str, Any],
  settings: RowSettings,
  weights: torch_models.Weights,
  images: Any,
  labels: Any,
  made: list[Any],
) -> tuple[Any, Any, Any]:
  """The row's steps on the same weights, images and labels: PyTorch's, timm's own fused-SDPA attention
  (scratch rows with native_scratch; else None) and ours, each appended to `made` once built."""
  variant, image_size, batch = row["model"], row["image_size"], row["batch"]
  mode, dtype, device, optimizer = row["mode"], row["dtype"], settings.device, settings.optimizer
  ts = torch_step.TorchStep(
    variant, image_size, mode, dtype, device, weights, images, labels, optimizer
  )
  made.append(ts)
  native = None
  if settings.native_scratch and mode == "none":
    native = torch_step.TorchStep(
      variant, image_size, mode, dtype, device, weights, images, labels, optimizer, "native"
    )
    made.append(native)
  js = jax_step.JaxStep(
    variant,
    image_size,
    batch,
    mode,
    dtype,
    settings.remat,
    settings.scan,
    images,
    labels,
    weights.student_ours,
    weights.teacher_ours if mode != "none" else None,
    attention=settings.attention,
  )
  made.append(js)
  return ts, native, js


def _first_losses(row: dict[str, Any], ts: Any, native: Any, js: Any) -> dict[str, Any]:
  """The first_step_losses record: both sides' losses of the same weights and batch (ours: of the
  first step, which this runs)."""
  losses = {"kind": "first_step_losses", **row, "torch": ts.first_losses()}
  if native is not None:
    losses["torch_native"] = native.first_losses()
  js.run(1)  # the first step's metrics are of the initial params, as first_losses
  m = js.first_metrics
  losses["ours"] = {"ce": float(m["ce_loss"]), "distill": float(m.get("distill_loss", 0.0))}
  return losses


def _time_row(
  row: dict[str, Any],
  settings: RowSettings,
  ts: Any,
  native: Any,
  js: Any,
  record: Callable[[dict], None],
) -> None:
  """Records the row's facts, times its steps in interleaved repetitions (each recorded as it is timed),
  then records ours against PyTorch (and against timm's fused SDPA, when built)."""
  s, batch, dtype = settings, row["batch"], row["dtype"]
  flop = js.flops_per_image()["total"]
  ours_prec = torch_step.jax_precision(dtype)
  torch_prec = "bf16" if dtype == "bfloat16" else s.torch_fp32
  ours_peak = flops.peak_tflops(s.device_kind, dtype, s.peak_override, tf32=ours_prec == "tf32")
  torch_peak = flops.peak_tflops(s.device_kind, dtype, s.peak_override, tf32=torch_prec == "tf32")
  row_facts = dict(
    row,
    device_kind=s.device_kind,
    gflop_per_img=flop / 1e9,
    ours_precision=ours_prec,
    torch_precision=torch_prec,
    ours_peak_tflops=ours_peak,
    torch_peak_tflops=torch_peak,
    ours_compile_s=js.compile_s,
    scan=s.scan,
    remat=s.remat,
    attention=s.attention,
    steps=s.steps,
    reps=s.reps,
  )
  # The row's facts, then each repetition as it is timed: a process killed mid-row keeps both.
  record({"kind": "torch_row", **row_facts})
  timed = [(n, t) for n, t in (("ours", js), ("torch", ts), ("torch_native", native)) if t]
  _interleaved(
    [t for _, t in timed],
    s.steps,
    s.reps,
    s.warmup,
    s.quiet_wait,
    lambda i, rep, seconds: record(
      {"kind": "torch_rep", **row, "side": timed[i][0], "rep": rep, "ms": 1e3 * seconds}
    ),
  )
  common = dict(row_facts, **_side("ours", js.times, batch, flop, ours_peak))
  for name, t in (("torch_vs_ours", ts), ("torch_native_scratch", native)):
    if t is not None:
      torch_side = _side("torch", t.times, batch, flop, torch_peak)
      speedup = torch_side["torch_ms_median"] / common["ours_ms_median"]
      record({"kind": name, **common, **torch_side, "speedup": speedup})
