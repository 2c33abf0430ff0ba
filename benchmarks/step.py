"""Train-step throughput of scratch / copy / distill, side by side in one process (run by hand).

  python benchmarks/step.py --models=Mu/7@28:128,Ti/16@224:32 --modes=none,copy,distill --steps=20
  python benchmarks/step.py --models=L/16@224:32 --dtypes=bfloat16 --remat=dots --peak_tflops=989  # H100

Prints a markdown table: compile time, ms/step, images/s, the ratio to the scratch step of the same model,
model TFLOPs per step (analytic: teacher forward + student forward and backward, attention included) and
MFU when --peak_tflops is given. Absolute times mean something only on an accelerator; on a CPU report the
ratios. Append the table to benchmarks/RESULTS.md with the machine and date.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_list("models", ["Mu/7@28:128"], "VARIANT@IMAGE_SIZE:BATCH entries.")
flags.DEFINE_list("modes", ["none", "copy", "distill"], "Transfer modes to time.")
flags.DEFINE_list("dtypes", ["float32"], "dtype_mm values.")
flags.DEFINE_string("remat", "none", "Remat policy (none, full, dots).")
flags.DEFINE_bool("scan", False, "Scan over layers.")
flags.DEFINE_integer("steps", 20, "Timed steps (after one warm-up step).")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (e.g. 989 for H100 bf16 dense).")
FLAGS = flags.FLAGS


def vit_flops_per_image(width: int, depth: int, mlp_dim: int, tokens: int, patch: int) -> float:
  """Forward FLOPs of one image (2 per multiply-add): embedding, qkv/out, attention maps, MLP, per layer."""
  n, d = tokens, width
  per_layer = 2 * n * d * 4 * d + 2 * 2 * n * n * d + 2 * 2 * n * d * mlp_dim
  return depth * per_layer + 2 * (n - 1) * patch * patch * 3 * d


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from at_jax import optim, sharding, train_step, transfer
  from at_jax.models import vit

  mesh = sharding.make_mesh(-1, 1)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; jax {jax.__version__}")
  print("| model | img | batch | dtype | mode | compile s | ms/step | img/s | vs scratch | TFLOP/step | MFU |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for entry in FLAGS.models:
    variant, rest = entry.split("@")
    size, batch = map(int, rest.split(":"))
    for dtype in FLAGS.dtypes:
      base_ms = None
      for mode in FLAGS.modes:
        cfg = {"variant": variant, "num_classes": 1000, "dtype_mm": dtype, "scan": FLAGS.scan,
               "remat_policy": FLAGS.remat}
        model = teacher = vit.build(cfg)
        t = transfer.resolve({"mode": mode, "layers": "all"}, model, teacher, size)
        schedule = optim.make_schedule(base_lr=1e-4, batch_size=batch, warmup_steps=1, total_steps=1000,
                                       min_lr=0.0)
        images = jnp.zeros((1, size, size, 3))
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
        tx = optim.make_optimizer(abstract["params"], schedule=schedule, b1=0.9, b2=0.95, eps=1e-8,
                                  weight_decay=0.05, layer_decay=1.0, depth=model.depth)
        state, shardings = train_step.create_sharded_state(
            lambda r: train_step.init_state(model, tx, r, size), jax.random.key(0), mesh)
        tp = None if mode == "none" else jax.jit(lambda: teacher.init(jax.random.key(1), images,
                                                                      train=False)["params"])()
        t_sh = None if tp is None else jax.tree.map(lambda a: a.sharding, tp)
        step = train_step.make_train_step(model, teacher, tx, t, schedule=schedule, label_smoothing=0.1,
                                          ema_decay=0.9999)
        train, _ = train_step.jit_steps(step, train_step.make_eval_step(model, teacher, t), mesh, shardings,
                                        t_sh)
        rng = np.random.default_rng(0)
        batch_ = sharding.global_batch({"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                                        "label": rng.integers(0, 1000, batch).astype(np.int32)}, mesh)
        t0 = time.perf_counter()
        state, m = train(state, batch_, tp)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
          state, m = train(state, batch_, tp)
        jax.block_until_ready(m)
        ms = 1000 * (time.perf_counter() - t0) / FLAGS.steps
        base_ms = ms if mode == "none" else base_ms
        tokens = model.tokens_for(size)
        fwd = vit_flops_per_image(model.width, model.depth, model.mlp_dim, tokens, model.patch_size)
        tflop = batch * fwd * (3 + (mode != "none")) / 1e12
        mfu = f"{100 * tflop / (ms / 1000) / FLAGS.peak_tflops:.1f}%" if FLAGS.peak_tflops else "-"
        ratio = f"{ms / base_ms:.2f}x" if base_ms else "-"
        print(f"| {variant} | {size} | {batch} | {dtype} | {mode} | {compile_s:.1f} | {ms:.1f} | "
              f"{batch / ms * 1000:.0f} | {ratio} | {tflop:.3f} | {mfu} |", flush=True)
        del state, tp


if __name__ == "__main__":
  app.run(main)
