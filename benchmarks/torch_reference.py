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

`compare` (the library entry point; benchmarks/gpu_bench.py calls it) makes one size's weights once
(seeded timm models, converted in memory by at_jax.convert, stacked into the scan layout with --scan) and
reuses them for every dtype x mode row. Per row it builds OUR step (benchmarks/step.py's JaxStep:
at_jax.training.classify, jitted and compiled) and the PyTorch step on the same weights, images and labels,
records the first step's losses of both at once, then times them in interleaved repetitions (ours,
PyTorch, ...; median and minimum over `reps` of `steps` steps each) and records the row: ms/step of both,
the speedup torch_ms / ours_ms (> 1: ours is faster), FLOP/s and MFU. `main` prints them as a markdown
table.

Precision: on a GPU, float32 matmuls of ours run at XLA's default, TF32 on Ampere and later; PyTorch's
follow --tf32 (default on, to match; off gives full float32, whose MFU counts against the far lower fp32
peak). Each row records the precision of both sides. bfloat16 runs PyTorch under torch.autocast and ours
with dtype_mm=bfloat16; on a CPU autocast works where oneDNN has bf16 kernels. On a shared host pass
--quiet_wait=30 (from step.py): each repetition first waits for idle CPUs.
"""

import contextlib
import dataclasses
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import flops  # benchmarks/flops.py
import quiet  # benchmarks/quiet.py
import step as jax_step  # benchmarks/step.py: defines --models, --modes, --dtypes, --steps, ...
from absl import app, flags

# Set before JAX and timm are first imported (they are imported lazily): timm must never wait on a model
# hub, and both frameworks share the GPU, so JAX must not grab 75% of its memory up front.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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


def set_torch_precision(device: str, tf32: bool) -> str:
  """Sets PyTorch's float32 matmul and conv precision on CUDA; returns it: "tf32" or "ieee"."""
  if not device.startswith("cuda"):
    return "ieee"  # CPU float32 matmuls are full precision (oneDNN's default)
  torch = _torch()
  precision = "tf32" if tf32 else "ieee"
  matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
  if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):  # torch >= 2.9
    matmul.fp32_precision = precision
    cudnn.conv.fp32_precision = precision
  else:  # Older torch has only the legacy flags (newer torch deprecates them, and mixing the two APIs).
    matmul.allow_tf32 = cudnn.allow_tf32 = tf32
  return precision


def jax_precision(dtype: str) -> str:
  """The precision our float32 matmuls get: XLA's default is TF32 on NVIDIA GPUs, one bf16 pass on TPU."""
  import jax  # pylint: disable=import-outside-toplevel

  if dtype == "bfloat16":
    return "bf16"
  platform = jax.devices()[0].platform
  setting = str(jax.config.jax_default_matmul_precision or "default")
  if platform == "cpu" or setting in ("highest", "float32"):
    return "ieee"
  if setting == "default":
    return {"gpu": "tf32", "tpu": "bf16_1pass"}.get(platform, setting)
  return setting


@dataclasses.dataclass
class Weights:
  """One (variant, image size)'s seeded weights, made once and loaded afresh into every row's steps.

  Attributes:
    student_torch, teacher_torch: timm state dicts of float32 CPU tensors (teacher: None when unneeded).
    student_ours, teacher_ours: the same converted by at_jax.convert into float32 numpy params in our
      layout (scan layout when made with scan).
  """

  student_torch: dict[str, Any]
  teacher_torch: dict[str, Any] | None
  student_ours: Any
  teacher_ours: Any


