"""Time and peak memory of `speechxfer.scoring.align` on one long utterance, the basis of MAX_ALIGNMENT_CELLS.

Each case runs in its own subprocess, so its peak RSS is its own. A case aligns a random reference of N tokens
(characters of a 42-letter Czech alphabet, or words of a 5,000-word vocabulary) with a hypothesis made from it
by 15% substitutions and 5% deletions, padded back to N tokens with random insertions. Prints wall time of
`align` alone (imports and text generation not counted), nanoseconds per cell, peak RSS of the process and the
cells that one minute at that speed would align.

  python scripts/bench_align.py                          # 5,000 and 20,000 characters, 20,000 words
  python scripts/bench_align.py --cases chars:31623
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import time

CZECH = "abcdefghijklmnopqrstuvwxyzáčďéěíňóřšťúůýž"


def run_case(unit: str, tokens: int) -> None:
    from speechxfer.scoring import align

    rng = random.Random(0)
    vocabulary = list(CZECH) if unit == "chars" else [f"w{i}" for i in range(5000)]
    ref = [rng.choice(vocabulary) for _ in range(tokens)]
    hyp = [t if rng.random() > 0.15 else rng.choice(vocabulary) for t in ref if rng.random() > 0.05]
    hyp += [rng.choice(vocabulary) for _ in range(tokens - len(hyp))]
    start = time.perf_counter()
    alignment = align(ref, hyp)
    seconds = time.perf_counter() - start
    cells = len(ref) * len(hyp)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    print(f"{len(ref):>7,} x {len(hyp):>7,} {unit:5}  {seconds:7.1f} s  {seconds / cells * 1e9:5.1f} ns/cell  "
          f"peak RSS {peak_mb:6.0f} MB  one minute: {60 * cells / seconds:.1e} cells  "
          f"(S {alignment.substitutions}, D {alignment.deletions}, I {alignment.insertions})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["chars:5000", "chars:20000", "words:20000"],
                        help="UNIT:TOKENS, UNIT chars or words")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)  # the subprocess's own case
    args = parser.parse_args()
    if args.run_case:
        unit, tokens = args.run_case.split(":")
        run_case(unit, int(tokens))
        return
    for case in args.cases:
        subprocess.run([sys.executable, __file__, "--run-case", case], check=True)


if __name__ == "__main__":
    main()
