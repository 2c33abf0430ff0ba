"""Attention distillation, ViT-B/16 student from an MAE ViT-B/16 teacher on ImageNet-1K.

  python launch/main.py --config=configs/distill_vitb.py --workdir=$WORKDIR \
      --config.teacher.init=/path/to/mae_pretrain_vit_base.pth --config.data.dir=/path/to/tensorflow_datasets

The paper reports ViT-B in its model-scale table (numbers not verified here; MAE's own ViT-B: fine-tune
83.6, scratch 82.3). Recipe: the ViT-L distillation recipe; distilled layers scaled to depth 12 as the
first 9 (end_layer -3, the same 3/4 of the depth as 18 of 24).
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  return common.finalize(
    common.imagenet(
      variant="B/16",
      mode="distill",
      epochs=200,
      warmup_epochs=20,
      base_lr=1e-4,
      b2=0.95,
      weight_decay=0.3,
      layer_decay=1.0,
      drop_path=0.2,
      layers="end_layer:-3",
    )
  )
