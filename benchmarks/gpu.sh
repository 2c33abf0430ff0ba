#!/usr/bin/env bash
# The GPU benchmark for one lent H100 or H200 (device tool: 15 minutes of machine time in all, start-up
# and idle waits included, no second try), most important first, in commands of at most 240 s each:
#
#   bash benchmarks/gpu.sh 1          # the headline: preflight, recipe (ViT-L MFU), torch_headline
#   bash benchmarks/gpu.sh 2          # kernels, fused, loss_memory
#   bash benchmarks/gpu.sh 3          # if the lease has time left: torch_l16, torch_b16
#   bash benchmarks/gpu.sh 1 2        # both in one call: one machine start, one compilation cache
#   bash benchmarks/gpu.sh --dry-run  # all three, tiny shapes, on this machine's CPU: what CI runs
#
# Each stage is one process of benchmarks/gpu_bench.py under its own `timeout -k 2`, with its budget from
# benchmarks/gpu_plan.py (which also writes down the budget model). Worst cases, every timeout reached
# and every kill grace used (`python benchmarks/gpu_plan.py worst`; tests/benchmarks check both):
#   command 1: header (5+2)+(25+2) + preflight (20+2) + recipe (98+2) + torch_headline (73+2) + report (5+2) = 238 s
#   command 2: header (5+2)+(25+2) + kernels (65+2) + fused (80+2) + loss_memory (45+2) + report (5+2) = 237 s
#   command 3: header (5+2)+(25+2) + torch_l16 (95+2) + torch_b16 (95+2) + report (5+2) = 235 s
# Every figure is appended to $OUT/results<N>.jsonl the moment it exists (one record per compile, per
# timed repetition, per check), so a stage killed at any point keeps all it measured; the console goes
# to $OUT/command<N>.log; benchmarks/gpu_report.py then prints the tables ($OUT/report<N>.md) and the dry
# run's budget table (each stage's compiles and CPU seconds beside its GPU budget). $OUT is the device
# tool's result folder, else ./gpu_results. The persistent compilation cache lives in /tmp, so a later
# command reuses earlier compiles when it lands on the same machine.
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
commands=${*:?usage: bash benchmarks/gpu.sh 1|2|3 ...|--dry-run|--make-image-env DIR}
if [ "$commands" = "--dry-run" ]; then
  dry="--dry_run"
  commands="1 2 3"
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
limits=$("$py" benchmarks/gpu_plan.py shell) || exit 1
read -r grace smi_s header_s report_s <<<"$limits"

header() {  # what ran where, then the backend check
  date -u
  timeout -k "$grace" "$smi_s" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
  timeout -k "$grace" $((header_s * scale)) "$py" -c "
import importlib.metadata as m, sys
print('python', sys.version.split()[0])
for name in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'flax', 'optax', 'orbax-checkpoint', 'tensorstore',
             'numpy', 'torch', 'triton', 'timm', 'nvidia-cudnn-cu13'):
  try:
    print(name, m.version(name))
  except m.PackageNotFoundError:
    pass
import jax
print('devices', jax.devices())
assert jax.default_backend() == '$want_backend', f'backend is {jax.default_backend()}, not $want_backend'"
}

stage() {  # stage NAME SECONDS: one gpu_bench.py stage under its timeout; a failure is recorded
  local name=$1 limit=$(($2 * scale)) rc
  echo "=== stage $name (timeout ${limit}s) $(date -u +%T)"
  timeout -k "$grace" "$limit" "$py" benchmarks/gpu_bench.py --stage="$name" --out="$jsonl" $dry
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "{\"stage\": \"$name\", \"kind\": \"stage_failed\", \"rc\": $rc, \"timeout_s\": $limit, \"time\": $(date +%s)}" >>"$jsonl"
    echo "=== stage $name FAILED rc=$rc (124 or 137: killed at its budget)"
  fi
}

for n in $commands; do
  jsonl="$out/results$n.jsonl"
  plan=$("$py" benchmarks/gpu_plan.py stages "$n") || { echo "unknown command $n (1, 2, 3, --dry-run)"; exit 2; }
  {
    if ! header; then
      echo "=== no $want_backend backend: nothing run"
      exit 3
    fi
    while read -r name seconds; do
      stage "$name" "$seconds"
    done <<<"$plan"
    timeout -k "$grace" $((report_s * scale)) "$py" benchmarks/gpu_report.py "$jsonl" >"$out/report$n.md"
    cat "$out/report$n.md"
  } 2>&1 | tee "$out/command$n.log"
done
if [ -n "$dry" ]; then  # every stage's compiles and CPU seconds beside its GPU budget, in one table
  "$py" benchmarks/gpu_report.py "$out"/results[123].jsonl >"$out/report.md" && cat "$out/report.md"
fi
