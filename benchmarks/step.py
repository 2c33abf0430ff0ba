"""Train-step throughput of scratch / copy / distill, side by side in one process (run by hand).

  python benchmarks/step.py --models=Mu/7@28:128,Ti/16@224:16 --modes=none,copy,distill --steps=5 --reps=5
  python benchmarks/step.py --models=L/16@224:32 --dtypes=bfloat16 --remat=none,dots,full  # GPU: MFU
  python benchmarks/step.py --models=L/16@224:32 --dtypes=bfloat16 --remat=dots --scan --layers=end_layer:-6 \
      --attention=materialized,fused --loss_impl=blockwise  # the ViT-L distill recipe's step, fused on GPU

For every model x dtype x remat policy, the steps of all modes are compiled first and then timed in
interleaved repetitions (mode after mode, `--reps` times `--steps` steps), so that load from other jobs
falls on all of them alike; the table gives the median and the minimum over repetitions of ms/step. Also:
lower+compile time, the compiled program's memory (`memory_analysis()`: arguments + outputs - aliased +
temporaries, exact for that program; the allocator's process-wide peak is not shown: it would include the
modes built before), the analytic model FLOPs of the
step (benchmarks/flops.py: teacher forward + student forward and backward, attention included), the FLOP/s
achieved and MFU against the device's peak (a table by device kind, or --peak_tflops). "vs scratch" is
the transfer overhead: the ratio of the step's median time to the scratch step's of the same model.

Append tables to benchmarks/RESULTS.md with the machine and date. benchmarks/torch_compare.py imports
`JaxStep` from here to time the same step against PyTorch.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import flops  # benchmarks/flops.py
import quiet  # benchmarks/quiet.py
from absl import app, flags

flags.DEFINE_list("models", ["Mu/7@28:128"], "VARIANT@IMAGE_SIZE:BATCH entries, e.g. Ti/16@224:16.")
flags.DEFINE_list("modes", ["none", "copy", "distill"], "Transfer modes to time (none = scratch).")
flags.DEFINE_list("dtypes", ["float32"], "dtype_mm values (float32, bfloat16).")
flags.DEFINE_list("remat", ["none"], "Remat policies to time (none, full, dots).")
flags.DEFINE_bool("scan", False, "Scan over layers.")
flags.DEFINE_list(
  "attention", ["materialized"], "model.attention_impl values to time (materialized, fused)."
)
flags.DEFINE_string(
  "layers", "all", "transfer.layers, e.g. end_layer:-6 (the paper's ViT-L distillation)."
)
flags.DEFINE_string(
  "loss_impl", "direct", "transfer.loss_impl for distill (direct, blockwise, pallas)."
)
flags.DEFINE_integer("steps", 5, "Steps per timed repetition.", lower_bound=1)
flags.DEFINE_integer(
  "reps", 5, "Timed repetitions per step (interleaved across modes).", lower_bound=1
)
# At least one: the first step after compiling also fetches its metrics (the first-step losses).
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", lower_bound=1)
flags.DEFINE_float(
  "peak_tflops", 0.0, "Device peak TFLOP/s for MFU; 0: look device_kind up in flops.py."
)
flags.DEFINE_float(
  "quiet_wait",
  0.0,
  "On a shared host: before each timed repetition wait up to this many seconds "
  "for the other processes to leave the CPUs idle (Linux /proc/stat); 0: never wait.",
)
FLAGS = flags.FLAGS

GIB = 2.0**30


def parse_model(entry: str) -> tuple[str, int, int]:
  """ "Ti/16@224:16" -> ("Ti/16", 224, 16)."""
  variant, rest = entry.split("@")
  size, batch = map(int, rest.split(":"))
  return variant, size, batch


def _model(variant: str, dtype: str, scan: bool, remat: str, attention: str) -> Any:
  """The ViT of JaxStep's settings (1000 classes), from at_jax.models.vit."""
  from at_jax.models import vit

  cfg = {
    "variant": variant,
    "num_classes": 1000,
    "dtype_mm": dtype,
    "scan": scan,
    "remat_policy": remat,
    "attention_impl": attention,
  }
  return vit.build(cfg)


