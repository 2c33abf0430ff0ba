#!/usr/bin/env bash
# Issue #7's GPU measurements, in parts that each fit one 10-minute command on a lent H100/H200:
#
#   bash benchmarks/gpu.sh step      # ViT-L/16 bf16 train step: scratch/copy/distill, materialized vs fused
#   bash benchmarks/gpu.sh torch     # ours vs timm/PyTorch, fp32 (TF32) and autocast bf16, Ti/S/B
#   bash benchmarks/gpu.sh memory    # distillation-loss memory incl. compiled Pallas (Triton); whole step
#
# Uses the machine's own Python (its jax, flax, optax, orbax, torch and timm; nothing is installed), writes
# one log per part into $OUT (the device tool's result folder) or ./gpu_results, and goes on after a
# failing command so that one broken row does not cost the rest. Copy the tables into RESULTS.md with the
# device, driver and jax version the logs start with.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
part=${1:?usage: bash benchmarks/gpu.sh step|torch|memory}
log="$out/$part.log"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  case "$part" in
    step)
      # Copy (all 24 layers) and the paper's distillation (18 of 24 layers, blockwise loss so that the
      # student's fused layers never form maps), scan + dots remat as configs/*_vitl.py.
      $py benchmarks/step.py --models=L/16@224:32 --dtypes=bfloat16 --remat=dots --scan \
          --attention=materialized,fused --modes=none,copy --steps=5 --reps=3
      $py benchmarks/step.py --models=L/16@224:32 --dtypes=bfloat16 --remat=dots --scan \
          --attention=materialized,fused --modes=none,distill --layers=end_layer:-6 --loss_impl=blockwise \
          --steps=5 --reps=3
      ;;
    torch)
      $py benchmarks/torch_reference.py --models=Ti/16@224:128,S/16@224:128,B/16@224:64 \
          --dtypes=float32,bfloat16 --steps=5 --reps=3
      ;;
    memory)
      $py benchmarks/distill_memory.py --image_sizes=224,448,640,896 --dtype=bfloat16
      $py benchmarks/step_memory.py --variant=L/16 --image_sizes=224,448 --remat=none,full --scan --dtype=bfloat16
      ;;
    *)
      echo "unknown part $part (step, torch, memory)"; exit 2 ;;
  esac
} 2>&1 | tee "$log"
