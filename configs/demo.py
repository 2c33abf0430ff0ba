"""The embedded default: attention distillation from an MAE teacher on Fashion-MNIST, on a laptop CPU.

  python launch/main.py --config=configs/demo.py --workdir=workdir/demo

The paper's setting in miniature: a fresh student ViT (Mini/7: width 64, depth 6, 4 heads, patch 7) trains
on the labels while distilling the attention of a frozen MAE teacher of the same architecture in layers 0-3
of 6 (end_layer=-2, as the paper's -6 of 24), then prints test top-1 and draws both models' maps.

The teacher is the miniature study's (projects/miniature: MAE, 20 epochs on the 60,000 training images
without labels, its 1.3 MB export committed), so the demo distils at once. `--config.teacher.init=`
(empty) pre-trains one first instead, with `teacher.pretrain` (configs/mae_fmnist.py's recipe at Mini/7,
5 epochs, in <workdir>/teacher; skipped when it is already there).
Needs the Debian package `dataset-fashion-mnist` (or config.data.dir pointing at the four IDX files).
"""

import os

from configs import common, miniature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_TEACHER = os.path.join(ROOT, "projects", "miniature", "results", "teachers", "full", "params")
VARIANT = "Mini/7"


def get_config(arg: str | None = None):
  del arg
  c = common.base()
  c.model = common.model(variant=VARIANT, num_classes=10)
  common.fashion_mnist(c, batch_size=128)
  # EMA 0.99 rather than the paper's 0.9999: a run of a few hundred steps must not average in the init.
  c.optim.update(dict(base_lr=2e-3, min_lr=1e-5, weight_decay=0.05, ema_decay=0.99))
  c.schedule = dict(epochs=2.0, warmup_epochs=0.2, steps=0, log_every_steps=50)
  c.mesh = dict(data=-1, fsdp=1)
  c.ckpt = dict(every_steps=200, keep=2)
  c.evals.every_steps = 0
  c.transfer.update(dict(mode="distill", layers="end_layer:-2"))

  c.teacher.init = STUDY_TEACHER
  c.teacher.pretrain = miniature.teacher_config(VARIANT, 5.0, {})
  return common.finalize(c)
