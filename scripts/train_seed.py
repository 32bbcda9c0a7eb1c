"""Train the small multilingual seed checkpoint (wav2vec2 CTC, from scratch) on synthetic speech of the source
languages, as a run of the recipe recipes/seed/seed.yaml, and write it as a Hugging Face model folder with a model
card.

Expects DATA/<lang>/{train,dev,test}.jsonl as `speechxfer synth LANG data/texts/LANG.txt DATA/LANG` writes them.
The script merges them into one manifest per split, each text normalized with its own language's casing locale
(Turkish I/ı), and the first --eval-utterances dev utterances of each language; speechxfer.training.train does the
rest (from model_config, under the time budget train.max_minutes counted over resumed runs, short utterances
first). It then scores the best model on each language's test sentences, and writes it in fp16 to OUT with
README.md (the model card) and training_summary.json.

    python scripts/train_seed.py --data data/synth --out seed                    # the recipe: 5 minutes on a GPU
    python scripts/train_seed.py --data data/synth --out seed --max-minutes 100 --set train.max_batch_s=16
    python scripts/train_seed.py --data data/synth --out seed --max-minutes 100 --resume   # after an interruption
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_LANGUAGES = ("de", "nl", "sv", "pl", "cs", "fi", "tr", "ca")
SPLITS = ("train", "dev", "test")
# The mean dev CER below which a run counts as past the CTC blank plateau (most hypotheses are no longer empty).
PLATEAU_CER = 0.8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", required=True, type=Path, help="folder with <lang>/{train,dev,test}.jsonl")
    parser.add_argument("--languages", nargs="+", default=list(SOURCE_LANGUAGES))
    parser.add_argument("--out", required=True, type=Path, help="model folder to write (e.g. seed)")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes/seed/seed.yaml")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/seed"),
                        help="merged manifests, the training run (model/, with last/ and metrics) and test scores")
    parser.add_argument("--resume", action="store_true", help="continue the run in WORK_DIR/model/last/")
    parser.add_argument("--max-minutes", type=float, help="train.max_minutes: training time budget over all runs")
    parser.add_argument("--max-updates", type=int, help="train.max_updates: stop after this many updates as well")
    parser.add_argument("--hidden-size", type=int,
                        help="model_config.hidden_size, with heads of 64 dimensions and an FFN of 4x hidden")
    parser.add_argument("--layers", type=int, help="model_config.num_hidden_layers")
    parser.add_argument("--eval-every", type=int, help="eval.every_updates: updates between dev evaluations")
    parser.add_argument("--eval-utterances", type=int, default=40, help="dev utterances per language")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any other recipe key, as `speechxfer train --set`; repeatable")
    args = parser.parse_args(argv)

    import torch

    from speechxfer.errors import SpeechxferError
    from speechxfer.recipe import load_recipe
    from speechxfer.training import train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        manifests = write_manifests(args.data, args.languages, args.work_dir / "manifests",
                                    dev_utterances=args.eval_utterances)
        recipe = load_recipe(args.recipe, overrides=recipe_overrides(args, manifests))
        result = train(recipe, resume=args.resume)
        test = test_scores(Path(result.output_dir), manifests, work_dir=args.work_dir)
        summary = write_seed(Path(result.output_dir), args.out, recipe=recipe, manifests=manifests, test=test,
                             updates=result.updates, command=shlex.join(["python", "scripts/train_seed.py",
                                                                         *(sys.argv[1:] if argv is None else argv)]))
    except SpeechxferError as err:
        print(f"train_seed: error: {err}", file=sys.stderr)
        return 2
    mean_cer = sum(r["cer"] for r in test.values()) / len(test)
    print(f"test CER (mean of languages) {mean_cer:.3f}: " + " ".join(f"{k} {v['cer']:.3f}" for k, v in test.items()))
    print(f"wrote {args.out} ({summary['updates']} updates, {summary['training_minutes']:.1f} minutes)")
    return 0


def write_manifests(data_dir: Path, languages: list[str], folder: Path, *,
                    dev_utterances: int) -> dict[str, dict[str, Path]]:
    """Merge DATA/<lang>/<split>.jsonl into folder/<split>.jsonl, each text normalized as the "basic" preset with its
    language as casing locale; the dev split keeps the first `dev_utterances` of each language. Per-language test
    manifests go to folder/test_<lang>.jsonl. Returns {"all": {split: path}, "test": {language: path}}."""
    from speechxfer.errors import InputError
    from speechxfer.manifest import read_manifest, write_manifest
    from speechxfer.text import TextNormalizer, TextOptions, TextRejected

    merged: dict[str, list] = {split: [] for split in SPLITS}
    paths: dict[str, dict[str, Path]] = {"all": {}, "test": {}}
    for language in languages:
        normalize = TextNormalizer(TextOptions(locale=language))
        for split in SPLITS:
            path = data_dir / language / f"{split}.jsonl"
            if not path.is_file():
                raise InputError(f"no {split}.jsonl (run `speechxfer synth {language} data/texts/{language}.txt "
                                 f"{data_dir / language}` first)", path=path.parent)
            utterances, problems = read_manifest(path)
            for problem in problems:
                print(f"skipped: {problem}", file=sys.stderr)
            if split == "dev":
                utterances = utterances[:dev_utterances]
            kept = []
            for u in utterances:
                try:
                    kept.append(dataclasses.replace(u, text=normalize(u.text), language=language))
                except TextRejected:  # the basic preset rejects nothing; kept for a preset that does
                    continue
            merged[split] += kept
            if split == "test":
                paths["test"][language] = folder / f"test_{language}.jsonl"
                write_manifest(paths["test"][language], kept)
    for split, utterances in merged.items():
        paths["all"][split] = folder / f"{split}.jsonl"
        write_manifest(paths["all"][split], utterances)
    return paths


def recipe_overrides(args: argparse.Namespace, manifests: dict[str, dict[str, Path]]) -> list[str]:
    """--set overrides for the recipe: the merged manifests, the output folder, and the options given as flags."""
    overrides = [f"data.{split}={path}" for split, path in manifests["all"].items()]
    overrides.append(f"output_dir={args.work_dir / 'model'}")
    if args.max_minutes is not None:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    if args.max_updates is not None:
        overrides.append(f"train.max_updates={args.max_updates}")
    if args.hidden_size is not None:
        overrides += [f"model_config.hidden_size={args.hidden_size}",
                      f"model_config.num_attention_heads={max(1, args.hidden_size // 64)}",
                      f"model_config.intermediate_size={4 * args.hidden_size}"]
    if args.layers is not None:
        overrides.append(f"model_config.num_hidden_layers={args.layers}")
    if args.eval_every is not None:
        overrides.append(f"eval.every_updates={args.eval_every}")
    return overrides + args.overrides


def test_scores(model_dir: Path, manifests: dict[str, dict[str, Path]], *, work_dir: Path) -> dict[str, dict]:
    """Greedy-decoding CER and WER of the model on each language's test sentences (speechxfer.evaluate):
    {language: {"cer", "wer", "utterances"}}."""
    from speechxfer.decoding import GreedyDecoder
    from speechxfer.evaluate import evaluate
    from speechxfer.transcribe import Recognizer

    recognizer = Recognizer(model_dir)
    decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)
    scores = {}
    for language, manifest in manifests["test"].items():
        report = evaluate(recognizer, manifest, output_dir=work_dir / "test" / language, decoder=decoder,
                          bootstrap=0).report
        scores[language] = {"cer": report.cer, "wer": report.wer, "utterances": report.sentences}
    return scores


def write_seed(model_dir: Path, out: Path, *, recipe, manifests: dict[str, dict[str, Path]], test: dict[str, dict],
               updates: int, command: str) -> dict:
    """Write the trained model in fp16 to `out` with recipe.yaml, training_summary.json and README.md."""
    import shutil

    import torch
    from transformers import Wav2Vec2ForCTC

    from speechxfer.manifest import load_manifest, read_jsonl
    from speechxfer.surgery import save_model_folder
    from speechxfer.vocabulary import Vocabulary

    model = Wav2Vec2ForCTC.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float16)
    vocab = Vocabulary.load(model_dir)
    save_model_folder(out, model, vocab)
    shutil.copyfile(model_dir / "recipe.yaml", out / "recipe.yaml")

    records = [record for _, record in read_jsonl(model_dir / "metrics.jsonl")]
    losses = [r for r in records if "loss" in r]
    evaluations = [{"update": r["update"], "minutes": r["minutes"], "dev_cer": r["dev_cer"]}
                   for r in records if "dev_cer" in r]
    past = next((e for e in evaluations if e["dev_cer"] < PLATEAU_CER), None)
    train: dict[str, list] = {language: [] for language in manifests["test"]}
    for u in load_manifest(manifests["all"]["train"]):
        train[u.language].append(u)
    summary = {
        "parameters": model.num_parameters(), "updates": updates, "training_minutes": losses[-1]["minutes"],
        "audio_hours_seen": losses[-1]["audio_h"], "device": _device_name(),
        "languages": list(manifests["test"]),
        "train_hours": {lang: sum(u.duration_s for u in utts) / 3600 for lang, utts in train.items()},
        "train_utterances": {lang: len(utts) for lang, utts in train.items()},
        "test": test,
        "plateau_left_at": None if past is None else {
            "update": past["update"], "minutes": past["minutes"],
            "audio_h": max((r["audio_h"] for r in losses if r["update"] <= past["update"]), default=0.0)},
        "evaluations": evaluations,
        "command": command,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(summary, recipe=recipe, config=model.config, vocab=vocab),
                                   encoding="utf-8")
    return summary


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def model_card(summary: dict, *, recipe, config, vocab) -> str:
    """seed/README.md: data, size, training time, per-language test CER and what got past the plateau."""
    from speechxfer.training import FINAL_LR_SCALE

    t = recipe.train
    size_mb = summary["parameters"] * 2 / 2**20
    rows = "\n".join(f"| {lang} | {summary['train_utterances'][lang]} | {summary['train_hours'][lang]:.2f} | "
                     f"{r['utterances']} | {r['cer']:.3f} | {r['wer']:.3f} |"
                     for lang, r in summary["test"].items())
    mean_cer = sum(r["cer"] for r in summary["test"].values()) / len(summary["test"])
    plateau = summary["plateau_left_at"]
    plateau_text = (f"The dev CER never fell below {PLATEAU_CER} during this run: it did not get past the plateau."
                    if plateau is None else
                    f"The dev CER first fell below {PLATEAU_CER} at update {plateau['update']}, after "
                    f"{plateau['minutes']:.1f} minutes and {plateau['audio_h']:.2f} h of audio.")
    curve = "\n".join(f"| {e['update']} | {e['minutes']:.1f} | {e['dev_cer']:.3f} |" for e in summary["evaluations"])
    schedule, phases = (("tri-stage", f"warm-up {t.warmup_ratio:.0%}, hold {t.hold_ratio:.0%}, exponential decay to "
                                      f"{FINAL_LR_SCALE:.0%}") if t.schedule == "tri_stage" else
                        ("linear", f"warm-up {t.warmup_ratio:.0%}, then linear decay to 0"))
    stage = ("" if t.short_first_s is None else
             f"- Curriculum: for the first {t.short_first_share:.0%} of the budget only utterances up to "
             f"{t.short_first_s:g} s, then everything.\n")
    return f"""# speechxfer seed: a small multilingual wav2vec2 CTC model trained on synthetic speech

