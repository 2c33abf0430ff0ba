"""Defaults shared by every config; each config file overrides what its recipe sets.

Namespaces: model, teacher, transfer, data, optim, schedule, mesh, ckpt, evals, precompute. Every field is
read by at_jax.experiment (precompute.* by at_jax.experiment.precompute). Configs are locked, so a mistyped
`--config.x.y=...` override fails at start-up.
"""

import ml_collections


def model(**overrides) -> dict:
  """Every `config.model` field, with the defaults below and `overrides` (each config's one source)."""
  fields = dict(
    init="", arch="own", variant="B/16", num_classes=1000, pool="gap", class_token=True,
    qkv_bias=True, drop_path=0.0, head_init_std=0.02, dtype_mm="float32", scan=False,
    remat_policy="none", attention_impl="materialized", posemb="learned", weight_init="timm",
    feature_dim=0,
  )  # fmt: skip
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise KeyError(f"not config.model fields: {unknown}")
  return {**fields, **overrides}


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # classify: supervised ViT, with or without attention transfer; mae: MAE pre-training of config.model
  # (no labels), whose export is the encoder -- a teacher for teacher.init.
  c.task = "classify"

  # Fields of at_jax.models.vit.ViT; `variant` ("L/16") sets width/depth/mlp_dim/num_heads/patch_size.
  # arch="teacher_components": the teacher's components (registers, LayerScale, QK-norm, activation, norm
  # eps, ...) at this config's own width, depth, heads and patch (model.variant), for a smaller student.
  # arch="teacher": the teacher's architecture (registers, LayerScale, ...), freshly initialised; only
  # num_classes, pool, drop_path, head_init_std, dtype_mm, scan, remat_policy, attention_impl are taken
  # from here. attention_impl: "materialized" | "fused" (jax.nn.dot_product_attention: cuDNN flash
  # attention on GPUs with bf16 matmuls, in the layers that need no maps; the teacher follows the student).
  # pool: "gap" (mean of the patch tokens, then fc_norm) | "cls" (the cls token after the final norm) |
  # "cls_mean" ([cls | mean patch token] after the final norm, 2 x width: transformers' DINOv2 classifier).
  # posemb: "learned" (trunc-normal, trained) | "sincos2d" (MAE's fixed 2-D sin-cos table, not trained).
  # weight_init: "timm" (trunc_normal(0.02) linears, as timm's ViT) | "mae" (xavier-uniform linears and
  # patch embedding, as MAE's pre-training).
  # init: start from these weights (fine-tuning): a params export or a checkpoint file, converted like
  # teacher.init; leaves it lacks or shapes it doesn't match (a new head, fc_norm) stay freshly initialised.
  c.model = model()

  # init: the frozen teacher: a params export (the params/ folder of a run, or `python -m at_jax.convert`
  # output) or a PyTorch/timm/MAE/big_vision checkpoint file (.pth, .safetensors, .npz) converted on the
  # fly. If it is empty and `pretrain` holds a config, that config is trained first in <workdir>/teacher
  # and its export used. resample_posemb: allow bicubic resampling of the teacher's position table when
  # it was trained at another image size. For checkpoint files only: num_heads (0: from the width) and
  # family (at_jax.convert.load.FAMILIES; "" unless the file is a CLIP tower) -- what the file doesn't store.
  # image_size: the size the teacher sees the training images at (resized in the step; 0: data.image_size),
  # e.g. so that a teacher of another patch size has the student's token grid (its position table is
  # fitted to it: resample_posemb).
  c.teacher = dict(
    init="", pretrain=None, resample_posemb=False, num_heads=0, family="", image_size=0
  )

  # mode: none | copy | distill; what: attn | q | k | v; layers/heads: "all", "first:k", "last:k",
  # "end_layer:e" (layers [0, depth + e), the paper's --end_layer) or "0,3,5"; source: jointly |
  # precomputed (distill only: targets arrive in the batch as teacher_<attn_logits|q|k|v>); average:
  # "images" replaces the teacher's targets by their mean over the batch's images (the paper's control).
  # loss_impl (distilling maps): "direct" forms one layer's N x N maps at a time; "blockwise" (pure JAX)
  # and "pallas" stream over query/key blocks from q and k, memory linear in tokens (large images).
  # targets_dir: where launch/precompute.py writes the teacher's targets and a "precomputed" run reads
  # them ("": <workdir>/teacher_targets).
  # layer_map / head_map: which teacher layer and heads each student layer and head reads, for a teacher
  # of another depth or head count (at_jax.transfer.pairing): layer_map "same" | "uniform" | "last" |
  # pairs "s:t,s:t"; head_map "same" | "first" | "pick" | "group" | "mean" | "merge" | "learned".
  c.transfer = dict(
    mode="none",
    what="attn",
    layers="all",
    heads="all",
    layer_map="same",
    head_map="same",
    # head_map "learned": where each student head's mix starts: "mean" (every head the same) or
    # "group" (halfway between its group of teacher heads and the mean: distinct starts).
    head_mix_init="mean",
    # head_map "pick": the teacher head each student head reads, "3,5,6,7" (every selected layer) or
    # "3,5,6,7;0,1,2,4;..." (one group per selected layer; e.g. job.sharpest_teacher_heads's).
    head_pick="",
    # what="attn": the taught maps are softmax(teacher logits / T), mixed maps p^(1/T) renormalised:
    # below 1 sharper, above 1 flatter (1: the teacher's own maps, the paper).
    target_temperature=1.0,
    # distill: the fraction of training steps that distil; the rest train on labels alone, the teacher
    # not run (HASTE, arXiv 2505.16792, ends its alignment early). 1.0: every step (the paper).
    until=1.0,
    # keep: a teacher of another token grid has its cls row/column kept, registers dropped; drop: the
    # loss is over patch rows and patch keys only, both maps renormalised there (HASTE), any grid.
    prefix="keep",
    weight=3.0,
    source="jointly",
    average="none",
    loss_impl="direct",
    loss_block=0,  # blockwise/pallas: query and key tile size, a power of two >= 16; 0 = auto
    targets_dir="",
  )
  # launch/precompute.py: store, for what="attn", the teacher's "logits" (H*N*N per layer and image) or
  # "qk" (2*N*H*Dh: smaller once N > 2*Dh; the step forms q.k/sqrt(Dh) itself).
  c.precompute = dict(store="logits")

  # name: "fashion_mnist" (Debian package / IDX files), "imagefolder" (dir/<split>/<class>/*.JPEG, as
  # torchvision's ImageFolder) or a tfds dataset prepared as ArrayRecord.
  c.data = dict(
    name="imagenet2012",
    dir="",
    train_split="train",
    eval_split="validation",
    # imagefolder: a flat eval split's label file ("<file> <class or index>" lines; "" = class folders),
    # and where file lists are cached ("" = <workdir>/file_lists).
    eval_labels="",
    file_list_dir="",
    # JPEGs decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) where the crop is at least twice
    # the output; False decodes every pixel first, as torchvision's loader.
    jpeg_downscale=True,
    image_size=224,
    crop_pct=0.875,
    normalization="imagenet",
    rrc_scale=(0.08, 1.0),
    hflip=True,
    batch_size=2048,
    eval_batch_size=1024,
    num_threads=16,
    # The paper's recipe (timm semantics); off by default, on in the ImageNet configs. mixup and
    # cutmix are Beta alphas (0: off), applied in the step to the global batch (batch mode).
    randaugment="",
    random_erase=0.0,
    mixup=0.0,
    cutmix=0.0,
    mixup_switch_prob=0.5,
    mixup_prob=1.0,
    # Mixup/CutMix draws per group of this many consecutive examples of the global batch, each paired
    # within its group (the reference: timm's Mixup in each process, 32 images); 0 = one draw per batch.
    mix_group_size=0,
  )

  # MAE pre-training (task="mae"): a light decoder, 75% of patches masked, per-patch normalised pixels.
  c.mae = dict(
    decoder_width=512,
    decoder_depth=8,
    decoder_heads=16,
    decoder_mlp_dim=2048,
    mask_ratio=0.75,
    norm_pix_loss=True,
  )

  # Absolute lr = base_lr * batch_size / 256; min_lr is absolute.
  c.optim = dict(
    base_lr=1e-4,
    min_lr=1e-6,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.3,
    layer_decay=1.0,
    grad_clip=0.0,
    label_smoothing=0.1,
    ema_decay=0.9999,
    # Gradient accumulation: each step sums accum_steps micro-batches of batch_size / accum_steps.
    accum_steps=1,
    # Which params weight decay skips: "timm" (biases, norms, position table, class token: timm's
    # no_weight_decay) | "mae" (biases and norms only: MAE's pre-training decays its cls and mask tokens).
    decay_rule="timm",
  )
  # Durations in epochs; `steps` > 0 overrides epochs (handy for smoke runs).
  c.schedule = dict(epochs=100.0, warmup_epochs=5.0, steps=0, log_every_steps=50)

  # Device mesh ('data', 'fsdp'); -1 fills the axis with the remaining devices.
  c.mesh = dict(data=-1, fsdp=1)
  c.ckpt = dict(every_steps=1000, keep=3)
  # Evaluations (raw and EMA params) during training, besides the one at the end: every `every_steps`
  # steps or every `every_epochs` epochs (1.0: each epoch, as the reference; fractions allowed); set one,
  # 0 = off. Each logs the running best too (eval/best_top1, ...), which results report beside the last.
  c.evals = dict(every_steps=0, every_epochs=0.0)
  # "START:STOP": a jax.profiler trace of train steps START..STOP-1 in <workdir>/tensorboard; "" = none.
  c.profile = ""
  # A relaunch on a workdir continues its run when the fields that define the run are unchanged
  # (at_jax.experiment.workdir: model, teacher, transfer, data, optim, schedule, ...), and is refused
  # naming each changed field otherwise; "override" continues it with the changes, recorded in run.json.
  c.resume = "auto"
  return c


