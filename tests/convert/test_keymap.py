"""at_jax.convert.keymap: what is not a ViT, what our ViT cannot express, and which keys or shapes do not
match, is named in the error."""

import pytest
import timm
import torch
from timm.models import beit as timm_beit

from at_jax.convert.load import load_checkpoint
from at_jax.errors import ConfigError


def test_resnet_is_not_a_vit(write_state_dict):
  path = write_state_dict(timm.create_model("resnet18", pretrained=False).state_dict())
  with pytest.raises(
    ConfigError, match=r"not a ViT checkpoint: no 'patch_embed.proj.weight'.*conv1\.weight"
  ) as e:
    load_checkpoint(path)
  assert e.value.field == path


def test_beit_relative_position_bias_is_unsupported(write_state_dict):
  beit = timm_beit.Beit(
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=1,
    num_heads=2,
    use_abs_pos_emb=False,
    use_rel_pos_bias=True,
    init_values=0.1,
  )
  path = write_state_dict(beit.state_dict())
  with pytest.raises(
    ConfigError,
    match=r"unsupported architecture: relative position bias.*"
    r"blocks\.0\.attn\.relative_position_bias_table",
  ) as e:
    load_checkpoint(path)
  assert e.value.field == path


@pytest.mark.parametrize(
  "edit,pattern",
  [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing keys blocks\.1\.mlp\.fc2\.bias"),
    (
      lambda sd: sd.update({"blocks.0.attn.extra.weight": torch.zeros(3)}),
      r"unknown keys blocks\.0\.attn\.extra\.weight",
    ),
    (
      lambda sd: sd.update({"blocks.1.mlp.fc1.bias": torch.zeros(7)}),
      r"blocks\.1\.mlp\.fc1\.bias has shape \(7,\), expected \(512,\)",
    ),
    (
      # fc1 neither as wide as fc2's input (plain MLP) nor twice as wide (SwiGLU, [gate | value]).
      lambda sd: sd.update(
        {
          "blocks.0.mlp.fc1.weight": torch.zeros(300, 128),
          "blocks.0.mlp.fc1.bias": torch.zeros(300),
        }
      ),
      r"blocks\.0\.mlp\.fc1\.weight has 300 output features and blocks\.0\.mlp\.fc2\.weight 512 "
      r"input features; expected as many \(plain MLP\) or twice as many \(SwiGLU\)",
    ),
    (lambda sd: sd.update({"pos_embed": torch.zeros(1, 15, 128)}), r"pos_embed has 15 positions"),
    (
      lambda sd: sd.update({"fc_norm.weight": torch.ones(128), "fc_norm.bias": torch.zeros(128)}),
      r"exactly one final LayerNorm.*found both",
    ),
  ],
  ids=["missing", "unknown", "shape", "mlp_width", "positions", "two_norms"],
)
def test_key_problems_are_named(edit, pattern, make_vit, state_dict_of, write_state_dict):
  sd = state_dict_of(make_vit(embed_dim=128, num_heads=2, num_classes=10))
  edit(sd)
  path = write_state_dict(sd)
  with pytest.raises(ConfigError, match=pattern) as e:
    load_checkpoint(path, num_heads=2)
  assert e.value.field == path
