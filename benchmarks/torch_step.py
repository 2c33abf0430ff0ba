"""The PyTorch train step of benchmarks/torch_reference.py (`TorchStep`: the paper's dual-model step
written plainly, on benchmarks/torch_models.py's timm ViTs), and the float32 matmul precision each side
runs at (PyTorch's as set, ours as XLA's default gives it)."""

import contextlib
import time
from typing import Any

import torch_models  # benchmarks/torch_models.py


def set_torch_precision(device: str, tf32: bool) -> str:
  """Sets PyTorch's float32 matmul and conv precision on CUDA; returns it: "tf32" or "ieee"."""
  if not device.startswith("cuda"):
    return "ieee"  # CPU float32 matmuls are full precision (oneDNN's default)
  torch = torch_models.import_torch()
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


class TorchStep:
  """The dual-model train step in PyTorch (see torch_reference.py's docstring), with its models, optimizer and batch.

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
    weights: torch_models.Weights,
    images: Any,
    labels: Any,
    optimizer: str = "fused",
    attention: str = "exposed",
  ):
    import numpy as np  # pylint: disable=import-outside-toplevel

    if attention == "native" and mode != "none":
      raise ValueError(f"native timm attention keeps no maps: scratch only, not mode {mode!r}")
    torch = torch_models.import_torch()
    self.torch, self.mode, self.device = torch, mode, device
    self.student = self._model(variant, image_size, weights.student_torch).train()
    if attention == "native":
      for blk in self.student.blocks:
        blk.attn.fused_attn = True
      self.s_attn = []
    else:
      self.s_attn = torch_models.expose_attention(self.student)
    self.teacher, self.t_attn = None, []
    if mode != "none":
      self.teacher = self._model(variant, image_size, weights.teacher_torch)
      self.teacher.eval().requires_grad_(False)
      self.t_attn = torch_models.expose_attention(self.teacher)
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
      model = torch_models.build_timm_vit(variant, image_size)
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
        distill = 3.0 * sum(
          torch_models.attention_ce(t, a.logits).mean() for a, t in zip(self.s_attn, targets)
        )
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
