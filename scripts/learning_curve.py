"""Learning curves of transfer: test WER against minutes of target-language training data, at a fixed compute budget.

Three ways of training the same architecture, each on the first 5, 10, 20 and 40 minutes of one shuffled train
split, with the same number of updates, the same seconds of audio per batch, the same vocabulary, dev and test set:

  (a) transfer     the seed with speechxfer's way: the recipe as it is (vocabulary transfer into the new CTC head,
                   the recipe's staged freezing: head-only warm-up, feature encoder frozen)
  (b) hf_example   the seed the way transformers' run_speech_recognition_ctc.py does it: a random new head
                   (replace_ctc_head(..., source_vocab=None)), the feature encoder frozen and nothing else
  (c) scratch      the seed's config with random weights, everything trained, at the peak learning rate the
                   seed itself was trained with from scratch

Each finished cell is cached in OUT/results.json and a rerun skips it; an interrupted cell resumes from its last/
checkpoint. The report goes to REPORT_DIR/learning_curves.{md,json,png}.

    bash scripts/demo.sh                      # makes data/demo/es (the corpus) and data/texts/es.txt
    python scripts/learning_curve.py                          # seed/, data/demo/es, 600 updates of 32 s (~52 min)
    python scripts/learning_curve.py --budget-updates 80 --max-batch-s 16 --out runs/learning_curve_80   # ~45 min
                                                              # on a loaded machine: docs/learning_curves_80.md
    python scripts/learning_curve.py --device cuda --budget-updates 800 --max-batch-s 64 --out runs/learning_curve_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# torch, transformers and speechxfer are imported inside the functions: --device cpu must hide the GPUs before any
# of them can look for one.
REPO = Path(__file__).resolve().parents[1]
CONDITIONS = {
    "transfer": "(a) seed, speechxfer (vocabulary transfer, staged freezing)",
    "hf_example": "(b) seed, transformers example (random head, feature encoder frozen)",
    "scratch": "(c) from scratch (same architecture)",
}
# From-scratch training needs a higher peak learning rate than fine-tuning: that of scripts/train_seed.py.
SCRATCH_LR = 2e-3
EVALUATIONS_PER_CELL = 3  # dev evaluations per run; the best one is scored on test


@dataclass(frozen=True)
class Grid:
    """What every cell shares."""

    recipe: Path  # the transfer recipe; (b) and (c) change only base, freezing (and lr for (c))
    seed_dir: Path
    corpus: Path  # folder with train/dev/test.jsonl
    minutes: tuple[float, ...]
    budget_updates: int
    max_batch_s: float
    device: str  # "cpu" or "cuda"
    out: Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seed-dir", type=Path, default=REPO / "seed", help="the seed model folder (default seed/)")
    parser.add_argument("--corpus", type=Path, default=REPO / "data/demo/es",
                        help="folder with train/dev/test.jsonl of the target language (default data/demo/es)")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes/demo/es.yaml",
                        help="recipe of the transfer run (a); its text, model and train settings hold for all")
    parser.add_argument("--minutes", type=_minutes, default=(5.0, 10.0, 20.0, 40.0),
                        help="comma-separated minutes of training data (default 5,10,20,40)")
    # 600 updates of 32 s, the demo recipe's budget: the 12 runs took 51.7 min wall on 2 idle cores (96 min of
    # process CPU time). At 80 updates of 16 s training from scratch never left the blank plateau.
    parser.add_argument("--budget-updates", type=int, default=600, help="updates of every run (default 600)")
    parser.add_argument("--max-batch-s", type=float, default=32.0,
                        help="seconds of audio per batch of every run (default 32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "runs/learning_curve",
                        help="runs and the results cache (default runs/learning_curve)")
    parser.add_argument("--report-dir", type=Path, default=REPO / "docs",
                        help="where learning_curves.{md,json,png} go (default docs/)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first looks for a GPU: Accelerate then picks the CPU

    from speechxfer.cli import messages_to_stderr
    from speechxfer.errors import SpeechxferError

    try:
        grid = Grid(recipe=args.recipe.resolve(), seed_dir=args.seed_dir.resolve(), corpus=args.corpus.resolve(),
                    minutes=args.minutes, budget_updates=args.budget_updates, max_batch_s=args.max_batch_s,
                    device=args.device, out=args.out.resolve())
        with messages_to_stderr():  # training's progress messages, as `speechxfer train` shows them
            results = run_grid(grid)
        write_report(grid, results, args.report_dir)
    except SpeechxferError as err:
        print(f"learning_curve: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.report_dir / 'learning_curves.md'}, .json, .png")
    return 0


def _minutes(value: str) -> tuple[float, ...]:
    try:
        minutes = tuple(sorted(float(v) for v in value.split(",") if v.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not minutes or minutes[0] <= 0:
        raise argparse.ArgumentTypeError("minutes must be positive")
    return minutes


def run_grid(grid: Grid) -> dict:
    """Train every (condition, minutes) cell not yet in OUT/results.json; returns the results
    {"settings": ..., "cells": {"<condition>/<minutes>": {test_wer, test_cer, ...}}}."""
    import torch

    from speechxfer.errors import InputError

    if grid.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no CUDA device")
    grid.out.mkdir(parents=True, exist_ok=True)
    cache = grid.out / "results.json"
    settings = {"seed_dir": str(grid.seed_dir), "corpus": str(grid.corpus), "recipe": str(grid.recipe),
                "budget_updates": grid.budget_updates, "max_batch_s": grid.max_batch_s}
    results = {"settings": settings, "cells": {}}
    if cache.exists():
        results = json.loads(cache.read_text(encoding="utf-8"))
        if results["settings"] != settings:
            raise InputError(f"holds results of other settings ({results['settings']}); choose another --out",
                             path=cache)

    subsets = write_subsets(grid)
    vocab_dir = write_vocabulary(grid, subsets[max(grid.minutes)])
    bases = {"transfer": grid.seed_dir, "hf_example": grid.out / "base_hf_example",
             "scratch": grid.out / "base_scratch"}
    make_bases(grid.seed_dir, vocab_dir, hf_example=bases["hf_example"], scratch=bases["scratch"])

    for minutes in grid.minutes:
        for condition in CONDITIONS:
            key = f"{condition}/{minutes:g}"
            if key in results["cells"]:
                continue
            print(f"=== {key}", flush=True)
            results["cells"][key] = run_cell(grid, condition, minutes, base=bases[condition],
                                             train_manifest=subsets[minutes], vocab_dir=vocab_dir)
            results["cells"][key]["device"] = _device_name(grid.device)
            _write_json(cache, results)
    return results


def write_subsets(grid: Grid) -> dict[float, Path]:
    """Nested train manifests: the first utterances of a seeded shuffle of the corpus train split that add up to
    each number of minutes (5 ⊂ 10 ⊂ 20 ⊂ 40). InputError when the split holds less than the largest."""
    from speechxfer.errors import InputError
    from speechxfer.manifest import load_manifest, write_manifest

    train = load_manifest(grid.corpus / "train.jsonl")
    random.Random(0).shuffle(train)
    total_min = sum(u.duration_s for u in train) / 60
    if total_min < max(grid.minutes):
        raise InputError(f"the train split holds {total_min:.1f} minutes, fewer than {max(grid.minutes):g}: "
                         "synthesize more sentences", path=grid.corpus / "train.jsonl")
    subsets = {}
    for minutes in grid.minutes:
        taken, seconds = [], 0.0
        for u in train:
            if seconds >= minutes * 60:
                break
            taken.append(u)
            seconds += u.duration_s
        subsets[minutes] = grid.out / "data" / f"train_{minutes:g}min.jsonl"
        write_manifest(subsets[minutes], taken)
    return subsets


def write_vocabulary(grid: Grid, train_manifest: Path) -> Path:
    """One vocabulary for every cell, from the largest subset's texts normalized as the recipe says."""
    from speechxfer.recipe import load_recipe
    from speechxfer.text import TextNormalizer
    from speechxfer.vocabulary import vocabulary_from_manifests

    recipe = load_recipe(grid.recipe, overrides=[f"base={grid.seed_dir}"])
    vocab, _, _ = vocabulary_from_manifests(train_manifest, normalizer=TextNormalizer(recipe.text))
    folder = grid.out / "vocab"
    vocab.save(folder)
    return folder


