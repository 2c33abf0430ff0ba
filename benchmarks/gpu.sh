#!/usr/bin/env bash
# The whole GPU benchmark in two commands of at most ~270 s each, for one lent H100/H200 (device tool:
# 15 minutes of machine time in all, start-up and idle waits included, no second try):
#
#   bash benchmarks/gpu.sh 1          # preflight, kernels, recipe, loss_memory   (see gpu_bench.py)
#   bash benchmarks/gpu.sh 2          # fused, torch_b16, torch_l16
#   bash benchmarks/gpu.sh --dry-run  # both, tiny shapes, on this machine's CPU: what CI runs
#
# Each stage is one process under its own `timeout`; the timeouts of a command sum to under its limit
# (GPU: header 15 + 20 + 80 + 110 + 45 = 270 s for command 1, 15 + 110 + 90 + 55 = 270 s for command 2).
# Figures are appended as they are made to $OUT/results<N>.jsonl, the console to $OUT/command<N>.log
# ($OUT: the device tool's result folder, else ./gpu_results). The persistent compilation cache lives
# in /tmp, so command 2 reuses command 1's compiles when it lands on the same machine.
#
# It runs on the machine's own Python (PYTHON, default python3) and installs nothing: the GPU image has
# Python 3.12 with jax 0.11.2 (cuda13), flax, optax, orbax-checkpoint, tensorstore, torch 2.11, timm,
# safetensors, absl-py, pytest, but no grain, ml-collections, tensorflow-datasets or tensorboardX, which
# the benchmark path never imports. The dry run under an environment like that image's, as checked on
# the CPU (`bash benchmarks/gpu.sh --make-image-env DIR` builds it; about 4 GB, torch's CUDA wheel):
#
#   bash benchmarks/gpu.sh --make-image-env /work/py312
#   PYTHON=/work/py312/venv/bin/python bash benchmarks/gpu.sh --dry-run
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ "${1:-}" = "--make-image-env" ]; then
  dir=${2:?usage: bash benchmarks/gpu.sh --make-image-env DIR}
  mkdir -p "$dir"
  "${PYTHON312:-python3.12}" -m venv "$dir/venv" || exit 1
  # The image's known versions (jax 0.11.2, torch 2.11.0); the rest as pip resolves them today.
  "$dir/venv/bin/pip" install -q "jax==0.11.2" "jaxlib==0.11.2" flax optax orbax-checkpoint \
    tensorstore numpy pillow absl-py safetensors pytest timm "torch==2.11.0"
  exit $?
fi

dry=""
commands=${1:?usage: bash benchmarks/gpu.sh 1|2|--dry-run|--make-image-env DIR}
if [ "$commands" = "--dry-run" ]; then
  dry="--dry_run"
  commands="1 2"
fi
out=${OUT:-gpu_results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
# Both frameworks share the GPU: no 75% preallocation by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/at_jax_compilation_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
if [ -n "$dry" ]; then
  # Only the platform is pinned (a GPU plugin would otherwise be tried); the CPU is slower than the
  # GPU's budget, so the dry run's timeouts are wider. No 8-device emulation: one device, as the GPU.
  export JAX_PLATFORMS=cpu
  scale=4
  want_backend=cpu
else
  # A CUDA plugin that fails to load must stop the run, not run everything on the CPU until the timeout:
  # a platform named in JAX_PLATFORMS that fails to start raises. The CPU is listed too (host-side work
  # such as at_jax.convert.posemb asks for it), and the header asserts that the default backend is a GPU.
  export JAX_PLATFORMS=cuda,cpu
  scale=1
  want_backend=gpu
fi

header() {  # what ran where, then the backend check (at most ~15 s)
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
    || echo "nvidia-smi: not available"
  "$py" --version
  "$py" -m pip list 2>/dev/null \
    | grep -i -E '^(jax|jaxlib|jax-cuda|flax|optax|orbax|tensorstore|numpy|torch|triton|timm|absl|nvidia-cudnn)'
  timeout 30 "$py" -c "import jax; print('jax', jax.__version__, jax.devices())
assert jax.default_backend() == '$want_backend', f'backend is {jax.default_backend()}, not $want_backend'"
}

stage() {  # stage NAME SECONDS: one gpu_bench.py stage under its timeout; a failure is recorded
  local name=$1 limit=$(($2 * scale)) rc
  echo "=== stage $name (timeout ${limit}s) $(date -u +%T)"
  timeout -k 5 "$limit" "$py" benchmarks/gpu_bench.py --stage="$name" --out="$jsonl" $dry
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "{\"stage\": \"$name\", \"kind\": \"stage_failed\", \"rc\": $rc, \"timeout_s\": $limit}" >>"$jsonl"
    echo "=== stage $name FAILED rc=$rc (124: timed out)"
  fi
}

for n in $commands; do
  jsonl="$out/results$n.jsonl"
  {
    if ! header; then
      echo "=== no $want_backend backend: nothing run"
      exit 3
    fi
    case "$n" in
      1)
        stage preflight 20
        stage kernels 80
        stage recipe 110
        stage loss_memory 45
        ;;
      2)
        stage fused 110
        stage torch_b16 90
        stage torch_l16 55
        ;;
      *)
        echo "unknown command $n (1, 2, --dry-run)"
        exit 2
        ;;
    esac
  } 2>&1 | tee "$out/command$n.log"
done