def to_ours(state: dict[str, Any], num_heads: int, scan: bool) -> Any:
  """A timm state dict converted in memory by at_jax.convert (as a real teacher's file is)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from at_jax.convert import timm as timm_convert  # pylint: disable=import-outside-toplevel
  from at_jax.models import vit  # pylint: disable=import-outside-toplevel

  flat = {k: v.numpy() for k, v in state.items()}
  _, params = timm_convert.from_timm(flat, "timm state dict (in memory)", num_heads)
  if scan:
    # Kept as numpy: JaxStep puts params and EMA separately to get two buffers (the state is donated),
    # and a put of a device array already in place may return that same array. (Not stacked under
    # jax.default_device(cpu): with JAX_PLATFORMS=cuda there is no CPU backend.)
    params = jax.tree.map(np.asarray, vit.loop_to_scan(params))
  return params


def make_weights(
  variant: str, image_size: int, *, teacher: bool, scan: bool, seed: int = 0, device: str = "cpu"
) -> Weights:
  """Seeded timm student (and teacher) of `variant`, initialised on `device`, kept on the CPU, converted."""
  torch = _torch()
  from at_jax.models import vit  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  states = []
  for _ in range(2 if teacher else 1):
    # On a GPU its init takes a second where the CPU's takes tens for two ViT-Ls.
    with torch.device(device):
      model = build_timm_vit(variant, image_size)
    states.append({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()})
    del model
  heads = vit.decode_variant(variant)["num_heads"]
  ours = [to_ours(s, heads, scan) for s in states]
  if not teacher:
    states.append(None)
    ours.append(None)
  return Weights(states[0], states[1], ours[0], ours[1])


class TorchStep:
  """The dual-model train step in PyTorch (see the module docstring), with its models, optimizer and batch.

  Args:
    variant, image_size, mode, dtype: as for JaxStep; dtype "bfloat16" runs under torch.autocast.
    device: a torch device string.
    weights: the models' weights, copied into fresh modules (the teacher's only when mode != "none").
    images: [B, H, W, C] float32 numpy and `labels` [B] int, as JaxStep's.
    optimizer: "fused", "foreach" or "loop" (torch.optim.AdamW's implementations).
    attention: "exposed" (ExposedAttention, unfused: any mode) or "native" (timm's Attention with fused
      scaled_dot_product_attention: scratch only, as it keeps no maps).
  """

  def __init__(
    self,
    variant: str,
    image_size: int,
    mode: str,
    dtype: str,
    device: str,
    weights: Weights,
    images: Any,
    labels: Any,
    optimizer: str = "fused",
    attention: str = "exposed",
  ):
    import numpy as np  # pylint: disable=import-outside-toplevel

    if attention == "native" and mode != "none":
      raise ValueError(f"native timm attention keeps no maps: scratch only, not mode {mode!r}")
    torch = _torch()
    self.torch, self.mode, self.device = torch, mode, device
    self.student = self._model(variant, image_size, weights.student_torch).train()
    if attention == "native":
      for blk in self.student.blocks:
        blk.attn.fused_attn = True
      self.s_attn = []
    else:
      self.s_attn = expose_attention(self.student)
    self.teacher, self.t_attn = None, []
    if mode != "none":
      self.teacher = self._model(variant, image_size, weights.teacher_torch)
      self.teacher.eval().requires_grad_(False)
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
      lr=1e-4 * len(images) / 256,
      betas=(0.9, 0.95),
      eps=1e-8,
      **impl,
    )
    self.params = list(self.student.parameters())
    self.ema = [p.detach().clone() for p in self.params]
    self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
    self.times: list[float] = []  # seconds per step, one entry per timed repetition

  def _model(self, variant: str, image_size: int, state: dict[str, Any]):
    # Built on the device (its throwaway random init is fast there), then the shared weights copied in:
    # load_state_dict copies, so training never changes `state`, which later rows reuse.
    with self.torch.device(self.device):
      model = build_timm_vit(variant, image_size)
    model.load_state_dict(state)
    return model

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

  def first_losses(self) -> dict[str, float]:
    """{"ce", "distill"} of the current params, without a step."""
    with self.torch.no_grad():
      _, ce, distill = self.losses()
    self._drop_maps()
    return {"ce": float(ce), "distill": float(distill)}

  def _drop_maps(self) -> None:
    for a in self.s_attn + self.t_attn:
      a.override = a.logits = None

  def step(self) -> None:
    torch = self.torch
    loss, _, _ = self.losses()
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1 - 0.9999)  # pylint: disable=protected-access
    self._drop_maps()  # now rather than at the next step

  def run(self, steps: int) -> float:
    """Runs `steps` (>= 1) steps; returns seconds per step."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.step()
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps

  def close(self) -> None:
    del self.student, self.teacher, self.opt, self.params, self.ema, self.s_attn, self.t_attn


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
    _torch().cuda.empty_cache()


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
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  torch = _torch()
  torch_fp32 = set_torch_precision(device, tf32)
  kind = (
    torch.cuda.get_device_name(torch.device(device))
    if device.startswith("cuda")
    else jax.devices()[0].device_kind
  )
  base = dict(model=variant, image_size=image_size, batch=batch)
  t0 = time.perf_counter()
  weights = make_weights(
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
  for dtype in dtypes:
    for mode in modes:
      row = dict(base, dtype=dtype, mode=mode)
      made: list[Any] = []  # closed whatever happens, so a failed row leaves the memory free
      try:
        ts = TorchStep(variant, image_size, mode, dtype, device, weights, images, labels, optimizer)
        made.append(ts)
        native = None
        if native_scratch and mode == "none":
          native = TorchStep(
            variant, image_size, mode, dtype, device, weights, images, labels, optimizer, "native"
          )
          made.append(native)
        js = jax_step.JaxStep(
          variant,
          image_size,
          batch,
          mode,
          dtype,
          remat,
          scan,
          images,
          labels,
          weights.student_ours,
          weights.teacher_ours if mode != "none" else None,
          attention=attention,
        )
        made.append(js)
        losses = {"kind": "first_step_losses", **row, "torch": ts.first_losses()}
        if native is not None:
          losses["torch_native"] = native.first_losses()
        js.run(1)  # the first step's metrics are of the initial params, as first_losses
        m = js.first_metrics
        losses["ours"] = {"ce": float(m["ce_loss"]), "distill": float(m.get("distill_loss", 0.0))}
        record(losses)
        flop = js.flops_per_image()["total"]
        ours_prec = jax_precision(dtype)
        torch_prec = "bf16" if dtype == "bfloat16" else torch_fp32
        ours_peak = flops.peak_tflops(kind, dtype, peak_override, tf32=ours_prec == "tf32")
        torch_peak = flops.peak_tflops(kind, dtype, peak_override, tf32=torch_prec == "tf32")
        row_facts = dict(
          row,
          device_kind=kind,
          gflop_per_img=flop / 1e9,
          ours_precision=ours_prec,
          torch_precision=torch_prec,
          ours_peak_tflops=ours_peak,
          torch_peak_tflops=torch_peak,
          ours_compile_s=js.compile_s,
          scan=scan,
          remat=remat,
          attention=attention,
          steps=steps,
          reps=reps,
        )
        # The row's facts, then each repetition as it is timed: a process killed mid-row keeps both.
        record({"kind": "torch_row", **row_facts})
        timed = [(n, s) for n, s in (("ours", js), ("torch", ts), ("torch_native", native)) if s]
        _interleaved(
          [s for _, s in timed],
          steps,
          reps,
          warmup,
          quiet_wait,
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
      except Exception:  # pylint: disable=broad-except  # one failed row must not cost the others
        record({"kind": "error", **row, "error": traceback.format_exc()[-4000:]})
      finally:
        for s in made:
          s.close()
        _free(device)


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
  torch = _torch()
  device = (
    FLAGS.device if FLAGS.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
  )
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  import jax  # pylint: disable=import-outside-toplevel

  kind = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
  print(
    f"torch {torch.__version__} on {device} ({kind}, {torch.get_num_threads()} threads, float32 "
    f"matmuls {set_torch_precision(device, FLAGS.tf32)}); jax {jax.__version__} on "
    f"{jax.devices()[0].device_kind} (float32 matmuls {jax_precision('float32')}); {FLAGS.reps} reps "
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
    compare(
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
