"""Peak memory of one training update, with and without train.gradient_checkpointing.

Each case runs `train()` for one update in its own subprocess, so its peak RSS is its own: a random model of one
of bench_transcribe's SHAPES as the base, recipes/common_voice/tr.yaml's settings, and one batch of --batch-s
seconds of generated speech-like audio (utterances of --utterance-s). Prints wall time and peak RSS per case.

  python scripts/bench_train_memory.py --shape xls-r-300m --batch-s 60
  python scripts/bench_train_memory.py --batch-s 16 --cases checkpointed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from bench_transcribe import CHARACTERS, RATE_HZ, SHAPES, babble, make_model

REPO = Path(__file__).resolve().parents[1]
CASES = {"plain": False, "checkpointed": True}  # case -> train.gradient_checkpointing


def write_batch(folder: Path, *, batch_s: float, utterance_s: float) -> Path:
    """A manifest of utterances that fill one batch of batch_s seconds exactly (no padding)."""
    from speechxfer.manifest import Utterance, write_manifest

    rng = np.random.default_rng(0)
    count = max(1, round(batch_s / utterance_s))
    utterances = []
    for k in range(count):
        path = folder / f"u{k}.wav"
        sf.write(path, babble(rng, int(utterance_s * RATE_HZ)), RATE_HZ, subtype="PCM_16")
        text = " ".join("".join(rng.choice(list(CHARACTERS[:26]), size=5)) for _ in range(int(utterance_s * 2)))
        utterances.append(Utterance(id=f"u{k}", audio_path=str(path), text=text, duration_s=utterance_s))
    manifest = folder / "train.jsonl"
    write_manifest(manifest, utterances)
    return manifest


def run_case(model: Path, manifest: Path, out: Path, *, batch_s: float, utterance_s: float,
             checkpointing: bool) -> dict:
    from speechxfer.recipe import load_recipe
    from speechxfer.training import train

    overrides = [f"base={model}", "data.prepare=null", f"data.train={manifest}", f"output_dir={out}",
                 "train.max_updates=1", f"train.max_batch_s={batch_s}", f"train.max_duration_s={utterance_s + 1}",
                 "train.num_workers=0", f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    recipe = load_recipe(REPO / "recipes" / "common_voice" / "tr.yaml", overrides=overrides)
    start = time.perf_counter()
    train(recipe)
    return {"wall_s": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="xls-r-300m")
    parser.add_argument("--batch-s", type=float, default=60.0, help="seconds of audio in the one batch")
    parser.add_argument("--utterance-s", type=float, default=15.0, help="seconds of each utterance")
    parser.add_argument("--cases", default=",".join(CASES), help=f"which of {','.join(CASES)} to run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/speechxfer-bench"))
    parser.add_argument("--run-case", metavar="CASE", choices=tuple(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.workdir / f"model-{args.shape}"
    data = args.workdir / f"train-{args.batch_s:g}s"
    if args.run_case:
        print(json.dumps(run_case(model, data / "train.jsonl", args.workdir / f"run-{args.run_case}",
                                  batch_s=args.batch_s, utterance_s=args.utterance_s,
                                  checkpointing=CASES[args.run_case])))
        return
    if not (model / "model.safetensors").is_file():
        make_model(model, args.shape)
    data.mkdir(parents=True, exist_ok=True)
    write_batch(data, batch_s=args.batch_s, utterance_s=args.utterance_s)
    print(f"{args.shape}, one update on {args.batch_s:g} s of audio ({args.utterance_s:g} s utterances), "
          f"recipes/common_voice/tr.yaml, {os.cpu_count()} CPUs", flush=True)
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        shutil.rmtree(args.workdir / f"run-{case}", ignore_errors=True)  # train() refuses to overwrite a run
        command = [sys.executable, __file__, "--run-case", case, "--shape", args.shape, "--batch-s", str(args.batch_s),
                   "--utterance-s", str(args.utterance_s), "--workdir", str(args.workdir)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
        if done.returncode != 0:
            sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{case:<13} wall {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
