"""Memory of one training update, with and without train.gradient_checkpointing.

Each case runs `train()` for two updates in its own process: a random model of one of bench_transcribe's SHAPES as
the base, recipes/common_voice/tr.yaml's settings, and batches of exactly --batch-s seconds of generated speech-like
audio (utterances of at most --utterance-s, all the same length, so no padding). Global torch hooks read the
process's memory (/proc/self/status) around the second update, which finds the optimizer's state already there:

  set-up     resident memory when the first update's forward starts: libraries, data, optimizer without its
             state, and only the weights read so far (transformers maps the safetensors file: the weights come in
             as the first update reads them, and stay as private copies once it writes them)
  baseline   the same when the second update's forward starts: the libraries, all weights and AdamW's state (two
             more copies of every trained weight), what every later update starts from
  peak       the high-water mark of resident memory from there to the end of that update's optimizer step
             (forward, backward, gradient clipping, AdamW step; the mark is reset with /proc/self/clear_refs)
  increment  peak - baseline: what one update needs on top of the model and optimizer: the gradients (one copy
             of every trained weight, freed after each step) and the activations kept for the backward pass

Before each reading, free heap memory goes back to the system (malloc_trim), so resident memory counts live memory
and the increment counts pages the update really touched. The table also gives the process's whole-run peak RSS,
which includes saving the run (what this script printed before).

Memory guard: the smallest --batch-s runs first; a larger batch runs only where its peak, extrapolated linearly from
the increments of the batches measured so far (activations grow with the frames of a batch of equal-length
utterances), stays under --cap-gib and under the memory the system has available; a case whose resident memory
passes --cap-gib is killed.

  flock /work/exp/bench.lock python scripts/bench_train_memory.py --shape xls-r-300m --batch-s 16,30,60
  python scripts/bench_train_memory.py --shape small --batch-s 4,8 --cases checkpointed
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from bench_transcribe import CHARACTERS, RATE_HZ, SHAPES, babble, make_model, run_capped

REPO = Path(__file__).resolve().parents[1]
CASES = {"plain": False, "checkpointed": True}  # case -> train.gradient_checkpointing
MIB = 1024 * 1024
# Kept free beside an extrapolated peak when deciding whether a case may run: the guard samples every 0.2 s.
MARGIN_MIB = 1024


def write_batch(folder: Path, *, batch_s: float, utterance_s: float) -> tuple[Path, float]:
    """A manifest of equal-length utterances of at most utterance_s that fill one batch of batch_s seconds
    exactly (no padding); returns it and the utterances' length in seconds."""
    from speechxfer.manifest import Utterance, write_manifest

    rng = np.random.default_rng(0)
    count = math.ceil(batch_s / utterance_s - 1e-9)
    samples = int(batch_s * RATE_HZ) // count
    length_s = samples / RATE_HZ
    utterances = []
    for k in range(count):
        path = folder / f"u{k}.wav"
        sf.write(path, babble(rng, samples), RATE_HZ, subtype="PCM_16")
        text = " ".join("".join(rng.choice(list(CHARACTERS[:26]), size=5)) for _ in range(int(length_s * 2)))
        utterances.append(Utterance(id=f"u{k}", audio_path=str(path), text=text, duration_s=length_s))
    manifest = folder / "train.jsonl"
    write_manifest(manifest, utterances)
    return manifest, length_s


# --- one case, in its own process ----------------------------------------------------------------------------


def _memory_mib() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and its high-water mark (VmHWM), in MiB."""
    figures = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0]) / 1024  # kB
    return figures


def _settle() -> float:
    """Hand freed heap memory back to the system, restart the high-water mark from the resident memory left,
    and return that in MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to VmRSS (Linux >= 4.0, proc(5))
    return _memory_mib()["VmRSS"]


