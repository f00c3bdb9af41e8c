#!/usr/bin/env bash
# Every GPU check and benchmark in one device call. From the repo root on the device machine:
#
#   bash benchmarks/run_device.sh all              (< 8 min on an H100/H200; results under $OUT)
#   bash benchmarks/run_device.sh all --dry-run    (the same code paths on a CPU, tiny shapes, < 2 min: CI runs it,
#                                                   tests/test_device_runbook.py)
#   bash benchmarks/run_device.sh plan             (the blocks and their time caps)
#   bash benchmarks/run_device.sh BLOCK [--dry-run]  (one block: correctness, train, bon, kernels, train-1.4b)
#
# Blocks run in this order, each under its own time cap (and all under FASTRM_RUNBOOK_BUDGET_S, default 470 s), and
# each writes its JSON as it goes, so a cut run still returns what it finished:
#   correctness  CUDA tests (-m gpu): the fused head+loss op compiled for real in bf16/fp16 on HH packs, varlen
#                attention in bf16 on HH lengths at NeoX/Llama/Qwen2 widths in both layouts, sequences of exactly
#                2048 tokens, the fused linear + cross-entropy kernel's tests, the prefetched batches pinned
#                                                                                  -> correctness.json
#   train        pythia-410m shape, stacks A B C C0 D CT side by side, profile of one C step -> train_pythia-410m.json
#   bon          best-of-N scoring at N = 4/16/64 vs HF padded                     -> bon_pythia-410m.json
#   kernels      the fused op vs the eager composition at HH-pack sizes            -> kernels.json
#   train-1.4b   pythia-1.4b, stacks B C D, only if the budget has room            -> train_pythia-1.4b.json
# plus runbook.json (GPU, versions, each block's status and seconds) and runbook.log (all output). That is 7 files:
# the device tool returns at most 8. Afterwards: python benchmarks/device_table.py table $OUT prints the README table.
#
# The device has no package registry: nothing here imports a package it lacks (the dry run hides ray, datasets, trl,
# fastapi, uvicorn, flash_attn and gguf to prove it: benchmarks/device_sim/sitecustomize.py). Carried wheels in .whl/
# are installed first if present. fastrm is imported from this tree (no install).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
mode=${1:-all}
dry=0
[ "${2:-}" = "--dry-run" ] && dry=1
PY=${PYTHON:-python3}
# FASTRM_RUNBOOK_CAP_SCALE multiplies the budget and every cap (the dry-run test sets it: a loaded CPU is slow).
SCALE=${FASTRM_RUNBOOK_CAP_SCALE:-1}
BUDGET=$((${FASTRM_RUNBOOK_BUDGET_S:-470} * SCALE))
# name:cap_s, in run order. The caps add up to the budget; a block gets at most what is left of it.
BLOCKS="correctness:150 train:170 bon:50 kernels:45 train-1.4b:55"
MIN_BLOCK_S=20 # a block with less time left than this is skipped (recorded as such)
if [ "$mode" = plan ]; then
    echo "budget ${BUDGET}s"
    for b in $BLOCKS; do echo "${b%%:*} $((${b##*:} * SCALE))s"; done
    exit 0
fi
case " all correctness train bon kernels train-1.4b " in *" $mode "*) ;; *)
    echo "usage: $0 all|plan|correctness|train|bon|kernels|train-1.4b [--dry-run]" >&2
    exit 2 ;;
esac

OUT=${OUT:-$ROOT/benchmarks/results/device_$(date +%F)}
mkdir -p "$OUT"
LOG=$OUT/runbook.log
: >"$LOG"
export PYTHONUNBUFFERED=1
# fastrm and fastrm_kernels from this tree, whatever is installed.
SITE=$(mktemp -d)
ln -s "$ROOT/fastrm" "$SITE/fastrm"
ln -s "$ROOT/kernels" "$SITE/fastrm_kernels"
export PYTHONPATH="$SITE:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then # carried wheels (see the device README)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 &&
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ $dry = 1 ]; then
    export PYTHONPATH="$ROOT/benchmarks/device_sim:$PYTHONPATH" TRITON_INTERPRET=1
    SHAPE=tiny-neox SHAPE_BIG=tiny-llama DRY=(--dry-run)
