#!/usr/bin/env bash
# The one check a session with a GPU runs once; every stage runs under `timeout`, and the caps add up to
# 8 minutes (not yet timed on a GPU: the first GPU session should report the stages' seconds):
#   1. the GPU-relevant tests (CUDA == CPU augmentation, host-dependent defaults, step overhead);
#   2. bench_train.py, ResNet-50 @224 batch 64: plain path, fast path (float views and device
#      augmentation) and the 40-line reference loop (fp32 and bf16) in one process, synthetic and folder;
#   3. bench_train.py at batch 32/128/256 (peak memory, ratio to the reference loop) and SE-ResNeXt-50;
#   4. bench_loader.py (workers' throughput against the training figure of stage 2);
#   5. profile_step.py: ops, host syncs and host CPU time per step, project vs reference loop;
#   6. supcon-train -> probe-all -> check-accuracies at 224 px on generated JPEGs.
# Everything goes into one folder (--out, default benchmarks/gpu_check_<date>_<time>); the last thing
# printed is one summary table (scripts/gpu_check_summary.py, also written as summary.md).
#
# Without a GPU (or with --cpu-smoke) every stage runs with tiny settings in about a minute, so the
# script is known to work before anyone spends GPU minutes on it (tests/test_gpu_check.py runs it so).
#
#   bash scripts/gpu_check.sh                 # GPU session: full settings (auto-detected)
#   bash scripts/gpu_check.sh --cpu-smoke     # tiny settings; default output in a temporary folder
#   bash scripts/gpu_check.sh --only bench_train,pipeline   # some stages (tests, bench_train,
#        bench_train_batches, bench_train_seresnext, bench_loader, profile_step, pipeline)
# Environment: PYTHON (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=auto
OUT=
ONLY=
STAGES=",tests,bench_train,bench_train_batches,bench_train_seresnext,bench_loader,profile_step,pipeline,"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) MODE=smoke ;;
        --full) MODE=full ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --only) ONLY=",${2:?--only needs stage names},"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "Error: unknown option $1 (expected --cpu-smoke, --full, --out DIR, --only STAGES)" >&2; exit 2 ;;
    esac
    shift