def run_case(model: Path, manifest: Path, out: Path, *, batch_s: float, utterance_s: float,
             checkpointing: bool) -> dict:
    """Two updates of train() on one batch of batch_s seconds; the memory figures of the second (MiB)."""
    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import Wav2Vec2ForCTC

    from speechxfer.recipe import load_recipe
    from speechxfer.training import train

    marks: dict[str, float] = {}
    forwards = 0

    def before_forward(module: torch.nn.Module, args: tuple) -> None:
        # The model's own training forward starts an update (gradient checkpointing re-runs layers, not the model).
        nonlocal forwards
        if isinstance(module, Wav2Vec2ForCTC) and module.training:
            forwards += 1
            marks.setdefault("setup_mib" if forwards == 1 else "baseline_mib", _settle())

    def after_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if forwards == 2:
            marks.setdefault("peak_mib", _memory_mib()["VmHWM"])

    register_module_forward_pre_hook(before_forward)
    register_optimizer_step_post_hook(after_step)
    overrides = [f"base={model}", "data.prepare=null", f"data.train={manifest}", f"output_dir={out}",
                 "train.max_updates=2", f"train.max_batch_s={batch_s}", f"train.max_duration_s={utterance_s + 1}",
                 "train.num_workers=0", f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    recipe = load_recipe(REPO / "recipes" / "common_voice" / "tr.yaml", overrides=overrides)
    start = time.perf_counter()
    train(recipe)
    if set(marks) != {"setup_mib", "baseline_mib", "peak_mib"}:
        raise RuntimeError(f"the hooks saw {forwards} training forwards, not 2: {marks}")
    return {**marks, "increment_mib": marks["peak_mib"] - marks["baseline_mib"], "wall_s": time.perf_counter() - start,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


# --- the driver ------------------------------------------------------------------------------------------------


def predicted_peak_mib(measured: dict[float, dict], batch_s: float) -> float:
    """The peak of a batch of batch_s seconds from measured ones ({batch_s: figures}): the largest baseline plus
    the largest increment per second of audio, times batch_s."""
    baseline = max(r["baseline_mib"] for r in measured.values())
    per_s = max(r["increment_mib"] / b for b, r in measured.items())
    return baseline + per_s * batch_s


def _available_mib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="xls-r-300m")
    parser.add_argument("--batch-s", default="16,30,60", help="seconds of audio in a batch, one or more")
    parser.add_argument("--utterance-s", type=float, default=15.0, help="longest utterance, seconds")
    parser.add_argument("--cases", default=",".join(CASES), help=f"which of {','.join(CASES)} to run")
    parser.add_argument("--cap-gib", type=float, default=16.0,
                        help="run a batch only if its extrapolated peak fits under this; kill a case passing it")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/speechxfer-bench"))
    parser.add_argument("--run-case", metavar="CASE", choices=tuple(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.workdir / f"model-{args.shape}"
    if args.run_case:
        batch_s = float(args.batch_s)
        data = args.workdir / f"train-{batch_s:g}s"
        print(json.dumps(run_case(model, data / "train.jsonl", args.workdir / f"run-{args.run_case}-{batch_s:g}s",
                                  batch_s=batch_s, utterance_s=args.utterance_s, checkpointing=CASES[args.run_case])))
        return
    sizes = sorted(float(b) for b in args.batch_s.split(","))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"unknown case {', '.join(unknown)}: choose from {', '.join(CASES)}")
    if not (model / "model.safetensors").is_file():
        make_model(model, args.shape)
    import torch

    print(f"{args.shape}, two updates of train() per case, figures of the second; recipes/common_voice/tr.yaml; "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    cap_mib = args.cap_gib * 1024
    results: dict[str, dict[float, dict]] = {case: {} for case in cases}
    lengths: dict[float, float] = {}
    for batch_s in sizes:
        data = args.workdir / f"train-{batch_s:g}s"
        data.mkdir(parents=True, exist_ok=True)
        _, lengths[batch_s] = write_batch(data, batch_s=batch_s, utterance_s=args.utterance_s)
        for case in cases:
            if results[case]:
                expected = predicted_peak_mib(results[case], batch_s)
                room = min(cap_mib, _available_mib() - MARGIN_MIB)
                if expected > room:
                    print(f"{case:<13} {batch_s:5g} s  skipped: extrapolated peak {expected:.0f} MiB > "
                          f"{room:.0f} MiB (cap {cap_mib:.0f}, available {_available_mib():.0f} less {MARGIN_MIB})",
                          flush=True)
                    continue
            run = args.workdir / f"run-{case}-{batch_s:g}s"
            shutil.rmtree(run, ignore_errors=True)  # train() refuses to overwrite a run
            command = [sys.executable, __file__, "--run-case", case, "--shape", args.shape, "--batch-s", str(batch_s),
                       "--utterance-s", str(args.utterance_s), "--workdir", str(args.workdir)]
            r = run_capped(command, os.environ | {"TQDM_DISABLE": "1"}, cap_mib=cap_mib)
            shutil.rmtree(run, ignore_errors=True)  # its last/ holds the optimizer state: gigabytes
            if r is None:
                print(f"{case:<13} {batch_s:5g} s  stopped: RSS passed {args.cap_gib:g} GiB", flush=True)
                continue
            results[case][batch_s] = r
            print(f"{case:<13} {batch_s:5g} s  set-up {r['setup_mib']:6.0f}  baseline {r['baseline_mib']:6.0f}  "
                  f"peak {r['peak_mib']:6.0f}  increment {r['increment_mib']:6.0f} MiB  (whole run "
                  f"{r['process_peak_mib']:.0f} MiB, {r['wall_s']:.0f} s; load {os.getloadavg()[0]:.2f})", flush=True)

    print()
    print("| batch s | utterances | case | set-up MiB | baseline MiB | peak MiB | increment MiB | whole run MiB |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for batch_s in sizes:
        count = round(batch_s / lengths[batch_s])
        for case in cases:
            r = results[case].get(batch_s)
            cells = ("not run",) + ("",) * 4 if r is None else (
                f"{r['setup_mib']:.0f}", f"{r['baseline_mib']:.0f}", f"{r['peak_mib']:.0f}",
                f"{r['increment_mib']:.0f}", f"{r['process_peak_mib']:.0f}")
            print(f"| {batch_s:g} | {count} x {lengths[batch_s]:g} s | {case} | {' | '.join(cells)} |")
    largest = sizes[-1]
    figures = [f"{case} peak {r['peak_mib']:.0f} MiB (increment {r['increment_mib']:.0f})"
               for case in cases if (r := results[case].get(largest))]
    print(f"\n{args.shape} one update at max_batch_s {largest:g}: {'; '.join(figures) or 'not run'}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