def make_bases(seed_dir: Path, vocab_dir: Path, *, hf_example: Path, scratch: Path) -> None:
    """Write the starting points of (b) and (c) as model folders whose head already fits the vocabulary (so
    training copies it row for row): the seed with a random head, and the seed's config with random weights."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from speechxfer.surgery import replace_ctc_head, save_model_folder
    from speechxfer.vocabulary import Vocabulary

    vocab = Vocabulary.load(vocab_dir)
    if not (hf_example / "model.safetensors").exists():
        model = Wav2Vec2ForCTC.from_pretrained(seed_dir, dtype=torch.float32, use_safetensors=True)
        torch.manual_seed(0)
        replace_ctc_head(model, vocab, source_vocab=None)
        save_model_folder(hf_example, model, vocab)
    if not (scratch / "model.safetensors").exists():
        torch.manual_seed(0)
        model = Wav2Vec2ForCTC(Wav2Vec2Config.from_pretrained(seed_dir)).float()
        replace_ctc_head(model, vocab, source_vocab=None)
        save_model_folder(scratch, model, vocab)


def run_cell(grid: Grid, condition: str, minutes: float, *, base: Path, train_manifest: Path,
             vocab_dir: Path) -> dict:
    """Train one cell (resuming its last/ checkpoint if there is one) and return its scores and costs."""
    from speechxfer.manifest import load_manifest
    from speechxfer.recipe import load_recipe
    from speechxfer.training import train

    output_dir = grid.out / "runs" / f"{condition}_{minutes:g}min"
    # Evaluations every ceil(budget / n) updates, so that the last one falls on the final update.
    overrides = [f"base={base}", f"data.train={train_manifest}", f"data.dev={grid.corpus / 'dev.jsonl'}",
                 f"data.test={grid.corpus / 'test.jsonl'}", f"vocabulary.path={vocab_dir}",
                 f"train.max_updates={grid.budget_updates}", f"train.max_batch_s={grid.max_batch_s}",
                 f"eval.every_updates={-(-grid.budget_updates // EVALUATIONS_PER_CELL)}", "eval.patience=null",
                 f"output_dir={output_dir}"]
    if condition != "transfer":
        overrides += ["freezing.head_only_updates=0", "freezing.bottom_layers=0", "freezing.layer_lr_decay=1.0"]
    if condition == "scratch":
        overrides += ["freezing.feature_encoder=false", f"train.lr={SCRATCH_LR}"]
    recipe = load_recipe(grid.recipe, overrides=overrides)
    resume = (output_dir / "last" / "training_state.pt").is_file()
    if not resume and output_dir.exists():
        shutil.rmtree(output_dir)  # a run that stopped before its first checkpoint: start it over
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    result = train(recipe, resume=resume)
    utterances = load_manifest(train_manifest)
    return {"condition": condition, "minutes": minutes, "train_minutes": sum(u.duration_s for u in utterances) / 60,
            "train_utterances": len(utterances), "updates": result.updates, "best_update": result.best_update,
            "best_dev_wer": result.best_dev_wer, "test_wer": result.test_wer, "test_cer": result.test_cer,
            "wall_s": time.perf_counter() - wall_start, "cpu_s": time.process_time() - cpu_start,
            "resumed": resume}


def write_report(grid: Grid, results: dict, report_dir: Path) -> None:
    """learning_curves.json (the results), .md (table, checks, settings) and .png (test WER vs minutes)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    cells = results["cells"]
    _write_json(report_dir / "learning_curves.json", results)
    plot(cells, grid.minutes, report_dir / "learning_curves.png")

    def cell(condition: str, minutes: float) -> dict | None:
        return cells.get(f"{condition}/{minutes:g}")

    header = "| minutes of data | " + " | ".join(CONDITIONS.values()) + " |"
    rows = [header, "|---" * (len(CONDITIONS) + 1) + "|"]
    for minutes in grid.minutes:
        entries = []
        for condition in CONDITIONS:
            c = cell(condition, minutes)
            entries.append("not run" if c is None else f"{100 * c['test_wer']:.1f} ({100 * c['test_cer']:.1f})")
        rows.append(f"| {minutes:g} | " + " | ".join(entries) + " |")
    done = [c for c in cells.values()]
    wall_min = sum(c["wall_s"] for c in done) / 60
    cpu_min = sum(c["cpu_s"] for c in done) / 60
    devices = sorted({c["device"] for c in done})
    lines = [
        "# Learning curves: transfer from the seed vs. the transformers recipe vs. from scratch",
        "",
        f"Test WER (CER in brackets), in %, on the held-out test split of `{grid.corpus}`, against minutes "
        "of training data. Every run has the same compute budget: "
        f"{grid.budget_updates} updates of up to {grid.max_batch_s:g} s of audio, the same vocabulary, dev and "
        f"test set (greedy CTC decoding of the model with the best dev WER, evaluated {EVALUATIONS_PER_CELL} "
        "times per run).",
        "",
        *rows,
        "",
        "![test WER vs minutes of training data](learning_curves.png)",
        "",
        "## Checks",
        "",
        *checks(cells, grid.minutes),
        "",
        "## How it was made",
        "",
        f"- Written by `scripts/learning_curve.py` on {', '.join(devices)}: {len(done)} runs, "
        f"{wall_min:.1f} min wall-clock, {cpu_min:.1f} min of process CPU time.",
        f"- Seed: `{_relative(grid.seed_dir)}`; corpus: `{_relative(grid.corpus)}` (train subsets are nested "
        "prefixes of one seeded shuffle); recipe of (a): "
        f"`{_relative(grid.recipe)}`.",
        "- (b) starts from the seed with a random head sized from the vocabulary and freezes the feature encoder "
        "only: no head-only warm-up, no layer-wise learning-rate decay, as transformers' "
        "`run_speech_recognition_ctc.py` does.",
        f"- (c) starts from the seed's config with random weights, trains everything (feature encoder included) at "
        f"a peak learning rate of {SCRATCH_LR:g} (that of `scripts/train_seed.py`).",
        "- Everything else (learning rate of (a) and (b), schedule, SpecAugment, dropouts) is the recipe's.",
    ]
    (report_dir / "learning_curves.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def checks(cells: dict, minutes: tuple[float, ...]) -> list[str]:
    """The two acceptance checks of the learning curves, as markdown bullet points with the numbers."""
    def wer(condition: str, m: float) -> float | None:
        c = cells.get(f"{condition}/{m:g}")
        return None if c is None else c["test_wer"]

    lines = []
    largest = max(minutes)
    scratch_best = wer("scratch", largest)
    small = [(m, wer("transfer", m)) for m in minutes if m <= 10 and wer("transfer", m) is not None]
    if scratch_best is None or not small:
        lines.append(f"- (a) with at most 10 minutes vs. (c) with {largest:g} minutes: not all runs done.")
    else:
        reached = [m for m, w in small if w <= scratch_best]
        verdict = (f"yes, with {min(reached):g} minutes" if reached else "no")
        lines.append(f"- Does (a) reach, with at most 10 minutes, the test WER of (c) with {largest:g} minutes "
                     f"({100 * scratch_best:.1f}%)? {verdict} (best of (a) up to 10 minutes: "
                     f"{100 * min(w for _, w in small):.1f}%).")
    pairs = [(m, wer("transfer", m), wer("hf_example", m)) for m in minutes]
    pairs = [(m, a, b) for m, a, b in pairs if a is not None and b is not None]
    worse = [f"{m:g} min ({100 * a:.1f}% vs {100 * b:.1f}%)" for m, a, b in pairs if a > b]
    lines.append(f"- Is (a) no worse than (b) at every point? "
                 + ("yes" if not worse else "no, worse at " + ", ".join(worse))
                 + f" ({len(pairs)} of {len(minutes)} points run).")
    return lines


def plot(cells: dict, minutes: tuple[float, ...], png_path: Path) -> None:
    """Test WER (%) against minutes of training data, one line per condition, log-2 x axis."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for condition, label in CONDITIONS.items():
        points = [(m, 100 * cells[f"{condition}/{m:g}"]["test_wer"]) for m in minutes
                  if f"{condition}/{m:g}" in cells]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(minutes), [f"{m:g}" for m in minutes])
    axes.set_xlabel("minutes of training data")
    axes.set_ylabel("test WER (%)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(png_path, dpi=100)


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _write_json(path: Path, value: object) -> None:
    """Atomic: a temporary file renamed into place, so an interrupted write keeps the previous results."""
    from speechxfer.atomic import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps(value, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
