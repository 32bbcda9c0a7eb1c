"""The real-speech benchmark: fine-tune on Debian's Asterisk telephone prompts (one human voice per language, 8 kHz)
three ways and score each on its test split greedily and with the recipe's n-gram LM.

    plain        recipes/demo/<lang>-asterisk.yaml with its augment section switched off (the seed, fine-tuned as is)
    augment      the recipe as it is (speed, music-on-hold noise, telephone channel)
    augment+seed the recipe with another seed folder as base (--seed-v2 DIR, e.g. one trained by
                 scripts/train_seed.py --recipe recipes/seed/seed-v2.yaml); left out without --seed-v2

Each run goes to OUT/<lang>-<condition>/ and a rerun skips the finished ones (a run folder with test_report.json),
so the table can be built up over several sessions. The LM columns need lmplz (scripts/install_kenlm.sh) and the
recipe's text file (python scripts/prepare_texts.py --languages es it); without them they read "-".

    apt-get install asterisk-core-sounds-es-wav asterisk-core-sounds-es asterisk-core-sounds-it-wav \\
        asterisk-core-sounds-it asterisk-moh-opsound-wav
    python scripts/prepare_texts.py --languages es it
    python scripts/bench_real.py --out runs/bench_real --updates 600 [--seed-v2 runs/seed-v2]   # the README table
    python scripts/bench_real.py --out runs/bench_real --table-only                  # just print what is there

Prints a markdown table (test WER / CER greedy and with the LM, the tuned LM weight and word score) and writes
OUT/table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The recipe's augment section with every effect off: what "plain" fine-tuning means here.
NO_AUGMENT = ("augment.speed.probability=0", "augment.noise.probability=0", "augment.telephone.probability=0")


def conditions(seed_v2: Path | None) -> dict[str, list[str]]:
    """Condition name -> --set overrides of the recipe."""
    runs = {"plain": list(NO_AUGMENT), "augment": []}
    if seed_v2 is not None:
        runs["augment+seed"] = [f"base={seed_v2.resolve()}"]
    return runs


def run(lang: str, name: str, overrides: list[str], out: Path) -> Path:
    """Train recipes/demo/<lang>-asterisk.yaml into OUT/<lang>-<name> unless it is finished; returns the folder."""
    folder = out / f"{lang}-{name.replace('+', '-')}"
    if (folder / "test_report.json").is_file():
        print(f"{folder}: finished, kept", file=sys.stderr)
        return folder
    command = [sys.executable, "-m", "speechxfer", "train", str(REPO / f"recipes/demo/{lang}-asterisk.yaml"),
               "--set", f"output_dir={folder.resolve()}"]
    for override in overrides:
        command += ["--set", override]
    if (folder / ".speechxfer-run").exists():
        command.append("--resume")
    print("$ " + " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True, cwd=REPO)
    return folder


def row(lang: str, name: str, folder: Path) -> dict:
    """The figures of one finished run from its test_report.json."""
    report = json.loads((folder / "test_report.json").read_text(encoding="utf-8"))
    lm = report.get("lm") or {}
    decoder = lm.get("decoder") or {}
    return {"language": lang, "condition": name, "folder": str(folder), "utterances": report["sentences"],
            "wer": report["wer"], "cer": report["cer"], "lm_wer": lm.get("wer"), "lm_cer": lm.get("cer"),
            "lm_weight": decoder.get("lm_weight"), "word_score": decoder.get("word_score"),
            "best_update": report.get("model_update")}


def table(rows: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| language | condition | test WER | test CER | WER with LM | CER with LM | LM weight / word score | "
             "utterances |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tuned = "-" if r["lm_weight"] is None else f"{r['lm_weight']:g} / {r['word_score']:g}"
        lines.append(f"| {r['language']} | {r['condition']} | {pct(r['wer'])} | {pct(r['cer'])} | {pct(r['lm_wer'])} "
                     f"| {pct(r['lm_cer'])} | {tuned} | {r['utterances']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_real"))
    parser.add_argument("--languages", nargs="+", default=["es", "it"], choices=["es", "it"])
    parser.add_argument("--seed-v2", type=Path, default=None, help="a seed folder for the augment+seed condition")
    parser.add_argument("--updates", type=int, default=None,
                        help="train.max_updates of every run (default: the recipe's; the README table used 600)")
    parser.add_argument("--table-only", action="store_true", help="train nothing; tabulate the finished runs")
    args = parser.parse_args(argv)

    rows = []
    for lang in args.languages:
        for name, overrides in conditions(args.seed_v2).items():
            if args.updates is not None:
                overrides = [*overrides, f"train.max_updates={args.updates}"]
            folder = args.out / f"{lang}-{name.replace('+', '-')}"
            if not args.table_only:
                try:
                    folder = run(lang, name, overrides, args.out)
                except subprocess.CalledProcessError as err:
                    print(f"bench_real: {lang} {name} failed (exit {err.returncode}); see its output above",
                          file=sys.stderr)
                    continue
            if (folder / "test_report.json").is_file():
                rows.append(row(lang, name, folder))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
