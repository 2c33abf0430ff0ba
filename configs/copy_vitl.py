"""Attention copy, ViT-L/16 student using an MAE ViT-L/16 teacher's maps on ImageNet-1K.

  python launch/main.py --config=configs/copy_vitl.py --workdir=$WORKDIR \
      --config.teacher.init=/path/to/mae_vitl_params --config.data.dir=/path/to/tensorflow_datasets

Paper: 85.1 top-1 (77.8% of the scratch -> fine-tune gap). Recipe: 100 epochs, 5 warmup, base lr 1e-3
per 256 (batch 2048), AdamW (0.9, 0.999), wd 0.05, layer decay 0.75, drop path 0, EMA 0.9999. All 24 layers
are copied (the paper's intent; the reference code's constructor default end_layer=-3 copies 21).
The teacher runs at evaluation too.
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  return common.finalize(
    common.imagenet(
      mode="copy",
      epochs=100,
      warmup_epochs=5,
      base_lr=1e-3,
      b2=0.999,
      weight_decay=0.05,
      layer_decay=0.75,
      drop_path=0.0,
      layers="all",
    )
  )
