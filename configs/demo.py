"""The embedded default: attention distillation from an MAE teacher on Fashion-MNIST, on a laptop CPU.

  python launch/main.py --config=configs/demo.py --workdir=workdir/demo

The paper's setting in miniature: first pre-trains an MAE teacher on the training images *without labels*
(configs/mae_fmnist.py, in <workdir>/teacher; skipped when it is already there), then trains a fresh
student of the same architecture on the labels while distilling the teacher's attention in layers 0-3 of 6
(end_layer=-2, as the paper's -6 of 24), and prints test top-1 with the teacher's reconstruction loss.
Needs the Debian package `dataset-fashion-mnist` (or config.data.dir pointing at the four IDX files).
"""

from configs import common, mae_fmnist


def get_config(arg: str | None = None):
  del arg
  c = common.base()
  c.model = common.model(variant="Mu/7", num_classes=10)
  common.fashion_mnist(c, batch_size=128)
  # EMA 0.99 rather than the paper's 0.9999: a run of a few hundred steps must not average in the init.
  c.optim.update(dict(base_lr=2e-3, min_lr=1e-5, weight_decay=0.05, ema_decay=0.99))
  c.schedule = dict(epochs=2.0, warmup_epochs=0.2, steps=0, log_every_steps=50)
  c.mesh = dict(data=-1, fsdp=1)
  c.ckpt = dict(every_steps=200, keep=2)
  c.evals.every_steps = 0
  c.transfer.update(dict(mode="distill", layers="end_layer:-2"))

  c.teacher.pretrain = mae_fmnist.get_config()
  return common.finalize(c)
