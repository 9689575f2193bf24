#!/usr/bin/env bash
# Command two: set up (.venv with the test extras; Debian's Chromium for the browser test when
# apt is at hand), lint (ruff), type-check (mypy, including tests/typing's user snippet) and run
# the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = "0" ]; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
    || echo "note: Chromium could not be installed; the browser test will say so and skip"
fi
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -rs "$@"
