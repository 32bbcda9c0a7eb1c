"""Utterance manifests: one JSON object per line, audio paths relative to the manifest's folder."""

from __future__ import annotations

import codecs
import gzip
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from speechxfer.atomic import atomic_write
from speechxfer.audio import audio_duration_s, file_problem
from speechxfer.compat import gc_paused
from speechxfer.errors import AudioError, ManifestError, Problem

# A listed duration may exceed the audio by this much (seconds, or this share of it, whichever is larger) before
# they count as different: headers and decoders round, MP3 and AAC pad.
DURATION_TOLERANCE_S = 0.1
DURATION_TOLERANCE_SHARE = 0.1


@dataclass(frozen=True, slots=True)  # slots: a million of them are held while training
class Utterance:
    """One utterance: a (span of an) audio file and its transcript."""

    id: str
    audio_path: str  # absolute once read; stored relative to the manifest's folder when under it
    text: str  # the transcript as the corpus gives it; normalization happens later
    duration_s: float
    speaker: str | None = None
    language: str | None = None
    offset_s: float = 0.0  # start inside audio_path (Kaldi segments); 0 for whole files
    # A pseudo label: the text is a model's transcript (speechxfer pseudo-label), not a person's. Training takes
    # such rows (data.pseudo_labelled); dev and test refuse them (check_held_out).
    pseudo_label: bool = False
    confidence: float | None = None  # of a pseudo label: decoding.Transcript.confidence of the teacher
    # Where the row came from, for messages about it; set by read_manifest, never written, not compared.
    manifest: str | None = field(default=None, compare=False, repr=False)
    line: int | None = field(default=None, compare=False, repr=False)

    def problem(self, kind: str, message: str) -> Problem:
        """A Problem about this utterance, naming its manifest and line (its audio file when it has no manifest)."""
        return Problem(self.manifest or self.audio_path, self.line, kind, f"{self.id}: {message}", self.id)


@dataclass(frozen=True)
class ManifestSummary:
    """Totals of a list of utterances."""

    utterances: int
    duration_s: float
    speakers: int  # distinct known speakers; utterances without one are not counted
    characters: str  # every character of the transcripts except whitespace, sorted

    @property
    def hours(self) -> float:
        return self.duration_s / 3600

    def __str__(self) -> str:
        return (f"{self.hours:.2f} h, {self.utterances} utterances, {self.speakers} speakers, "
                f"{len(self.characters)} characters: {self.characters}")


# field -> (accepted JSON types, required)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": ((str,), True),
    "audio_path": ((str,), True),
    "text": ((str,), True),
    "duration_s": ((int, float), True),
    "speaker": ((str, type(None)), False),
    "language": ((str, type(None)), False),
    "offset_s": ((int, float), False),
    "pseudo_label": ((bool,), False),
    "confidence": ((int, float, type(None)), False),
}
_DECODER = json.JSONDecoder()


def read_manifest(path: str | os.PathLike, *, check_files: bool = False,
                  check_audio: bool = False) -> tuple[list[Utterance], list[Problem]]:
    """Read a JSONL manifest, skipping and reporting every bad row.

    Audio paths come back absolute (relative ones resolve against the manifest's folder); each utterance knows its
    manifest and line. Every row is checked for its fields and types, an empty id or text, a non-positive duration
    and a duplicate id. With `check_files`, also that its audio is a non-empty regular file (one stat per row,
    nothing opened: cheap enough before training on any corpus). With `check_audio`, also that the header is
    readable, that the samples are finite (float formats are read in full), and that the audio holds the listed
    span (see duration_mismatch). Other decoding problems surface later, from speechxfer.audio. Raises
    ManifestError only when the manifest itself cannot be read.
    """
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    utterances: list[Utterance] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    names: dict[str, str] = {}  # one copy of each speaker and language name, shared by its rows
    layouts: set[tuple] = set()  # field names and value types of the rows whose fields passed their checks
    with gc_paused():
        for number, row in read_jsonl(path, problems=problems, what="manifest"):
            try:
                utterance = _parse_row(row, base, path, number, names, layouts)
            except ValueError as err:
                problems.append(Problem(path, number, "malformed_row", str(err)))
                continue
            problem = _check_row(utterance, seen, check_files or check_audio, check_audio)
            if problem is not None:
                problems.append(utterance.problem(*problem))
                continue
            seen.add(utterance.id)
            utterances.append(utterance)
    return utterances, problems


