"""The attention-transfer train step in PyTorch with timm ViTs, timed alone or side by side with ours.

  python benchmarks/torch_reference.py --models=Ti/16@224:8,S/16@224:8 --modes=none,copy,distill \
      --framework=both --steps=3 --reps=7
  python benchmarks/torch_reference.py --models=B/16@224:64 --dtypes=float32,bfloat16 --framework=both  # GPU

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
keeps the logits and obeys an override.

--framework=both builds OUR step (benchmarks/step.py's JaxStep: at_jax.train_step, jitted and compiled)
with the same shapes, the same images and labels and the same weights (converted from the timm models with
at_jax.convert), checks that the first step's losses agree, then times both in one process in interleaved
repetitions (JAX, PyTorch, JAX, ...; median and minimum over --reps of --steps steps each) and prints a
markdown table: ms/step of both and the speedup torch_ms / jax_ms (> 1: ours is faster).

On a GPU (--device=auto picks cuda when available) float32 matmuls use TF32 on both sides by default:
XLA's default precision on Ampere and later, and here torch.backends.cuda.matmul.allow_tf32 for PyTorch
(--tf32=false gives PyTorch full float32; ours stays at XLA's default). bfloat16 runs PyTorch under
torch.autocast and ours with dtype_mm=bfloat16; on a CPU autocast works where oneDNN has bf16 kernels.
On a shared host pass --quiet_wait=30 (from step.py): each repetition first waits for idle CPUs.
"""

import contextlib
import os
import statistics
import tempfile
import time
from typing import Any

import flops  # benchmarks/flops.py
import step as jax_step  # benchmarks/step.py: defines --models, --modes, --dtypes, --steps, ...
from absl import app, flags

flags.DEFINE_enum(
  "framework", "both", ["torch", "both"], "Time PyTorch alone, or ours and PyTorch side by side."
)
flags.DEFINE_string("device", "auto", "PyTorch device: auto (cuda if available), cpu or cuda.")
flags.DEFINE_enum(
  "torch_optimizer", "fused", ["fused", "foreach", "loop"], "torch.optim.AdamW implementation."
)
flags.DEFINE_bool("tf32", True, "PyTorch on CUDA: TF32 for float32 matmuls (XLA's default on GPU).")
flags.DEFINE_bool(
  "check", True, "With --framework=both: same weights and data, compare the first losses."
)
flags.DEFINE_integer(
  "torch_threads", 0, "torch.set_num_threads (0: PyTorch's default, one per core)."
)
FLAGS = flags.FLAGS

# Our variants that timm registers under a name (all at patch 16, 224 px by default; img_size overrides).
TIMM_NAMES = {
  "Ti/16": "vit_tiny_patch16_224",
  "S/16": "vit_small_patch16_224",
  "B/16": "vit_base_patch16_224",
  "L/16": "vit_large_patch16_224",
}


def _torch():
  import torch  # pylint: disable=import-outside-toplevel  # Only this script needs it.

  return torch


def build_timm_vit(variant: str, image_size: int, num_classes: int = 1000):
  """A timm ViT of our `variant` (e.g. "Ti/16", "Mu/7") with average pooling + fc_norm, random init."""
  import timm  # pylint: disable=import-outside-toplevel
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=import-outside-toplevel

  from at_jax.models import vit  # pylint: disable=import-outside-toplevel  # the variant table only

  shape = vit.decode_variant(variant)
  common = dict(img_size=image_size, num_classes=num_classes, global_pool="avg", class_token=True)
  if variant in TIMM_NAMES:
    return timm.create_model(TIMM_NAMES[variant], pretrained=False, **common)
  return VisionTransformer(
    patch_size=shape["patch_size"],
    embed_dim=shape["width"],
    depth=shape["depth"],
    num_heads=shape["num_heads"],
    mlp_ratio=shape["mlp_dim"] / shape["width"],
    qkv_bias=True,
    **common,
  )


def _exposed_attention_class():
  torch = _torch()

  class ExposedAttention(torch.nn.Module):
    """timm's Attention.forward, unfused, keeping its float32 logits (q @ k^T * scale) and taking an override.

    Shares the wrapped module's submodules, so state-dict keys stay timm's (`blocks.i.attn.qkv.weight`).
    Set `override` to teacher logits [B, H, N, N] to make this layer attend with softmax(override) (copy);
    after a forward, `logits` holds this layer's own logits (None when overridden).
    """

    def __init__(self, attn: torch.nn.Module):
      super().__init__()
      self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
      self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
      self.norm, self.proj = attn.norm, attn.proj
      self.override = None
      self.logits = None

    def forward(self, x, attn_mask=None, is_causal=False):
      del attn_mask, is_causal  # a ViT passes neither
      b, n, _ = x.shape
      q, k, v = (
        self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
      )
      if self.override is None:
        q, k = self.q_norm(q), self.k_norm(k)
        # float32 maps (as the paper's code): under autocast the matmul runs in bf16, the map is upcast.
        self.logits = (q @ k.transpose(-2, -1)).float() * self.scale
        probs = self.logits.softmax(dim=-1)
      else:
        self.logits = None
        probs = self.override.softmax(dim=-1)
      y = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
      return self.proj(self.norm(y))

  return ExposedAttention


