"""at_jax.convert.big_vision: big_vision / vision_transformer .npz files, in every layout, compute what
timm computes from the same file (timm's own reader, `_load_weights`)."""

import numpy as np
import pytest
from timm.models import vision_transformer as timm_vit

from at_jax.convert.load import load_checkpoint


@pytest.mark.parametrize("layout", ["big_vision", "big_vision_scan", "vit_legacy"])
def test_big_vision_npz_matches_timms_own_loader(
  layout, tmp_path, make_vit, make_images, assert_same, big_vision_npz
):
  # big_vision's table covers the patches only (timm's no_embed_class); the original ViT's the cls slot.
  kwargs = dict(
    embed_dim=128,
    num_heads=2,
    num_classes=10,
    act_layer="gelu_tanh",
    no_embed_class=layout != "vit_legacy",
  )
  source = make_vit(**kwargs)
  path = str(tmp_path / f"{layout}.npz")
  np.savez(path, **big_vision_npz(source, layout))
  model = make_vit(seed=1, **kwargs)
  timm_vit._load_weights(model, path)  # timm's own, independent reading of the same file.
  for key, value in source.state_dict().items():  # The writer is right (else timm disagrees).
    np.testing.assert_array_equal(model.state_dict()[key].numpy(), value.numpy(), err_msg=key)

  config, params = load_checkpoint(path)

  assert config["mlp_act"] == "gelu_tanh" and config["num_heads"] == 2
  assert config["posemb_prefix"] == (layout == "vit_legacy")
  assert_same(config, params, model, make_images(2, 32))