def read_jsonl(path: str | os.PathLike, *, problems: list[Problem] | None = None,
               what: str | None = None) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) of each non-blank line of a JSON-lines file, read as it goes.

    UTF-8 with or without a byte-order mark, gzip-compressed when named *.gz; only "\\n" ends a line (a
    JSON string may hold other Unicode line separators). A line that is not UTF-8 or not valid JSON raises
    ManifestError naming the file and line, or, when `problems` is given, is added to it as a malformed_row
    Problem and skipped. ManifestError ("cannot read [WHAT]: ...") when the file cannot be read.
    """
    path = os.fspath(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if number == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.strip():
                    continue
                try:
                    text = raw.rstrip(b"\r\n").decode("utf-8")
                    try:
                        value, end = _DECODER.raw_decode(text)  # json.loads less its wrappers (whitespace scans)
                    except json.JSONDecodeError:
                        end = -1
                    if end != len(text):  # not one value alone on the line: json.loads says what is wrong, with
                        value = json.loads(text)  # the column on this line, or allows the spaces around it
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    message = (f"not UTF-8 ({err.reason})" if isinstance(err, UnicodeDecodeError)
                               else f"not valid JSON: {err.msg} (column {err.colno})")
                    if problems is None:
                        raise ManifestError(message, path=path, line=number) from None
                    problems.append(Problem(path, number, "malformed_row", message))
                    continue
                yield number, value
    except (OSError, EOFError) as err:
        raise ManifestError(f"cannot read{' ' + what if what else ''}: {err.strerror or err}", path=path) from None


def duration_mismatch(utterance: Utterance, audio_s: float) -> str | None:
    """Why `audio_s` seconds of audio (after the utterance's offset) cannot hold its listed duration, or None.

    Only audio shorter than listed is a mismatch: a span may be part of a longer recording."""
    if utterance.duration_s - audio_s <= max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_SHARE * utterance.duration_s):
        return None
    return f"the manifest lists {utterance.duration_s:g} s, the audio holds {max(audio_s, 0.0):g} s"


def load_manifest(path: str | os.PathLike) -> list[Utterance]:
    """Read a JSONL manifest strictly: ManifestError (with file and line) at its first bad row."""
    utterances, problems = read_manifest(path)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more bad rows)" if len(problems) > 1 else ""
        raise ManifestError(f"[{first.kind}] {first.message}{more}", path=first.path, line=first.line)
    return utterances


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance]) -> None:
    """Write utterances as JSONL, atomically (a temporary file in the same folder, then rename).

    Audio paths under the manifest's folder are stored relative to it, others absolute; `offset_s`,
    `pseudo_label` and `confidence` are written only when set, so human-labelled rows read as before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.abspath(path.parent))  # as read_manifest resolves: symlinks kept
    with atomic_write(path) as f:
        for u in utterances:
            row = {"id": u.id, "audio_path": _stored_path(u.audio_path, base), "text": u.text,
                   "duration_s": u.duration_s, "speaker": u.speaker, "language": u.language}
            if u.offset_s:
                row["offset_s"] = u.offset_s
            if u.pseudo_label:
                row["pseudo_label"] = True
            if u.confidence is not None:
                row["confidence"] = u.confidence
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def check_held_out(pseudo_labelled: Iterable[Utterance], held_out: dict[str, Sequence[Utterance]]) -> None:
    """ManifestError unless dev and test (`held_out`: split name -> utterances) are free of pseudo labels: no
    held-out row marked pseudo_label, and no pseudo-labelled utterance whose id or audio file (symlinks resolved)
    is also held out, so that a model is never scored on audio its own transcripts trained it on. The error names
    the offending row's manifest and line, and the held-out row it meets."""
    by_id: dict[str, tuple[str, Utterance]] = {}
    by_file: dict[str, tuple[str, Utterance]] = {}
    for split, utterances in held_out.items():
        for u in utterances:
            if u.pseudo_label:
                raise ManifestError(f"{split} utterance {u.id} is pseudo-labelled (pseudo_label: true): {split} "
                                    "needs human transcripts", path=u.manifest, line=u.line)
            by_id.setdefault(u.id, (split, u))
            by_file.setdefault(os.path.realpath(u.audio_path), (split, u))
    for u in pseudo_labelled:
        for what, found in (("id", by_id.get(u.id)), ("audio file", by_file.get(os.path.realpath(u.audio_path)))):
            if found is not None:
                split, other = found
                where = other.manifest if other.line is None else f"{other.manifest}:{other.line}"
                raise ManifestError(f"pseudo-labelled utterance {u.id}: its {what} is also in the {split} set "
                                    f"({where}); {split} audio must never be pseudo-labelled for training",
                                    path=u.manifest, line=u.line)


