"""Supervised ViT-L/16 from scratch on ImageNet-1K: the baseline attention transfer is measured against.

  python launch/main.py --config=configs/scratch_vitl.py --workdir=$WORKDIR \
      --config.data.dir=/path/to/tensorflow_datasets

Paper: 83.0 top-1. The reference repository gives no scratch command; we use the distillation recipe
without the teacher (MAE's from-scratch ViT-L recipe, at batch 2048 where MAE used 4096): 200 epochs, 20 warmup, base lr 1e-4, (0.9, 0.95),
wd 0.3, drop path 0.2, EMA 0.9999.
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  return common.finalize(
    common.imagenet(
      mode="none",
      epochs=200,
      warmup_epochs=20,
      base_lr=1e-4,
      b2=0.95,
      weight_decay=0.3,
      layer_decay=1.0,
      drop_path=0.2,
    )
  )
