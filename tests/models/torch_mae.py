"""MAE's PyTorch model (facebookresearch/mae models_mae.py: its parameters and `initialize_weights`), built
from the installed timm's PatchEmbed and Block, for comparing our init and weight-decay set against it.

MAE's own file imports timm 0.3's Block(qk_scale=...), which today's timm lacks; the parameters (one
fused qkv Linear per block, requires_grad=False position tables) and the init are as in MAE's file.
"""

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
  """MAE's util/pos_embed.py, in torch (float64, as its numpy's np.float)."""
  omega = torch.arange(embed_dim // 2, dtype=torch.float64)
  omega /= embed_dim / 2.0
  omega = 1.0 / 10000**omega
  out = torch.einsum("m,d->md", pos.reshape(-1).double(), omega)
  return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
  """MAE's util/pos_embed.py, in torch: meshgrid with w first (xy), half the channels each."""
  grid_h = torch.arange(grid_size, dtype=torch.float32)
  grid_w = torch.arange(grid_size, dtype=torch.float32)
  grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0)
  grid = grid.reshape([2, 1, grid_size, grid_size])
  emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
  emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  pos_embed = torch.cat([emb_h, emb_w], dim=1)
  if cls_token:
    pos_embed = torch.cat([torch.zeros([1, embed_dim], dtype=torch.float64), pos_embed], dim=0)
  return pos_embed


class MaskedAutoencoderViT(nn.Module):
  """MAE's model: its parameters and init (the forward pass is not needed here)."""

  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, dec_dim, dec_depth,
               dec_heads):  # fmt: skip
    super().__init__()
    self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
    num_patches = self.patch_embed.num_patches
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
    block = lambda d, h: Block(d, h, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
    self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, dec_dim, bias=True)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
    self.decoder_pos_embed = nn.Parameter(
      torch.zeros(1, num_patches + 1, dec_dim), requires_grad=False
    )
    self.decoder_blocks = nn.ModuleList([block(dec_dim, dec_heads) for _ in range(dec_depth)])
    self.decoder_norm = nn.LayerNorm(dec_dim)
    self.decoder_pred = nn.Linear(dec_dim, patch_size**2 * 3, bias=True)
    self.initialize_weights()

  def initialize_weights(self):
    grid = int(self.patch_embed.num_patches**0.5)
    self.pos_embed.data.copy_(
      get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, True).float().unsqueeze(0)
    )
    self.decoder_pos_embed.data.copy_(
      get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, True).float().unsqueeze(0)
    )
    w = self.patch_embed.proj.weight.data
    torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    torch.nn.init.normal_(self.cls_token, std=0.02)
    torch.nn.init.normal_(self.mask_token, std=0.02)
    self.apply(self._init_weights)

  def _init_weights(self, m):
    if isinstance(m, nn.Linear):
      torch.nn.init.xavier_uniform_(m.weight)
      if m.bias is not None:
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
      nn.init.constant_(m.bias, 0)
      nn.init.constant_(m.weight, 1.0)


def xavier_bound(weight: torch.Tensor) -> float:
  """torch.nn.init.xavier_uniform_'s bound for `weight` viewed as a matrix [out, in * k * k]."""
  fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(weight.reshape(weight.shape[0], -1))
  return float(np.sqrt(6.0 / (fan_in + fan_out)))
