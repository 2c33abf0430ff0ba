"""at_jax.convert.load: the arguments that fix a conversion are named in its errors, and a timm file
works as a run's teacher.init."""

import pytest
import safetensors.torch as safetensors_torch
import torch
from timm.models import vision_transformer as timm_vit

from at_jax.convert.load import load_checkpoint
from at_jax.errors import ConfigError


def test_arguments_to_fix(make_vit, state_dict_of, write_state_dict):
  path = write_state_dict(state_dict_of(make_vit(embed_dim=128, num_heads=2, num_classes=10)))
  with pytest.raises(ConfigError, match="width 128 is not a known ViT size.*--num_heads") as e:
    load_checkpoint(path)
  assert e.value.field == "num_heads"
  with pytest.raises(ConfigError, match="not a positive multiple of the patch size 8") as e:
    load_checkpoint(path, num_heads=2, image_size=36)
  assert e.value.field == "image_size"
  with pytest.raises(ConfigError, match="unknown family") as e:
    load_checkpoint(path, num_heads=2, family="resnet")
  assert e.value.field == "family"
  clip = write_state_dict(
    state_dict_of(make_vit(embed_dim=128, num_heads=2, pre_norm=True)), "clip.pth"
  )
  with pytest.raises(ConfigError, match="family='clip'") as e:
    load_checkpoint(clip, num_heads=2)
  assert e.value.field == "family"


@pytest.mark.slow
def test_timm_file_as_teacher_init_in_a_distill_run(tmp_path, tiny_config):
  """config.teacher.init may name a timm checkpoint file: converted on the fly, mirrored by the student."""
  from at_jax.experiment import loop, runs

  torch.manual_seed(0)
  model = timm_vit.VisionTransformer(
    img_size=28,
    patch_size=7,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
    num_classes=0,
    global_pool="token",
    reg_tokens=1,
    no_embed_class=True,
    init_values=0.1,
  )
  path = str(tmp_path / "teacher.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  c = tiny_config(steps=2, mode="distill")
  c.teacher.init = path
  c.model.arch = "teacher"
  with pytest.raises(
    ConfigError, match="width 32 is not a known ViT size"
  ) as e:  # no standard size
    runs.setup(c, str(tmp_path / "student"))
  # Named as the config field that fixes it, not as the converter's command-line flag.
  assert e.value.field == "teacher.num_heads" and "--num_heads" not in e.value.message
  assert e.value.line().startswith("teacher.num_heads (--config.teacher.num_heads): ")
  c.teacher.num_heads = 2
  run = runs.setup(c, str(tmp_path / "student"))
  assert (run.model.num_registers, run.model.posemb_prefix, run.model.layerscale_init > 0) == (
    1,
    False,
    True,
  )
  assert 0 <= loop.train_and_evaluate(c, str(tmp_path / "student"))["top1"] <= 100
