"""Transcribe a manifest and score it: hypotheses that `speechxfer wer` reads, WER/CER with confidence intervals,
per-utterance rows, the most frequent substitutions and a short report.md."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from speechxfer.decoding import BeamSearchDecoder, Decoder
from speechxfer.atomic import atomic_write
from speechxfer.errors import InputError, Problem, counted, output_folder
from speechxfer.manifest import read_jsonl, read_manifest
from speechxfer.scoring import (ScoreReport, format_report, render_alignment, score, worst_utterances,
                                write_per_utterance_tsv)
from speechxfer.text import TextNormalizer, normalized_references
from speechxfer.transcribe import AudioSegment, Ranks, Recognizer, TranscribeOptions, Transcription, transcribe

HYPOTHESES_NAME = "hypotheses.jsonl"


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` scored and where it wrote it."""

    report: ScoreReport
    hypotheses_path: Path  # JSONL of {"id", "text"}: `speechxfer wer MANIFEST hypotheses.jsonl` gives `report`
    output_dir: Path
    substitutions: list[tuple[str, str, int]]  # (reference word, hypothesis word, count), most frequent first
    problems: list[Problem]  # manifest rows skipped, and utterances whose audio failed (scored as empty)
    left_out: list[Problem]  # utterances whose reference the normalizer rejects or empties: not transcribed, not scored


def evaluate(recognizer: Recognizer, manifest_path: str | os.PathLike, *, output_dir: str | os.PathLike,
             decoder: Decoder, normalizer: TextNormalizer | None = None,
             options: TranscribeOptions = TranscribeOptions(), bootstrap: int = 1000, seed: int = 0,
             progress: bool = False, ranks: Ranks = Ranks()) -> Evaluation | None:
    """Transcribe every usable utterance of the manifest and score it against the manifest's texts.

    Writes under output_dir: hypotheses.jsonl (as each batch finishes, then again in manifest order), score.json,
    per_utterance.tsv and report.md. An utterance whose audio cannot be read gets an empty hypothesis and is listed
    as a problem; one whose reference the normalizer rejects or empties is left out (see
    text.normalized_references).

    With several `ranks` every process transcribes its share into hypotheses.jsonl.rankN; rank 0 merges them
    (in manifest order) once all have finished, scores and returns the Evaluation, the others return None.
    """
    output = output_folder(output_dir)
    utterances, problems = read_manifest(manifest_path)
    references, left_out = normalized_references(utterances, normalizer)
    utterances = [u for u in utterances if u.id in references]
    if not utterances:
        raise InputError(f"no usable utterance in the manifest ({len(problems)} bad rows, {len(left_out)} "
                         "references the normalizer rejects or empties)", path=manifest_path)
    segments = [AudioSegment(u.id, u.audio_path, u.duration_s, u.offset_s, name=u.id) for u in utterances]
    hypotheses: dict[str, str] = {}
    hypotheses_path = output / HYPOTHESES_NAME
    own_path = hypotheses_path if ranks.world_size == 1 else output / f"{HYPOTHESES_NAME}.rank{ranks.rank}"
    failures: list[Problem] = []  # utterances whose audio failed
    with open(own_path, "w", encoding="utf-8") as f:
        for result in transcribe(recognizer, segments, decoder=decoder, options=options, progress=progress,
                                 ranks=ranks):
            if isinstance(result, Transcription):
                utterance_id, text = result.segment.id, result.transcript.text
            else:
                failures.append(result)
                utterance_id, text = result.utterance_id, ""
            hypotheses[utterance_id] = text
            f.write(json.dumps({"id": utterance_id, "text": text}, ensure_ascii=False) + "\n")
            f.flush()
    if ranks.world_size > 1:
        merged = _merge_ranks(output, ranks, failures)
        if merged is None:
            return None
        hypotheses, failures = merged
    # In manifest order, however many processes ran and in whatever order their batches finished.
    hypotheses = {u.id: hypotheses[u.id] for u in utterances if u.id in hypotheses}
    with atomic_write(hypotheses_path) as f:
        f.writelines(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in hypotheses.items())
    problems += failures
    references = {u.id: u.text for u in utterances}
    report = score(references, hypotheses, normalizer=normalizer, bootstrap=bootstrap, seed=seed)
    substitutions = frequent_substitutions(report)
    (output / "score.json").write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1) + "\n",
                                       encoding="utf-8")
    write_per_utterance_tsv(report, output / "per_utterance.tsv")
    evaluation = Evaluation(report, hypotheses_path, output, substitutions, problems, left_out)
    (output / "report.md").write_text(
        format_markdown(evaluation, model=recognizer.directory, manifest=os.fspath(manifest_path),
                        decoder=describe_decoder(decoder)), encoding="utf-8")
    return evaluation


