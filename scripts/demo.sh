#!/usr/bin/env bash
# The offline demo: fine-tune the shipped seed checkpoint (seed/, trained on synthetic de, nl, sv, pl, cs, fi, tr,
# ca) on a small synthetic corpus of a language it has never heard, and print the test WER and CER.
#
#   bash scripts/demo.sh          # Spanish: recipes/demo/es.yaml
#   bash scripts/demo.sh it       # any LANG with a recipes/demo/LANG.yaml
#   SEED_DIR=path/to/model bash scripts/demo.sh   # another seed folder of the same kind
#
# Needs no GPU and no model hub: pip (for the GPL-3 espeak-ng wheel of the synth extra) and apt (only for a
# missing fortunes-LANG package and the LibreOffice help pages the sentences come from). It writes
# data/texts/LANG.txt, data/demo/LANG/ (the corpus) and runs/demo-LANG/ (the model); a rerun reuses the corpus and
# replaces the model.
set -euo pipefail
cd "$(dirname "$0")/.."

lang="${1:-es}"
recipe="recipes/demo/$lang.yaml"
seed_dir="${SEED_DIR:-seed}"
sentences=1500   # about 1.6 h of speech in 25 s on 2 cores: more sentences than the run can use costs little
texts="data/texts/$lang.txt"
corpus="data/demo/$lang"
output_dir="runs/demo-$lang"

start=$SECONDS
step() { printf '\n== [%3d s] %s\n' $((SECONDS - start)) "$*"; }
fail() { echo "demo: $*" >&2; exit 2; }

languages=$(ls recipes/demo | sed -n 's/^\([a-z]*\)\.yaml$/\1/p' | xargs)
# recipes/demo/es-asterisk.yaml and the like train on prepared real speech: `speechxfer train` runs them, not this
[[ "$lang" =~ ^[a-z]+$ && -f "$recipe" ]] || fail "no recipe $recipe (languages with one: $languages)"
[ -f "$seed_dir/model.safetensors" ] || fail "no seed checkpoint in $seed_dir/ (model.safetensors)"

step "installing speechxfer with the synth extra (espeak-ng, GPL-3)"
python -m pip install -q -e ".[synth]"

if [ ! -s "$texts" ]; then
    step "preparing sentences: $texts"
    # apt-get download needs package lists; a fresh container may have none.
    has_candidate() { [[ "$(apt-cache policy "$1" 2>/dev/null)" =~ Candidate:\ [0-9] ]]; }
    has_candidate "libreoffice-help-$lang" || apt-get update -qq
    if [ ! -d "/usr/share/games/fortunes/$lang" ] && has_candidate "fortunes-$lang"; then
        apt-get install -y -qq "fortunes-$lang"
    fi
    python scripts/prepare_texts.py --languages "$lang"
fi

if [ ! -s "$corpus/test.jsonl" ]; then
    step "synthesizing $sentences sentences into $corpus"
    python -m speechxfer synth "$lang" "$texts" "$corpus" --count "$sentences"
fi

if [ -e "$output_dir" ]; then
    step "removing the previous demo model $output_dir"
    rm -rf "$output_dir"
fi
step "fine-tuning $seed_dir with $recipe"
python -m speechxfer train "$recipe" --set "base=$seed_dir" --set "output_dir=$output_dir"

step "done: the model is in $output_dir (test_report.json, metrics.jsonl, curves.png)"
