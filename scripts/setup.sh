#!/usr/bin/env bash
# Create .venv (once) and install gpugroups with what the given extras need.
# Installs torch 2.13.0 first when the venv has no torch: on a machine without an
# NVIDIA GPU (no nvidia-smi) the CPU build from PyTorch's CPU index (its "+cpu" version sorts
# above PyPI's, which is a multi-GB CUDA build), on one with a GPU PyPI's CUDA build.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
  else  # one retry: offline, pip falls back to the wheels it can reach without a long wait
    .venv/bin/python -m pip install -q --retries 1 --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
  fi
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q -e "$spec"