def _merge_ranks(output: Path, ranks: Ranks, failures: list[Problem]) -> tuple[dict[str, str], list[Problem]] | None:
    """Every process's hypotheses and audio failures, once all have finished: on rank 0, read from the part files
    (which go) and returned; None on the other ranks."""
    with atomic_write(output / f"problems.rank{ranks.rank}.jsonl") as f:
        f.writelines(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in failures)
    ranks.barrier()
    if ranks.rank != 0:
        return None
    hypotheses: dict[str, str] = {}
    failures = []
    for rank in range(ranks.world_size):
        part, part_failures = output / f"{HYPOTHESES_NAME}.rank{rank}", output / f"problems.rank{rank}.jsonl"
        hypotheses |= {record["id"]: record["text"] for _, record in read_jsonl(part)}
        failures += [Problem(**record) for _, record in read_jsonl(part_failures)]
        part.unlink()
        part_failures.unlink()
    return hypotheses, failures


def describe_left_out(left_out: Sequence[Problem]) -> str:
    """One line: how many references were left out of scoring, and why."""
    kinds = Counter(p.kind for p in left_out)
    why = {"rejected_text": "rejected by the normalizer", "empty_text": "empty after normalization"}
    return (f"{counted(len(left_out), 'utterance')} left out of scoring ("
            + ", ".join(f"{n} {why.get(kind, kind)}" for kind, n in kinds.most_common()) + ")")


def model_normalization(model_dir: str | os.PathLike, *, lang: str | None = None) -> str | None:
    """The model folder's recipe.yaml (whose `text:` section normalized its training targets), if it has one; for
    `lang` of a folder of language adapters, that of the language's own run (model_dir/<lang>/recipe.yaml)."""
    candidates = [Path(model_dir, "recipe.yaml")] if lang is None else [Path(model_dir, lang, "recipe.yaml"),
                                                                         Path(model_dir, "recipe.yaml")]
    for recipe in candidates:
        if recipe.is_file():
            return os.fspath(recipe)
    return None


def frequent_substitutions(report: ScoreReport, n: int = 20) -> list[tuple[str, str, int]]:
    """The n most frequent (reference word, hypothesis word) substitutions of the word alignments."""
    counts: Counter[tuple[str, str]] = Counter()
    for u in report.per_utterance:
        ref, hyp = u.reference.split(), u.hypothesis.split()
        i = j = 0
        for op in u.words.ops:
            if op == "S":
                counts[ref[i], hyp[j]] += 1
            i += op in "CSD"
            j += op in "CSI"
    return [(r, h, c) for (r, h), c in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]]


def describe_decoder(decoder: Decoder) -> str:
    if isinstance(decoder, BeamSearchDecoder):
        o = decoder.options
        return (f"beam search (LM {o.lm_path}, beam {o.beam_size}, LM weight {o.lm_weight:g}, "
                f"word score {o.word_score:g}, {decoder.lexicon_size} lexicon words)")
    return "greedy"


def format_markdown(evaluation: Evaluation, *, model: str, manifest: str, decoder: str, worst: int = 5) -> str:
    """report.md: settings, the score summary, frequent substitutions, the worst utterances, the problems."""
    report = evaluation.report
    lines = [f"# Evaluation of `{model}`", "", f"- manifest: `{manifest}`", f"- decoder: {decoder}",
             f"- scored: {counted(report.sentences, 'utterance')}, {report.ref_words} reference words"]
    if evaluation.left_out:
        lines.append(f"- left out: {describe_left_out(evaluation.left_out)}, listed under Problems")
    lines += [f"- hypotheses: `{evaluation.hypotheses_path.name}` (`speechxfer wer` on the manifest and this file, "
              "with the same --normalize" + (" and --allow-missing" if evaluation.left_out else "")
              + ", gives these numbers)", "", "```", format_report(report), "```", ""]
    if evaluation.substitutions:
        lines += ["## Most frequent substitutions", "", "| reference | hypothesis | count |", "|---|---|---:|"]
        lines += [f"| {r} | {h} | {c} |" for r, h, c in evaluation.substitutions]
        lines.append("")
    bad = [u for u in worst_utterances(report, worst) if u.words.errors]
    if bad:
        lines += ["## Worst utterances", ""]
        for u in bad:
            lines += [f"`{u.id}`: WER {u.wer:.2%} ({counted(u.words.errors, 'error')} / "
                      f"{counted(u.ref_words, 'word')})", "", "```",
                      render_alignment(u.words, u.reference, u.hypothesis), "```", ""]
    if evaluation.problems or evaluation.left_out:
        lines += ["## Problems", ""] + [f"- {p}" for p in evaluation.problems + evaluation.left_out] + [""]
    return "\n".join(lines)
