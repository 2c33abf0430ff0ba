"""MAE pre-training of ViT-L/16 on ImageNet-1K, to make a teacher of the paper's kind ourselves (the paper's
own is MAE's released 1600-epoch mae_pretrain_vit_large.pth: convert that for its numbers; this runs 800).

  python launch/main.py --config=configs/mae_vitl.py --workdir=$WORKDIR \
      --config.data.dir=/path/to/tensorflow_datasets

MAE (He et al. 2022) recipe: 800 epochs (1600 in the released checkpoint), 40 warmup, batch 4096, base lr
1.5e-4 per 256, AdamW (0.9, 0.95), wd 0.05, mask ratio 0.75, decoder 8 blocks x 512 wide, 16 heads,
normalised-pixel loss, random-resized-crop (0.2, 1) + flip; a fixed 2-D sin-cos position table,
xavier-uniform linears and patch embedding, and weight decay on all but biases and norms (the cls and mask
tokens too). The released ViT-L reaches 85.9 (MAE paper) / 85.7 (this paper) after fine-tuning. The run's
`params/` export is the encoder, for teacher.init.
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.base()
  c.task = "mae"
  c.model = common.model(
    variant="L/16",
    num_classes=0,
    pool="cls",
    dtype_mm="bfloat16",
    scan=True,
    remat_policy="dots",
    posemb="sincos2d",
    weight_init="mae",
  )
  c.mae = dict(
    decoder_width=512,
    decoder_depth=8,
    decoder_heads=16,
    decoder_mlp_dim=2048,
    mask_ratio=0.75,
    norm_pix_loss=True,
  )
  c.data.update(dict(batch_size=4096, rrc_scale=(0.2, 1.0)))
  c.optim.update(
    dict(
      base_lr=1.5e-4,
      min_lr=0.0,
      b2=0.95,
      weight_decay=0.05,
      label_smoothing=0.0,
      decay_rule="mae",
    )
  )
  c.schedule.update(dict(epochs=800, warmup_epochs=40, log_every_steps=100))
  c.ckpt.every_steps = 3000
  return common.finalize(c)
