"""`python -m at_jax.convert CHECKPOINT OUT_DIR`: converts a checkpoint file into a params export.
`python -m at_jax.convert --export PARAMS_DIR OUT_DIR --to=timm|hf`: the reverse, an export (a run's
`params/` or `params_ema/`) into PyTorch weights timm or transformers load (`export`)."""

import argparse
import json
import sys

from at_jax import checkpoint
from at_jax.convert import export, load
from at_jax.errors import ConfigError

# The flags of the import direction, which an export has no use for (its architecture is stored).
_IMPORT_FLAGS = ("image_size", "resample", "num_heads", "family")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m at_jax.convert",
    description="Converts a pretrained ViT (timm/MAE/MoCo-v3/DINO/DINOv2 .pth/.safetensors, big_vision "
    ".npz, training checkpoints, Hugging Face folders) into a params export for "
    "--config.teacher.init; with --export, a "
    "params export into PyTorch weights for timm or Hugging Face transformers.",
  )
  parser.add_argument(
    "src",
    help="checkpoint file or Hugging Face folder (save_pretrained, a hub-cache snapshot), a file "
    "optionally as FILE#SELECTOR for a training checkpoint's weights, e.g. "
    "checkpoint-199.pth#model_ema.student (a dual teacher + student one must name its tower); "
    "with --export, a params export directory (<workdir>/params or <workdir>/params_ema)",
  )
  parser.add_argument(
    "dst",
    help="export directory to write (at_jax.checkpoint.save_params); with --export, the folder for "
    "model.safetensors and timm_args.json (timm) or config.json (hf)",
  )
  parser.add_argument(
    "--export", action="store_true", help="export SRC (a params export) to PyTorch; needs --to"
  )
  parser.add_argument(
    "--to",
    choices=export.TARGETS,
    default=None,
    help="with --export: timm (VisionTransformer) or hf (transformers ViTModel / "
    "ViTForImageClassification)",
  )
  parser.add_argument(
    "--image_size", type=int, default=None, help="input size; default: the checkpoint's"
  )
  parser.add_argument(
    "--resample", action="store_true", help="resample position embeddings to image_size"
  )
  parser.add_argument(
    "--num_heads",
    type=int,
    default=None,
    help="heads, for widths not in the size table (our timm export's timm_args.json says it)",
  )
  parser.add_argument(
    "--family",
    choices=sorted(load.FAMILIES),
    default=None,
    help="for what the keys do not tell (e.g. clip_openai: QuickGELU, eps 1e-5)",
  )
  return parser


def _import(args: argparse.Namespace) -> dict:
  config, params = load.load_checkpoint(
    args.src,
    image_size=args.image_size,
    resample_posemb=args.resample,
    family=args.family,
    num_heads=args.num_heads,
  )
  checkpoint.save_params(args.dst, params, config)
  return config


def _export(args: argparse.Namespace) -> dict:
  meta, notes = export.export(args.src, args.dst, args.to)
  for note in notes:
    print(f"note: {note}", file=sys.stderr)
  return meta


def main(argv: list[str] | None = None) -> int:
  """Converts `src` into `dst` and prints the model config (import) or what rebuilds the PyTorch
  model (export: timm_args.json's or config.json's contents) as JSON; 2 on a ConfigError."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.export and args.to is None:
    parser.error("--export needs --to=timm or --to=hf")
  if not args.export and args.to is not None:
    parser.error("--to goes with --export")
  given = [f"--{name}" for name in _IMPORT_FLAGS if getattr(args, name) not in (None, False)]
  if args.export and given:
    parser.error(f"{', '.join(given)}: not for --export (an export stores its architecture)")
  try:
    printed = _export(args) if args.export else _import(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(printed, indent=2, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
