"""Word and character error rates that equal NIST sclite's, with sclite's own alignment.

How the numbers are counted, following `sclite -e utf-8 -s` (case-sensitive: case is the normalizer's job):
- WER = (S + D + I) / reference words, summed over utterances; the sentence error rate counts utterances with
  at least one word error.
- CER follows `sclite -c`: words are split into characters and the spaces between them are not scored, so CER is
  the character edit rate of the texts with their spaces removed.
- The alignment is sclite's, not a unit-cost Levenshtein (jiwer's): sclite weighs insertions and deletions 3 and
  substitutions 4 and breaks ties in a fixed order, so it prefers hits over substitutions (ref "a b", hyp "b c"
  is one deletion and one insertion, not two substitutions) and may even accept more errors for more hits.
  On 1000 Czech/Russian sentences with 15% (40%) word errors, jiwer's S/D/I differ from sclite's on 1.5% (9.6%)
  of sentences in words and 2.1% (8.3%) in characters, where the total differs on 1.4% (3.7%): a CER from jiwer
  is not sclite's. So `align` reproduces sclite's dynamic programme (net_dp.c) instead of calling jiwer.
- Normalization (`normalizer`): references go through it as they are; hypotheses by `normalize_hypothesis`, which
  turns an unknown token ("[UNK]") into a mark that no scored reference holds (a reference that keeps it, as the
  `none` preset may, is refused), and rejects nothing. Training's dev and test reports, `evaluate`, `wer`, `lm tune` and a recipe's LM stage all score by
  this one rule.
- Ids: sclite scores only the utterances that have a hypothesis; a reference without one is skipped, and a
  hypothesis id absent from the references is an error. With `allow_missing` we do the same, except that extra
  hypotheses are listed and left out rather than refused; without it, either kind of missing id is an error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechxfer.errors import InputError, counted
from speechxfer.manifest import read_jsonl
from speechxfer.text import UNKNOWN_MARK, TextNormalizer, TextRejected, normalized_reference
from speechxfer.vocabulary import UNK

FORMATS = ("auto", "kaldi", "tsv", "jsonl", "lines")
# sclite's alignment weights (insertion and deletion 3, substitution 4, match 0)
_GAP = 3
_SUBSTITUTION = 4
# Longest alignment (reference x hypothesis tokens) scored, so that one takes at most about a minute. Measured with
# scripts/bench_align.py on 2 cores shared by ~8 processes: 20-31 ns a cell for two texts of 20,000 tokens (8-13 s),
# 60-90 ns a cell when one text is 500-50,000 times longer than the other (30-44 s at this limit). Longer texts
# must be segmented.
MAX_ALIGNMENT_CELLS = 500_000_000
# Tables up to this many cells (8 bytes each) are built whole; larger ones are checkpointed (see _trace_back).
_WHOLE_TABLE_CELLS = 4_000_000
# How a hypothesis spells the unknown token: our vocabularies' "[UNK]", and "<unk>" of fairseq/MMS vocabularies.
UNKNOWN_TOKENS = (UNK, "<unk>")
# A normalized hypothesis spells each as text.UNKNOWN_MARK ("⁇"), which no scored reference holds (a reference that
# keeps it is refused: text.normalized_reference). Normalized as letters, "[UNK]" would be the word "unk".
# Stands for an unknown token while the normalizer runs: a private-use character, which no Unicode form, casing
# or punctuation rule changes.
_UNKNOWN_PLACEHOLDER = "\ue000"


@dataclass(frozen=True)
class Alignment:
    """Edit counts of one reference/hypothesis token alignment."""

    hits: int
    substitutions: int
    deletions: int
    insertions: int
    ops: str  # one letter per aligned column: C(orrect), S(ubstitution), D(eletion), I(nsertion)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


@dataclass(frozen=True)
class UtteranceScore:
    """One scored utterance: normalized texts, word and character alignments."""

    id: str
    reference: str  # normalized, single spaces
    hypothesis: str
    words: Alignment
    chars: Alignment  # over the characters of the words, spaces not scored

    @property
    def ref_words(self) -> int:
        return self.words.hits + self.words.substitutions + self.words.deletions

    @property
    def ref_chars(self) -> int:
        return self.chars.hits + self.chars.substitutions + self.chars.deletions

    @property
    def wer(self) -> float:
        return _rate(self.words.errors, self.ref_words)

    @property
    def cer(self) -> float:
        return _rate(self.chars.errors, self.ref_chars)


def _rate(errors: int, total: int) -> float:
    # An utterance with an empty reference has WER 0 when the hypothesis is empty too, else infinity.
    return errors / total if total else (0.0 if errors == 0 else float("inf"))


@dataclass(frozen=True)
class ScoreReport:
    """Corpus-level WER/CER (fractions, not percent) with counts, confidence intervals and per-utterance scores."""

    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    sentence_error_rate: float
    sentences: int
    ref_words: int
    ref_chars: int
    wer_ci95: tuple[float, float] | None  # percentile bootstrap over utterances; None when bootstrap=0
    per_utterance: list[UtteranceScore]
    char_substitutions: int = 0
    char_deletions: int = 0
    char_insertions: int = 0
    char_hits: int = 0
    sentence_errors: int = 0  # utterances with at least one word error
    cer_ci95: tuple[float, float] | None = None
    missing_hypotheses: tuple[str, ...] = ()  # reference ids without a hypothesis, not scored (as sclite)
    extra_hypotheses: tuple[str, ...] = ()  # hypothesis ids without a reference, not scored
    bootstrap: int = 0  # resamples behind the confidence intervals
    seed: int = 0

    @property
    def word_errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def char_errors(self) -> int:
        return self.char_substitutions + self.char_deletions + self.char_insertions

    def to_dict(self) -> dict:
        """The summary as plain JSON types (no per-utterance rows)."""
        summary = {name: getattr(self, name) for name in (
            "wer", "cer", "sentence_error_rate", "substitutions", "deletions", "insertions", "hits", "word_errors",
            "char_substitutions", "char_deletions", "char_insertions", "char_hits", "char_errors",
            "sentences", "sentence_errors", "ref_words", "ref_chars", "bootstrap", "seed")}
        summary["wer_ci95"] = None if self.wer_ci95 is None else list(self.wer_ci95)
        summary["cer_ci95"] = None if self.cer_ci95 is None else list(self.cer_ci95)
        summary["missing_hypotheses"] = list(self.missing_hypotheses)
        summary["extra_hypotheses"] = list(self.extra_hypotheses)
        return summary


def score(refs: Mapping[str, str], hyps: Mapping[str, str], *, normalizer: TextNormalizer | None = None,
          allow_missing: bool = False, bootstrap: int = 1000, seed: int = 0) -> ScoreReport:
    """Score hypotheses against references (id -> text), the references normalized by `normalizer` and the
    hypotheses by `normalize_hypothesis` with it.

    Utterances are scored in the references' order. Raises InputError for ids missing on one side (unless
    allow_missing), for a reference the normalizer rejects, and when the scored references hold no word; when
    `refs` are Transcripts (read_transcripts, read_pair), a reference's error names its file and line.
    """
    missing = tuple(i for i in refs if i not in hyps)
    extra = tuple(i for i in hyps if i not in refs)
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{counted(len(missing), 'reference id')} without a hypothesis: {_some(missing)}")
        if extra:
            parts.append(f"{counted(len(extra), 'hypothesis id')} without a reference: {_some(extra)}")
        raise InputError("; ".join(parts) + f"{_files(refs, hyps)} (--allow-missing scores the ids both sides have, "
                         "as sclite does)")
    ids = [i for i in refs if i in hyps]
    if not ids:
        raise InputError(f"no utterance id appears in both the references and the hypotheses{_files(refs, hyps)}")
    ref_texts = [_normalized_reference(refs, i, normalizer) for i in ids]
    hyp_texts = [normalize_hypothesis(hyps[i], normalizer) for i in ids]
    ref_words = [t.split() for t in ref_texts]
    hyp_words = [t.split() for t in hyp_texts]
    # Characters are those of the words: like `sclite -c`, the spaces between words are not scored.
    per_utterance = [UtteranceScore(i, " ".join(r), " ".join(h), _aligned(r, h, refs, i, "words"),
                                    _aligned(list("".join(r)), list("".join(h)), refs, i, "characters"))
                     for i, r, h in zip(ids, ref_words, hyp_words)]

    total_words = sum(u.ref_words for u in per_utterance)
    if total_words == 0:
        raise InputError("the references hold no words, so WER is undefined",
                         path=refs.path if isinstance(refs, Transcripts) else None)
    total_chars = sum(u.ref_chars for u in per_utterance)
    word_errors = np.array([u.words.errors for u in per_utterance])
    char_errors = np.array([u.chars.errors for u in per_utterance])
    sentence_errors = int(np.count_nonzero(word_errors))
    rng = np.random.default_rng(seed)
    return ScoreReport(
        wer=int(word_errors.sum()) / total_words,
        cer=int(char_errors.sum()) / total_chars,  # a reference word has at least one character
        substitutions=sum(u.words.substitutions for u in per_utterance),
        deletions=sum(u.words.deletions for u in per_utterance),
        insertions=sum(u.words.insertions for u in per_utterance),
        hits=sum(u.words.hits for u in per_utterance),
        sentence_error_rate=sentence_errors / len(per_utterance),
        sentences=len(per_utterance),
        ref_words=total_words,
        ref_chars=total_chars,
        wer_ci95=bootstrap_ci95(word_errors, np.array([u.ref_words for u in per_utterance]),
                                resamples=bootstrap, rng=rng),
        per_utterance=per_utterance,
        char_substitutions=sum(u.chars.substitutions for u in per_utterance),
        char_deletions=sum(u.chars.deletions for u in per_utterance),
        char_insertions=sum(u.chars.insertions for u in per_utterance),
        char_hits=sum(u.chars.hits for u in per_utterance),
        sentence_errors=sentence_errors,
        cer_ci95=bootstrap_ci95(char_errors, np.array([u.ref_chars for u in per_utterance]),
                                resamples=bootstrap, rng=rng),
        missing_hypotheses=missing,
        extra_hypotheses=extra,
        bootstrap=bootstrap,
        seed=seed,
    )


def _files(refs: Mapping[str, str], hyps: Mapping[str, str]) -> str:
    """" (references: PATH, hypotheses: PATH)", naming the files of those that are Transcripts; "" for neither."""
    named = [f"{side}: {texts.path}" for side, texts in (("references", refs), ("hypotheses", hyps))
             if isinstance(texts, Transcripts)]
    return f" ({', '.join(named)})" if named else ""


def _some(ids: tuple[str, ...], limit: int = 10) -> str:
    return ", ".join(ids[:limit]) + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def normalize_hypothesis(text: str, normalizer: TextNormalizer | None) -> str:
    """A model's output as it is scored: normalized as the references are, except that each unknown token
    (UNKNOWN_TOKENS) becomes UNKNOWN_MARK, an error wherever it stands, and that nothing is rejected: digits under
    `digits: reject` and characters outside the alphabet stay, to be counted as errors. Without a normalizer, the
    text as it is."""
    if normalizer is None:
        return text
    for token in UNKNOWN_TOKENS:
        text = text.replace(token, _UNKNOWN_PLACEHOLDER)
    return normalizer(text, reject=False).replace(_UNKNOWN_PLACEHOLDER, UNKNOWN_MARK)


def _normalized_reference(refs: Mapping[str, str], utterance_id: str, normalizer: TextNormalizer | None) -> str:
    try:
        return normalized_reference(refs[utterance_id], normalizer)
    except TextRejected as err:
        raise InputError(f"utterance {utterance_id}: the normalizer rejects the reference: {err}",
                         **_where(refs, utterance_id)) from None


def _aligned(reference: list[str], hypothesis: list[str], refs: Mapping[str, str], utterance_id: str,
             unit: str) -> Alignment:
    try:
        return align(reference, hypothesis)
    except InputError as err:  # too long to align: say which utterance
        raise InputError(f"utterance {utterance_id}, {unit}: {err.message}", **_where(refs, utterance_id)) from None


def _where(refs: Mapping[str, str], utterance_id: str) -> dict:
    """InputError's path and line of a reference, when it was read from a file."""
    if isinstance(refs, Transcripts):
        return {"path": refs.path, "line": refs.lines[utterance_id]}
    return {}


