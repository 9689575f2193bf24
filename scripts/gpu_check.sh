#!/usr/bin/env bash
# The GPU check (needs one CUDA GPU; < 5 minutes; without one it says so and exits 0, and
# `--cpu` runs its sharding check on CPU-backed virtual devices). Uses the python that already has torch,
# transformers and peft (on the GPU machine: its own), with this checkout on PYTHONPATH.
# Record the output in docs/gpu-results.md with the device and the date.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true; }
"$py" bench/gpu_check.py "$@"
