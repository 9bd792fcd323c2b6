#!/usr/bin/env bash
# Create .venv in the repo and install scaletrain with its dependencies (idempotent).
# torch is pinned first to the CPU wheel this machine keeps (torch==2.13.0); on a GPU machine
# install your CUDA build of torch into .venv before running this and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

stamp=".venv/.scaletrain-installed-$(sha1sum pyproject.toml | cut -c1-12)"
[ -f "$stamp" ] && exit 0
echo "setup: installing into .venv (log: .venv/setup.log)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=.venv/setup.log
{
  .venv/bin/python -m pip install --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install "$TORCH_SPEC"
  fi
  .venv/bin/python -m pip install -e ".[dev]"
} >"$log" 2>&1 || { tail -n 30 "$log"; echo "setup: failed, see $log" >&2; exit 1; }
touch "$stamp"
echo "setup: done"