def _transfer(
  model: Any, teacher: Any, image_size: int, mode: str, layers: str, loss_impl: str
) -> Any:
  """The resolved transfer spec (loss_impl counts for distill only)."""
  from at_jax.transfer import spec

  return spec.resolve(
    {"mode": mode, "layers": layers, "loss_impl": loss_impl if mode == "distill" else "direct"},
    model,
    teacher,
    image_size,
  )


def _state(
  model: Any, image_size: int, batch: int, mesh: Any, ones: Any, params: Any
) -> tuple[Any, Any, Any, Any]:
  """(schedule, optimizer, sharded train state, its shardings): AdamW as the recipes', the params
  given (else random init)."""
  import jax

  from at_jax import optim
  from at_jax.training import classify as train_step
  from at_jax.training import state as train_state

  schedule = optim.make_schedule(
    base_lr=1e-4, batch_size=batch, warmup_steps=1, total_steps=1000, min_lr=0.0
  )
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ones, train=False))
  tx = optim.make_optimizer(
    abstract["params"], schedule=schedule, depth=model.depth, **optim.MAE_ADAMW
  )
  state, shardings = train_state.create_sharded_state(
    lambda r: train_step.init_state(model, tx, r, image_size), jax.random.key(0), mesh
  )
  if (
    params is not None
  ):  # Two puts: params and EMA must be distinct buffers (the state is donated).
    state = state.replace(
      params=jax.device_put(params, shardings.params),
      ema_params=jax.device_put(params, shardings.ema_params),
    )
  return schedule, tx, state, shardings


def _teacher(teacher: Any, teacher_params: Any, t: Any, mesh: Any, ones: Any) -> tuple[Any, Any]:
  """The teacher, cut, and its params (given, else random init) put on the mesh."""
  import jax

  from at_jax import sharding
  from at_jax.models import vit

  if teacher_params is None:
    teacher_params = jax.jit(lambda: teacher.init(jax.random.key(1), ones, train=False)["params"])()
  # Cut after the last transferred layer, as train.setup does.
  teacher, teacher_params = vit.truncate(teacher, teacher_params, t.teacher_depth)
  return teacher, jax.device_put(teacher_params, sharding.tree_shardings(mesh, teacher_params))


