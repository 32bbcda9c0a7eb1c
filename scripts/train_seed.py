"""Train the small multilingual seed checkpoint (wav2vec2 CTC, from scratch) on synthetic speech of the source
languages, and write it as a Hugging Face model folder with a model card.

Expects DATA/<lang>/{train,dev,test}.jsonl as `speechxfer synth LANG data/texts/LANG.txt DATA/LANG` writes them.
Runs on CPU or one CUDA GPU (bf16 autocast). Training stops when the time budget (--max-minutes, counted over
resumed runs) or --max-updates is spent; the learning-rate schedule (tri-stage) is laid over that budget. A
checkpoint is written every --checkpoint-every updates; --resume continues from it.

    python scripts/train_seed.py --data data/synth --out seed --max-minutes 60
    python scripts/train_seed.py --data data/synth --out seed --max-minutes 60 --resume   # after an interruption

What gets past the CTC blank plateau (see seed/README.md for the measured run): a short-utterances-first stage
(only utterances up to --short-first-s seconds for the first --short-first-share of the budget), a pre-layer-norm
("stable layer norm") transformer that tolerates a high peak learning rate, a warm-up that is a share of the
budget, and a cheap tapered group-norm conv front-end for more audio per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from speechxfer.audio import SAMPLE_RATE_HZ
from speechxfer.batching import DurationBatchSampler, SpeechDataset, collate, filter_utterances, frame_geometry
from speechxfer.decoding import GreedyDecoder, decode_batch
from speechxfer.manifest import Utterance, read_manifest
from speechxfer.recipe import TrainOptions
from speechxfer.scoring import score
from speechxfer.surgery import needs_attention_mask, save_model_folder
from speechxfer.text import TextNormalizer, TextOptions
from speechxfer.training import ADAM_BETAS, ADAM_EPS, get_lr
from speechxfer.vocabulary import Vocabulary

SOURCE_LANGUAGES = ("de", "nl", "sv", "pl", "cs", "fi", "tr", "ca")
# A tapered group-norm conv front-end: on 2 CPU cores it doubles the audio seconds per second of training
# against 128 channels with layer norm (docs: shared/notes/cpu-training-measurements.md). 20 ms frames.
CONV_DIM = (32, 64, 128, 128, 128, 128, 128)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
MIN_DURATION_S, MAX_DURATION_S = 0.5, 12.0
# The schedule is computed by speechxfer.training.get_lr over this many steps of progress (a share of the budget).
_SCHEDULE_STEPS = 100_000


def seed_config(vocab: Vocabulary, *, hidden_size: int, layers: int) -> Wav2Vec2Config:
    """Config of a from-scratch seed: heads of 64 dimensions, FFN 4x hidden, pre-layer-norm transformer."""
    return Wav2Vec2Config(
        vocab_size=len(vocab), pad_token_id=vocab.blank_id,
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=hidden_size // 64,
        intermediate_size=4 * hidden_size,
        conv_dim=CONV_DIM, conv_stride=CONV_STRIDE, conv_kernel=CONV_KERNEL, conv_bias=False,
        feat_extract_norm="group", do_stable_layer_norm=True, feat_extract_activation="gelu",
        num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16,
        hidden_dropout=0.05, attention_dropout=0.05, activation_dropout=0.0, feat_proj_dropout=0.05,
        final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.05, mask_time_length=5, mask_feature_prob=0.0,
        ctc_loss_reduction="mean", ctc_zero_infinity=True,
    )


def language_options(language: str) -> TextOptions:
    """The "basic" normalization with the language as casing locale (Turkish I/ı, İ/i)."""
    return TextOptions(locale=language)


def read_splits(data_dir: Path, languages: list[str]) -> dict[str, dict[str, list[Utterance]]]:
    """{split: {language: utterances}}; bad rows are reported and skipped."""
    splits: dict[str, dict[str, list[Utterance]]] = {"train": {}, "dev": {}, "test": {}}
    for language in languages:
        for split in splits:
            path = data_dir / language / f"{split}.jsonl"
            if not path.is_file():
                sys.exit(f"train_seed: no {path} (run `speechxfer synth {language} data/texts/{language}.txt "
                         f"{data_dir / language}` first)")
            utterances, problems = read_manifest(path)
            for problem in problems:
                print(f"skipped: {problem}", file=sys.stderr)
            splits[split][language] = utterances
    return splits


def encode(utterances: dict[str, list[Utterance]], *, vocab: Vocabulary,
           config: Wav2Vec2Config) -> list[tuple[Utterance, list[int]]]:
    """(utterance, labels) of every language, filtered as speechxfer's fine-tuning does."""
    examples = []
    for language, utts in utterances.items():
        kept, report = filter_utterances(utts, normalizer=TextNormalizer(language_options(language)), vocab=vocab,
                                         config=config, min_duration_s=MIN_DURATION_S, max_duration_s=MAX_DURATION_S)
        if report.total:
            print(f"{language}: {report}", file=sys.stderr)
        examples += kept
    return examples