def align(reference: list[str], hypothesis: list[str]) -> Alignment:
    """Align two token sequences exactly as sclite does (the weights and tie-breaking of its net_dp.c).

    Cost of cell (a, b) = min(diagonal + 0 for a match or 4 for a substitution, up + 3 for a deletion,
    left + 3 for an insertion). The trace back from the last cell takes the diagonal when it is not worse than
    either gap, then the deletion when it is strictly better than the insertion, else the insertion.

    Time grows with len(reference) * len(hypothesis) cells; beyond MAX_ALIGNMENT_CELLS (about a minute) this
    raises InputError. Memory for long texts stays near 16 bytes * longer length * sqrt(shorter length)
    (20,000 x 20,000 tokens: about 45 MB): see `_trace_back`.
    """
    if reference == hypothesis:  # the all-correct path costs 0, so sclite takes it too; common, and cheap
        return Alignment(len(reference), 0, 0, 0, "C" * len(reference))
    n, m = len(reference), len(hypothesis)
    if n * m > MAX_ALIGNMENT_CELLS:
        raise InputError(f"{n:,} reference x {m:,} hypothesis tokens ({n * m:.1e} cells) are more to align than "
                         f"the limit of {MAX_ALIGNMENT_CELLS:.1e} (about a minute); split the text into shorter "
                         "utterances")
    ids: dict[str, int] = {}
    ref = np.array([ids.setdefault(t, len(ids)) for t in reference], dtype=np.int64)
    hyp = np.array([ids.setdefault(t, len(ids)) for t in hypothesis], dtype=np.int64)
    ops = _trace_back(ref, hyp)
    return Alignment(ops.count("C"), ops.count("S"), ops.count("D"), ops.count("I"), ops)