def fashion_mnist(c: ml_collections.ConfigDict, *, batch_size: int) -> None:
  """Points `c.data` at Fashion-MNIST (28 px, Debian's package or data.dir), as the demo recipes train."""
  c.data.update(
    dict(
      name="fashion_mnist", dir="", train_split="train", eval_split="test", image_size=28,
      crop_pct=1.0, normalization="fashion_mnist", rrc_scale=(0.5, 1.0), hflip=True,
      batch_size=batch_size, eval_batch_size=500, num_threads=2,
    )
  )  # fmt: skip


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c


def imagenet(
  *,
  variant: str = "L/16",
  mode: str,
  epochs: float,
  warmup_epochs: float,
  base_lr: float,
  b2: float,
  weight_decay: float,
  layer_decay: float,
  drop_path: float,
  layers: str = "all",
  batch_size: int = 2048,
  init: str = "",
) -> ml_collections.ConfigDict:
  """A ViT on ImageNet-1K (tfds imagenet2012, ArrayRecord) with a paper recipe's values.

  Differs from the PyTorch reference on purpose: bf16 matmuls (float32 logits/softmax/norms) and
  scan-over-layers with remat to fit 32 images per device; set model.dtype_mm=float32 for its fp32.
  """
  c = base()
  c.model = model(
    init=init,
    variant=variant,
    drop_path=drop_path,
    dtype_mm="bfloat16",
    scan=True,
    remat_policy="dots",
  )
  c.transfer.mode = mode
  c.transfer.layers = layers
  c.data.update(
    dict(
      batch_size=batch_size,
      randaugment="rand-m9-mstd0.5-inc1",
      random_erase=0.25,
      mixup=0.8,
      cutmix=1.0,
      mix_group_size=32,  # the reference's draws: timm's Mixup on each of its 64 processes' 32 images
    )
  )
  c.optim.update(
    dict(base_lr=base_lr, min_lr=1e-6, b2=b2, weight_decay=weight_decay, layer_decay=layer_decay)
  )
  c.schedule.update(dict(epochs=epochs, warmup_epochs=warmup_epochs, log_every_steps=100))
  c.ckpt.every_steps = 2500  # 4 epochs at 625 steps/epoch: a preempted job loses at most ~1 hour.
  c.evals.every_steps = 6250
  return c


# Fine-tuning starts from the pre-trained weights, which the user must name: this placeholder fails the
# start-up check with a message that says so.
FINETUNE_INIT = "<set --config.model.init=/path/to/mae_pretrain_vit_xxx.pth or a params export>"
