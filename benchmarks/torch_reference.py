"""Our attention-transfer train step timed side by side with the same step in PyTorch with timm ViTs.

  python benchmarks/torch_reference.py --models=Ti/16@224:8,S/16@224:8 --modes=none,copy,distill \
      --steps=3 --reps=7
  python benchmarks/torch_reference.py --models=B/16@224:64 --dtypes=float32,bfloat16 --scan  # GPU

The PyTorch step is the paper's dual-model step written plainly: the frozen teacher (eval mode, under
torch.no_grad) runs first and its blocks hand out their pre-softmax attention logits q @ k^T * scale as
float32 maps; the student then runs with either its own attention (distill: loss = weight 3.0 * sum over
layers of the mean over batch, heads and queries of CE(softmax(teacher), log_softmax(student))) or, in
copy mode, softmax(teacher logits) in place of its own. Then cross-entropy with label smoothing 0.1,
backward, AdamW (b2 0.95, wd 0.05 on weight matrices only, as ours; fused kernel by default) and an EMA of
the params (0.9999), which our step also keeps. All layers transfer; no drop-path.

Models come from `timm.create_model` (vit_tiny/small/base/large_patch16_224, pretrained=False: there is no
network) or, for other variants such as the Fashion-MNIST demo's Mu/7 at 28 px, timm's VisionTransformer
with the same shape. Both are built with average pooling + fc_norm (the MAE/paper readout, and ours).
Attention runs through `ExposedAttention`, a re-implementation of timm's (unfused) Attention.forward that
keeps the logits and obeys an override. Scratch rows also time timm's own Attention with fused SDPA
(--native_scratch): the baseline a PyTorch user would get, which needs no maps.

`compare` (the library entry point, in torch_compare.py; benchmarks/gpu_bench.py calls it) makes one
size's weights once (seeded timm models, converted in memory by at_jax.convert, stacked into the scan
layout with --scan) and reuses them for every dtype x mode row. Per row it builds OUR step
(benchmarks/step.py's JaxStep: at_jax.training.classify, jitted and compiled) and the PyTorch step on the
same weights, images and labels, records the first step's losses of both at once, then times them in
interleaved repetitions (ours, PyTorch, ...; median and minimum over `reps` of `steps` steps each) and
records the row: ms/step of both, the speedup torch_ms / ours_ms (> 1: ours is faster), FLOP/s and MFU.
`main` prints them as a markdown table.

Precision: on a GPU, float32 matmuls of ours run at XLA's default, TF32 on Ampere and later; PyTorch's
follow --tf32 (default on, to match; off gives full float32, whose MFU counts against the far lower fp32
peak). Each row records the precision of both sides. bfloat16 runs PyTorch under torch.autocast and ours
with dtype_mm=bfloat16; on a CPU autocast works where oneDNN has bf16 kernels. On a shared host pass
--quiet_wait=30 (from step.py): each repetition first waits for idle CPUs.

This file holds the command line and its table; the other jobs live beside it: torch_compare.py
(`compare`: each row built, checked and timed), torch_step.py (the PyTorch step, and the matmul
precision of each side) and torch_models.py (timm ViTs with ExposedAttention, and the seeded weights
of both sides).
"""

import sys

import step as jax_step  # benchmarks/step.py: defines --models, --modes, --dtypes, --steps, ...
import torch_compare  # benchmarks/torch_compare.py
import torch_models  # benchmarks/torch_models.py
import torch_step  # benchmarks/torch_step.py
from absl import app, flags

flags.DEFINE_string("device", "auto", "PyTorch device: auto (cuda if available), cpu or cuda.")
flags.DEFINE_enum(
  "torch_optimizer", "fused", ["fused", "foreach", "loop"], "torch.optim.AdamW implementation."
)
flags.DEFINE_bool("tf32", True, "PyTorch on CUDA: TF32 for float32 matmuls (XLA's default on GPU).")
flags.DEFINE_bool(
  "native_scratch", True, "Also time timm's own fused-SDPA attention in scratch (mode none) rows."
)
flags.DEFINE_integer(
  "torch_threads", 0, "torch.set_num_threads (0: PyTorch's default, one per core)."
)
FLAGS = flags.FLAGS


