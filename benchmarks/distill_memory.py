"""Memory and time of one layer's attention-distillation loss and its gradient, per implementation (by hand).

  python benchmarks/distill_memory.py                                   # CPU: direct, blockwise
  python benchmarks/distill_memory.py --dtype=bfloat16                  # GPU: pallas joins by default

For ViT-L attention (16 heads of dim 64) at image sizes 224/448/640 with patch 16 (197, 785, 1601 tokens,
cls included) it compiles `jax.jit(jax.value_and_grad(mean CE, argnums=(q_s, k_s)))` and reports XLA's
`compiled.memory_analysis()`: temp (scratch the program allocates: the N x N maps for "direct"), argument
and output bytes. These are exact for each program, whatever else the process holds, so all rows run in
one process (the allocator's process-wide peak would mix rows, and is not shown). The default batch, 32,
is the recipe's per-device batch: at batch 1 a GPU runs a few dozen thread blocks on 132 SMs and the time
is latency, not throughput. A row that fails (an OOM, a kernel that does not compile) prints its error and
the table goes on. "N x N map" is one float32 [B, H, N, N] map, for scale: direct holds several. Times
from a CPU say little; its memory numbers do. gpu_bench.py's loss_memory stage (benchmarks/gpu_kernels.py)
calls `measure`.
"""

from __future__ import annotations

import time
from typing import Any

from absl import app, flags

flags.DEFINE_list(
  "image_sizes", ["224", "448", "640"], "Image sizes; tokens = (size / patch)^2 + 1."
)
flags.DEFINE_integer("patch", 16, "Patch size.")
flags.DEFINE_integer("batch", 32, "Batch size (the recipe's per-device batch).")
flags.DEFINE_integer("heads", 16, "Attention heads (ViT-L: 16).")
flags.DEFINE_integer("head_dim", 64, "Head dim of teacher and student (ViT-L: 64).")
flags.DEFINE_list(
  "impls", [], "Implementations to run; default direct, blockwise, and pallas off CPU."
)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of q and k.")
flags.DEFINE_integer("iters", 5, "Timed calls (after one warm-up call).")
FLAGS = flags.FLAGS

MIB = 2.0**20


def measure(
  impl: str, tokens: int, *, batch: int, heads: int, head_dim: int, dtype: str, iters: int
) -> dict[str, Any]:
  """Compiles and times value_and_grad of one layer's mean CE; returns the numbers of one table row."""
  import jax

  from at_jax.ops import attn_ce

  shape = (batch, tokens, heads, head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  qk = [jax.random.normal(k, shape, dtype) for k in keys]
  scale = head_dim**-0.5

  def loss(q_t, k_t, q_s, k_s):
    ce = attn_ce.attention_ce(impl, q_t, k_t, q_s, k_s, scale_teacher=scale, scale_student=scale)
    return ce.mean()

  # The teacher is an argument too: closed over, it would be baked into the program as constants.
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(2, 3))).lower(*qk).compile()
  mem = compiled.memory_analysis()
  jax.block_until_ready(compiled(*qk))
  start = time.perf_counter()
  for _ in range(iters):
    out = compiled(*qk)
  jax.block_until_ready(out)
  return {
    "impl": impl,
    "tokens": tokens,
    "batch": batch,
    "heads": heads,
    "head_dim": head_dim,
    "dtype": dtype,
    "temp_mib": mem.temp_size_in_bytes / MIB,
    "args_mib": mem.argument_size_in_bytes / MIB,
    "out_mib": mem.output_size_in_bytes / MIB,
    "one_map_mib": batch * heads * tokens * tokens * 4 / MIB,
    "ms": (time.perf_counter() - start) / iters * 1e3,
  }


def main(argv):
  del argv
  import jax

  backend = jax.default_backend()
  impls = FLAGS.impls or ["direct", "blockwise"] + (["pallas"] if backend != "cpu" else [])
  print(
    f"{jax.devices()[0].device_kind} ({backend}); jax {jax.__version__}; batch {FLAGS.batch}, "
    f"{FLAGS.heads} heads x {FLAGS.head_dim}, {FLAGS.dtype}"
  )
  print("\n| img | tokens | impl | temp MiB | args MiB | out MiB | N x N map MiB | ms/call |")
  print("|---|---|---|---|---|---|---|---|")
  for size in map(int, FLAGS.image_sizes):
    tokens = (size // FLAGS.patch) ** 2 + 1
    for impl in impls:
      try:
        r = measure(
          impl,
          tokens,
          batch=FLAGS.batch,
          heads=FLAGS.heads,
          head_dim=FLAGS.head_dim,
          dtype=FLAGS.dtype,
          iters=FLAGS.iters,
        )
      except Exception as e:  # one failing row (OOM) must not end the table
        print(f"| {size} | {tokens} | {impl} | failed: {type(e).__name__}: {str(e)[:200]} |||||")
        continue
      print(
        f"| {size} | {tokens} | {impl} | {r['temp_mib']:.1f} | {r['args_mib']:.1f} | "
        f"{r['out_mib']:.1f} | {r['one_map_mib']:.1f} | {r['ms']:.1f} |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
