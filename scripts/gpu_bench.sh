#!/usr/bin/env bash
# GPU figures of issue 12, item 7, in one run of at most 5 minutes on one H100/H200-class card, each step under its
# own timeout so that one failure leaves time for the rest:
#   1. bench_transcribe.py --device cuda: speechxfer transcribe against transformers' pipeline on a random
#      XLS-R-300M-shaped model in bf16 (folder of short files, one long file): wall time, x real time, peak GPU memory
#   2. bench_train.py on the XLS-R-300M shape in bf16 (paths a, b, c): audio hours trained per hour, peak GPU
#      memory, model FLOPs utilisation against the card's dense bf16 peak (scripts/bench_device.py)
#   3. check_precision.py: a few updates of speechxfer.training.train with train.mixed_precision bf16, then fp16:
#      every loss and weight finite
# It first prints `nvidia-smi --query-gpu=name,memory.total --format=csv`; every figure line names the card.
# Not run on a GPU yet.
#
#   bash scripts/gpu_bench.sh                       # on the GPU machine, from the repository root
#   GPU_BENCH_DEVICE=cpu bash scripts/gpu_bench.sh  # the same steps at toy scale on a CPU (a few minutes), in
#                                                   # float32 (GPU_BENCH_DTYPE=bfloat16 for bf16): every line
#                                                   # but the CUDA-only ones
#
# Only a GPU runs: nvidia-smi; torch.cuda.get_device_name, reset_peak_memory_stats, max_memory_allocated
# (bench_device.py); torch.cuda.synchronize (bench_train.py's _synchronize, bench_transcribe.py's run_case); mixed
# precision inside train() (on a CPU it trains in float32 and check_precision.py says so) and the Trainer's bf16 on
# CUDA. The rest runs on a CPU too.
#
# The machine (/work/.library/device: python3 with torch, transformers, accelerate, scipy, pyyaml, tqdm,
# tensorboard, matplotlib; no network) lacks six of speechxfer's dependencies. Carry them as wheels in
# gpu_wheels/ (git-ignored), downloaded on a machine with PyPI:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d gpu_wheels soundfile soxr audioread anyascii cffi pycparser           # 2.2 MB
# They are unpacked onto PYTHONPATH (wheels are zip archives: no pip, no index, no write to the box's Python), and
# speechxfer runs from this tree (PYTHONPATH), not installed. $OUT (default /tmp/gpu_bench) receives the log.
set -uo pipefail  # no -e: a failed step is reported and the next one runs
cd "$(dirname "$0")/.."

DEVICE=${GPU_BENCH_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/speechxfer_gpu_bench}
WHEELS=${WHEELS:-gpu_wheels}
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_bench.log"
: > "$LOG"
START=$(date +%s)
say() { echo "[gpu_bench $(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }

if [[ "$DEVICE" == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee -a "$LOG"
    CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    # Seconds per step (about 4.5 minutes in all at most; a step usually ends well before its limit), and sizes:
    # 200-s batches are fairseq's XLS-R fine-tuning batch (3.2 M samples).
    T_TRANSCRIBE=90 T_TRAIN=120 T_PRECISION=60
    TRANSCRIBE_ARGS=(--shape xls-r-300m --files 200 --long-min 10 --batch-size 16)
    TRAIN_ARGS=(--shape xls-r-300m --utterances 400 --max-batch-s 200 --warmup 5 --updates 30 --repeat 1)
    PRECISION_ARGS=(--shape xls-r-300m --utterances 400 --updates 10 --max-batch-s 100)
    PEAK=()  # bench_device.PEAK_BF16_TFLOPS by the card's name
    DTYPE=${GPU_BENCH_DTYPE:-bfloat16}
else
    CARD="CPU ($(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
    T_TRANSCRIBE=300 T_TRAIN=400 T_PRECISION=200
    TRANSCRIBE_ARGS=(--shape small --files 4 --long-min 0.25 --ref-min 0.1 --batch-size 4)
    TRAIN_ARGS=(--shape seed --utterances 24 --max-batch-s 8 --warmup 1 --updates 1 --repeat 1)
    PRECISION_ARGS=(--shape seed --utterances 24 --updates 2 --max-batch-s 8)
    # No table entry for a CPU: a nominal figure (2 cores x 32 fp32 FLOPs a cycle x 3 GHz), only so that the
    # MFU lines print
    PEAK=(--peak-tflops 0.2)
    # float32: bfloat16 runs several times slower than float32 on a CPU without AVX512-BF16 or AMX (README);
    # GPU_BENCH_DTYPE=bfloat16 runs the bf16 lines here too
    DTYPE=${GPU_BENCH_DTYPE:-float32}
fi
say "device $DEVICE: $CARD, $DTYPE"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} )); then
    say "unpacking ${#wheels[@]} wheels of $WHEELS"
    rm -rf "$WORK/site"
    for wheel in "${wheels[@]}"; do
        "$PYTHON" -m zipfile -e "$wheel" "$WORK/site"
    done
fi
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
"$PYTHON" -c "import speechxfer.training, torch; print('speechxfer imports; torch', torch.__version__)" 2>&1 \
    | tee -a "$LOG" || { say "speechxfer does not import: carry the wheels above in $WHEELS"; exit 1; }

step() {  # step NAME SECONDS COMMAND...: run one step under its timeout, log it, report how it ended
    local name=$1 limit=$2
    shift 2
    say "$name: start (limit $limit s) [$CARD]"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v "Writing model shards\|Loading weights" \
        | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    case $status in
        0) say "$name: done [$CARD]" ;;
        124|137) say "$name: STOPPED at its $limit s limit [$CARD]" ;;
        *) say "$name: FAILED, exit status $status [$CARD]" ;;
    esac
}

step transcribe "$T_TRANSCRIBE" "$PYTHON" scripts/bench_transcribe.py --device "$DEVICE" --dtype "$DTYPE" \
    --workdir "$WORK/transcribe" --cases folder,long "${TRANSCRIBE_ARGS[@]}"
step train "$T_TRAIN" "$PYTHON" scripts/bench_train.py --device "$DEVICE" --dtype "$DTYPE" --work "$WORK/train" \
    "${PEAK[@]}" "${TRAIN_ARGS[@]}"
step precision "$T_PRECISION" "$PYTHON" scripts/check_precision.py --work "$WORK/train" "${PRECISION_ARGS[@]}"
say "all steps ended [$CARD]"
