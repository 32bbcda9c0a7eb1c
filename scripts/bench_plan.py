"""Benchmark what training does with a large manifest before its first update: read, filter, plan batches.

Writes a manifest of --rows generated rows (durations drawn like Common Voice clips, short random texts; every row
names the same short audio file, so that the file check that training makes finds a file, and nothing is opened),
then times the steps train() takes on it, in this process:
  read:   manifest.read_manifest_table(path, check_files=True), as train() reads its train split (columns); it
          stats each distinct audio path of a block of rows once, so here one stat a block: a corpus of a million
          files costs a million stats on top (about 5 us each on a shared VM)
  vocab:  vocabulary.encode_texts of the train rows' texts (each normalized once, its characters kept as small
          integers), whose character_counts train() builds its vocabulary (without vocabulary.path) and its
          charset audit from
  filter: batching.filter_utterances given those encoded texts (their labels taken, CTC fit against the conv
          layout of XLS-R; nothing normalized again)
  plan:   DurationBatchSampler over SpeechDataset(kept).durations_s: the first epoch's batches, as train() plans
          them before the first update
Prints each step's wall and CPU seconds (the machine may be shared: CPU time is what the steps cost) and the
process's peak RSS (imports included), then the targets: < 10 s and < 1 GiB.

  python scripts/bench_plan.py                  # 1,000,000 rows
  python scripts/bench_plan.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import Wav2Vec2Config

from speechxfer.batching import DurationBatchSampler, SpeechDataset, filter_utterances
from speechxfer.manifest import read_manifest_table
from speechxfer.text import TextNormalizer
from speechxfer.vocabulary import Vocabulary, encode_texts

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_rows(path: Path, rows: int, seed: int) -> None:
    """`rows` manifest rows of one audio file, with lognormal durations (median 4.5 s, 1-15 s) and ~10 letters of
    text a second, written without building Utterances (the bench times reading them)."""
    rng = np.random.default_rng(seed)
    durations = np.clip(rng.lognormal(np.log(4.5), 0.35, rows), 1.0, 15.0).round(2)
    words = ["".join(random.Random(k).choices(LETTERS, k=1 + k % 7)) for k in range(1000)]
    pick = random.Random(seed)
    (path.parent / "clip.wav").write_bytes(b"RIFF" + bytes(40))  # stat only: never opened
    with path.open("w", encoding="utf-8") as f:
        for k, duration_s in enumerate(durations.tolist()):
            text = " ".join(pick.choices(words, k=max(1, int(duration_s * 2.5))))
            f.write(json.dumps({"id": f"utt{k:07d}", "audio_path": "clip.wav", "text": text,
                                "duration_s": duration_s, "speaker": f"spk{k % 5000}"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max-batch-s", type=float, default=200.0, help="train.max_batch_s (default: recipes')")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "train.jsonl"
        write_rows(manifest, args.rows, args.seed)
        imported_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        steps: list[tuple[str, float, float]] = []

        def timed(name, step):
            wall, cpu = time.perf_counter(), time.process_time()
            result = step()
            steps.append((name, time.perf_counter() - wall, time.process_time() - cpu))
            return result

        utterances, problems = timed("read", lambda: read_manifest_table(manifest, check_files=True))
        assert not problems, problems[:3]
        normalizer = TextNormalizer()
        # as train() does: the train texts normalized once, their characters the vocabulary and the charset audit's,
        # then their labels the filter's
        train_texts = timed("vocab", lambda: encode_texts(utterances.texts, normalizer))
        vocab = Vocabulary.from_texts(["".join(train_texts.character_counts)])
        kept, dropped = timed("filter", lambda: filter_utterances(
            utterances, normalizer=normalizer, vocab=vocab, config=Wav2Vec2Config(), min_duration_s=0.5,
            max_duration_s=20.0, encoded=train_texts))
        del train_texts

        def plan() -> int:
            sampler = DurationBatchSampler(SpeechDataset(kept).durations_s, max_batch_s=args.max_batch_s,
                                           seed=args.seed)
            return len(sampler)  # the epoch's batches are formed when first asked for

        num_batches = timed("plan", plan)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"{args.rows} rows: {len(kept)} kept ({dropped}); {num_batches} batches of at most {args.max_batch_s:g} s")
    for name, wall, cpu in steps:
        print(f"  {name:<7} {wall:6.2f} s wall  {cpu:6.2f} s CPU")
    wall_s, cpu_s = sum(s[1] for s in steps), sum(s[2] for s in steps)
    print(f"  total   {wall_s:6.2f} s wall  {cpu_s:6.2f} s CPU (target < 10 s)")
    print(f"peak RSS {peak_mib:.0f} MiB: {imported_mib:.0f} MiB before reading (imports, torch's most of it), "
          f"{peak_mib - imported_mib:.0f} MiB more for the rows (target < 1024 MiB)")
    met = wall_s < 10 and peak_mib < 1024
    print(f"targets {'met' if met else 'NOT met'}: {wall_s:.2f} s wall {'<' if wall_s < 10 else '>='} 10 s, "
          f"{peak_mib:.0f} MiB {'<' if peak_mib < 1024 else '>='} 1024 MiB")


if __name__ == "__main__":
    main()
