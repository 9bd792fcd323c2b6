#!/usr/bin/env bash
# Fresh machine -> full test suite: set up .venv, lint, start the local SLURM, then every test
# (multi-process ones included; they start CPU ranks with torchrun over gloo, or as SLURM jobs).
# Extra arguments go to pytest. Needs root for the SLURM part (apt-get, daemons).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# The venv's tools first: DeepSpeed builds its CPU comm op with whichever `ninja` is on PATH, and
# two ninja versions (the venv's and Debian's) invalidate each other's build, costing ~1 min each.
export PATH="$PWD/.venv/bin:$PATH"

.venv/bin/ruff check .
.venv/bin/ruff format --check .
# The tests marked `slurm` submit real jobs: start the one-machine SLURM (installs slurm-wlm,
# munge and shellcheck with apt-get if missing; a no-op if it already runs).
bash slurm/local-cluster.sh start
eval "$(bash slurm/local-cluster.sh env)"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
