#!/usr/bin/env bash
# Fresh machine -> trained model: set up .venv, tokenize Python's standard library into
# data/stdlib, and train configs/runs/quickstart.yaml on 2 simulated CPU ranks (DP=2, ZeRO-1).
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH" # the venv's ninja builds DeepSpeed's CPU comm op (see test.sh)

.venv/bin/scaletrain data prepare --stdlib --output data/stdlib --vocab-size 4096
exec .venv/bin/scaletrain launch local --nproc 2 --config configs/runs/quickstart.yaml "$@"