def collate_with_lengths(items: list[dict], *, attention_mask: bool) -> dict:
    """speechxfer.batching.collate plus "num_samples": (batch,) int64, the unpadded length of each input."""
    batch = collate(items, attention_mask=attention_mask)
    batch["num_samples"] = torch.tensor([len(item["input_values"]) for item in items])
    return batch


def loader(dataset, sampler, *, attention_mask: bool, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      collate_fn=partial(collate_with_lengths, attention_mask=attention_mask),
                      pin_memory=torch.cuda.is_available())


@torch.no_grad()
def character_error_rates(model: Wav2Vec2ForCTC, examples: dict[str, list[tuple[Utterance, list[int]]]], *,
                          vocab: Vocabulary, device: torch.device, max_batch_s: float) -> dict[str, dict]:
    """Greedy-decoding CER and WER per language: {language: {"cer", "wer", "empty", "utterances"}}."""
    was_training = model.training
    model.eval()
    results = {}
    attention_mask = needs_attention_mask(model.config)
    geometry = frame_geometry(model.config)
    decoder = GreedyDecoder(vocab, frame_s=geometry.stride / SAMPLE_RATE_HZ)
    for language, items in examples.items():
        dataset = SpeechDataset(items)
        refs = {utt.id: vocab.decode(labels) for utt, labels in items}  # label ids: repeats are letters
        hyps = {}
        sampler = DurationBatchSampler(dataset.durations_s, max_batch_s=max_batch_s, shuffle=False)
        for batch in loader(dataset, sampler, attention_mask=attention_mask, workers=0):
            ids = batch.pop("ids")
            lengths = torch.tensor([geometry.frames(n) for n in batch.pop("num_samples").tolist()])
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            with _autocast(device):
                logits = model(**inputs).logits  # (batch, frames, vocab)
            transcripts = decode_batch(decoder, logits.float().log_softmax(dim=-1).cpu(), lengths)
            hyps.update((utterance_id, t.text) for utterance_id, t in zip(ids, transcripts))
        report = score(refs, hyps, bootstrap=0)
        results[language] = {"cer": report.cer, "wer": report.wer, "utterances": len(items),
                             "empty": sum(not h for h in hyps.values()) / max(1, len(hyps))}
    model.train(was_training)
    return results