done
for stage in ${ONLY//,/ }; do
    if [[ $STAGES != *",$stage,"* ]]; then
        echo "Error: unknown stage '$stage' in --only (stages: ${STAGES:1:-1})" >&2
        exit 2
    fi
done
# selected NAME: is this stage (or its group) to run?
selected() { [ -z "$ONLY" ] || [[ $ONLY == *",$1,"* ]]; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
HAS_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$MODE" = auto ]; then
    if [ "$HAS_GPU" = 1 ]; then MODE=full; else MODE=smoke; fi
fi
if [ "$MODE" = full ] && [ "$HAS_GPU" != 1 ]; then
    echo "Error: --full needs a CUDA GPU (torch.cuda.is_available() is False); use --cpu-smoke" >&2
    exit 2
fi
if [ -z "$OUT" ]; then
    if [ "$MODE" = full ]; then OUT=benchmarks/gpu_check_$(date +%Y%m%d_%H%M%S); else OUT=$(mktemp -d -t gpu_check_smoke_XXXX); fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/stages.tsv"
echo "gpu_check: mode $MODE, python $PY, results in $OUT"

if [ "$MODE" = full ]; then
    WORKERS=$("$PY" -c 'import os; print(min(16, len(os.sched_getaffinity(0))))')
    TESTS=(tests/test_gpu_augment.py tests/test_gpu_augment_ops.py tests/test_step_overhead.py tests/test_bench_scripts.py
           tests/test_train_cli.py tests/test_gradcache.py)
    TRAIN=(--model resnet50 --batch-size 64 --size 224 --data synthetic,folder --data-path cpu,device
           --num-workers "$WORKERS" --gen-images 512 --warmup 8 --steps 25 --repeats 3 --rounds 1)
    BATCHES=(--model resnet50 --batch-size 32,128,256 --size 224 --data synthetic --no-plain
             --warmup 5 --steps 10 --repeats 2 --rounds 1)
    SERESNEXT=(--model seresnext50_32x4d --batch-size 64 --size 224 --data synthetic --no-plain --warmup 5
               --steps 15 --repeats 2 --rounds 1)
    LOADER=(--workers "0,4,$WORKERS" --batches 20 --size 224)
    PROFILE=(--model resnet50 --size 224 --batch-size 64 --precision bf16 --channels-last --steps 10 --windows 4)
    PIPE_IMAGES=(192 64 64); PIPE_SIZE=256
    PIPE_TRAIN=(--model resnet50 --size 224 --batch-size 32 --epochs 2 --num-workers "$WORKERS")
    PIPE_PROBE=(--num-workers 4)
    BUDGETS=(80 115 45 40 40 10 55 35 20 40)  # seconds per stage, in the order below: 480 in all
else
    TESTS=(tests/test_gpu_augment.py -k cuda_gives_the_cpu_result)  # the CUDA check skips; plumbing only
    # fp32/NCHW pinned: the same settings (and JSON rows) on a CPU-only machine and on a GPU host
    TINY=(--model test_resnet --small-input --size 16 --threads 1 --num-workers 0 --rounds 1 --repeats 1
          --precision fp32 --memory-format nchw)
    TRAIN=("${TINY[@]}" --batch-size 4 --data synthetic,folder --data-path cpu,device --gen-images 16
           --warmup 1 --steps 2)
    BATCHES=("${TINY[@]}" --batch-size 2,8 --data synthetic --no-plain --warmup 1 --steps 1)
    SERESNEXT=()
    LOADER=(--workers 0 --batches 2 --size 16 --batch-size 4 --gen-images 12)
    PROFILE=(--model test_resnet --small-input --size 16 --batch-size 4 --steps 2 --log-every 2 --windows 1)
    PIPE_IMAGES=(24 12 12); PIPE_SIZE=40
    PIPE_TRAIN=(--model test_resnet --small-input --size 32 --batch-size 8 --epochs 1 --num-workers 0)
    PIPE_PROBE=(--num-workers 0 --device cpu)
    BUDGETS=(60 60 60 0 60 30 60 60 60 60)
fi

FAILED=0
# run_stage NAME BUDGET_S COMMAND...: run under `timeout`, log to OUT/NAME.log, record the outcome.
run_stage() {
    local name=$1 budget=$2 start=$SECONDS rc=0 status
    shift 2
    echo "== $name (at most ${budget}s)"
    timeout --kill-after=15 "$budget" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${budget}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$budget" >> "$OUT/stages.tsv"
    if [ $rc -ne 0 ]; then
        FAILED=1
        echo "   $name: $status; last lines of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    fi
    return $rc
}
skip_stage() {  # NAME REASON
    echo "== $1: skipped ($2)"
    printf '%s\t%s\t0\t0\n' "$1" "skipped ($2)" >> "$OUT/stages.tsv"
}

if selected tests; then
    run_stage tests "${BUDGETS[0]}" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" || true
fi
if selected bench_train; then
    run_stage bench_train "${BUDGETS[1]}" "$PY" scripts/bench_train.py "${TRAIN[@]}" --out "$OUT/train.json" || true
fi
if selected bench_train_batches; then
    run_stage bench_train_batches "${BUDGETS[2]}" "$PY" scripts/bench_train.py "${BATCHES[@]}" \
        --out "$OUT/train_batches.json" || true
fi
if ! selected bench_train_seresnext; then
    :
elif [ ${#SERESNEXT[@]} -gt 0 ]; then
    run_stage bench_train_seresnext "${BUDGETS[3]}" "$PY" scripts/bench_train.py "${SERESNEXT[@]}" \
        --out "$OUT/train_seresnext.json" || true
else
    skip_stage bench_train_seresnext "CPU smoke"
fi
TRAIN_JSON=()
if [ -f "$OUT/train.json" ]; then TRAIN_JSON=(--train-json "$OUT/train.json"); fi
if selected bench_loader; then
    run_stage bench_loader "${BUDGETS[4]}" "$PY" scripts/bench_loader.py "${LOADER[@]}" "${TRAIN_JSON[@]}" \
        --out "$OUT/loader.json" || true
fi
if selected profile_step; then
    run_stage profile_step "${BUDGETS[9]}" "$PY" scripts/profile_step.py "${PROFILE[@]}" --out "$OUT/profile_step.json" \
        || true
fi

# The pipeline on generated JPEGs: train/val/test folders side by side, as a user lays them out.
DATA="$OUT/pipeline/data"
RUN="$OUT/pipeline/run"
rm -rf "$OUT/pipeline"
if selected pipeline && run_stage make_jpegs "${BUDGETS[5]}" "$PY" -c "
import sys; sys.path.insert(0, 'scripts')
from bench_common import make_jpeg_folder
for split, count, seed in zip(('train', 'val', 'test'), map(int, sys.argv[2:5]), (0, 1, 2)):
    make_jpeg_folder(f'{sys.argv[1]}/{split}', count, size=($PIPE_SIZE, $PIPE_SIZE), classes=2, seed=seed)
" "$DATA" "${PIPE_IMAGES[@]}"; then
    if run_stage supcon_train "${BUDGETS[6]}" "$PY" -m supcon.cli --data-folder "$DATA/train" "${PIPE_TRAIN[@]}" \
            --save-freq 1 --knn-every 1 --run-dir "$RUN" --quiet; then
        if run_stage probe_all "${BUDGETS[7]}" "$PY" -c \
                'import sys; from linear_probe.cli import probe_all_main; sys.argv[0] = "probe-all"; probe_all_main()' \
                --run "$RUN" "${PIPE_PROBE[@]}" --quiet; then
            run_stage check_accuracies "${BUDGETS[8]}" "$PY" -c \
                'import sys; from linear_probe.cli import check_accuracies_main; sys.argv[0] = "check-accuracies"; check_accuracies_main()' \
                --run "$RUN" --output "$OUT/pipeline" --num-workers 0 --quiet || true
        else
            skip_stage check_accuracies "probe-all failed"
        fi
    else
        skip_stage probe_all "supcon-train failed"
        skip_stage check_accuracies "supcon-train failed"
    fi
fi

"$PY" scripts/gpu_check_summary.py "$OUT" | tee "$OUT/summary.md"
if [ $FAILED -ne 0 ]; then
    echo "gpu_check: some stages failed (see the table above and $OUT/*.log)" >&2
    exit 1
fi
echo "gpu_check: all stages passed; results in $OUT"
