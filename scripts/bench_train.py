"""Training throughput: audio seconds trained per wall second by `speechxfer train`'s loop, by transformers'
Trainer fed as run_speech_recognition_ctc.py feeds it, and by the bare training step.

On the same model, the same corpus (synthetic speech, 1-15 s, median about 5 s), the same optimiser (AdamW with
speechxfer's betas and eps, linear schedule with 10% warm-up, gradient clipping at 1.0, feature encoder frozen):
  a        `speechxfer.training.train` (batches of at most --max-batch-s padded seconds, planned by duration,
           audio decoded by the loader; fused AdamW; the frozen encoder's output cached from the second epoch
           on; a group-norm encoder such as the seed's gives each utterance its own frames, as training runs it); timed
           from its own metrics.jsonl (cumulative audio_h and minutes).
  b        transformers `Trainer` as examples/pytorch/speech-recognition/run_speech_recognition_ctc.py runs it:
           audio decoded and normalized by Wav2Vec2FeatureExtractor once before training (as its dataset.map),
           padding CTC collator (processor.pad, labels padded with -100), fixed per_device_train_batch_size,
           train_sampling_strategy="group_by_length" (transformers 5's group_by_length). The batch size is the one
           whose mean padded seconds per batch over an epoch come closest to a's.
  c        the limit: forward + backward + clip + AdamW step (a's: training.adamw) on a's own batches held in
           memory, each batch's audio laid end to end and cut into as many equal rows as it has utterances (no
           padding, no loader).
Levers, each a path of its own (--levers): a+workers (train.num_workers=1), a+plain (per-tensor AdamW instead of
the fused kernel), a+nocache (train.feature_cache_mib=0), c+cache (the frozen feature encoder's output computed
once and reused), c+plain (per-tensor AdamW), c+eager (eager attention instead of SDPA), c+bf16 (bf16 autocast).

a's cache serves from the second epoch on: to time it, make --warmup at least one epoch's updates (the plan line
says how many), e.g. --utterances 100 --warmup 25. --shape seed-layernorm is the seed with layer-norm conv
layers (new norms at their initial values, the rest of its weights kept): a model that takes an attention mask,
whose encoder runs on padded batches where nothing is cached.

Each run is a fresh process: --warmup updates, then --updates timed ones; paths alternate (a, b, c, a, b, c, ...)
and each path's figure is the median over --repeat runs. Prints one line per run, then the table (audio seconds
per wall second, seconds per update, padding share of the batches over one epoch, peak RSS), and last
`ratio_vs_trainer=X ratio_vs_limit=Y` (a/b, a/c). Targets on CPU: a/b >= 1.5 on the seed, >= 1.2 on the XLS-R
shape; a/c >= 0.9.

  python scripts/bench_train.py --quick                         # the seed, a few minutes
  python scripts/bench_train.py --levers a+plain,c+plain,c+eager
  python scripts/bench_train.py --shape seed-layernorm --utterances 100 --warmup 25 --levers a+nocache,c+cache
  python scripts/bench_train.py --shape xls-r-300m --max-batch-s 16 --warmup 1 --updates 2 --repeat 2

The corpus is spoken by espeak-ng (`speechxfer.synth`) from random Spanish-spelled pseudo-words, or, without
espeak-ng, the speech-like tones of bench_transcribe.py with the same texts; it stays in --work between runs.
Run it alone on the machine (the figures are ratios of alternating runs, but a busy CPU still moves them).

On a GPU (--device cuda, --dtype bfloat16: a trains with train.mixed_precision bf16, b with the Trainer's bf16,
c under bf16 autocast; on a CPU train() has no mixed precision, so a trains in float32 whatever --dtype says) a
last table gives, per path and naming the card: audio hours trained per hour, the peak GPU
memory torch allocated, and the model FLOPs utilisation (bench_device.training_step_flops of each timed step's
input over its wall time, against --peak-tflops, by default the card's dense bf16 peak from
bench_device.PEAK_BF16_TFLOPS).

  python scripts/bench_train.py --shape xls-r-300m --device cuda --dtype bfloat16 --max-batch-s 200 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

# numpy, torch, transformers and speechxfer are imported inside the functions, so that --help is instant.
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
PATHS = ("a", "b", "c")
LEVERS = ("a+workers", "a+plain", "a+nocache", "c+cache", "c+plain", "c+eager", "c+bf16")
LABELS = {"a": "speechxfer train loop", "b": "transformers Trainer (example)", "c": "limit: bare step",
          "a+workers": "a, 1 loader worker", "a+plain": "a, per-tensor AdamW", "a+nocache": "a, no encoder cache",
          "c+cache": "c, feature encoder output cached", "c+plain": "c, per-tensor AdamW",
          "c+eager": "c, eager attention", "c+bf16": "c, bf16 autocast"}
# Optimisation shared by every path: the figures measure speed, so only the shape of the schedule matters.
LR = 1e-4
WARMUP_RATIO = 0.1
CLIP_NORM = 1.0
# Utterance lengths of the corpus: log-normal around a median of 5 s (10% under 2.3 s, 10% over 11 s, like read
# speech corpora), kept within 1-15 s after synthesis.
MEDIAN_S = 5.0
SIGMA = 0.6
MIN_S, MAX_S = 1.0, 15.0
WORDS_PER_S = 3.2  # espeak-ng's Spanish at 130-190 words per minute reads these pseudo-words this fast
CONSONANTS = "bcdfglmnprstvz"
VOWELS = "aeiou"
DTYPES = {"float32": "no", "bfloat16": "bf16"}  # --dtype: a's train.mixed_precision; b and c autocast to it


def make_corpus(work: Path, *, utterances: int) -> Path:
    """A JSONL manifest of `utterances` synthetic utterances of 1-15 s in work/corpus-N (made once)."""
    import numpy as np

    folder = work / f"corpus-{utterances}"
    manifest = folder / "bench.jsonl"
    if manifest.is_file():
        return manifest
    from speechxfer.manifest import Utterance, load_manifest, write_manifest
    from speechxfer.synth import build_corpus, espeak_available

    rng = np.random.default_rng(0)
    # 20% more sentences than needed: a few come out shorter or longer than MIN_S..MAX_S.
    targets_s = np.exp(rng.normal(math.log(MEDIAN_S), SIGMA, int(utterances * 1.2)))
    sentences = [" ".join(_pseudo_word(rng) for _ in range(max(2, round(t * WORDS_PER_S)))) for t in targets_s]
    if espeak_available():
        build_corpus("es", sentences, folder, seed=0, jobs=os.cpu_count() or 1, dev_fraction=0, test_fraction=0)
        spoken = load_manifest(folder / "train.jsonl")
    else:
        import soundfile as sf

        sys.path.insert(0, str(SCRIPTS))
        from bench_transcribe import RATE_HZ, babble

        (folder / "audio").mkdir(parents=True, exist_ok=True)
        spoken = []
        for i, (sentence, target_s) in enumerate(zip(sentences, targets_s)):
            path = folder / "audio" / f"tone-{i:06d}.flac"
            samples = int(min(max(target_s, MIN_S), MAX_S) * RATE_HZ)
            sf.write(path, babble(rng, samples), RATE_HZ, format="FLAC", subtype="PCM_16")
            spoken.append(Utterance(id=path.stem, audio_path=str(path), text=sentence,
                                    duration_s=samples / RATE_HZ))
    kept = [u for u in spoken if MIN_S <= u.duration_s <= MAX_S][:utterances]
    write_manifest(manifest, kept)
    return manifest


def _pseudo_word(rng) -> str:
    """One to three consonant-vowel syllables, spelled as Spanish is read (every letter spoken)."""
    return "".join(rng.choice(list(CONSONANTS)) + rng.choice(list(VOWELS)) for _ in range(rng.integers(1, 4)))


def make_base(work: Path, shape: str, manifest: Path) -> Path:
    """The model every path starts from, as a speechxfer model folder whose head fits the corpus vocabulary:
    the shipped seed with a new head (seed-layernorm: and layer-norm conv layers), or bench_transcribe.py's random
    XLS-R-300M-shaped model (a-z head)."""
    base = work / f"base-{shape}"
    if (base / "model.safetensors").is_file():
        return base
    import torch
    from transformers import Wav2Vec2ForCTC

    from speechxfer.manifest import load_manifest
    from speechxfer.surgery import replace_ctc_head, save_model_folder
    from speechxfer.text import TextNormalizer
    from speechxfer.vocabulary import Vocabulary

    if shape == "xls-r-300m":
        sys.path.insert(0, str(SCRIPTS))
        from bench_transcribe import make_model

        make_model(base, shape)
        return base
    normalize = TextNormalizer()
    vocab = Vocabulary.from_texts(normalize(u.text) for u in load_manifest(manifest))
    overrides = {"feat_extract_norm": "layer"} if shape == "seed-layernorm" else {}
    model = Wav2Vec2ForCTC.from_pretrained(REPO / "seed", dtype=torch.float32, use_safetensors=True, **overrides)
    torch.manual_seed(0)
    replace_ctc_head(model, vocab)
    save_model_folder(base, model, vocab)
    return base


def plan(manifest: Path, base: Path, *, max_batch_s: float) -> dict:
    """Epoch-level figures of the batches: a's (DurationBatchSampler) and, for each fixed batch size, the
    Trainer's (LengthGroupedSampler), and the batch size whose mean padded seconds come closest to a's."""
    import torch
    from transformers import Wav2Vec2Config
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from speechxfer.batching import DurationBatchSampler, filter_utterances
    from speechxfer.manifest import load_manifest
    from speechxfer.recipe import TrainOptions
    from speechxfer.text import TextNormalizer
    from speechxfer.vocabulary import Vocabulary

    examples, _ = filter_utterances(load_manifest(manifest), normalizer=TextNormalizer(), vocab=Vocabulary.load(base),
                                    config=Wav2Vec2Config.from_pretrained(base),
                                    min_duration_s=TrainOptions.min_duration_s,
                                    max_duration_s=TrainOptions.max_duration_s)
    durations = [u.duration_s for u, _ in examples]
    planned = list(DurationBatchSampler(durations, max_batch_s=max_batch_s, seed=0))
    ours = _padding(durations, planned)
    theirs = {}
    for batch_size in range(1, 1 + max(2, int(max_batch_s / min(durations)))):
        order = list(LengthGroupedSampler(batch_size, lengths=durations, generator=torch.Generator().manual_seed(0)))
        theirs[batch_size] = _padding(durations, [order[i:i + batch_size] for i in range(0, len(order), batch_size)])
    batch_size = min(theirs, key=lambda b: abs(theirs[b]["padded_s"] - ours["padded_s"]))
    return {"a": ours, "b": theirs[batch_size], "batch_size": batch_size, "utterances": len(durations),
            "audio_min": sum(durations) / 60, "batches": len(planned)}


def _padding(durations: list[float], batches: list[list[int]]) -> dict:
    """Mean audio and padded seconds per batch, and the padding share of all padded seconds."""
    audio = sum(durations[i] for b in batches for i in b)
    padded = sum(len(b) * max(durations[i] for i in b) for b in batches)
    return {"audio_s": audio / len(batches), "padded_s": padded / len(batches), "padding": 1 - audio / padded,
            "max_padded_s": max(len(b) * max(durations[i] for i in b) for b in batches)}


# --- one path, run in a fresh process --------------------------------------------------------------------------


def run_path(path: str, *, manifest: Path, base: Path, work: Path, max_batch_s: float, batch_size: int,
             warmup: int, updates: int, device: str = "cpu", dtype: str = "float32") -> dict:
    """Train `warmup` + `updates` updates along `path` on `device` in `dtype` (DTYPES); returns the timed
    updates' audio seconds, wall seconds and model FLOPs (None where the path's steps skip the feature encoder),
    the process's peak RSS and, on a GPU, the peak GPU memory torch allocated (MiB)."""
    from transformers import Wav2Vec2Config

    sys.path.insert(0, str(SCRIPTS))
    from bench_device import TrainingSteps, peak_memory_mib, reset_peak_memory

    reset_peak_memory(device)
    steps = TrainingSteps()
    if path.startswith("a"):
        audio_s, wall_s = _run_speechxfer(manifest=manifest, base=base, work=work, max_batch_s=max_batch_s,
                                          warmup=warmup, updates=updates, lever=path.partition("+")[2], dtype=dtype)
    elif path == "b":
        audio_s, wall_s = _run_trainer(manifest=manifest, base=base, work=work, batch_size=batch_size,
                                       warmup=warmup, updates=updates, device=device, dtype=dtype)
    else:
        audio_s, wall_s = _run_limit(manifest=manifest, base=base, max_batch_s=max_batch_s, warmup=warmup,
                                     updates=updates, lever=path.partition("+")[2], device=device, dtype=dtype)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"audio_s": audio_s, "wall_s": wall_s, "peak_rss_mib": peak_mib, "peak_gpu_mib": peak_memory_mib(device),
            "flops": steps.flops(Wav2Vec2Config.from_pretrained(base), first=warmup, count=updates)}


