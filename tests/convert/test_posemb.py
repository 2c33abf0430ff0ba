"""at_jax.convert.posemb: position tables resampled to another image size exactly as timm resamples them."""

import numpy as np
import pytest
from timm.layers import resample_abs_pos_embed
from timm.models import vision_transformer as timm_vit

from at_jax.convert.load import load_checkpoint
from at_jax.errors import ConfigError
from at_jax.models import vit


@pytest.mark.parametrize(
  "kwargs,num_prefix",
  [
    (dict(), 1),  # cls slot
    (dict(reg_tokens=2), 3),  # cls + register slots
    (dict(reg_tokens=4, no_embed_class=True), 0),  # patches only
  ],
  ids=["cls", "cls_registers", "no_embed_class"],
)
def test_resample_posemb_matches_timm(
  kwargs, num_prefix, tmp_path, make_vit, state_dict_of, save_checkpoint
):
  model = make_vit(embed_dim=128, num_heads=2, num_classes=0, **kwargs)  # 32 px, patch 8: 4x4 grid
  path = save_checkpoint(state_dict_of(model), str(tmp_path / "vit32.pth"))

  config, params = load_checkpoint(path, num_heads=2, image_size=48, resample_posemb=True)

  want = resample_abs_pos_embed(
    model.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=num_prefix
  )
  assert params["pos_embedding"].shape == tuple(want.shape)
  np.testing.assert_allclose(params["pos_embedding"], want.numpy(), atol=1e-5)
  np.testing.assert_array_equal(
    params["pos_embedding"][:, :num_prefix], model.pos_embed[:, :num_prefix].detach()
  )
  assert vit.build(config).tokens_for(48) == 36 + config["num_registers"] + 1

  with pytest.raises(ConfigError, match=r"4x4 patch grid.*resample_posemb=True.*--resample") as e:
    load_checkpoint(path, num_heads=2, image_size=48)
  assert e.value.field == path
  _, same = load_checkpoint(path, num_heads=2, image_size=32)  # Same grid: nothing to resample.
  np.testing.assert_array_equal(same["pos_embedding"], model.pos_embed.detach().numpy())


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_518_resampled_to_224_matches_timm(
  registers, tmp_path, make_vit, make_images, assert_same, state_dict_of, save_checkpoint
):
  kwargs = dict(
    img_size=518,
    patch_size=14,
    embed_dim=128,
    num_heads=2,
    num_classes=0,
    init_values=1e-5,
    reg_tokens=registers,
    no_embed_class=bool(registers),
  )
  native = make_vit(**kwargs)
  path = save_checkpoint(state_dict_of(native), str(tmp_path / "dinov2.pth"))

  config, params = load_checkpoint(path, num_heads=2)  # The checkpoint's own size: 37x37 patches.
  assert params["pos_embedding"].shape == (1, 37 * 37 + (0 if registers else 1), 128)
  with pytest.raises(ConfigError, match="resample"):
    load_checkpoint(path, num_heads=2, image_size=224)

  config, params = load_checkpoint(path, num_heads=2, image_size=224, resample_posemb=True)

  # The native model's architecture at 224 px, with timm's own resampling of its weights.
  model = timm_vit.VisionTransformer(
    **{**kwargs, "depth": len(native.blocks), "img_size": 224}
  ).eval()
  model.load_state_dict(timm_vit.checkpoint_filter_fn(state_dict_of(native), model))
  assert_same(config, params, model, make_images(2, 224))