def _autocast(device: torch.device):
    # bf16 on GPUs: no loss scaling needed, and the CTC loss itself runs in float32 inside transformers.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                       enabled=False)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: an interrupted save leaves the previous checkpoint."""
    temp = path.with_suffix(".tmp")
    torch.save(state, temp)
    os.replace(temp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder with <lang>/{train,dev,test}.jsonl")
    parser.add_argument("--languages", nargs="+", default=list(SOURCE_LANGUAGES))
    parser.add_argument("--out", required=True, type=Path, help="model folder to write (e.g. seed)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/seed"), help="checkpoint and logs")
    parser.add_argument("--resume", action="store_true", help="continue from WORK_DIR/checkpoint.pt")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="training time budget over all runs")
    parser.add_argument("--max-updates", type=int, default=None, help="stop after this many updates as well")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup-share", type=float, default=0.08, help="share of the budget warming up")
    parser.add_argument("--hold-share", type=float, default=0.42, help="share held at the peak")
    parser.add_argument("--max-batch-s", type=float, default=16.0, help="seconds of (padded) audio per batch")
    parser.add_argument("--short-first-s", type=float, default=3.0,
                        help="first stage: only utterances up to this long (0: no curriculum)")
    parser.add_argument("--short-first-share", type=float, default=0.15, help="share of the budget in stage one")
    parser.add_argument("--eval-every", type=int, default=200, help="updates between dev CER evaluations")
    parser.add_argument("--eval-utterances", type=int, default=40, help="dev utterances per language")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_minutes <= 0:
        parser.error("--max-minutes must be positive")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.work_dir / "checkpoint.pt"
    splits = read_splits(args.data, args.languages)

    checkpoint = None
    if args.resume:
        if not checkpoint_path.is_file():
            sys.exit(f"train_seed: --resume, but there is no {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        vocab = Vocabulary(tuple(checkpoint["vocab"]))
        config = Wav2Vec2Config.from_dict(checkpoint["config"])
    else:
        texts = [TextNormalizer(language_options(language))(u.text)
                 for language, utts in splits["train"].items() for u in utts]
        vocab = Vocabulary.from_texts(texts)
        config = seed_config(vocab, hidden_size=args.hidden_size, layers=args.layers)

    torch.manual_seed(args.seed)
    model = Wav2Vec2ForCTC(config)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters / 1e6:.2f} M parameters, vocabulary of {len(vocab)}, device {device}", flush=True)

    train_examples = encode(splits["train"], vocab=vocab, config=config)
    dev_examples = {lang: encode({lang: utts[:args.eval_utterances]}, vocab=vocab, config=config)
                    for lang, utts in splits["dev"].items()}
    dataset = SpeechDataset(train_examples)
    durations_s = dataset.durations_s
    short = [i for i, d in enumerate(durations_s) if d <= args.short_first_s]
    train_hours = sum(durations_s) / 3600
    print(f"train: {len(dataset)} utterances, {train_hours:.2f} h; stage one: {len(short)} utterances up to "
          f"{args.short_first_s} s", flush=True)

    schedule = TrainOptions(lr=args.lr, max_updates=_SCHEDULE_STEPS, warmup_ratio=args.warmup_share,
                            hold_ratio=args.hold_share, schedule="tri_stage")
    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                  weight_decay=0.01)
    samplers = {"short": DurationBatchSampler([durations_s[i] for i in short], max_batch_s=args.max_batch_s,
                                              seed=args.seed) if short and args.short_first_s > 0 else None,
                "all": DurationBatchSampler(durations_s, max_batch_s=args.max_batch_s, seed=args.seed)}
    state = {"update": 0, "elapsed_s": 0.0, "audio_s": 0.0, "evaluations": [], "plateau_left_at": None}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for name, sampler_state in checkpoint["samplers"].items():
            if samplers[name] is not None:
                samplers[name].load_state_dict(sampler_state)
        state = checkpoint["state"]
        torch.set_rng_state(checkpoint["rng"])
        print(f"resumed at update {state['update']}, {state['elapsed_s'] / 60:.1f} min trained", flush=True)

    budget_s = args.max_minutes * 60
    attention_mask = needs_attention_mask(config)
    log = (args.work_dir / "train_log.jsonl").open("a", encoding="utf-8")
    run_start = time.monotonic() - state["elapsed_s"]

    def progress() -> float:
        done = (time.monotonic() - run_start) / budget_s
        if args.max_updates:
            done = max(done, state["update"] / args.max_updates)
        return done

    def checkpoint_now() -> None:
        state["elapsed_s"] = time.monotonic() - run_start
        save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "vocab": list(vocab.tokens),
            "config": config.to_dict(), "state": state, "rng": torch.get_rng_state(),
            "samplers": {n: s.state_dict() for n, s in samplers.items() if s is not None}})

    def evaluate_now() -> None:
        results = character_error_rates(model, dev_examples, vocab=vocab, device=device,
                                        max_batch_s=args.max_batch_s)
        mean_cer = float(np.mean([r["cer"] for r in results.values()]))
        entry = {"update": state["update"], "minutes": (time.monotonic() - run_start) / 60, "dev_cer": mean_cer,
                 "per_language": {k: round(v["cer"], 4) for k, v in results.items()}}
        state["evaluations"].append(entry)
        # Leaving the plateau: most hypotheses are no longer empty and the CER dropped clearly below 1.
        if state["plateau_left_at"] is None and mean_cer < 0.8:
            state["plateau_left_at"] = {"update": state["update"], "minutes": entry["minutes"],
                                        "audio_h": state["audio_s"] / 3600}
        log.write(json.dumps({"eval": entry}) + "\n")
        log.flush()
        print(f"update {state['update']}: dev CER {mean_cer:.3f} "
              + " ".join(f"{k} {v['cer']:.2f}" for k, v in results.items()), flush=True)

    stage = "short" if samplers["short"] is not None and progress() < args.short_first_share else "all"
    while progress() < 1.0:
        for batch in loader(dataset if stage == "all" else torch.utils.data.Subset(dataset, short), samplers[stage],
                            attention_mask=attention_mask, workers=args.workers):
            batch.pop("ids")
            num_samples = batch.pop("num_samples")
            lr = get_lr(min(_SCHEDULE_STEPS - 1, int(progress() * _SCHEDULE_STEPS)), schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with _autocast(device):
                loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            state["update"] += 1
            state["audio_s"] += float(num_samples.sum()) / SAMPLE_RATE_HZ
            loss_value = loss.item()
            log.write(json.dumps({"update": state["update"], "loss": round(loss_value, 4), "lr": lr,
                                  "grad_norm": round(float(grad_norm), 3), "stage": stage,
                                  "minutes": round((time.monotonic() - run_start) / 60, 3)}) + "\n")
            if state["update"] % 20 == 0:
                print(f"update {state['update']} loss {loss_value:.3f} lr {lr:.2e} stage {stage} "
                      f"{(time.monotonic() - run_start) / 60:.1f} min {state['audio_s'] / 3600:.2f} h audio",
                      flush=True)
            if state["update"] % args.eval_every == 0:
                evaluate_now()
            if state["update"] % args.checkpoint_every == 0:
                checkpoint_now()
            next_stage = "short" if samplers["short"] is not None and progress() < args.short_first_share else "all"
            if progress() >= 1.0 or next_stage != stage:
                stage = next_stage
                break
    checkpoint_now()
    log.close()

    test_examples = {lang: encode({lang: utts}, vocab=vocab, config=config) for lang, utts in splits["test"].items()}
    test = character_error_rates(model, test_examples, vocab=vocab, device=device, max_batch_s=args.max_batch_s)
    model.to("cpu").to(torch.float16)
    model.config.dtype = "float16"
    save_model_folder(args.out, model, vocab)
    summary = {
        "parameters": parameters, "updates": state["update"], "training_minutes": state["elapsed_s"] / 60,
        "audio_hours_seen": state["audio_s"] / 3600, "device": _device_name(device),
        "languages": args.languages, "train_hours": {lang: sum(u.duration_s for u in utts) / 3600
                                                     for lang, utts in splits["train"].items()},
        "train_utterances": {lang: len(utts) for lang, utts in splits["train"].items()},
        "test": test, "plateau_left_at": state["plateau_left_at"], "evaluations": state["evaluations"],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (args.out / "README.md").write_text(model_card(summary, config=config, vocab=vocab), encoding="utf-8")
    mean_cer = np.mean([r["cer"] for r in test.values()])
    print(f"test CER (mean of languages) {mean_cer:.3f}: "
          + " ".join(f"{k} {v['cer']:.3f}" for k, v in test.items()))
    print(f"wrote {args.out}")
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def model_card(summary: dict, *, config: Wav2Vec2Config, vocab: Vocabulary) -> str:
    """seed/README.md: data, size, training time, per-language test CER and what got past the plateau."""
    s = summary["settings"]
    size_mb = summary["parameters"] * 2 / 2**20
    rows = "\n".join(f"| {lang} | {summary['train_utterances'][lang]} | {summary['train_hours'][lang]:.2f} | "
                     f"{r['utterances']} | {r['cer']:.3f} | {r['wer']:.3f} |"
                     for lang, r in summary["test"].items())
    mean_cer = np.mean([r["cer"] for r in summary["test"].values()])
    plateau = summary["plateau_left_at"]
    plateau_text = ("The dev CER never fell below 0.8 during this run: it did not get past the plateau."
                    if plateau is None else
                    f"The mean dev CER first fell below 0.8 at update {plateau['update']}, after "
                    f"{plateau['minutes']:.1f} minutes and {plateau['audio_h']:.2f} h of audio.")
    curve = "\n".join(f"| {e['update']} | {e['minutes']:.1f} | {e['dev_cer']:.3f} |" for e in summary["evaluations"])
    return f"""# speechxfer seed: a small multilingual wav2vec2 CTC model trained on synthetic speech

A from-scratch `Wav2Vec2ForCTC` trained by `scripts/train_seed.py` on espeak-ng speech of
{", ".join(summary["languages"])} with one shared character vocabulary ({len(vocab)} tokens). It exists to be
fine-tuned: speechxfer's offline demo transfers it to held-out languages (es, it, fr, ru, pt are never seen).
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
- AdamW (betas 0.9/0.98, weight decay 0.01), peak learning rate {s["lr"]}, tri-stage schedule over the time
  budget (warm-up {s["warmup_share"]:.0%}, hold {s["hold_share"]:.0%}, exponential decay to 5%), gradient
  clipping 5, batches of up to {s["max_batch_s"]} s of padded audio from length buckets.
- Curriculum: for the first {s["short_first_share"]:.0%} of the budget only utterances up to
  {s["short_first_s"]} s, then everything.
- Command: `python scripts/train_seed.py --data {s["data"]} --out {s["out"]} --max-minutes {s["max_minutes"]}
  --hidden-size {s["hidden_size"]} --layers {s["layers"]} --lr {s["lr"]} --max-batch-s {s["max_batch_s"]}`

## The CTC blank plateau
{plateau_text}

What was chosen against it: the short-utterances-first stage (short inputs align easily, so the model leaves
the all-blank output sooner), a pre-layer-norm transformer (stable with a high peak learning rate), a warm-up
proportional to the budget, and a cheap tapered group-norm conv front-end (more audio per second on a CPU).

| update | minutes | mean dev CER |
|---|---|---|
{curve}

## Licence
The weights are released with speechxfer. The training speech was produced with espeak-ng (GPL-3), used as a
program; the sentences come from Debian's fortunes and LibreOffice help packages.
"""


if __name__ == "__main__":
    raise SystemExit(main())
