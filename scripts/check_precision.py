"""A few updates of `speechxfer.training.train` in each mixed precision (train.mixed_precision bf16 and fp16), on
the device train() picks (a GPU wherever there is one): every logged loss and every weight of the saved model must
be finite. Also reports whether the weights moved, and the updates whose gradient norm was not finite (with fp16,
the loss scaler skips those steps and lowers its scale). One line per precision, naming the device; exit status 1
when a check fails.

train() uses mixed precision only on CUDA (bf16 where the card has it) and says so when it falls back to float32:
on a CPU this checks float32 training, and the line says that too.

The corpus and model are bench_train.py's (made in --work when missing, shared with it).

  python scripts/check_precision.py --shape xls-r-300m --updates 10 --max-batch-s 100
  python scripts/check_precision.py --shape seed --updates 2 --max-batch-s 8      # the same paths on a CPU
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
PRECISIONS = ("bf16", "fp16")


def check(precision: str, *, manifest: Path, base: Path, out: Path, updates: int, max_batch_s: float) -> dict:
    """Train `updates` updates in `precision`; the losses and grad norms logged, whether train() fell back to
    float32, and the saved weights against the base's (non-finite count, largest change)."""
    import torch
    from safetensors.torch import load_file

    from speechxfer.manifest import read_jsonl
    from speechxfer.recipe import DataOptions, EvalOptions, Recipe, TrainOptions, VocabularyOptions
    from speechxfer.training import train

    shutil.rmtree(out, ignore_errors=True)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("speechxfer.training")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train(Recipe(base=str(base), data=DataOptions(train=str(manifest)),
                     vocabulary=VocabularyOptions(path=str(base)),
                     train=TrainOptions(max_updates=updates, max_batch_s=max_batch_s, schedule="linear",
                                        mixed_precision=precision, log_every=1),
                     eval=EvalOptions(every_updates=updates), output_dir=str(out)))
    finally:
        logger.removeHandler(handler)
    records = [r for _, r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    moved = max(float((after[name].float() - before[name].float()).abs().max())
                for name in after if name in before and before[name].shape == after[name].shape)
    return {"losses": [r["loss"] for r in records],
            "skipped": sum(r["grad_norm"] is not None and not math.isfinite(r["grad_norm"]) for r in records),
            "fell_back": any("training in float32" in line for line in said),
            "non_finite_weights": sum(int((~torch.isfinite(w.float())).sum()) for w in after.values()),
            "moved": moved}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("seed", "xls-r-300m"), default="seed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/speechxfer-bench-train"),
                        help="bench_train.py's folder: its corpus and model, and the runs")
    parser.add_argument("--utterances", type=int, default=400, help="utterances of bench_train's corpus")
    parser.add_argument("--updates", type=int, default=10, help="updates of each run")
    parser.add_argument("--max-batch-s", type=float, default=32.0, help="seconds of audio per batch")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="which of bf16,fp16 to check")
    args = parser.parse_args()

    sys.path.insert(0, str(SCRIPTS))
    import torch

    from bench_device import device_name
    from bench_train import make_base, make_corpus

    device = "cuda" if torch.cuda.is_available() else "cpu"  # as train()'s Accelerator picks it on one process
    card = device_name(device)
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = make_corpus(args.work, utterances=args.utterances)
    base = make_base(args.work, args.shape, manifest)
    failed = False
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        r = check(precision, manifest=manifest, base=base, out=args.work / f"precision-{precision}",
                  updates=args.updates, max_batch_s=args.max_batch_s)
        finite = (len(r["losses"]) == args.updates and all(math.isfinite(x) for x in r["losses"])
                  and r["non_finite_weights"] == 0)
        failed |= not finite
        trained_in = "float32 (train() fell back: no mixed precision on this device)" if r["fell_back"] else precision
        print(f"{precision}: {'PASS' if finite else 'FAIL'} [{card}, {args.shape}] trained in {trained_in}; "
              f"{len(r['losses'])} losses, first {r['losses'][0]:.4g}, last {r['losses'][-1]:.4g}, "
              f"{sum(not math.isfinite(x) for x in r['losses'])} not finite; {r['non_finite_weights']} weights not "
              f"finite; largest weight change {r['moved']:.3g}; {r['skipped']} updates with a non-finite gradient "
              "norm (skipped by the loss scaler)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
