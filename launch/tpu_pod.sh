#!/usr/bin/env bash
# Launch at_jax on a Cloud TPU VM slice: create (or reuse) it, copy this checkout to every worker, install,
# and run the same launch/main.py command on all workers with --multihost, streaming worker 0's log.
#
#   TPU=at-jax ZONE=us-central2-b TYPE=v4-64 bash launch/tpu_pod.sh \
#       --config=configs/distill_vitl.py --workdir=gs://BUCKET/distill_vitl \
#       --config.teacher.init=gs://BUCKET/mae_vitl_params --config.data.dir=gs://BUCKET/tensorflow_datasets
#
# --workdir, teacher.init, model.init, transfer.targets_dir and data.dir (tfds ArrayRecord or JPEG
# folders) may all be gs:// paths; no gcsfuse mount is needed.
#
# Env: TPU (name), ZONE, TYPE (accelerator type, used only when creating), VERSION (TPU VM runtime,
# default tpu-ubuntu2204-base), PROJECT (default: gcloud's), SPOT=1 for a preemptible slice. Re-running
# with the same --workdir resumes from the last checkpoint; a preempted run exits 143 after saving.
set -euo pipefail
: "${TPU:?set TPU to the slice name}" "${ZONE:?set ZONE}"
TYPE="${TYPE:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
PROJECT_FLAG=()
[ -n "${PROJECT:-}" ] && PROJECT_FLAG=(--project="$PROJECT")
cd "$(dirname "$0")/.."

if ! gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" >/dev/null 2>&1; then
  echo "== creating $TPU ($TYPE) in $ZONE"
  extra=()
  [ "${SPOT:-0}" = "1" ] && extra=(--spot)
  gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION" \
      "${PROJECT_FLAG[@]}" "${extra[@]}"
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}

echo "== copying the checkout to every worker"
archive="$(mktemp -d)/at_jax.tar.gz"
git ls-files -z | tar --null -czf "$archive" -T -
gcloud compute tpus tpu-vm scp "$archive" "$TPU":~/at_jax.tar.gz --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all
ssh_all "rm -rf ~/at_jax && mkdir -p ~/at_jax && tar -xzf ~/at_jax.tar.gz -C ~/at_jax"

echo "== installing"
# The TPU VM images ship Python 3.10 and at_jax needs >= 3.11: uv fetches a 3.11 interpreter for the
# venv. at_jax itself (with configs/) is installed editable, as launch/setup.sh does: the scripts import it.
uv='~/.local/bin/uv'
ssh_all "cd ~/at_jax && python3 -m pip install -q --user uv && $uv venv -q --python 3.11 .venv \
  && $uv pip install -q --python .venv/bin/python -r requirements.txt 'jax[tpu]==0.10.2' \
  && $uv pip install -q --python .venv/bin/python --no-deps -e ."

echo "== running on all workers: python launch/main.py --multihost $*"
args="$(printf ' %q' "$@")"
# Every worker runs the same command; jax.distributed finds the slice's topology by itself. Each worker's
# output goes to ~/at_jax/run.log; worker 0's (the one that writes metrics) is streamed here.
ssh_all "cd ~/at_jax && nohup .venv/bin/python launch/main.py --multihost$args > run.log 2>&1 &"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=0 \
    --command="tail -n +1 -F ~/at_jax/run.log"