def summarize(utterances: Iterable[Utterance]) -> ManifestSummary:
    """Count utterances, seconds of audio, distinct speakers and the characters used."""
    count, seconds, speakers, characters = 0, 0.0, set(), set()
    for u in utterances:
        count += 1
        seconds += u.duration_s
        if u.speaker is not None:
            speakers.add(u.speaker)
        characters.update(c for c in u.text if not c.isspace())
    return ManifestSummary(count, seconds, len(speakers), "".join(sorted(characters)))


def _parse_row(row: object, base: str, manifest: str, number: int, names: dict[str, str],
               layouts: set[tuple]) -> Utterance:
    """One decoded manifest line → Utterance with an absolute path; ValueError saying what is wrong. `names`
    holds one copy of each speaker and language name, shared by the rows that repeat it; `layouts`, the field
    names and value types of the rows whose fields passed _check_fields."""
    # The field checks depend on the names and types alone, which a manifest's rows share: a million rows are
    # read before training, a handful of layouts checked.
    if type(row) is not dict or (layout := (tuple(row), tuple(map(type, row.values())))) not in layouts:
        _check_fields(row)
        layouts.add(layout)
    duration_s, offset_s, confidence = row["duration_s"], row.get("offset_s", 0.0), row.get("confidence")
    if not math.isfinite(duration_s + offset_s + (confidence or 0.0)):  # one test for the three
        for name, value in (("duration_s", duration_s), ("offset_s", offset_s), ("confidence", confidence)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"field {name!r} is not finite")
    if not row["id"].strip():
        raise ValueError("empty id")
    speaker, language = row.get("speaker"), row.get("language")
    return Utterance(row["id"], _absolute(row["audio_path"], base), row["text"], float(duration_s),
                     speaker and names.setdefault(speaker, speaker), language and names.setdefault(language, language),
                     float(offset_s), row.get("pseudo_label", False), None if confidence is None else float(confidence),
                     manifest, number)


def _check_fields(row: object) -> None:
    """ValueError naming the first thing wrong with a decoded row's fields: not an object, an unknown or missing
    field, a field of the wrong type."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    for name, (types, required) in _FIELDS.items():
        if name not in row:
            if required:
                raise ValueError(f"missing field {name!r}")
        # bool is an int in Python but never a valid duration or offset
        elif not isinstance(row[name], types) or (isinstance(row[name], bool) and bool not in types):
            raise ValueError(f"field {name!r} has type {type(row[name]).__name__}")


def _absolute(audio_path: str, base: str) -> str:
    """A manifest's audio path made absolute and normal, relative ones against `base` (an absolute, normal folder);
    a leading ~ is the user's home."""
    if (audio_path and audio_path[0] not in "~." and audio_path[-1] != "/" and "/." not in audio_path
            and "//" not in audio_path):  # already normal once joined: no normpath (Python code in 3.11)
        return audio_path if audio_path[0] == "/" else (base + audio_path if base == "/" else base + "/" + audio_path)
    return os.path.normpath(os.path.join(base, os.path.expanduser(audio_path)))


def _check_row(u: Utterance, seen: set[str], check_files: bool, check_audio: bool) -> tuple[str, str] | None:
    """(kind, message) of the first thing wrong with a parsed row, or None."""
    if u.id in seen:
        return "duplicate_id", "id appears earlier in the manifest"
    if not u.text.strip():
        return "empty_text", "empty transcript"
    if u.duration_s <= 0:
        return "zero_length", f"duration_s is {u.duration_s:g}"
    if u.offset_s < 0:
        return "malformed_row", f"offset_s is negative ({u.offset_s:g})"
    if check_files and (problem := file_problem(u.audio_path)) is not None:
        return problem[0], f"{problem[1]}: {u.audio_path}"
    if check_audio:
        try:
            audio_s = audio_duration_s(u.audio_path, check_finite=True)
        except AudioError as err:
            return "unreadable_audio", f"{err.message}: {u.audio_path}"
        if (mismatch := duration_mismatch(u, audio_s - u.offset_s)) is not None:
            return "duration_mismatch", f"{mismatch}: {u.audio_path}"
    return None


def _stored_path(audio_path: str, base: Path) -> str:
    """Path relative to `base` when the file lies under it, else absolute."""
    absolute = Path(os.path.abspath(audio_path))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)
