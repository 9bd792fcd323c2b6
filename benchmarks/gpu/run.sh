#!/usr/bin/env bash
# The GPU kit: scaletrain's claims measured on one real GPU, in one go (about 5 minutes).
#   bash benchmarks/gpu/wheels.sh       here, with the registry: the missing wheels into .whl/
#   bash benchmarks/gpu/run.sh          there (no network; the device tool carries .whl)
#   bash benchmarks/gpu/run.sh --dry-run   anywhere, no GPU: checks configs and wheel list,
#                                          prints the planned steps (tests/benchmarks runs it)
# Installs the wheels and scaletrain into $GPU_KIT_SITE (never touching the machine's torch),
# prepares data/stdlib, then runs the steps below and prints a markdown table last. With $OUT
# set, the table, the numbers, the log and the metrics are copied there.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=benchmarks/gpu/llama-1b-h200.yaml
STEPS=${GPU_KIT_STEPS:-30}
AC_STEPS=${GPU_KIT_AC_STEPS:-12}
MULTI_STEPS=${GPU_KIT_MULTI_STEPS:-10}
WORK=${GPU_KIT_WORK:-runs/gpu-kit}
SITE=${GPU_KIT_SITE:-/tmp/gpu-kit-site}
DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
mkdir -p "$WORK"

planned_steps() {
    echo "step 1/5: train llama-1b (configs/models/llama-1b.yaml) in bf16 at seq 2048 on CUDA + nccl, world size 1, ZeRO-0, $STEPS steps via scaletrain train: loss, tokens/s, MFU vs the measured bf16 GEMM peak and the datasheet"
    echo "step 2/5: the same model, batches and optimizer in a plain PyTorch loop (benchmarks/gpu/plain_loop.py), $STEPS steps: step-time ratio scaletrain / plain"
    echo "step 3/5: peak torch.cuda.max_memory_allocated vs scaletrain plan --json for the same config"
    echo "step 4/5: activation checkpointing full vs none, $AC_STEPS steps: memory and time"
    echo "step 5/5: TP2 and ZeRO-1 DP2, $MULTI_STEPS steps each, only with >= 2 GPUs"
}

plan_json() { # mode python [overrides]: `scaletrain plan --json` for one H200, and its summary
    local mode=$1 py=$2
    shift 2
    "$py" -m scaletrain plan --config "$CONFIG" --world-size 1 --gpu H200 --json \
        model.activation_checkpointing="$mode" "$@" >"$WORK/plan-$mode.json"
    "$py" benchmarks/gpu/table.py --plan-summary "$WORK/plan-$mode.json"
}

