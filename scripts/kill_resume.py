"""Kill `speechxfer train` (SIGKILL) inside each step of its checkpoint and model-folder writes, resume it, and
check that the resumed run ends exactly where an uninterrupted one does.

Builds a tiny XLS-R-like checkpoint and a few seconds of tones, trains once without interruption, then for each
kill point starts the same run in a subprocess, kills it there, runs `speechxfer train --resume` (killed again
at the next point of a chain such as `last-retired,model-swap`) until it finishes, and compares with the
uninterrupted run: the weights of last/ and of the best model (max abs difference 0.0), the other model files
and test_report.json byte for byte, the loop state, metrics.jsonl (timings aside), and no hidden leftovers.

How a kill point is reached: renames take microseconds, too short to hit by watching the disk, so the child
process wraps `os.replace`, `os.rmdir` and `shutil.rmtree` (in this script, not in the package): at the named
step (by default at its second occurrence, when a previous checkpoint and model exist) it writes a signal file
and sleeps, and this script SIGKILLs it as soon as it sees that file. The `poll-*` points use no wrapper: this
script polls the output folder and kills the run as soon as a staging folder appears, wherever the run then is.

    python scripts/kill_resume.py [--workdir DIR] [--points NAME,...]

Prints one line per kill point and a final PASS or FAIL line; exit code 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny import make_tiny_checkpoint, write_tone  # noqa: E402  (test helpers, importable once tests/ is on the path)

from speechxfer.manifest import Utterance, read_jsonl, write_manifest  # noqa: E402

# One-letter utterances, each letter a tone of its own: a task the tiny model learns in a few updates, so that the
# dev WER falls and the best model is saved more than once.
TONE_HZ = {"a": 300.0, "b": 700.0, "c": 1500.0}
# step -> (operation wrapped in the child, which call: the path argument named and its path inside the output
# folder, at which occurrence of that call, pause before or after it). Occurrence 2 of a checkpoint or model save is
# the first to find a previous one in place.
POINTS = {
    "checkpoint-writing": ("replace", "dst", ".last.staging/training_state.pt", 2, "before"),
    "checkpoint-complete": ("replace", "dst", ".last.staging/training_state.pt", 2, "after"),
    "last-retired": ("replace", "dst", ".last.retired", 1, "after"),
    "last-swapped": ("replace", "src", ".last.staging", 2, "after"),
    "retired-cleanup": ("rmtree", "path", ".last.retired", 1, "half"),  # half its files deleted
    "model-writing": ("replace", "dst", ".model.staging/.files.json", 2, "before"),
    "model-committed": ("replace", "dst", ".model.ready", 2, "after"),
    "model-swap": ("replace", "src", ".model.ready/config.json", 2, "after"),  # the first file moved
    "model-finishing": ("rmdir", "path", ".model.ready", 2, "before"),
}
# polled steps: kill as soon as this appears in the output folder
POLLED = {"poll-checkpoint": ".last.staging", "poll-model": ".model.staging"}
# kill points one after the other: the first run, then each resume
CHAINS = ["checkpoint-writing,last-retired", "model-swap,retired-cleanup,checkpoint-complete"]
DEFAULT_POINTS = ";".join([*POINTS, *POLLED, *CHAINS])
# Wall-clock figures of metrics.jsonl records and of the loop state (the time budget counts training seconds).
TIMING_KEYS = ("audio_s_per_s", "minutes", "elapsed_s")
RECOVERY_WORDS = ("recovered", "deleted", "completed", "restored", "resuming from", "nothing to resume")
MODEL_FILES = ("config.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json",
               "preprocessor_config.json")
STEP_TIMEOUT_S = 600


def write_inputs(workdir: Path) -> Path:
    """A tiny checkpoint, train/dev/test manifests of 0.6-0.9 s tones and a recipe; returns the recipe."""
    base = make_tiny_checkpoint(workdir / "tiny", arch="stable")
    manifests, k = {}, 0
    for split, count in (("train", 12), ("dev", 3), ("test", 3)):
        utterances = []
        for _ in range(count):
            letter, duration_s = "abc"[k % 3], 0.6 + 0.1 * (k % 4)
            audio = write_tone(workdir / "audio" / f"u{k}.wav", duration_s=duration_s, frequency_hz=TONE_HZ[letter],
                               seed=k)
            utterances.append(Utterance(id=f"u{k}", audio_path=str(audio), text=letter, duration_s=duration_s))
            k += 1
        manifests[split] = workdir / f"{split}.jsonl"
        write_manifest(manifests[split], utterances)
    recipe = {"base": str(base), "data": {name: str(p) for name, p in manifests.items()},
              "train": {"max_updates": 4, "max_batch_s": 2.5, "lr": 3e-3, "min_duration_s": 0.1, "log_every": 1,
                        "warmup_ratio": 0.25, "hold_ratio": 0.25, "num_workers": 0},
              "eval": {"every_updates": 1}, "output_dir": str(workdir / "runs" / "unset")}
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to build the inputs and runs (default: a new temp dir)")
    parser.add_argument("--points", default=DEFAULT_POINTS,
                        help="';'-separated kill points, each one step or ','-separated steps (default: all)")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "OUTPUT_DIR", "SIGNAL_FILE"),
                        help=argparse.SUPPRESS)  # internal: run `speechxfer train ARGS...` pausing at STEP
    args, rest = parser.parse_known_args(argv)
    if args.child:
        return _child(*args.child, rest)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_resume."))
    recipe = write_inputs(workdir)
    chains = [point.split(",") for point in args.points.split(";") if point]
    started = time.perf_counter()
    reference = workdir / "runs" / "reference"
    done = _train(recipe, reference)
    if done.returncode != 0:
        print(done.stdout + done.stderr)
        print("FAIL: the uninterrupted run failed")
        return 1
    print(f"uninterrupted run: {time.perf_counter() - started:.0f} s; best update "
          f"{json.loads((reference / 'test_report.json').read_text())['model_update']}, "
          f"{len(_best_saves(reference))} best-model saves")

    failures = 0
    for chain in chains:
        out = workdir / "runs" / "-".join(chain)
        lines, ok = _kill_and_resume(recipe, out, chain, reference)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {','.join(chain)}: {lines}", flush=True)
    total_s = time.perf_counter() - started
    print(f"{'PASS' if failures == 0 else 'FAIL'}: {len(chains) - failures} of {len(chains)} kill points end as the "
          f"uninterrupted run ({total_s:.0f} s)")
    return 0 if failures == 0 else 1


def _kill_and_resume(recipe: Path, out: Path, chain: list[str], reference: Path) -> tuple[str, bool]:
    """Run, kill at each step of the chain in turn (the first run, then each resume), resume to the end; compare."""
    notes = []
    resume = False
    for step in chain:
        landed = _run_killed(recipe, out, step, resume=resume)
        if landed is None:
            return f"{step} not reached", False
        notes.append(f"killed at {step} ({landed})")
        resume = True
    done = _train(recipe, out, resume=True)
    # train's messages go to stderr (through logging), its results to stdout
    recovered = [line.strip() for line in (done.stdout + done.stderr).splitlines()
                 if line.strip().startswith(RECOVERY_WORDS)]
    if done.returncode != 0:
        return "; ".join(notes) + f"; resume failed: {done.stderr.strip().splitlines()[-1:]}", False
    problems = _compare(out, reference)
    result = "same as uninterrupted" if not problems else "DIFFERS: " + "; ".join(problems)
    return "; ".join(notes) + f"; resume said: {' / '.join(recovered) or 'nothing'}; {result}", not problems


def _run_killed(recipe: Path, out: Path, step: str, *, resume: bool) -> str | None:
    """Start the run, SIGKILL it at `step`; returns what was on disk then, or None when the run ended first."""
    signal_file = out.parent / f".{out.name}.signal"  # beside the run: not one of its files
    signal_file.unlink(missing_ok=True)
    command = _train_command(recipe, out, resume=resume)
    if step in POINTS:  # the same command through _child
        command[1:3] = [str(Path(__file__).resolve()), "--child", step, str(out), str(signal_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + STEP_TIMEOUT_S
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if (signal_file.exists() if step in POINTS else (out / POLLED[step]).exists()):
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return _describe(out)
            time.sleep(0.002)
        return None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        signal_file.unlink(missing_ok=True)


def _describe(out: Path) -> str:
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".speechxfer-run")
    return f"last/ {'present' if (out / 'last').is_dir() else 'MISSING'}, hidden: {', '.join(hidden) or 'none'}"


def _compare(out: Path, reference: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    problems = []
    for name in ("last/model.safetensors", "model.safetensors"):
        a, b = load_file(reference / name), load_file(out / name)
        if a.keys() != b.keys():
            problems.append(f"{name}: other tensors")
            continue
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        if diff != 0.0:
            problems.append(f"{name}: max abs difference {diff:.3g}")
    for name in (*MODEL_FILES, "test_report.json"):
        if (reference / name).read_bytes() != (out / name).read_bytes():
            problems.append(f"{name} differs")
    states = [_untimed(torch.load(d / "last" / "training_state.pt", weights_only=True)["state"])
              for d in (reference, out)]
    if states[0] != states[1]:
        problems.append(f"loop state {states[1]} != {states[0]}")
    if _metrics(reference) != _metrics(out):
        problems.append("metrics.jsonl differs")
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    leftovers += sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".speechxfer-run")
    if leftovers:
        problems.append(f"leftovers: {', '.join(leftovers)}")
    return problems


def _metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    return [_untimed(record) for _, record in read_jsonl(out / "metrics.jsonl")]


def _untimed(record: dict) -> dict:
    """A metrics record or loop state without its wall-clock figures, which differ from run to run."""
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def _best_saves(out: Path) -> list[int]:
    """The updates at which the run saved a better model (a lower dev WER than all before)."""
    saves, best = [], None
    for record in _metrics(out):
        if "dev_wer" in record and (best is None or record["dev_wer"] < best):
            best = record["dev_wer"]
            saves.append(record["update"])
    return saves


def _train(recipe: Path, out: Path, *, resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(_train_command(recipe, out, resume=resume), capture_output=True, text=True, env=_env(),
                          timeout=STEP_TIMEOUT_S)


def _train_command(recipe: Path, out: Path, *, resume: bool) -> list[str]:
    return [sys.executable, "-m", "speechxfer", "train", str(recipe), "--set", f"output_dir={out}",
            *(["--resume"] if resume else [])]


def _env() -> dict[str, str]:
    # One thread per run: the runs are tiny, and the machine may be shared.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
        "PYTHONPATH", "")}


# --- the child: `speechxfer train` with the file-system calls of one step wrapped -------------------------------


def _child(step: str, out: str, signal_file: str, argv: list[str]) -> int:
    operation, argument, target, occurrence, when = POINTS[step]
    out = Path(out)
    real = {"replace": os.replace, "rmdir": os.rmdir, "rmtree": shutil.rmtree}
    seen = []

    def pause() -> None:
        Path(signal_file).touch()
        time.sleep(STEP_TIMEOUT_S)  # the parent kills this process here

    def reached(called: str, **paths) -> bool:
        """Whether this call is the chosen occurrence of the step's call."""
        if called != operation or Path(paths[argument]).parent.resolve() != (out / target).parent.resolve():
            return False
        if Path(paths[argument]).name != Path(target).name:
            return False
        seen.append(paths[argument])
        return len(seen) == occurrence

    def replace(src, dst, **kwargs):
        hit = reached("replace", src=src, dst=dst)
        if hit and when == "before":
            pause()
        real["replace"](src, dst, **kwargs)
        if hit:
            pause()

    def rmdir(path, **kwargs):
        if reached("rmdir", path=path):
            pause()
        real["rmdir"](path, **kwargs)

    def rmtree(path, *args, **kwargs):
        if Path(path).exists() and reached("rmtree", path=path):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files[:len(files) // 2]:
                f.unlink()
            pause()
        real["rmtree"](path, *args, **kwargs)

    os.replace, os.rmdir, shutil.rmtree = replace, rmdir, rmtree
    from speechxfer.cli import main as speechxfer_main

    return speechxfer_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
