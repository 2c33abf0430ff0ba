"""The models of benchmarks/torch_reference.py's PyTorch side: timm ViTs of our variants (average pooling +
fc_norm), `ExposedAttention` (timm's Attention.forward, unfused, keeping its logits and obeying an
override), the attention cross-entropy of the distillation loss, and one size's seeded weights made once
for both frameworks (timm state dicts, and the same converted by at_jax.convert into our layout). torch
and timm are imported only when called."""

import dataclasses
import os
from typing import Any

# Set before JAX and timm are first imported (they are imported lazily): timm must never wait on a model
# hub, and both frameworks share the GPU, so JAX must not grab 75% of its memory up front.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


# Our variants that timm registers under a name (all at patch 16, 224 px by default; img_size overrides).
TIMM_NAMES = {
  "Ti/16": "vit_tiny_patch16_224",
  "S/16": "vit_small_patch16_224",
  "B/16": "vit_base_patch16_224",
  "L/16": "vit_large_patch16_224",
}


def import_torch():
  import torch  # pylint: disable=import-outside-toplevel  # Only the PyTorch side needs it.

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
  torch = import_torch()

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
  torch = import_torch()
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
