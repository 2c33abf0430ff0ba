"""Supervised ViT-B/16 from scratch on ImageNet-1K.

  python launch/main.py --config=configs/scratch_vitb.py --workdir=$WORKDIR \
      --config.data.dir=/path/to/tensorflow_datasets

MAE paper's from-scratch ViT-B: 82.3 top-1 (300 epochs there). Here: the distillation recipe without the
teacher, as scratch_vitl (200 epochs, 20 warmup, base lr 1e-4, (0.9, 0.95), wd 0.3, drop path 0.2).
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  return common.finalize(
    common.imagenet(
      variant="B/16",
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
