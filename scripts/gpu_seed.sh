#!/usr/bin/env bash
# One prepared run on a lent GPU box (one H100/H200, 16 cores, no internet, python3 with torch, transformers,
# accelerate, numpy, pyyaml, tqdm): synthesize the source-language corpora, train the larger seed variant of
# recipes/seed/seed.yaml (scripts/train_seed.py) for a fixed time, and leave the model folder, model card and
# metrics in $OUT. Finishes in under 9 minutes wall.
#
# Needs, carried from the development machine (both git-ignored):
#   data/texts/<lang>.txt   from scripts/prepare_texts.py
#   gpu_wheels/             pip download --only-binary=:all: --python-version 3.12 --implementation cp
#                           --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
#                           --platform manylinux_2_28_x86_64 -d gpu_wheels
#                           espeakng-loader soundfile soxr audioread anyascii cffi pycparser
#                           tensorboard matplotlib
#                           (then delete the numpy and typing_extensions wheels: the box has its own;
#                           speechxfer.training writes TensorBoard scalars and curves.png)
#
#   bash scripts/gpu_seed.sh                      # on the GPU box, from the repository root
#   SEED_TOY=1 OUT=/tmp/toy WHEELS=DIR bash scripts/gpu_seed.sh   # the same steps at toy scale on a CPU
#                                  (about 2 minutes; DIR: the same wheels for the local Python version)
#
# $OUT receives: model.safetensors (fp16) and seed_gpu.tar.gz (the rest of the model folder: config, vocabulary,
# tokenizer and preprocessor files, recipe.yaml, README.md model card, training_summary.json; plus metrics.jsonl
# and this script's log). Unpack: mkdir seed_gpu && tar -xzf seed_gpu.tar.gz -C seed_gpu && cp model.safetensors seed_gpu/
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the folder that receives the results}
PYTHON=${PYTHON:-python3}
LANGS="de nl sv pl cs fi tr ca"
WORK=${WORK:-/tmp/speechxfer_gpu_seed}
WHEELS=${WHEELS:-gpu_wheels}
if [[ "${SEED_TOY:-0}" == 1 ]]; then
    COUNT=24 JOBS=2 MAX_MINUTES=1 HIDDEN=64 LAYERS=2 BATCH_S=16 WORKERS=2 EVAL_EVERY=10 WALL_S=240
else
    # 6000 sentences a language: ~45 h of speech, synthesized in about a minute on 16 cores.
    COUNT=6000 JOBS=16 MAX_MINUTES=6 HIDDEN=320 LAYERS=6 BATCH_S=320 WORKERS=12 EVAL_EVERY=500 WALL_S=510
fi
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
LOG="$WORK/gpu_seed.log"
: > "$LOG"
say() { echo "[gpu_seed $(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }

pack() {
    # Runs on every exit, so a failed run still returns its logs. $OUT holds at most a few files.
    local model="$WORK/seed_gpu"
    [[ -f "$model/model.safetensors" ]] && cp "$model/model.safetensors" "$OUT/model.safetensors"
    mkdir -p "$model"
    cp "$LOG" "$model/gpu_seed.log" 2>/dev/null || true
    cp "$WORK/run/model/metrics.jsonl" "$model/metrics.jsonl" 2>/dev/null || true
    tar -czf "$OUT/seed_gpu.tar.gz" -C "$model" --exclude model.safetensors . || true
    say "packed: $(ls "$OUT" | tr '\n' ' ')"
}
trap pack EXIT

# Wheels are zip archives: unpacking them into a folder on PYTHONPATH needs no pip, no index and no write
# access to the box's Python (which may be marked externally managed).
say "unpacking the wheels of $WHEELS"
rm -rf "$WORK/site"
shopt -s nullglob  # no wheels at all (a machine that has every package) is fine
for wheel in "$WHEELS"/*.whl; do
    "$PYTHON" -m zipfile -e "$wheel" "$WORK/site"
done
nvidia-smi -L 2>&1 | tee -a "$LOG" || true
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

say "synthesizing $COUNT sentences for each of: $LANGS"
# A script file, not stdin: the synthesis processes are spawned and re-import the main module.
cat > "$WORK/synthesize.py" <<'EOF'
import sys, time
from speechxfer.synth import build_corpus, read_sentences

if __name__ == "__main__":
    out, count, jobs, languages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    for language in languages:
        start = time.monotonic()
        corpus = build_corpus(language, read_sentences(f"data/texts/{language}.txt"), f"{out}/{language}",
                              count=count, jobs=jobs, seed=0)
        hours = sum(u.duration_s for utts in corpus.splits.values() for u in utts) / 3600
        sizes = ", ".join(f"{name} {len(utts)}" for name, utts in corpus.splits.items())
        print(f"{language}: {sizes} utterances, {hours:.2f} h in {time.monotonic() - start:.0f} s", flush=True)
EOF
timeout 240 "$PYTHON" "$WORK/synthesize.py" "$WORK/data" "$COUNT" "$JOBS" $LANGS 2>&1 | tee -a "$LOG" \
    || say "synthesis stopped early; training on the languages that are complete"
DONE=$(for lang in $LANGS; do [[ -f "$WORK/data/$lang/test.jsonl" ]] && echo -n "$lang "; done || true)
[[ -n "$DONE" ]] || { say "no corpus was synthesized"; exit 1; }

# Whatever synthesis took, leave ~75 s of the wall budget for the test evaluation, saving and packing.
ELAPSED=$(( $(date +%s) - START ))
TRAIN_MINUTES=$("$PYTHON" -c "print(round(max(0.5, min($MAX_MINUTES, ($WALL_S - $ELAPSED - 75) / 60)), 2))")
say "training for $TRAIN_MINUTES minutes"
train() {  # train WORKERS MINUTES
    "$PYTHON" scripts/train_seed.py --data "$WORK/data" --languages $DONE --out "$WORK/seed_gpu" \
        --work-dir "$WORK/run" --max-minutes "$2" --hidden-size "$HIDDEN" --layers "$LAYERS" \
        --eval-every "$EVAL_EVERY" --set train.max_batch_s="$BATCH_S" --set train.num_workers="$1" 2>&1 \
        | grep --line-buffered -v "Writing model shards" | tee -a "$LOG"
}
if ! train "$WORKERS" "$TRAIN_MINUTES"; then
    # Data-loader workers are the likeliest part to fail on an unknown box (shared memory): retry without.
    ELAPSED=$(( $(date +%s) - START ))
    LEFT=$("$PYTHON" -c "print(round(($WALL_S - $ELAPSED - 75) / 60, 2))")
    if "$PYTHON" -c "raise SystemExit($LEFT < 1)"; then
        say "training failed; retrying without data-loader workers for $LEFT minutes"
        rm -rf "$WORK/run"
        train 0 "$LEFT"
    else
        say "training failed, too late to retry"
    fi
fi
say "done"
