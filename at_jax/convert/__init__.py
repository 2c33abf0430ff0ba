"""Pretrained ViT checkpoints (timm/MAE/MoCo-v3/DINO/DINOv2/CLIP PyTorch files, big_vision `.npz`) ->
our params and `vit.build` config; the only package that knows foreign key names.

  load        `load_checkpoint`, the entry point, and `FAMILIES` (what a checkpoint does not store)
  readers     files -> their contents (one flat {key: array}, or a training checkpoint's entries)
  selection   `FILE#SELECTOR`: which entry (model, model_ema) and tower (student, teacher) to convert
  timm        timm-named state dicts -> our layout
  big_vision  big_vision / vision_transformer `.npz` (loop or scan layout) -> our layout
  keymap      what the mappings share: rules, shapes read off keys, heads, errors that name keys
  posemb      the position table: its prefix slots, resampling to another image size
  __main__    `python -m at_jax.convert CHECKPOINT[#SELECTOR] OUT_DIR`
"""
