"""Utterance manifests: one JSON object per line, audio paths relative to the manifest's folder."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from speechxfer.atomic import atomic_write
from speechxfer.errors import ManifestError, Problem


@dataclass(frozen=True)
class Utterance:
    """One utterance: a (span of an) audio file and its transcript."""

    id: str
    audio_path: str  # absolute once read; stored relative to the manifest's folder when under it
    text: str  # the transcript as the corpus gives it; normalization happens later
    duration_s: float
    speaker: str | None = None
    language: str | None = None
    offset_s: float = 0.0  # start inside audio_path (Kaldi segments); 0 for whole files


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
}


def read_manifest(path: str | os.PathLike, *,
                  check_audio: bool = False) -> tuple[list[Utterance], list[Problem]]:
    """Read a JSONL manifest, skipping and reporting every bad row.

    Audio paths come back absolute (relative ones resolve against the manifest's folder). Every row is checked
    for its fields and types, an empty id or text, a non-positive duration and a duplicate id; with
    `check_audio` also for a missing or empty (0-byte) audio file. Decoding problems surface later, from
    speechxfer.audio. Raises ManifestError only when the manifest itself cannot be read.
    """
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot read manifest: {err}", path=path) from err
    utterances: list[Utterance] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            utterance = _parse_row(line, base)
        except ValueError as err:
            problems.append(Problem(path, number, "malformed_row", str(err)))
            continue
        problem = _check_row(utterance, seen, check_audio)
        if problem is not None:
            kind, message = problem
            problems.append(Problem(path, number, kind, message, utterance.id))
            continue
        seen.add(utterance.id)
        utterances.append(utterance)
    return utterances, problems


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

    Audio paths under the manifest's folder are stored relative to it, others absolute; `offset_s` is written
    only when non-zero.
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
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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


def _parse_row(line: str, base: str) -> Utterance:
    """One manifest line → Utterance with an absolute path; ValueError saying what is wrong."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err.msg} (column {err.colno})") from None
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
        elif not isinstance(row[name], types) or isinstance(row[name], bool):
            raise ValueError(f"field {name!r} has type {type(row[name]).__name__}")
    for name in ("duration_s", "offset_s"):
        if name in row and not math.isfinite(row[name]):
            raise ValueError(f"field {name!r} is not finite")
    if not row["id"].strip():
        raise ValueError("empty id")
    audio_path = os.path.normpath(os.path.join(base, os.path.expanduser(row["audio_path"])))
    return Utterance(id=row["id"], audio_path=audio_path, text=row["text"], duration_s=float(row["duration_s"]),
                     speaker=row.get("speaker"), language=row.get("language"),
                     offset_s=float(row.get("offset_s", 0.0)))


def _check_row(u: Utterance, seen: set[str], check_audio: bool) -> tuple[str, str] | None:
    """(kind, message) of the first thing wrong with a parsed row, or None."""
    if u.id in seen:
        return "duplicate_id", f"id {u.id!r} appears earlier in the manifest"
    if not u.text.strip():
        return "empty_text", f"{u.id}: empty transcript"
    if u.duration_s <= 0:
        return "zero_length", f"{u.id}: duration_s is {u.duration_s:g}"
    if u.offset_s < 0:
        return "malformed_row", f"{u.id}: offset_s is negative ({u.offset_s:g})"
    if check_audio:
        if not os.path.isfile(u.audio_path):
            return "missing_file", f"{u.id}: no such audio file {u.audio_path}"
        if os.path.getsize(u.audio_path) == 0:
            return "unreadable_audio", f"{u.id}: empty audio file (0 bytes) {u.audio_path}"
    return None


def _stored_path(audio_path: str, base: Path) -> str:
    """Path relative to `base` when the file lies under it, else absolute."""
    absolute = Path(os.path.abspath(audio_path))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)