def _trace_back(ref: np.ndarray, hyp: np.ndarray) -> str:
    """The ops of sclite's trace back through the cost table of ref against hyp (token ids, (tokens,)).

    A small table is built whole. A large one is not kept: a first pass keeps every `stride`-th row, and the
    trace back rebuilds one block of rows at a time from the kept row above it, only up to the column it has
    reached. Every cell so rebuilt holds the very value of the whole table (the same sums in the same order) and
    each step reads only its cell's three neighbours, so the ops are identical to the whole table's, ties
    included. That is why the table is checkpointed rather than split as Hirschberg's algorithm does: its split
    point, found from a forward and a backward pass, would have to be steered onto the one path among equally
    cheap ones that sclite's trace takes. The price is a second pass over the area left of the path.
    """
    # One row per token of the shorter text: each row costs a few numpy calls whatever its length, so fewer and
    # longer rows are faster (memory is then 16 bytes * longer * sqrt(shorter)). The costs are the same either
    # way (both gaps weigh 3); only which gap is a deletion swaps, and sclite's preference with it.
    transposed = len(hyp) < len(ref)
    down, across = (hyp, ref) if transposed else (ref, hyp)
    vertical_op, horizontal_op = ("I", "D") if transposed else ("D", "I")
    n, m = len(down), len(across)
    stride = max(1, n if (n + 1) * (m + 1) <= _WHOLE_TABLE_CELLS else math.isqrt(n))
    # One buffer for every block of rows: fresh arrays of a wide table's size cost a page fault per 4 KB.
    buffer = np.empty((min(stride, n) + 1, m + 1), dtype=np.int64)
    kept = {0: _GAP * np.arange(m + 1)}
    for top in range(0, (n - 1) // stride * stride, stride):  # no row below the last kept one is needed yet
        buffer[0] = kept[top]
        _fill_rows(buffer, down[top:top + stride], across)
        kept[top + stride] = buffer[-1].copy()
    ops: list[str] = []
    a, b = n, m
    down_ids, across_ids = down.tolist(), across.tolist()  # Python scalars compare faster
    while a > 0:
        top = (a - 1) // stride * stride
        block = buffer[:a - top + 1, :b + 1]  # rows top..a, columns 0..b
        block[0] = kept[top][:b + 1]
        _fill_rows(block, down[top:a], across[:b])
        while a > top:
            if b == 0:
                op = vertical_op
            else:
                same = down_ids[a - 1] == across_ids[b - 1]
                diagonal = block.item(a - 1 - top, b - 1) + (0 if same else _SUBSTITUTION)
                vertical = block.item(a - 1 - top, b) + _GAP
                horizontal = block.item(a - top, b - 1) + _GAP
                deletion, insertion = (horizontal, vertical) if transposed else (vertical, horizontal)
                if diagonal <= deletion and diagonal <= insertion:
                    op = "C" if same else "S"
                else:
                    op = "D" if deletion < insertion else "I"
            ops.append(op)
            a -= op != horizontal_op
            b -= op != vertical_op
    ops.extend(horizontal_op * b)  # along row 0
    return "".join(reversed(ops))


def _fill_rows(rows: np.ndarray, down: np.ndarray, across: np.ndarray) -> None:
    """Fill rows[1:] of the cost table from rows[0]: rows (len(down) + 1, len(across) + 1), token ids.

    Each row at once: a chain of insertions along a row is a running minimum of cost - 3 * column.
    """
    steps = _GAP * np.arange(rows.shape[1])
    diagonal = np.empty(len(across), dtype=np.int64)
    match = np.empty(len(across), dtype=bool)
    for r, token in enumerate(down, start=1):
        previous, row = rows[r - 1], rows[r]
        np.add(previous, _GAP, out=row)  # deleting the token of this row
        np.add(previous[:-1], _SUBSTITUTION, out=diagonal)
        np.equal(across, token, out=match)
        np.copyto(diagonal, previous[:-1], where=match)  # a match costs nothing (faster than np.where)
        np.minimum(row[1:], diagonal, out=row[1:])
        np.subtract(row, steps, out=row)
        np.minimum.accumulate(row, out=row)
        np.add(row, steps, out=row)  # then any chain of insertions


def bootstrap_ci95(errors: np.ndarray, totals: np.ndarray, *, resamples: int,
                   rng: np.random.Generator) -> tuple[float, float] | None:
    """Percentile 95% interval of sum(errors)/sum(totals) over utterances resampled with replacement.

    errors, totals: (utterances,) integer counts. Resamples whose totals sum to 0 are left out.
    """
    if resamples <= 0:
        return None
    n = len(errors)
    rates = []
    # Resample in blocks so that memory stays near 16 MB whatever the number of utterances.
    block = max(1, 2_000_000 // n)
    for start in range(0, resamples, block):
        index = rng.integers(0, n, size=(min(block, resamples - start), n))
        num, den = errors[index].sum(axis=1), totals[index].sum(axis=1)
        rates.append(num[den > 0] / den[den > 0])
    low, high = np.percentile(np.concatenate(rates), [2.5, 97.5])
    return float(low), float(high)


def render_alignment(alignment: Alignment, reference: str, hypothesis: str) -> str:
    """Three lines REF/HYP/Eval in sclite's pralign style: columns per aligned pair, '*' for a gap."""
    ref, hyp = iter(reference.split()), iter(hypothesis.split())
    columns: list[tuple[str, str, str]] = []
    for op in alignment.ops:
        r = next(ref) if op != "I" else None
        h = next(hyp) if op != "D" else None
        columns.append((r or "*" * len(h), h or "*" * len(r), "" if op == "C" else op))
    widths = [max(len(a), len(b), len(e)) for a, b, e in columns]
    return "\n".join(label + " ".join(col[k].ljust(w) for col, w in zip(columns, widths)).rstrip()
                     for k, label in enumerate(("REF:  ", "HYP:  ", "Eval: ")))


def worst_utterances(report: ScoreReport, n: int) -> list[UtteranceScore]:
    """The n utterances with the most word errors (then highest WER, then id)."""
    return sorted(report.per_utterance, key=lambda u: (-u.words.errors, -u.wer, u.id))[:n]


def write_per_utterance_tsv(report: ScoreReport, path: str | os.PathLike) -> None:
    """One row per scored utterance: counts, WER and CER (fractions), and the normalized texts."""
    rows = [["id", "ref_words", "hits", "substitutions", "deletions", "insertions", "wer", "ref_chars",
             "char_errors", "cer", "reference", "hypothesis"]]
    for u in report.per_utterance:
        w = u.words
        # Texts are single-spaced already; ids from JSONL could in principle hold a tab.
        rows.append([u.id.replace("\t", " "), u.ref_words, w.hits, w.substitutions, w.deletions, w.insertions,
                     f"{u.wer:.6f}", u.ref_chars, u.chars.errors, f"{u.cer:.6f}", u.reference, u.hypothesis])
    Path(path).write_text("".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")


def format_report(report: ScoreReport) -> str:
    """A short human-readable summary, percentages with two decimals."""
    def ci(interval: tuple[float, float] | None) -> str:
        return "" if interval is None else f"  95% CI [{interval[0]:.2%}, {interval[1]:.2%}]"

    lines = [
        f"WER {report.wer:.2%} [{report.word_errors} / {counted(report.ref_words, 'word')}: "
        f"{report.substitutions} sub, {report.deletions} del, {report.insertions} ins, "
        f"{report.hits} hits]{ci(report.wer_ci95)}",
        f"CER {report.cer:.2%} [{report.char_errors} / {report.ref_chars} characters: {report.char_substitutions} "
        f"sub, {report.char_deletions} del, {report.char_insertions} ins]{ci(report.cer_ci95)}",
        f"SER {report.sentence_error_rate:.2%} [{report.sentence_errors} / {report.sentences} sentences]",
    ]
    if report.missing_hypotheses:
        lines.append(f"not scored: {counted(len(report.missing_hypotheses), 'reference')} without a hypothesis: "
                     f"{_some(report.missing_hypotheses)}")
    if report.extra_hypotheses:
        lines.append(f"not scored: {counted(len(report.extra_hypotheses), 'hypothesis id')} without a reference: "
                     f"{_some(report.extra_hypotheses)}")
    return "\n".join(lines)


# --- reading transcript files ---------------------------------------------------------------------------


class Transcripts(dict[str, str]):
    """Utterance id -> text as read from `path`, with the line each came from (`lines`), so that a reference
    `score` refuses is named by file and line."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = os.fspath(path)
        self.lines: dict[str, int] = {}


def read_transcripts(path: str | os.PathLike, *, format: str = "auto") -> tuple[Transcripts | list[str], str]:
    """Read a transcript file; returns (id -> text, or texts in line order for plain files, format used).

    Formats: "kaldi" (`id text` per line; an id alone is an empty text), "tsv" (header with `id` and `text`
    columns), "jsonl" (objects with `id` and `text`), "lines" (one text per line, blank lines are empty texts).
    "auto" picks jsonl for a .jsonl/.json file or a first line starting with "{", tsv for a tab-separated header
    naming `id` and `text`, kaldi when every line's first word is unique and looks like an id (holds a digit or
    one of _-.:/), and lines otherwise. Raises InputError naming the file and line.
    """
    path = Path(path)
    if format not in FORMATS:
        raise InputError(f"unknown transcript format {format!r} (one of {', '.join(FORMATS)})", path=path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror}", path=path) from None
    try:
        text = data.decode("utf-8-sig")  # a byte order mark (Windows editors) is not part of the first id
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8: {err.reason}", path=path,
                         line=err.object[:err.start].count(b"\n") + 1) from None
    lines = text.splitlines()
    if format == "auto":
        format = _detect_format(path, lines)
    reader = {"kaldi": _read_kaldi, "tsv": _read_tsv, "jsonl": _read_jsonl, "lines": _read_lines}[format]
    return reader(path, lines), format


def _detect_format(path: Path, lines: list[str]) -> str:
    content = [line for line in lines if line.strip()]
    if path.suffix.lower() in (".jsonl", ".json") or (content and content[0].lstrip().startswith("{")):
        return "jsonl"
    if content and "\t" in content[0] and {"id", "text"} <= {c.strip().lower() for c in content[0].split("\t")}:
        return "tsv"
    first_words = [line.split()[0] for line in content]
    if first_words and len(set(first_words)) == len(first_words) and all(
            any(c.isdigit() or c in "_-.:/" for c in word) for word in first_words):
        return "kaldi"
    return "lines"


def _read_kaldi(path: Path, lines: list[str]) -> Transcripts:
    texts = Transcripts(path)
    for number, line in enumerate(lines, start=1):
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        _add(texts, parts[0], parts[1] if len(parts) > 1 else "", path, number)
    return texts


def _read_tsv(path: Path, lines: list[str]) -> Transcripts:
    if not lines:
        raise InputError("empty file: expected a header with 'id' and 'text' columns", path=path)
    header = [c.strip().lower() for c in lines[0].split("\t")]
    if "id" not in header or "text" not in header:
        raise InputError(f"the header must name 'id' and 'text' columns, got {lines[0]!r}", path=path, line=1)
    id_col, text_col = header.index("id"), header.index("text")
    texts = Transcripts(path)
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) <= max(id_col, text_col):
            raise InputError(f"expected {len(header)} tab-separated columns, got {len(cells)}", path=path,
                             line=number)
        _add(texts, cells[id_col].strip(), cells[text_col], path, number)
    return texts


def _read_jsonl(path: Path, lines: list[str]) -> Transcripts:
    texts = Transcripts(path)
    for number, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("id"), (str, int)) or isinstance(row["id"], bool):
            raise InputError("expected a JSON object with an 'id' (string)", path=path, line=number)
        if not isinstance(row.get("text"), str):
            raise InputError("expected a string 'text'", path=path, line=number)
        _add(texts, str(row["id"]), row["text"], path, number)
    return texts


def _read_lines(path: Path, lines: list[str]) -> list[str]:
    return list(lines)


def _add(texts: Transcripts, utterance_id: str, text: str, path: Path, line: int) -> None:
    if not utterance_id:
        raise InputError("empty utterance id", path=path, line=line)
    if utterance_id in texts:
        raise InputError(f"duplicate utterance id {utterance_id!r}", path=path, line=line)
    texts[utterance_id] = text
    texts.lines[utterance_id] = line


def read_pair(ref_path: str | os.PathLike, hyp_path: str | os.PathLike, *, ref_format: str = "auto",
              hyp_format: str = "auto") -> tuple[Transcripts, Transcripts, str, str]:
    """Read references and hypotheses for `score`: (refs, hyps, ref format, hyp format).

    Files with ids pair by id; two plain files pair by line (ids are line numbers from 1); a plain file cannot
    pair with a file that has ids.
    """
    refs, ref_fmt = read_transcripts(ref_path, format=ref_format)
    hyps, hyp_fmt = read_transcripts(hyp_path, format=hyp_format)
    if isinstance(refs, list) != isinstance(hyps, list):
        plain, plain_path = (ref_fmt, ref_path) if isinstance(refs, list) else (hyp_fmt, hyp_path)
        raise InputError(f"read as plain lines ({plain}) while the other file has utterance ids; "
                         "give --format to read both the same way", path=plain_path)
    if isinstance(refs, list):
        if len(refs) != len(hyps):
            raise InputError(f"plain files pair by line, but the references have {counted(len(refs), 'line')} and the "
                             f"hypotheses {len(hyps)}", path=hyp_path)
        refs, hyps = _by_line(refs, ref_path), _by_line(hyps, hyp_path)
    return refs, hyps, ref_fmt, hyp_fmt


def _by_line(texts: list[str], path: str | os.PathLike) -> Transcripts:
    """A plain file's lines keyed by their line numbers from 1."""
    keyed = Transcripts(path)
    for number, text in enumerate(texts, start=1):
        keyed[str(number)] = text
        keyed.lines[str(number)] = number
    return keyed
