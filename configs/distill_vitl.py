"""Attention distillation, ViT-L/16 student from an MAE ViT-L/16 teacher on ImageNet-1K.

  python launch/main.py --config=configs/distill_vitl.py --workdir=$WORKDIR \
      --config.teacher.init=/path/to/mae_vitl_params --config.data.dir=/path/to/tensorflow_datasets

Paper (Li et al. 2024, Table 1): 85.7 top-1 (MAE fine-tune 85.7, scratch 83.0); 86.3 ensembled with the
fine-tuned teacher. Recipe: 200 epochs, 20 warmup, base lr 1e-4 per 256 (batch 2048), AdamW (0.9, 0.95),
wd 0.3, drop path 0.2 shared with the teacher, EMA 0.9999, CE over keys with weight 3.0 summed over the
first 18 of 24 layers (the reference code's README passes --end_layer -6).
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  return common.finalize(
    common.imagenet(
      mode="distill",
      epochs=200,
      warmup_epochs=20,
      base_lr=1e-4,
      b2=0.95,
      weight_decay=0.3,
      layer_decay=1.0,
      drop_path=0.2,
      layers="end_layer:-6",
    )
  )
