#!/usr/bin/env bash
# Command one: set up (.venv, CPU torch when none, gpugroups) and start JupyterLab on the
# quickstart notebook (scripts/lab.py: opened directly, no pop-ups, JupyterLab settings under
# .venv/jupyterlab), with the server extension enabled and the shipped demo models in the catalog.
# Extra arguments go to jupyter lab (e.g. --port 8899 --no-browser).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh notebooks
root_flag=()
[ "$(id -u)" = "0" ] && root_flag=(--allow-root)
exec .venv/bin/python scripts/lab.py "${root_flag[@]}" "$@"
