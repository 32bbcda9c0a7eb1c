"""n-gram language models for beam search: build an ARPA file from target-language text with KenLM's `lmplz`,
and tune the LM weight and word score on a dev manifest."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from speechxfer.decoding import BeamSearchDecoder, BeamSearchOptions, GreedyDecoder, decode_batch
from speechxfer.errors import InputError, Problem, SpeechxferError
from speechxfer.manifest import read_manifest
from speechxfer.scoring import score
from speechxfer.text import TextRejected, normalized_references
from speechxfer.transcribe import AudioSegment, Recognizer, TranscribeOptions, emissions

LMPLZ_MISSING = (
    "KenLM's lmplz is not on PATH. In a speechxfer checkout, `bash scripts/install_kenlm.sh` builds it from the "
    "kenlm source package on PyPI into /usr/local/bin (PREFIX=DIR: into DIR/bin, then put that on PATH); it needs "
    "cmake, a C++ compiler, Boost program_options/system/thread/test and zlib (apt-get install cmake g++ "
    "libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev).")
DEFAULT_LM_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_WORD_SCORES = (-1.0, 0.0, 1.0, 2.0)


@dataclass(frozen=True)
class LMBuild:
    """An ARPA model built from text."""

    path: Path
    order: int
    lines: int  # text lines the model was trained on
    words: int
    skipped: list[Problem]  # lines the normalizer rejected or left empty


def build_lm(text_path: str | os.PathLike, out_path: str | os.PathLike, *, order: int = 3,
             normalizer: Callable[[str], str]) -> LMBuild:
    """Normalize each line of a UTF-8 text file and train an `order`-gram ARPA model on it with `lmplz`.

    Raises SpeechxferError when lmplz is not on PATH or fails, InputError for an unreadable or empty text.
    """
    lmplz = shutil.which("lmplz")
    if lmplz is None:
        raise SpeechxferError(LMPLZ_MISSING)
    if order < 2:
        raise InputError(f"order must be at least 2 (KenLM needs bigrams), got {order}")
    kept: list[str] = []
    skipped: list[Problem] = []
    try:
        with open(text_path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                try:
                    normalized = normalizer(line)
                except TextRejected as err:
                    skipped.append(Problem(os.fspath(text_path), number, "rejected_text", str(err)))
                    continue
                if normalized.strip():
                    kept.append(normalized)
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read text: {err}", path=text_path) from None
    if not kept:
        raise InputError("no text left after normalization", path=text_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --discount_fallback: the small corpora of low-resource languages lack the counts Kneser-Ney needs.
        command = [lmplz, "-o", str(order), "--discount_fallback", "-T", tmp]
        with open(out, "wb") as arpa:
            done = subprocess.run(command, input="\n".join(kept).encode("utf-8") + b"\n", stdout=arpa,
                                  stderr=subprocess.PIPE)
    if done.returncode != 0:
        out.unlink(missing_ok=True)
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise SpeechxferError(f"lmplz failed (exit {done.returncode}): {' / '.join(tail)}")
    return LMBuild(out, order, len(kept), sum(len(t.split()) for t in kept), skipped)


@dataclass(frozen=True)
class TuneResult:
    """The best LM weight and word score on a dev set, and every point tried."""

    lm_weight: float
    word_score: float
    wer: float
    greedy_wer: float  # the same utterances without the LM
    grid: list[tuple[float, float, float]]  # (lm weight, word score, WER) in the order tried
    utterances: int
    problems: list[Problem]
    left_out: list[Problem]  # utterances whose reference the normalizer rejects or empties (not scored)


def tune_lm(recognizer: Recognizer, manifest_path: str | os.PathLike, *, lm_path: str,
            lexicon_path: str | None = None, lm_weights: Sequence[float] = DEFAULT_LM_WEIGHTS,
            word_scores: Sequence[float] = DEFAULT_WORD_SCORES, beam_size: int = 50,
            normalizer: Callable[[str], str] | None = None, options: TranscribeOptions = TranscribeOptions(),
            progress: bool = False) -> TuneResult:
    """Grid search of LM weight x word score by dev WER; the model runs once, each point only decodes.

    Utterances whose audio fails are left out (listed in problems), and so are those whose reference the
    normalizer rejects or empties (listed in left_out; see text.normalized_references). Ties go to the point
    tried first.
    """
    # Every point checked before the model runs: a bad value should not cost the pass over the audio.
    points = [BeamSearchOptions(lm_path, lexicon_path, beam_size, lm_weight, word_score)
              for lm_weight in lm_weights for word_score in word_scores]
    if not points:
        raise InputError("lm_weights and word_scores (--lm-weights, --word-scores) need at least one value each")
    for path in (lm_path, lexicon_path):
        if path is not None and not os.path.isfile(path):
            raise InputError("no such file", path=path)
    utterances, problems = read_manifest(manifest_path)
    references, left_out = normalized_references(utterances, normalizer)
    utterances = [u for u in utterances if u.id in references]
    segments = [AudioSegment(u.id, u.audio_path, u.duration_s, u.offset_s, name=u.id) for u in utterances]
    cached: dict[str, torch.Tensor] = {}
    for event in emissions(recognizer, segments, options=options, progress=progress):
        if isinstance(event, Problem):
            problems.append(event)
        else:
            cached[event[0].id] = event[1]
    if not cached:
        raise InputError("no utterance of the manifest could be transcribed", path=manifest_path)
    references = {u.id: u.text for u in utterances if u.id in cached}

    def wer(decoder) -> float:
        hypotheses = {i: decode_batch(decoder, lp[None], torch.tensor([len(lp)]))[0].text for i, lp in cached.items()}
        return score(references, hypotheses, normalizer=normalizer, bootstrap=0).wer

    greedy_wer = wer(GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s))
    grid = []
    for beam in points:
        decoder = BeamSearchDecoder(recognizer.vocabulary, beam, frame_s=recognizer.frame_s)
        grid.append((beam.lm_weight, beam.word_score, wer(decoder)))
    best = min(grid, key=lambda point: point[2])
    return TuneResult(best[0], best[1], best[2], greedy_wer, grid, len(cached), problems, left_out)
