#!/usr/bin/env bash
# Create .venv in the repo and install scaletrain with its dependencies (idempotent).
# torch is pinned first to the CPU wheel this machine keeps (torch==2.13.0); on a GPU machine
# install your CUDA build of torch into .venv before running this and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.scaletrain-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
  fi
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
