#!/usr/bin/env bash
# Fresh machine -> full test suite: set up .venv, lint, then every test (multi-process ones
# included; they start CPU ranks with torchrun over gloo). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh

.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
