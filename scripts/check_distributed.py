"""Check that 2 processes train like 1: the loss of the first update must agree within 1e-4.

Builds a tiny XLS-R-like checkpoint and a few seconds of tones of different lengths, then runs
`speechxfer train` once as one process and once as two CPU processes under `torchrun --nproc_per_node 2`
(gloo). Both see the same global batches (DurationBatchSampler does not depend on the process count) and
each of the two takes its share, so the first update's loss, averaged over the global batch, must be the same
(within 1e-4). The second update's loss also depends on the first update's gradient, which DDP averages over
the processes: it must agree within 1e-3 too, which holds only if each process's loss is weighed by its share.

    python scripts/check_distributed.py [--workdir DIR]

Exit code 0 when both differences are within their tolerances, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny import make_tiny_checkpoint, write_tone  # noqa: E402  (test helpers, importable once tests/ is on the path)

from speechxfer.manifest import Utterance, read_jsonl, write_manifest  # noqa: E402

TOLERANCE = 1e-4
SECOND_UPDATE_TOLERANCE = 1e-3  # after one AdamW step on float32 sums taken in another order
TEXTS = ["ab ba", "abc", "ca ab", "bac a", "cab", "a bc"]


def write_inputs(workdir: Path) -> Path:
    """A tiny checkpoint, a train manifest of 6 tones (0.8-1.2 s) and a recipe; returns the recipe path."""
    base = make_tiny_checkpoint(workdir / "checkpoint", arch="stable")
    utterances = []
    for k, text in enumerate(TEXTS):
        duration_s = 0.8 + 0.08 * k
        audio = write_tone(workdir / "audio" / f"u{k}.wav", duration_s=duration_s, frequency_hz=200 + 60 * k, seed=k)
        utterances.append(Utterance(id=f"u{k}", audio_path=str(audio), text=text, duration_s=duration_s))
    write_manifest(workdir / "train.jsonl", utterances)
    recipe = {
        "base": str(base),
        "data": {"train": "train.jsonl"},
        # no SpecAugment: the masks are random and would differ between the runs
        "model": {"mask_time_prob": 0.0},
        # 3 utterances per global batch: an uneven share (2 + 1) for the two processes
        "train": {"max_updates": 2, "max_batch_s": 3.7, "lr": 1e-3, "min_duration_s": 0.1, "log_every": 1,
                  "warmup_ratio": 0.0, "hold_ratio": 1.0},
    }
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def losses(output_dir: Path) -> dict[int, float]:
    records = [record for _, record in read_jsonl(output_dir / "metrics.jsonl")]
    return {r["update"]: r["loss"] for r in records if "loss" in r}


def run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the tiny inputs and runs "
                                                                   "(default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="check_distributed."))
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = write_inputs(workdir)

    train = ["-m", "speechxfer", "train", str(recipe)]
    run([sys.executable, *train, "--set", f"output_dir={workdir / 'one'}"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *train, "--set", f"output_dir={workdir / 'two'}"])

    one, two = losses(workdir / "one"), losses(workdir / "two")
    difference = abs(one[1] - two[1])
    print(f"first-update loss, 1 process:   {one[1]:.8f}")
    print(f"first-update loss, 2 processes: {two[1]:.8f}")
    print(f"difference: {difference:.2e} (tolerance {TOLERANCE:.0e})")
    second = abs(one[2] - two[2])
    print(f"second-update loss: {one[2]:.8f} vs {two[2]:.8f} (difference {second:.2e}, "
          f"tolerance {SECOND_UPDATE_TOLERANCE:.0e})")
    return 0 if difference <= TOLERANCE and second <= SECOND_UPDATE_TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