else
    SHAPE=pythia-410m SHAPE_BIG=pythia-1.4b DRY=()
fi
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "none (CPU)")
"$PY" benchmarks/device_table.py start "$OUT" --gpu "$gpu" --budget "$BUDGET" --dry-run $dry --mode "$mode" \
    --command "bash benchmarks/run_device.sh $*"
start=$SECONDS

correctness() {
    local files=(tests/test_gpu_hh_packs.py tests/test_kernel_reward_head_loss.py tests/test_kernel_edges.py)
    # the fused linear + cross-entropy kernel (kernels/linear_cross_entropy.py), right after the fused head's
    files+=(tests/test_kernel_linear_ce.py)
    files+=(tests/test_prefetch.py) # the prefetched batches are pinned on CUDA
    files+=(tests/test_varlen_lengths.py tests/test_attention_features.py) # flex attention compiles last
    FASTRM_RUNBOOK_JSON="$OUT/correctness.json" "$PY" -m pytest -q -p no:cacheprovider -p runbook_plugin -m gpu \
        "${files[@]}"
}
train() {
    "$PY" benchmarks/bench_train.py "${DRY[@]}" --shapes "$SHAPE" --checkpointing off --bon-ns --profile C \
        --out "$OUT/train_pythia-410m.json"
}
bon() {
    "$PY" benchmarks/bench_train.py "${DRY[@]}" --shapes "$SHAPE" --stacks --bon-ns 4 16 64 \
        --out "$OUT/bon_pythia-410m.json"
}
kernels() {
    FASTRM_KERNELS_GRID=$([ $dry = 1 ] && echo dry || echo runbook) FASTRM_KERNELS_OUT="$OUT/kernels.json" \
        "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_kernels.py
}
train-1.4b() {
    "$PY" benchmarks/bench_train.py "${DRY[@]}" --shapes "$SHAPE_BIG" --stacks B C D --checkpointing off --bon-ns \
        --out "$OUT/train_pythia-1.4b.json"
}

failed=0
for b in $BLOCKS; do
    name=${b%%:*} cap=$((${b##*:} * SCALE))
    [ "$mode" != all ] && [ "$mode" != "$name" ] && continue
    left=$((BUDGET - (SECONDS - start)))
    ((cap > left)) && cap=$left
    if ((cap < MIN_BLOCK_S)); then
        echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
        "$PY" benchmarks/device_table.py block "$OUT" "$name" --status skipped --seconds 0 --cap "$cap"
        continue
    fi
    echo "=== $name (cap ${cap}s, $((SECONDS - start))s into the run)" | tee -a "$LOG"
    t0=$SECONDS
    timeout --kill-after=10 "$cap" bash -c "$(declare -p ROOT OUT PY SHAPE SHAPE_BIG DRY dry); $(declare -f "$name"); $name" \
        2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    status=ok
    if ((rc == 124 || rc == 137)); then status=timed_out; elif ((rc != 0)); then status=failed; fi
    [ $status = ok ] || failed=1
    echo "=== $name: $status (rc $rc, $((SECONDS - t0))s)" | tee -a "$LOG"
    "$PY" benchmarks/device_table.py block "$OUT" "$name" --status $status --rc $rc --seconds $((SECONDS - t0)) \
        --cap "$cap"
done
# Every JSON written has the fields the README table is built from (the dry run fails here if one went missing).
"$PY" benchmarks/device_table.py check "$OUT" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || failed=1
"$PY" benchmarks/device_table.py table "$OUT" 2>&1 | tee -a "$LOG"
rm -rf "$SITE"
echo "results in $OUT ($((SECONDS - start))s)"
exit $failed
