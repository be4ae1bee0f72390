#!/usr/bin/env bash
# Create .venv and install diffusers-lightbagel with its test dependencies.
#
# torch and torchvision are installed first and pinned to a matching pair, because transformers' Qwen2.5-VL
# processor needs torchvision and a torchvision release only works with the torch release it was built for.
# Override the pair with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.9.1 torchvision==0.24.1".
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet $TORCH_SPEC
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import diffusers_lightbagel, torch, torchvision; print('installed diffusers-lightbagel', diffusers_lightbagel.__version__, 'with torch', torch.__version__)"
