"""MAE fine-tuning baseline: ViT-L/16 initialised from the MAE teacher's weights, trained on ImageNet-1K.

  python launch/main.py --config=configs/finetune_vitl.py --workdir=$WORKDIR \
      --config.model.init=/path/to/mae_pretrain_vit_large.pth --config.data.dir=/path/to/tensorflow_datasets

Paper: 85.7 top-1 (the MAE paper reports 85.9). MAE's fine-tuning recipe: 50 epochs, 5 warmup, batch 1024,
base lr 1e-3 per 256, AdamW (0.9, 0.999), wd 0.05, layer decay 0.75, drop path 0.2, EMA off in MAE (kept
here at 0.9999 and evaluated alongside), head init std 2e-5 (MAE) -- the head and fc_norm start fresh,
the encoder from model.init.
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.imagenet(
    variant="L/16",
    mode="none",
    epochs=50,
    warmup_epochs=5,
    base_lr=1e-3,
    b2=0.999,
    weight_decay=0.05,
    layer_decay=0.75,
    drop_path=0.2,
    batch_size=1024,
    init=common.FINETUNE_INIT,
  )
  c.model.head_init_std = 2e-5
  return common.finalize(c)
