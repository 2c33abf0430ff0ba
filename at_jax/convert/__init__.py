"""Pretrained ViT checkpoints (timm/MAE/MoCo-v3/DINO/DINOv2/CLIP PyTorch files, big_vision `.npz`, Hugging
Face folders) -> our params and `vit.build` config, and our exports back to timm and transformers; the only
package that knows foreign key names.

  load         `load_checkpoint`, the entry point, and `FAMILIES` (what a checkpoint does not store)
  readers      files -> their contents (one flat {key: array}, or a training checkpoint's entries)
  selection    `FILE#SELECTOR`: which entry (model, model_ema) and tower (student, teacher) to convert
  timm         timm-named state dicts -> our layout
  big_vision   big_vision / vision_transformer `.npz` (loop or scan layout) -> our layout
  hf           transformers ViT, ViT-MAE, DINOv2 (registers, LayerScale, SwiGLU), CLIP vision -> our layout
  hf_folder    a `save_pretrained` folder or hub-cache snapshot: finding it, its config.json, its weights
  hf_posemb    position tables resized as transformers' `interpolate_pos_encoding` does
  hf_dinov2    DINOv2's MLP width and its [cls | mean patch token] classifier (our `cls_mean` pooling)
  keymap       what the mappings share: rules, shapes read off keys, heads, errors that name keys
  posemb       the position table: its prefix slots, resampling to another image size
  export       an export -> timm (`timm_args.json` + safetensors) or transformers (`save_pretrained` folder)
  export_keys  timm's key names (its importer's rules inverted), timm's args, what each target cannot express
  export_hf    Hugging Face's ViT or DINOv2 (LayerScale, registers, SwiGLU): hf's rules inverted, config.json
  __main__     `python -m at_jax.convert CHECKPOINT[#SELECTOR] OUT_DIR`, `... --export PARAMS OUT --to=timm|hf`
"""
