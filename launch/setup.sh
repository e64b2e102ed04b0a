#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: the Fashion-MNIST package,
# a virtual environment in .venv with the pinned requirements, and this package.
# Safe to re-run; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing dataset-fashion-mnist (apt)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing pinned requirements"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
echo "[setup] done: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
