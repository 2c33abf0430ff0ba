"""MAE fine-tuning baseline for ViT-B/16 on ImageNet-1K.

  python launch/main.py --config=configs/finetune_vitb.py --workdir=$WORKDIR \
      --config.model.init=/path/to/mae_pretrain_vit_base.pth --config.data.dir=/path/to/tensorflow_datasets

MAE paper: 83.6 top-1. Recipe: 100 epochs, 5 warmup, batch 1024, base lr 5e-4 per 256, AdamW (0.9, 0.999),
wd 0.05, layer decay 0.65, drop path 0.1, head init std 2e-5.
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.imagenet(
    variant="B/16",
    mode="none",
    epochs=100,
    warmup_epochs=5,
    base_lr=5e-4,
    b2=0.999,
    weight_decay=0.05,
    layer_decay=0.65,
    drop_path=0.1,
    batch_size=1024,
    init=common.FINETUNE_INIT,
  )
  c.model.head_init_std = 2e-5
  return common.finalize(c)
