#!/usr/bin/env bash
# Create ./.venv with PyTorch and this project (editable, with test extras). Safe to run again.
# Works on CPU-only machines and, unchanged, on CUDA machines (pip picks the torch build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check "setuptools>=61" wheel torch torchvision
# sam2 compiles an optional CUDA extension unless told not to; --no-build-isolation reuses the torch above
SAM2_BUILD_CUDA=0 .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]"