def expose_attention(model) -> list:
  """Swaps every block's timm Attention for an ExposedAttention; returns them in layer order."""
  cls = _exposed_attention_class()
  for blk in model.blocks:
    blk.attn = cls(blk.attn)
  return [blk.attn for blk in model.blocks]


def attention_ce(teacher_logits, student_logits):
  """Per-query cross-entropy over keys, -sum_j softmax(t)_j log_softmax(s)_j, in float32."""
  return -(teacher_logits.float().softmax(-1) * student_logits.float().log_softmax(-1)).sum(-1)


class TorchStep:
  """The dual-model train step in PyTorch (see the module docstring), with its models, optimizer and batch.

  Args:
    variant, image_size, batch, mode, dtype: as for JaxStep; dtype "bfloat16" runs under torch.autocast.
    device: a torch device string.
    images: [B, H, W, C] float32 numpy and `labels` [B] int (default: random, seed 0), as JaxStep's.
  """

  def __init__(
    self,
    variant: str,
    image_size: int,
    batch: int,
    mode: str,
    dtype: str,
    device: str,
    images: Any = None,
    labels: Any = None,
    optimizer: str = "fused",
    seed: int = 0,
  ):
    import numpy as np  # pylint: disable=import-outside-toplevel

    torch = _torch()
    self.torch, self.mode, self.device, self.batch = torch, mode, device, batch
    torch.manual_seed(seed)
    self.student = build_timm_vit(variant, image_size).to(device).train()
    self.s_attn = expose_attention(self.student)
    self.teacher, self.t_attn = None, []
    if mode != "none":
      self.teacher = build_timm_vit(variant, image_size).to(device).eval().requires_grad_(False)
      self.t_attn = expose_attention(self.teacher)
    self.autocast = (
      torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
      if dtype == "bfloat16"
      else contextlib.nullcontext()
    )
    # Weight decay on weight matrices only (ours: on kernels; no biases, norms, pos_embed, cls_token).
    decay = [p for n, p in self.student.named_parameters() if n.endswith(".weight") and p.ndim >= 2]
    no_decay = [
      p for n, p in self.student.named_parameters() if not (n.endswith(".weight") and p.ndim >= 2)
    ]
    impl = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}[
      optimizer
    ]
    self.opt = torch.optim.AdamW(
      [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
      lr=1e-4 * batch / 256,
      betas=(0.9, 0.95),
      eps=1e-8,
      **impl,
    )
    self.params = list(self.student.parameters())
    self.ema = [p.detach().clone() for p in self.params]
    if images is None:
      rng = np.random.default_rng(seed)
      images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
      labels = rng.integers(0, 1000, batch).astype(np.int32)
    self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
    self.times: list[float] = []

  def losses(self):
    """(loss, ce, distill) of the current params on the batch, with the autograd graph."""
    torch, f = self.torch, self.torch.nn.functional
    with self.autocast:
      targets = None
      if self.teacher is not None:
        with torch.no_grad():
          self.teacher.forward_features(self.images)  # the head is not needed
        targets = [a.logits for a in self.t_attn]
        if self.mode == "copy":
          for a, t in zip(self.s_attn, targets):
            a.override = t
      logits = self.student(self.images)
      ce = f.cross_entropy(logits.float(), self.labels, label_smoothing=0.1)
      distill = torch.zeros((), device=self.device)
      if self.mode == "distill":
        distill = 3.0 * sum(attention_ce(t, a.logits).mean() for a, t in zip(self.s_attn, targets))
    return ce + distill, ce, distill

  def step(self) -> None:
    torch = self.torch
    loss, _, _ = self.losses()
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1 - 0.9999)  # pylint: disable=protected-access
    for a in self.s_attn + self.t_attn:  # drop the maps now rather than at the next step
      a.override = a.logits = None

  def run(self, steps: int) -> float:
    """Runs `steps` steps; returns seconds per step."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.step()
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps

  def our_params(self) -> tuple[Any, Any]:
    """(student, teacher) params in at_jax's layout, converted by at_jax.convert (as a real teacher is)."""
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel

    from at_jax.convert import load as convert

    out = []
    for model in (self.student, self.teacher):
      if model is None:
        out.append(None)
        continue
      with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vit.safetensors")
        save_file(
          {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, path
        )
        _, params = convert.load_checkpoint(path, num_heads=model.blocks[0].attn.num_heads)
      out.append(params)
    return out[0], out[1]

  def close(self) -> None:
    del self.student, self.teacher, self.opt, self.params, self.ema
    if self.device.startswith("cuda"):
      self.torch.cuda.empty_cache()


def _median_min(times: list[float]) -> tuple[float, float]:
  return 1000 * statistics.median(times), 1000 * min(times)


def main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never wait on a model hub
  # Both frameworks share the GPU: JAX must not grab 75% of its memory up front (JAX is imported later).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  torch = _torch()
  device = (
    FLAGS.device if FLAGS.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
  )
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  if device.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = FLAGS.tf32
  kind = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
  both = FLAGS.framework == "both"
  header = f"torch {torch.__version__} on {device} ({kind}, {torch.get_num_threads()} threads)"
  if both:
    import jax  # pylint: disable=import-outside-toplevel

    header += f"; jax {jax.__version__} on {jax.devices()[0].device_kind}"
    kind = jax.devices()[0].device_kind if kind == "cpu" else kind
  print(
    f"{header}; {FLAGS.reps} reps x {FLAGS.steps} steps, interleaved; AdamW {FLAGS.torch_optimizer}"
  )
  print(
    "| model | img | batch | dtype | mode | ours ms/step median (min) | PyTorch ms/step median (min) "
    "| speedup torch/ours | ours img/s | PyTorch img/s | GFLOP/img | ours TFLOP/s (MFU) | PyTorch TFLOP/s (MFU) |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  checks = []
  for entry in FLAGS.models:
    variant, size, batch = jax_step.parse_model(entry)
    for dtype in FLAGS.dtypes:
      peak = flops.peak_tflops(kind, dtype, FLAGS.peak_tflops)
      for mode in FLAGS.modes:
        ts = TorchStep(variant, size, batch, mode, dtype, device, optimizer=FLAGS.torch_optimizer)
        js = None
        if both:
          images = ts.images.permute(0, 2, 3, 1).cpu().numpy()
          labels = ts.labels.cpu().numpy().astype("int32")
          params, teacher_params = ts.our_params() if FLAGS.check else (None, None)
          js = jax_step.JaxStep(
            variant,
            size,
            batch,
            mode,
            dtype,
            FLAGS.remat[0],
            FLAGS.scan,
            images,
            labels,
            params,
            teacher_params,
          )
          if FLAGS.check:
            with torch.no_grad():
              _, ce, distill = ts.losses()
            for a in ts.s_attn + ts.t_attn:
              a.override = a.logits = None
            js.run(1)
            m = js.first_metrics
            checks.append(
              f"{variant}@{size} {dtype} {mode}: ce ours {float(m['ce_loss']):.5f} torch "
              f"{float(ce):.5f}; distill ours {float(m['distill_loss']):.5f} torch {float(distill):.5f}"
            )
          js.run(FLAGS.warmup)
        ts.run(FLAGS.warmup)
        for _ in range(FLAGS.reps):
          if js is not None:
            jax_step.wait_for_quiet(FLAGS.quiet_wait)
            js.times.append(js.run(FLAGS.steps))
          jax_step.wait_for_quiet(FLAGS.quiet_wait)
          ts.times.append(ts.run(FLAGS.steps))
        f = flops.train_step_flops(**_shape(variant, size), mode=mode)["total"]
        t_med, t_min = _median_min(ts.times)

        def mfu(ms: float) -> str:
          achieved = batch * f / (ms / 1000) / 1e12
          return f"{achieved:.3f}" + (f" ({100 * achieved / peak:.1f}%)" if peak else "")

        if js is not None:
          j_med, j_min = _median_min(js.times)
          ours = (
            f"{j_med:.1f} ({j_min:.1f})",
            f"{t_med / j_med:.2f}x",
            f"{batch / j_med * 1000:.1f}",
            mfu(j_med),
          )
          js.close()
        else:
          ours = ("-", "-", "-", "-")
        print(
          f"| {variant} | {size} | {batch} | {dtype} | {mode} | {ours[0]} | {t_med:.1f} ({t_min:.1f}) | "
          f"{ours[1]} | {ours[2]} | {batch / t_med * 1000:.1f} | {f / 1e9:.2f} | {ours[3]} | {mfu(t_med)} |",
          flush=True,
        )
        ts.close()
  for line in checks:
    print("first-step losses,", line)


def _shape(variant: str, image_size: int) -> dict[str, int]:
  from at_jax.models import vit  # pylint: disable=import-outside-toplevel

  s = vit.decode_variant(variant)
  return dict(
    width=s["width"],
    depth=s["depth"],
    mlp_dim=s["mlp_dim"],
    patch=s["patch_size"],
    num_patches=(image_size // s["patch_size"]) ** 2,
  )


if __name__ == "__main__":
  app.run(main)