class JaxStep:
  """Our jitted train step (at_jax.training.classify, as training runs it), compiled, with its state and batch.

  Args:
    variant, image_size, batch, mode, dtype, remat, scan, attention: the model and step to build; no
      drop-path, label smoothing 0.1, AdamW (b2 0.95, wd 0.05) and EMA 0.9999.
    layers, loss_impl: transfer.layers and transfer.loss_impl (the latter for distill only).
    images: [B, H, W, C] float32 and `labels` [B] int (default: random, seed 0).
    params, teacher_params: float32 numpy pytrees in our layout (e.g. converted from timm models); default:
      random init.
  """

  def __init__(
    self,
    variant: str,
    image_size: int,
    batch: int,
    mode: str,
    dtype: str = "float32",
    remat: str = "none",
    scan: bool = False,
    images: Any = None,
    labels: Any = None,
    params: Any = None,
    teacher_params: Any = None,
    attention: str = "materialized",
    layers: str = "all",
    loss_impl: str = "direct",
  ):
    import jax
    import jax.numpy as jnp

    from at_jax import sharding
    from at_jax.training import classify as train_step
    from at_jax.training import state as train_state

    self.variant, self.image_size, self.batch, self.mode, self.dtype, self.remat = (
      variant,
      image_size,
      batch,
      mode,
      dtype,
      remat,
    )
    mesh = sharding.make_mesh(-1, 1)
    self.model = model = teacher = _model(variant, dtype, scan, remat, attention)
    t = _transfer(model, teacher, image_size, mode, layers, loss_impl)
    self.layers = t.layers
    ones = jnp.zeros((1, image_size, image_size, 3))
    schedule, tx, state, shardings = _state(model, image_size, batch, mesh, ones, params)
    tp = None
    if mode != "none":
      teacher, tp = _teacher(teacher, teacher_params, t, mesh, ones)
    t_sh = None if tp is None else jax.tree.map(lambda a: a.sharding, tp)
    step = train_step.make_train_step(
      model, teacher, tx, t, schedule=schedule, label_smoothing=0.1, ema_decay=0.9999
    )
    train, _ = train_state.jit_steps(
      step, train_step.make_eval_step(model, teacher, t), mesh, shardings, t_sh
    )
    self._compile(train, state, tp, images, labels, mesh)
    self.state, self.teacher_params = state, tp
    self.first_metrics = None
    self.times: list[float] = []  # seconds per step, one entry per timed repetition

  def _compile(self, train: Any, state: Any, tp: Any, images: Any, labels: Any, mesh: Any) -> None:
    """Compiles the step on the batch (random unless given), and keeps its compile time and memory."""
    import numpy as np

    from at_jax import sharding

    rng = np.random.default_rng(0)
    if images is None:
      images = rng.normal(size=(self.batch, self.image_size, self.image_size, 3)).astype(np.float32)
      labels = rng.integers(0, 1000, self.batch).astype(np.int32)
    self.batch_ = sharding.global_batch({"image": images, "label": labels}, mesh)
    t0 = time.perf_counter()
    self.compiled = train.lower(state, self.batch_, tp).compile()
    self.compile_s = time.perf_counter() - t0
    mem = self.compiled.memory_analysis()
    self.program_bytes = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
      + mem.temp_size_in_bytes
    )
    self.temp_bytes = mem.temp_size_in_bytes

  def run(self, steps: int) -> float:
    """Runs `steps` steps; returns seconds per step (blocking on the last step's metrics)."""
    import jax

    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch_, self.teacher_params)
      if self.first_metrics is None:
        self.first_metrics = jax.device_get(metrics)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps

  def flops_per_image(self) -> dict[str, float]:
    m = self.model
    return flops.train_step_flops(
      width=m.width,
      depth=m.depth,
      mlp_dim=m.mlp_dim,
      patch=m.patch_size,
      num_patches=(self.image_size // m.patch_size) ** 2,
      num_prefix=m.num_prefix,
      num_classes=m.num_classes,
      mode=self.mode,
      layers=self.layers,
    )

  def close(self) -> None:
    del self.state, self.teacher_params, self.compiled, self.batch_


def summarize(times: list[float]) -> tuple[float, float]:
  """(median, min) in ms of per-step seconds."""
  return 1000 * statistics.median(times), 1000 * min(times)


def main(argv):
  del argv
  import jax

  device = jax.devices()[0]
  print(
    f"devices: {jax.device_count()} x {device.device_kind}; jax {jax.__version__}; "
    f"{FLAGS.reps} reps x {FLAGS.steps} steps, interleaved over modes; layers {FLAGS.layers}, "
    f"distill loss_impl {FLAGS.loss_impl}, scan {FLAGS.scan}"
  )
  print(
    "| model | img | batch | dtype | remat | attention | mode | compile s | ms/step median | min | img/s "
    "| vs scratch | GFLOP/img | TFLOP/s | MFU | program GiB | temp GiB |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for entry in FLAGS.models:
    variant, size, batch = parse_model(entry)
    for dtype in FLAGS.dtypes:
      peak = flops.peak_tflops(device.device_kind, dtype, FLAGS.peak_tflops)
      for remat, attention in [(r, a) for r in FLAGS.remat for a in FLAGS.attention]:
        steps = {}
        for mode in FLAGS.modes:
          steps[mode] = JaxStep(
            variant,
            size,
            batch,
            mode,
            dtype,
            remat,
            FLAGS.scan,
            attention=attention,
            layers=FLAGS.layers,
            loss_impl=FLAGS.loss_impl,
          )
          steps[mode].run(FLAGS.warmup)
        for _ in range(FLAGS.reps):
          for s in steps.values():
            quiet.wait_for_quiet(FLAGS.quiet_wait)
            s.times.append(s.run(FLAGS.steps))
        base = summarize(steps["none"].times)[0] if "none" in steps else None
        for mode, s in steps.items():
          med, low = summarize(s.times)
          f = s.flops_per_image()["total"]
          tflops = batch * f / (med / 1000) / 1e12
          mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
          ratio = f"{med / base:.2f}x" if base else "-"
          print(
            f"| {variant} | {size} | {batch} | {dtype} | {remat} | {attention} | {mode} | {s.compile_s:.1f} | {med:.1f} | "
            f"{low:.1f} | {batch / med * 1000:.1f} | {ratio} | {f / 1e9:.2f} | {tflops:.3f} | {mfu} | "
            f"{s.program_bytes / GIB:.2f} | {s.temp_bytes / GIB:.2f} |",
            flush=True,
          )
        for s in steps.values():
          s.close()


if __name__ == "__main__":
  app.run(main)
