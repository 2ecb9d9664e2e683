#!/usr/bin/env bash
# Lint (the pinned ruff: check + format) and run the test suite; sets up ./.venv first if needed.
# Extra arguments go to pytest, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${NOISYFT_VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest "$@"