def _run_speechxfer(*, manifest: Path, base: Path, work: Path, max_batch_s: float, warmup: int, updates: int,
                    lever: str, dtype: str) -> tuple[float, float]:
    from speechxfer import training
    from speechxfer.manifest import read_jsonl
    from speechxfer.recipe import DataOptions, EvalOptions, Recipe, TrainOptions, VocabularyOptions

    if lever == "plain":  # this process only: train() then builds AdamW without the fused kernel
        training.fused_optimizer_supported = lambda device: False
    out = work / "run-a"
    shutil.rmtree(out, ignore_errors=True)
    total = warmup + updates
    # Records at every multiple of log_every, so at `warmup` and at `total`; the one evaluation (and checkpoint)
    # comes after the last record.
    recipe = Recipe(base=str(base), data=DataOptions(train=str(manifest)),
                    vocabulary=VocabularyOptions(path=str(base)),
                    train=TrainOptions(lr=LR, max_updates=total, max_batch_s=max_batch_s, schedule="linear",
                                       warmup_ratio=WARMUP_RATIO, clip_norm=CLIP_NORM,
                                       num_workers=int(lever == "workers"),
                                       feature_cache_mib=0 if lever == "nocache" else TrainOptions.feature_cache_mib,
                                       log_every=math.gcd(warmup, updates), mixed_precision=DTYPES[dtype]),
                    eval=EvalOptions(every_updates=total), output_dir=str(out))
    training.train(recipe)
    records = {r["update"]: r for _, r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    start, end = records[warmup], records[total]
    return 3600 * (end["audio_h"] - start["audio_h"]), 60 * (end["minutes"] - start["minutes"])


def _example_model(base: Path, **kwargs):
    """The model as run_speech_recognition_ctc.py loads it: its config overrides (the defaults of its
    ModelArguments, which are speechxfer's recipe defaults too), then the feature encoder frozen."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config.from_pretrained(base)
    config.update({"feat_proj_dropout": 0.0, "attention_dropout": 0.0, "hidden_dropout": 0.0, "final_dropout": 0.0,
                   "mask_time_prob": 0.05, "mask_time_length": 10, "mask_feature_prob": 0.0,
                   "mask_feature_length": 10, "layerdrop": 0.0, "ctc_loss_reduction": "mean",
                   "activation_dropout": 0.0})
    model = Wav2Vec2ForCTC.from_pretrained(base, config=config, dtype=torch.float32, use_safetensors=True, **kwargs)
    model.freeze_feature_encoder()
    return model


def _run_trainer(*, manifest: Path, base: Path, work: Path, batch_size: int, warmup: int,
                 updates: int, device: str, dtype: str) -> tuple[float, float]:
    import torch
    from transformers import (Trainer, TrainerCallback, TrainingArguments, Wav2Vec2CTCTokenizer,
                              Wav2Vec2FeatureExtractor, Wav2Vec2Processor)

    from speechxfer.audio import load_audio
    from speechxfer.manifest import load_manifest
    from speechxfer.training import ADAM_BETAS, ADAM_EPS

    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(base)
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(base)
    processor = Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    model = _example_model(base)
    # The example's prepare_dataset (dataset.map, before training): audio decoded and normalized once, text
    # lowercased with a trailing space, tokenized. Kept as numpy arrays in memory, where the example reads lists
    # back from its Arrow cache: if anything, this favours the Trainer.
    dataset = []
    for u in load_manifest(manifest):
        samples = load_audio(u.audio_path, offset_s=u.offset_s, duration_s=u.duration_s)
        input_values = feature_extractor(samples, sampling_rate=feature_extractor.sampling_rate).input_values[0]
        dataset.append({"input_values": input_values, "input_length": len(input_values),
                        "labels": tokenizer(u.text.lower() + " ").input_ids})

    audio_s: list[float] = []  # unpadded seconds of each batch, in training order
    ends: list[float] = []  # perf_counter() at the end of each update

    def collate(features: list[dict]) -> dict:
        """The example's DataCollatorCTCWithPadding, plus each item's length for the count of audio seconds."""
        batch = processor.pad([{"input_values": f["input_values"]} for f in features], padding="longest",
                              return_tensors="pt")
        labels = processor.pad(labels=[{"input_ids": f["labels"]} for f in features], padding="longest",
                               return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels.attention_mask.ne(1), -100)
        batch["num_samples"] = torch.tensor([len(f["input_values"]) for f in features])
        return batch

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            audio_s.append(float(inputs.pop("num_samples").sum()) / feature_extractor.sampling_rate)
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(device)
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(work / "run-b"), per_device_train_batch_size=batch_size,
        train_sampling_strategy="group_by_length", length_column_name="input_length", max_steps=warmup + updates,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=WARMUP_RATIO, weight_decay=0.0,
        adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, max_grad_norm=CLIP_NORM,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=device == "cpu", bf16=dtype == "bfloat16", seed=0)
    trainer = CountingTrainer(model=model, args=args, data_collator=collate, train_dataset=dataset,
                              processing_class=feature_extractor, callbacks=[Clock()])
    trainer.train()
    return sum(audio_s[warmup:warmup + updates]), ends[warmup + updates - 1] - ends[warmup - 1]


def _run_limit(*, manifest: Path, base: Path, max_batch_s: float, warmup: int, updates: int,
               lever: str, device: str, dtype: str) -> tuple[float, float]:
    import torch

    from speechxfer.batching import DurationBatchSampler, SpeechDataset, filter_utterances
    from speechxfer.manifest import load_manifest
    from speechxfer.recipe import TrainOptions
    from speechxfer.text import TextNormalizer
    from speechxfer.training import ADAM_BETAS, ADAM_EPS, adamw
    from speechxfer.vocabulary import Vocabulary

    model = _example_model(base, **({"attn_implementation": "eager"} if lever == "eager" else {}))
    model.to(device).train()
    vocab = Vocabulary.load(base)
    examples, _ = filter_utterances(load_manifest(manifest), normalizer=TextNormalizer(), vocab=vocab,
                                    config=model.config, min_duration_s=TrainOptions.min_duration_s,
                                    max_duration_s=TrainOptions.max_duration_s)
    dataset = SpeechDataset(examples)
    # a's first batches (its sampler, seed and epoch), each laid end to end and cut into equal rows
    order = list(DurationBatchSampler(dataset.durations_s, max_batch_s=max_batch_s, seed=0))
    batches = []
    for indices in (order * (1 + (warmup + updates) // len(order)))[:warmup + updates]:
        items = [dataset[i] for i in indices]
        audio = torch.cat([item["input_values"] for item in items])
        row = len(audio) // len(items)
        labels = [t for item in items for t in [*item["labels"], vocab.delimiter_id]]
        step = -(-len(labels) // len(items))
        rows = [labels[i:i + step] for i in range(0, len(labels), step)]
        padded = torch.full((len(items), step), -100, dtype=torch.long)
        for r, ids in enumerate(rows):
            padded[r, :len(ids)] = torch.tensor(ids)
        batches.append({"input_values": audio[:row * len(items)].view(len(items), row).to(device),
                        "labels": padded.to(device)})
    if lever == "cache":
        class Replay(torch.nn.Module):
            """Stands in for the frozen feature encoder: its outputs, computed before timing, one per call."""

            def __init__(self, outputs: list[torch.Tensor]):
                super().__init__()
                self.outputs = iter(outputs)

            def forward(self, input_values: torch.Tensor) -> torch.Tensor:
                return next(self.outputs)

        with torch.no_grad():
            features = [model.wav2vec2.feature_extractor(b["input_values"]) for b in batches]
        model.wav2vec2.feature_extractor = Replay(features)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(params, lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS) if lever == "plain"
                 else adamw([{"params": params}], lr=LR, device=torch.device(device)))
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=lever == "bf16" or dtype == "bfloat16")
    ends = []
    for batch in batches:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        ends.append(time.perf_counter())
    audio_s = sum(b["input_values"].numel() for b in batches[warmup:]) / 16000
    return audio_s, ends[-1] - ends[warmup - 1]


def _synchronize(device: str) -> None:
    """Wait for the work queued on a GPU, so that a clock read next counts it (nothing to wait for on the CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


# --- the driver ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shape", choices=("seed", "seed-layernorm", "xls-r-300m"), default="seed",
                        help="the shipped seed (default), the seed with layer-norm conv layers, or a random "
                             "XLS-R-300M-shaped model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/speechxfer-bench-train"),
                        help="corpus, model folders and runs (kept between runs)")
    parser.add_argument("--utterances", type=_positive, default=400, help="utterances of the corpus (default 400)")
    parser.add_argument("--max-batch-s", type=float, default=32.0,
                        help="a's padded seconds per batch (the demo recipe's 32); b's batch size follows from it")
    parser.add_argument("--warmup", type=_positive, default=5, help="updates before timing, each run (default 5)")
    parser.add_argument("--updates", type=_positive, default=20, help="timed updates, each run (default 20)")
    parser.add_argument("--repeat", type=_positive, default=5, help="runs of each path, alternating (default 5)")
    parser.add_argument("--levers", default="", help=f"comma-separated extra paths: {', '.join(LEVERS)}")
    parser.add_argument("--quick", action="store_true", help="the seed, --repeat 3, --updates 10")
    parser.add_argument("--rss-cap-gib", type=float, default=8.0, help="stop a run whose RSS passes this")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every path trains")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="bfloat16: a with train.mixed_precision bf16, b with the Trainer's bf16, c under autocast")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: the card's dense bf16 peak, by its name)")
    parser.add_argument("--run-path", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    levers = [lever.strip() for lever in args.levers.split(",") if lever.strip()]
    if unknown := [lever for lever in levers if lever not in LEVERS]:
        parser.error(f"unknown lever {', '.join(unknown)}: choose from {', '.join(LEVERS)}")
    if args.quick:
        args.shape, args.repeat, args.updates = "seed", 3, 10
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = make_corpus(args.work, utterances=args.utterances)
    base = make_base(args.work, args.shape, manifest)
    if args.run_path:
        print(json.dumps(run_path(args.run_path, manifest=manifest, base=base, work=args.work,
                                  max_batch_s=args.max_batch_s, batch_size=args.batch_size, warmup=args.warmup,
                                  updates=args.updates, device=args.device, dtype=args.dtype)))
        return 0

    import torch

    sys.path.insert(0, str(SCRIPTS))
    from bench_device import device_name, peak_tflops
    from bench_transcribe import run_capped

    card = device_name(args.device)
    peak = args.peak_tflops or peak_tflops(card)
    batches = plan(manifest, base, max_batch_s=args.max_batch_s)
    padding = {"a": batches["a"], "b": batches["b"], "c": {"padding": 0.0}}
    print(f"model {args.shape} ({base}); corpus {batches['utterances']} utterances, {batches['audio_min']:.1f} min "
          f"({manifest}); {args.device} ({card}), {args.dtype}; {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          "torch threads; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"a: {batches['batches']} batches an epoch of <= {args.max_batch_s:g} s padded: "
          f"{batches['a']['padded_s']:.1f} s padded, "
          f"{batches['a']['audio_s']:.1f} s of audio per batch on average (largest {batches['a']['max_padded_s']:.1f} s)")
    print(f"b: per_device_train_batch_size {batches['batch_size']}: {batches['b']['padded_s']:.1f} s padded, "
          f"{batches['b']['audio_s']:.1f} s of audio per batch on average (largest {batches['b']['max_padded_s']:.1f} s)",
          flush=True)
    paths = [*PATHS, *levers]
    speeds: dict[str, list[float]] = {p: [] for p in paths}
    seconds: dict[str, list[float]] = {p: [] for p in paths}
    peaks: dict[str, float] = {}
    gpu_peaks: dict[str, float] = {}
    tflops: dict[str, list[float]] = {p: [] for p in paths}  # model TFLOP/s of each run
    # train() takes a GPU wherever there is one: hide it from a CPU run
    env = os.environ | {"TQDM_DISABLE": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})
    for repeat in range(args.repeat):
        for path in paths:
            command = [sys.executable, __file__, "--run-path", path, "--shape", args.shape, "--work", str(args.work),
                       "--utterances", str(args.utterances), "--max-batch-s", str(args.max_batch_s),
                       "--warmup", str(args.warmup), "--updates", str(args.updates),
                       "--batch-size", str(batches["batch_size"]), "--device", args.device, "--dtype", args.dtype]
            r = run_capped(command, env, cap_mib=args.rss_cap_gib * 1024)
            if r is None:
                print(f"run {repeat + 1} {path:<10} stopped: RSS passed {args.rss_cap_gib:g} GiB", flush=True)
                continue
            speeds[path].append(r["audio_s"] / r["wall_s"])
            seconds[path].append(r["audio_s"] / args.updates)
            peaks[path] = max(peaks.get(path, 0.0), r["peak_rss_mib"])
            device_figures = ""
            if r["flops"] is not None:
                tflops[path].append(r["flops"] / r["wall_s"] / 1e12)
                device_figures += f"   {tflops[path][-1]:.3g} TFLOP/s"
            if r["peak_gpu_mib"] is not None:
                gpu_peaks[path] = max(gpu_peaks.get(path, 0.0), r["peak_gpu_mib"])
                device_figures += f"   peak GPU {r['peak_gpu_mib']:6.0f} MiB"
            print(f"run {repeat + 1} {path:<10} {r['audio_s']:7.1f} s of audio in {r['wall_s']:6.1f} s: "
                  f"{speeds[path][-1]:6.3g} audio s/s   peak RSS {r['peak_rss_mib']:6.0f} MiB{device_figures}   load "
                  f"{os.getloadavg()[0]:.2f}   [{card}, {args.dtype}]", flush=True)

    print()
    print("| path | audio s per update | padding (epoch) | audio s / wall s (median) | runs | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    median = {p: statistics.median(v) for p, v in speeds.items() if v}
    for path in paths:
        if path not in median:
            print(f"| {path}: {LABELS[path]} | | | stopped (RSS cap) | 0 | |")
            continue
        share = padding[path.partition("+")[0]]["padding"]
        print(f"| {path}: {LABELS[path]} | {statistics.median(seconds[path]):.1f} | {share:.1%} | "
              f"{median[path]:.3g} | {len(speeds[path])} | {peaks[path]:.0f} |")
    print()
    against = "no known peak (give --peak-tflops)" if peak is None else f"a peak of {peak:g} TFLOP/s"
    print(f"{card}, {args.dtype}; MFU against {against}:")
    print("| path | audio h per h (median) | peak GPU MiB | model TFLOP/s (median) | MFU |")
    print("|---|---:|---:|---:|---:|")
    for path in [p for p in paths if p in median]:
        achieved = statistics.median(tflops[path]) if tflops[path] else None
        print(f"| {path} | {median[path]:.3g} | {round(gpu_peaks[path]) if path in gpu_peaks else '-'} | "
              f"{'-' if achieved is None else f'{achieved:.3g}'} | "
              f"{'-' if achieved is None or peak is None else f'{achieved / peak:.1%}'} |")
    print()
    for lever in levers:
        if lever in median and lever[0] in median:
            print(f"{lever} / {lever[0]}: {median[lever] / median[lever[0]]:.2f}")
    vs_trainer = median["a"] / median["b"] if "a" in median and "b" in median else float("nan")
    vs_limit = median["a"] / median["c"] if "a" in median and "c" in median else float("nan")
    targets = "1.2" if args.shape == "xls-r-300m" else "1.5"
    print(f"targets: a/b >= {targets}, a/c >= 0.9; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"ratio_vs_trainer={vs_trainer:.2f} ratio_vs_limit={vs_limit:.2f}")
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


if __name__ == "__main__":
    raise SystemExit(main())
