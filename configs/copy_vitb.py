"""Attention copy, ViT-B/16 student using an MAE ViT-B/16 teacher's maps on ImageNet-1K.

  python launch/main.py --config=configs/copy_vitb.py --workdir=$WORKDIR \
      --config.teacher.init=/path/to/mae_pretrain_vit_base.pth --config.data.dir=/path/to/tensorflow_datasets

Recipe: the ViT-L copy recipe (100 epochs, 5 warmup, base lr 1e-3, (0.9, 0.999), wd 0.05, layer decay
0.75, drop path 0), all 12 layers copied. ViT-B numbers of the paper are not verified here.
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  return common.finalize(
    common.imagenet(
      variant="B/16",
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
