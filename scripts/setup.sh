#!/usr/bin/env bash
# Create .venv with distill and its test tools.
#
# torch: a torch already importable in the venv (e.g. a CUDA build) is kept. Otherwise
# torch==2.13.0 is installed; set TORCH_INDEX_URL to pick the build, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# (Installing distill first with no torch present would pull PyPI's default build: several GB of CUDA.)
# To use a torch from your system Python instead: VENV_FLAGS=--system-site-packages bash scripts/setup.sh
#
# Usage: bash scripts/setup.sh [EXTRAS]   EXTRAS: comma-separated, default "dev"; the tests use
# "dev,export,deepspeed" (export: gguf, torchao, and llama-cpp-python, which compiles llama.cpp from
# source the first time: about 8 minutes on 2 cores, pip caches the wheel; deepspeed: for
# train.sharding=zero3, about 30 seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv ${VENV_FLAGS:-} "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
extras=${1:-dev}
# llama.cpp's multimodal library (llava / mtmd) is not used by distill: not building it saves time.
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$py" -m pip install -q -e ".[$extras]"
"$py" -c "import torch, transformers, distill; print(f'distill {distill.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