def _print_record(r: dict, checks: list[str]) -> None:
  """Prints a table row; first-step losses go to stderr at once (and into `checks`, for the end)."""
  if r["kind"] == "first_step_losses":
    o, t = r["ours"], r["torch"]
    line = (
      f"{r['model']}@{r['image_size']} {r['dtype']} {r['mode']}: ce ours {o['ce']:.5f} torch "
      f"{t['ce']:.5f}; distill ours {o['distill']:.5f} torch {t['distill']:.5f}"
    )
    if "torch_native" in r:
      line += f"; ce timm SDPA {r['torch_native']['ce']:.5f}"
    checks.append(line)
    print("first-step losses,", line, file=sys.stderr, flush=True)
  elif r["kind"] == "error":
    print(
      f"error in {r['model']} {r['dtype']} {r['mode']}:\n{r['error']}", file=sys.stderr, flush=True
    )
  elif r["kind"] in ("torch_vs_ours", "torch_native_scratch"):

    def cell(side: str) -> str:
      mfu = r[f"{side}_mfu_pct"]
      return f"{r[f'{side}_tflops']:.3f}" + (f" ({mfu:.1f}%)" if mfu is not None else "")

    mode = r["mode"] + (" (timm SDPA)" if r["kind"] == "torch_native_scratch" else "")
    print(
      f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['dtype']} | {mode} | "
      f"{r['ours_ms_median']:.1f} ({r['ours_ms_min']:.1f}) | "
      f"{r['torch_ms_median']:.1f} ({r['torch_ms_min']:.1f}) | {r['speedup']:.2f}x | "
      f"{r['ours_img_s']:.1f} | {r['torch_img_s']:.1f} | {r['gflop_per_img']:.2f} | "
      f"{cell('ours')} | {cell('torch')} |",
      flush=True,
    )


def main(argv):
  del argv
  torch = torch_models.import_torch()
  device = (
    FLAGS.device if FLAGS.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
  )
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  import jax  # pylint: disable=import-outside-toplevel

  kind = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
  print(
    f"torch {torch.__version__} on {device} ({kind}, {torch.get_num_threads()} threads, float32 "
    f"matmuls {torch_step.set_torch_precision(device, FLAGS.tf32)}); jax {jax.__version__} on "
    f"{jax.devices()[0].device_kind} (float32 matmuls {torch_step.jax_precision('float32')}); {FLAGS.reps} reps "
    f"x {FLAGS.steps} steps, interleaved; AdamW {FLAGS.torch_optimizer}; scan {FLAGS.scan}"
  )
  print(
    "| model | img | batch | dtype | mode | ours ms/step median (min) | PyTorch ms/step median (min) "
    "| speedup torch/ours | ours img/s | PyTorch img/s | GFLOP/img | ours TFLOP/s (MFU) | PyTorch TFLOP/s (MFU) |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  checks: list[str] = []
  for entry in FLAGS.models:
    variant, size, batch = jax_step.parse_model(entry)
    torch_compare.compare(
      variant,
      size,
      batch,
      modes=FLAGS.modes,
      dtypes=FLAGS.dtypes,
      device=device,
      scan=FLAGS.scan,
      remat=FLAGS.remat[0],
      tf32=FLAGS.tf32,
      steps=FLAGS.steps,
      reps=FLAGS.reps,
      warmup=FLAGS.warmup,
      native_scratch=FLAGS.native_scratch,
      record=lambda r: _print_record(r, checks),
      quiet_wait=FLAGS.quiet_wait,
      optimizer=FLAGS.torch_optimizer,
      attention=FLAGS.attention[0],
      peak_override=FLAGS.peak_tflops,
    )
  for line in checks:
    print("first-step losses,", line)


if __name__ == "__main__":
  app.run(main)
