#!/usr/bin/env bash
# Put into .whl/ every wheel the GPU machine (Python 3.12, CUDA torch, no network) lacks for
# scaletrain's runtime; run here, where the package registry is reachable, before run.sh there.
#   bash benchmarks/gpu/wheels.sh            (uses .venv's versions; refreshes nothing else)
# The list comes from benchmarks/gpu/wheel_list.py (pyproject.toml's dependencies walked through
# Requires-Dist, checked against benchmarks/gpu/machine-packages.txt). deepspeed ships only an
# sdist: it is built here as a pure-Python wheel (DS_BUILD_OPS=0; its ops JIT-build if used).
# Prints each wheel's size and the size of the whole tree that travels (limit 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
KINDS=/work/.library/device/KINDS.md
WHL=.whl
LIMIT=$((64 * 1024 * 1024))

if [[ -f $KINDS ]]; then # the device tool's package list, where this workplace has it
    "$PY" benchmarks/gpu/wheel_list.py --kinds "$KINDS" >/dev/null
fi
mapfile -t carry < <("$PY" benchmarks/gpu/wheel_list.py | sed -n 's/^carry //p')
if ((${#carry[@]} == 0)); then
    echo "error: benchmarks/gpu/wheel_list.py named no wheel to carry" >&2
    exit 1
fi
echo "wheels to carry: ${carry[*]}"
mkdir -p "$WHL"
rm -f "$WHL"/*.whl # one version of each: two stop the whole install there

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
binary=()
for spec in "${carry[@]}"; do
    [[ $spec == deepspeed==* ]] && deepspeed=$spec || binary+=("$spec")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$WHL" "${binary[@]}"
if [[ -n ${deepspeed:-} ]]; then
    # --no-build-isolation: its setup.py imports torch; the venv's serves (no ops are compiled).
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "$deepspeed"
fi

echo "| wheel | KiB |"
echo "|---|---|"
for f in "$WHL"/*.whl; do
    echo "| $(basename "$f") | $(($(stat -c %s "$f") / 1024)) |"
done
wheels=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
# What the device tool sends: tracked and untracked-not-ignored files, plus the carried .whl.
tree=$( (
    git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null
    echo "$wheels"
) | awk '{s += $1} END {print s}')
printf 'wheels: %.1f MiB; travelling tree with .whl: %.1f MiB (limit 64 MiB)\n' \
    "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)"
if ((tree > LIMIT)); then
    echo "error: the travelling tree is over 64 MiB" >&2
    exit 1
fi
