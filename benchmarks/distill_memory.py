"""Memory and time of one layer's attention-distillation loss and its gradient, per implementation (by hand).

  python benchmarks/distill_memory.py                                   # CPU: direct, blockwise
  python benchmarks/distill_memory.py --batch=8 --dtype=bfloat16        # GPU: pallas joins by default

For ViT-L attention (16 heads of dim 64) at image sizes 224/448/640 with patch 16 (197, 785, 1601 tokens,
cls included) it compiles `jax.jit(jax.value_and_grad(mean CE, argnums=(q_s, k_s)))` and reports XLA's
`compiled.memory_analysis()`: temp (scratch the program allocates: the N x N maps for "direct"), argument
and output bytes; on a GPU also the device's `peak_bytes_in_use`. Each row runs in its own subprocess, so
the device peak belongs to that row alone. "N x N map" is one float32 [B, H, N, N] map, for scale: direct
holds several. Prints a markdown table; times from a CPU say little, its memory numbers do.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list(
  "image_sizes", ["224", "448", "640"], "Image sizes; tokens = (size / patch)^2 + 1."
)
flags.DEFINE_integer("patch", 16, "Patch size.")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("heads", 16, "Attention heads (ViT-L: 16).")
flags.DEFINE_integer("head_dim", 64, "Head dim of teacher and student (ViT-L: 64).")
flags.DEFINE_list(
  "impls", [], "Implementations to run; default direct, blockwise, and pallas off CPU."
)
flags.DEFINE_integer("block_q", 128, "Query block of the streamed implementations.")
flags.DEFINE_integer("block_k", 128, "Key block of the streamed implementations.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of q and k.")
flags.DEFINE_integer("iters", 5, "Timed calls (after one warm-up call).")
flags.DEFINE_string("row", "", "Internal: IMAGE_SIZE:IMPL, run one row and print it as JSON.")
FLAGS = flags.FLAGS

MIB = 2.0**20


def run_row(image_size: int, impl: str) -> dict:
  """Compiles and times value_and_grad of one layer's mean CE; returns the numbers of one table row."""
  import jax

  from at_jax.ops import attn_ce

  n = (image_size // FLAGS.patch) ** 2 + 1
  shape = (FLAGS.batch, n, FLAGS.heads, FLAGS.head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  q_t, k_t, q_s, k_s = (jax.random.normal(k, shape, FLAGS.dtype) for k in keys)
  scale = FLAGS.head_dim**-0.5

  def loss(q_t, k_t, q_s, k_s):
    return attn_ce.attention_ce(
      impl,
      q_t,
      k_t,
      q_s,
      k_s,
      scale_teacher=scale,
      scale_student=scale,
      block_q=FLAGS.block_q,
      block_k=FLAGS.block_k,
    ).mean()

  # The teacher is an argument too: closed over, it would be baked into the program as constants.
  args = (q_t, k_t, q_s, k_s)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(2, 3))).lower(*args).compile()
  mem = compiled.memory_analysis()
  jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(FLAGS.iters):
    out = compiled(*args)
  jax.block_until_ready(out)
  ms = (time.perf_counter() - start) / FLAGS.iters * 1e3
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "tokens": n,
    "impl": impl,
    "temp": mem.temp_size_in_bytes,
    "args": mem.argument_size_in_bytes,
    "out": mem.output_size_in_bytes,
    "peak": stats.get("peak_bytes_in_use"),
    "ms": ms,
    "map": FLAGS.batch * FLAGS.heads * n * n * 4,
  }


def main(argv):
  if FLAGS.row:
    size, impl = FLAGS.row.split(":")
    print(json.dumps(run_row(int(size), impl)))
    return
  import jax  # only for the header: each row's work happens in its subprocess

  backend = jax.default_backend()
  impls = FLAGS.impls or ["direct", "blockwise"] + (["pallas"] if backend != "cpu" else [])
  print(
    f"{jax.devices()[0].device_kind} ({backend}); jax {jax.__version__}; batch {FLAGS.batch}, "
    f"{FLAGS.heads} heads x {FLAGS.head_dim}, {FLAGS.dtype}, blocks {FLAGS.block_q}x{FLAGS.block_k}"
  )
  print(
    "\n| img | tokens | impl | temp MiB | args MiB | out MiB | device peak MiB | N x N map MiB "
    "| ms/call |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for size in FLAGS.image_sizes:
    for impl in impls:
      child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv[1:], f"--row={size}:{impl}"],
        capture_output=True,
        text=True,
      )
      if child.returncode:
        print(f"| {size} | | {impl} | failed: {child.stderr.strip().splitlines()[-1]} |||||||")
        continue
      r = json.loads(child.stdout.strip().splitlines()[-1])
      peak = "n/a" if r["peak"] is None else f"{r['peak'] / MIB:.1f}"
      print(
        f"| {size} | {r['tokens']} | {impl} | {r['temp'] / MIB:.1f} | {r['args'] / MIB:.1f} | "
        f"{r['out'] / MIB:.1f} | {peak} | {r['map'] / MIB:.1f} | {r['ms']:.1f} |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