if ((DRY)); then
    PY=${PYTHON:-python3}
    [[ -x .venv/bin/python && -z ${PYTHON:-} ]] && PY=.venv/bin/python
    export DS_ACCELERATOR=cpu
    # A few standard-library files through the same prepare path as the real run, so that
    # `config check` sees real data metadata.
    lib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    "$PY" -m scaletrain data prepare --input "$lib/json" --output "$WORK/dry-data" \
        --vocab-size 512 --num-proc 1 >/dev/null 2>&1
    for ac in none full; do
        echo "config check activation_checkpointing=$ac: $("$PY" -m scaletrain config check \
            --config "$CONFIG" --world-size 1 data.paths="[$WORK/dry-data]" \
            model.activation_checkpointing=$ac)"
        plan_json "$ac" "$PY" data.paths="[$WORK/dry-data]"
    done
    "$PY" benchmarks/gpu/wheel_list.py >"$WORK/wheel-list.txt"
    carry=$(sed -n 's/^carry //p' "$WORK/wheel-list.txt" | tr '\n' ' ')
    echo "wheels to carry: $carry"
    for need in deepspeed megatron-core pydantic; do
        grep -q "^carry $need==" "$WORK/wheel-list.txt" || {
            echo "error: the wheel list does not carry $need" >&2
            exit 1
        }
    done
    if grep -q "^carry torch==" "$WORK/wheel-list.txt"; then
        echo "error: the wheel list carries torch; the machine's CUDA build must stay" >&2
        exit 1
    fi
    if [[ -d .whl ]]; then
        missing=""
        for spec in $carry; do
            file=$(echo "${spec%%==*}" | tr '-' '_')-${spec##*==}-
            compgen -G ".whl/$file*.whl" >/dev/null || missing+=" $spec"
        done
        echo ".whl/: ${missing:+missing$missing}${missing:-every wheel to carry is there}"
    fi
    planned_steps | sed 's/^/planned /'
    echo "dry run ok: nothing was trained"
    exit 0
fi

# --- on the GPU machine -------------------------------------------------------------------
run_step() { # label, command...: a failed step is reported and the others still run
    local label=$1 t0=$SECONDS
    shift
    echo "== $label"
    "$@" || {
        echo "== $label FAILED (exit $?)"
        status=1
    }
    echo "== $label took $((SECONDS - t0)) s"
}

gpu_kit() { # runs in the pipeline's subshell: setup failures stop it, step failures do not
    set -e
    status=0
    export PYTHONUNBUFFERED=1
    unset DS_ACCELERATOR # DeepSpeed picks its CUDA accelerator (DS_ACCELERATOR=cpu keeps the CPU)
    nvidia-smi -L
    local start=$SECONDS src gpus
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    # From a copy: setuptools leaves build/ and *.egg-info/ beside the sources it builds.
    # configs/ and slurm/ come along: scaletrain/configs and scaletrain/job.sbatch.in link to
    # them, and the wheel ships them as package data.
    src=$(mktemp -d)
    cp -r pyproject.toml README.md scaletrain configs slurm "$src/"
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --upgrade --target "$SITE" "$src"
    # The installed copy, not the checkout: it proves scaletrain installs offline and finds
    # its configs as package data (tests/test_package.py checks the same on CPU).
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    python3 benchmarks/gpu/check_env.py
    if [[ ! -f data/stdlib/metadata.json ]]; then
        python3 -m scaletrain data prepare --stdlib --output data/stdlib --vocab-size 4096
    fi
    echo "setup took $((SECONDS - start)) s"
    planned_steps
    run_step "probe: bf16 GEMM peak, SDPA kernel, fused AdamW" \
        python3 benchmarks/gpu/probe.py --out "$WORK/probe.json"
    run_step "plan, activation checkpointing none" plan_json none python3
    run_step "plan, activation checkpointing full" plan_json full python3
    rm -rf "${WORK:?}/none" "$WORK/full" "$WORK/tp2" "$WORK/zero1"
    run_step "step 1/5 scaletrain train, activation checkpointing none" \
        python3 -m scaletrain train --config "$CONFIG" train.steps="$STEPS" \
        train.run_dir="$WORK/none"
    run_step "step 2/5 plain PyTorch loop" python3 benchmarks/gpu/plain_loop.py \
        --config "$CONFIG" --steps "$STEPS" --out "$WORK/plain.json"
    run_step "step 4/5 scaletrain train, activation checkpointing full" \
        python3 -m scaletrain train --config "$CONFIG" train.steps="$AC_STEPS" \
        train.run_dir="$WORK/full" model.activation_checkpointing=full
    gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    if ((gpus >= 2)); then
        run_step "step 5/5 TP2" python3 -m scaletrain launch local --nproc 2 --config "$CONFIG" \
            parallel.tp=2 train.steps="$MULTI_STEPS" train.run_dir="$WORK/tp2"
        run_step "step 5/5 ZeRO-1 DP2" python3 -m scaletrain launch local --nproc 2 \
            --config "$CONFIG" parallel.zero_stage=1 train.global_batch=16 \
            train.steps="$MULTI_STEPS" train.run_dir="$WORK/zero1"
    else
        echo "step 5/5: skipped: $gpus GPU visible; TP2 / ZeRO need >= 2"
    fi
    echo "kit took $((SECONDS - start)) s"
    python3 benchmarks/gpu/table.py --work "$WORK" --config "$CONFIG" --md "$WORK/gpu-kit.md" \
        --json "$WORK/results.json" || status=1
    return $status
}

# A pipeline, not `exec > >(tee)`: it ends only once tee has written the table's last line.
# Not in an `||` list either, which would switch `set -e` off inside gpu_kit.
set +e
gpu_kit 2>&1 | tee "$WORK/kit.log"
rc=${PIPESTATUS[0]}
set -e
if [[ -n ${OUT:-} ]]; then
    for f in gpu-kit.md results.json kit.log probe.json plain.json; do
        if [[ -f $WORK/$f ]]; then cp "$WORK/$f" "$OUT/"; fi
    done
    for mode in none full; do
        if [[ -f $WORK/$mode/metrics.jsonl ]]; then
            cp "$WORK/$mode/metrics.jsonl" "$OUT/metrics-$mode.jsonl"
        fi
    done
fi
exit "$rc"
