"""`python -m at_jax.convert CHECKPOINT OUT_DIR`: converts a checkpoint file into a params export."""

import argparse
import json
import sys

from at_jax import checkpoint
from at_jax.convert import load
from at_jax.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
  """Converts `src` into the export `dst`, prints its model config as JSON; 2 on a ConfigError."""
  parser = argparse.ArgumentParser(
    prog="python -m at_jax.convert",
    description="Converts a pretrained ViT (timm/MAE/MoCo-v3/DINO/DINOv2 .pth/.safetensors, big_vision "
    ".npz, training checkpoints) into a params export for --config.teacher.init.",
  )
  parser.add_argument(
    "src",
    help="checkpoint file, optionally FILE#SELECTOR for a training checkpoint's weights, e.g. "
    "checkpoint-199.pth#model_ema.student (a dual teacher + student one must name its tower)",
  )
  parser.add_argument("dst", help="export directory to write (at_jax.checkpoint.save_params)")
  parser.add_argument(
    "--image_size", type=int, default=None, help="input size; default: the checkpoint's"
  )
  parser.add_argument(
    "--resample", action="store_true", help="resample position embeddings to image_size"
  )
  parser.add_argument(
    "--num_heads", type=int, default=None, help="heads, for widths not in the size table"
  )
  parser.add_argument(
    "--family",
    choices=sorted(load.FAMILIES),
    default=None,
    help="for what the keys do not tell (e.g. clip_openai: QuickGELU, eps 1e-5)",
  )
  args = parser.parse_args(argv)
  try:
    config, params = load.load_checkpoint(
      args.src,
      image_size=args.image_size,
      resample_posemb=args.resample,
      family=args.family,
      num_heads=args.num_heads,
    )
    checkpoint.save_params(args.dst, params, config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(config, indent=2, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