A from-scratch `Wav2Vec2ForCTC` trained by `scripts/train_seed.py` (the recipe `recipes/seed/seed.yaml`) on espeak-ng
speech of {", ".join(summary["languages"])} with one shared character vocabulary ({len(vocab)} tokens). It exists to
be fine-tuned: speechxfer's offline demo transfers it to held-out languages (es, it, fr, ru, pt are never seen).
It has only heard synthetic voices; do not expect it to transcribe human speech as it is.

## Model
- {summary["parameters"] / 1e6:.2f} M parameters, stored in fp16 ({size_mb:.1f} MiB).
- Hidden {config.hidden_size}, {config.num_hidden_layers} pre-layer-norm transformer layers
  ({config.num_attention_heads} heads, FFN {config.intermediate_size}); conv front-end {list(config.conv_dim)}
  channels with group norm, 20 ms frames.
- Input: 16 kHz mono, zero mean / unit variance per utterance (the folder's preprocessor_config.json).
- Text: Unicode NFC, lowercase (Turkish casing for tr), punctuation removed except `'` and `-` inside words.

## Data
Sentences from Debian `fortunes-<lang>` and `libreoffice-help-<lang>` (scripts/prepare_texts.py: 4-20 words,
the language's letters only, no digits or symbols), spoken by espeak-ng (`speechxfer synth`) with a random
variant (f1-f5, m1-m7, klatt-klatt4), speed 130-190 words/min and pitch 30-70 per utterance, 16 kHz FLAC.

| language | train utterances | train hours | test utterances | test CER | test WER |
|---|---|---|---|---|---|
{rows}

Mean test CER over the languages: **{mean_cer:.3f}** (greedy CTC decoding, held-out synthetic sentences).

## Training
- Device: {summary["device"]}; {summary["training_minutes"]:.1f} minutes of training, {summary["updates"]} updates,
  {summary["audio_hours_seen"]:.2f} h of audio seen.
- AdamW (betas 0.9/0.98, weight decay {t.weight_decay:g}), peak learning rate {t.lr:g}, {schedule} schedule over
  the time budget ({phases}), gradient clipping {t.clip_norm:g}, batches of up to {t.max_batch_s:g} s of padded
  audio from length buckets; the model of the best dev WER is kept.
{stage}- Command: `{summary["command"]}`

## The CTC blank plateau
{plateau_text}

What was chosen against it: the short-utterances-first stage (short inputs align easily, so the model leaves
the all-blank output sooner), a pre-layer-norm transformer (stable with a high peak learning rate), a warm-up
proportional to the budget, and a cheap tapered group-norm conv front-end (more audio per second on a CPU).

| update | minutes | dev CER (every language's dev sentences) |
|---|---|---|
{curve}

## Licence
The weights are released with speechxfer. The training speech was produced with espeak-ng (GPL-3), used as a
program; the sentences come from Debian's fortunes and LibreOffice help packages.
"""


if __name__ == "__main__":
    raise SystemExit(main())
