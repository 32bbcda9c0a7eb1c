"""Utterance manifests: one JSON object per line, audio paths relative to the manifest's folder."""

from __future__ import annotations

import codecs
import functools
import gzip
import json
import math
import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import msgspec
import numpy as np

from speechxfer.atomic import atomic_write
from speechxfer.audio import audio_duration_s, file_problem
from speechxfer.compat import gc_paused
from speechxfer.errors import AudioError, ManifestError, Problem, counted, output_folder

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
        return (f"{self.hours:.2f} h, {counted(self.utterances, 'utterance')}, {counted(self.speakers, 'speaker')}, "
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
# _FIELDS as a msgspec type, which decodes a line and checks its fields in C (_clean_block): a row's fields in
# _FIELDS' order, of exactly their types (a bool is no number), none unknown, the required ones present, an
# optional one left out Utterance's default (as _parse_row has it).
_ROW_DECODER = msgspec.json.Decoder(msgspec.defstruct("Row", [
    (f.name, functools.reduce(operator.or_, _FIELDS[f.name][0]), *(() if _FIELDS[f.name][1] else (f.default,)))
    for f in fields(Utterance) if f.name in _FIELDS], forbid_unknown_fields=True))
_LINE_ENDS = frozenset(("\n", "\r\n", ""))  # what commonly follows a value on its line (others: json.loads)
# Lines read_jsonl reads at a time: a block a manifest reader checks at once (_clean_block).
_JSONL_BLOCK = 1 << 14


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
    table, problems = _read_table(path, check_files=check_files, check_audio=check_audio)
    return list(table), problems


def read_manifest_table(path: str | os.PathLike, *, check_files: bool = False
                        ) -> tuple[UtteranceTable, list[Problem]]:
    """read_manifest's rows and problems, the rows held in columns (UtteranceTable): how training reads a split of
    a million rows."""
    return _read_table(path, check_files=check_files, check_audio=False)


class UtteranceTable(Sequence[Utterance]):
    """Utterances held in columns, as read_manifest_table reads them: a million rows cost a few hundred bytes each
    and no Python object of their own. `table[i]` builds row i's Utterance (equal to the one read_manifest gives)
    when a caller needs one; a column serves those that look at one field of every row.

    Columns: `ids`, `texts`, `speakers`, `languages` (lists of str, the last two with None); `durations_s`,
    `offsets_s`, `confidences` (float64 arrays (rows,), NaN where a row has no confidence); `pseudo_labels` (bool
    array); `lines` (int64 array: the row's line in its manifest); `sources` (int32 array: index into `manifests`,
    the files the rows were read from)."""

    def __init__(self, *, ids: list[str], audio_paths: list[str], texts: list[str], durations_s: np.ndarray,
                 speakers: list[str | None], languages: list[str | None], offsets_s: np.ndarray,
                 pseudo_labels: np.ndarray, confidences: np.ndarray, lines: np.ndarray, sources: np.ndarray,
                 manifests: tuple[str, ...]):
        self.ids = ids
        # As the manifest spells them when relative and normal (joined to their manifest's folder on demand: no
        # second string a row), else absolute.
        self._audio_paths = audio_paths
        self.texts = texts
        self.durations_s = durations_s
        self.speakers = speakers
        self.languages = languages
        self.offsets_s = offsets_s
        self.pseudo_labels = pseudo_labels
        self.confidences = confidences
        self.lines = lines
        self.sources = sources
        self.manifests = manifests
        self._folders = tuple(os.path.dirname(os.path.abspath(m)) for m in manifests)

    @classmethod
    def concat(cls, tables: Sequence[UtteranceTable]) -> UtteranceTable:
        """The rows of `tables`, one after another (ids are not checked for repeats across them)."""
        starts = np.cumsum([0] + [len(t.manifests) for t in tables])
        arrays = {name: np.concatenate([getattr(t, name) for t in tables] or [np.empty(0, dtype)])
                  for name, dtype in (("durations_s", np.float64), ("offsets_s", np.float64),
                                      ("pseudo_labels", bool), ("confidences", np.float64), ("lines", np.int64))}
        return cls(ids=[i for t in tables for i in t.ids], audio_paths=[p for t in tables for p in t._audio_paths],
                   texts=[x for t in tables for x in t.texts], speakers=[x for t in tables for x in t.speakers],
                   languages=[x for t in tables for x in t.languages],
                   sources=np.concatenate([t.sources + start for t, start in zip(tables, starts.tolist())]
                                          or [np.empty(0, np.int32)]).astype(np.int32),
                   manifests=tuple(m for t in tables for m in t.manifests), **arrays)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        confidence = float(self.confidences[index])
        return Utterance(self.ids[index], self.audio_path(index), self.texts[index], float(self.durations_s[index]),
                         self.speakers[index], self.languages[index], float(self.offsets_s[index]),
                         bool(self.pseudo_labels[index]), None if math.isnan(confidence) else confidence,
                         self.manifests[self.sources[index]], int(self.lines[index]))

    def __iter__(self) -> Iterator[Utterance]:
        return map(self.__getitem__, range(len(self)))

    def audio_path(self, index: int) -> str:
        """Row `index`'s audio path, absolute."""
        return _joined(self._folders[self.sources[index]], self._audio_paths[index])


# Rows read_manifest_table gathers before it turns their numbers into arrays: each row's Python floats live only
# that long.
_TABLE_BLOCK = 1 << 16


def _read_table(path: str | os.PathLike, *, check_files: bool, check_audio: bool
                ) -> tuple[UtteranceTable, list[Problem]]:
    """read_manifest's work, into columns."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    problems: list[Problem] = []
    seen: set[str] = set()
    names: dict[str, str] = {}  # one copy of each speaker and language name (and repeated path), shared by its rows
    layouts: set[tuple] = set()  # field names and value types of the rows whose fields passed their checks
    block: list[tuple] = []  # rows kept, as _parse_row gives them, not yet in `columns`
    columns: list[list] = [[] for _ in range(10)]  # _parse_row's fields and the line, each a list of blocks' parts
    check_files = check_files or check_audio

    def flush() -> None:
        for column, values in zip(columns, zip(*block)):
            column.append(values)
        block.clear()

    def add_row(number: int, row: object) -> None:
        try:
            values = _parse_row(row, folder, names, layouts)
        except ValueError as err:
            problems.append(Problem(path, number, "malformed_row", str(err)))
            return
        problem = _check_row(values, folder, seen, check_files)
        if problem is None and check_audio:
            problem = _check_audio(Utterance(values[0], _joined(folder, values[1]), *values[2:]))
        if problem is not None:
            problems.append(Problem(path, number, problem[0], f"{values[0]}: {problem[1]}", values[0]))
            return
        seen.add(values[0])
        block.append((*values, number))
        if len(block) == _TABLE_BLOCK:
            flush()

    with gc_paused():
        for numbers, lines in _jsonl_lines(path, what="manifest"):
            clean = None if check_audio else _clean_block(lines, folder, seen, names, check_files)
            if clean is None:  # some row to skip or report: row by row, as read_manifest has always read them
                for number, row in _decoded(numbers, lines, path, problems):
                    add_row(number, row)
            else:
                flush()
                for column, values in zip(columns, (*clean, np.asarray(numbers, dtype=np.int64))):
                    column.append(values)
        flush()
    # The strings as lists (one object each already), the numbers as arrays.
    ids, audio_paths, texts, speakers, languages = ([value for part in columns[k] for value in part]
                                                    for k in (0, 1, 2, 4, 5))
    durations_s, offsets_s, pseudo_labels, confidences, lines = (
        np.concatenate([np.asarray(part, dtype=dtype) for part in column] or [np.empty(0, dtype)])
        for column, dtype in ((columns[3], np.float64), (columns[6], np.float64), (columns[7], bool),
                              (columns[8], np.float64), (columns[9], np.int64)))  # a confidence of None: NaN
    return UtteranceTable(ids=ids, audio_paths=audio_paths, texts=texts, durations_s=durations_s,
                          speakers=speakers, languages=languages, offsets_s=offsets_s,
                          pseudo_labels=pseudo_labels, confidences=confidences, lines=lines,
                          sources=np.zeros(len(ids), dtype=np.int32), manifests=(path,)), problems


def read_jsonl(path: str | os.PathLike, *, problems: list[Problem] | None = None,
               what: str | None = None) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) of each non-blank line of a JSON-lines file, read as it goes.

    UTF-8 with or without a byte-order mark, gzip-compressed when named *.gz; only "\\n" ends a line (a
    JSON string may hold other Unicode line separators). A line that is not UTF-8 or not valid JSON raises
    ManifestError naming the file and line, or, when `problems` is given, is added to it as a malformed_row
    Problem and skipped. ManifestError ("cannot read [WHAT]: ...") when the file cannot be read.
    """
    path = os.fspath(path)
    for numbers, lines in _jsonl_lines(path, what=what):
        yield from _decoded(numbers, lines, path, problems)


def _jsonl_lines(path: str, *, what: str | None) -> Iterator[tuple[Sequence[int], list[bytes]]]:
    """The non-blank lines of a JSON-lines file as read_jsonl reads them (the first without its byte-order mark;
    each with its "\\n"), a block of up to _JSONL_BLOCK lines at a time, with their line numbers. When reading
    fails part way, the lines before the failure come first, then ManifestError."""
    block: list[bytes] = []
    read = 0  # lines read before `block`
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for raw in f:
                block.append(raw)
                if len(block) == _JSONL_BLOCK:
                    yield _non_blank(block, read)
                    read += len(block)
                    block = []
        failure = None
    except (OSError, EOFError) as err:
        failure = err
    if block:
        yield _non_blank(block, read)
    if failure is not None:
        raise ManifestError(f"cannot read{' ' + what if what else ''}: {failure.strerror or failure}",
                            path=path) from None


def _non_blank(block: list[bytes], read: int) -> tuple[Sequence[int], list[bytes]]:
    """(line numbers, lines) of the non-blank lines of `block`, which follows `read` lines of its file."""
    if read == 0:
        block[0] = block[0].removeprefix(codecs.BOM_UTF8)
    if block[0] and not any(map(bytes.isspace, block)):  # no blank line (only a lone BOM makes one empty)
        return range(read + 1, read + len(block) + 1), block
    kept = [(number, raw) for number, raw in enumerate(block, start=read + 1) if raw and not raw.isspace()]
    return [number for number, _ in kept], [raw for _, raw in kept]


def _decoded(numbers: Sequence[int], lines: list[bytes], path: str,
             problems: list[Problem] | None) -> Iterator[tuple[int, object]]:
    """read_jsonl's (line number, value) of each of `lines`, decoded one by one."""
    for number, raw in zip(numbers, lines):
        try:
            text = raw.decode("utf-8")
            try:
                value, end = _DECODER.raw_decode(text)  # json.loads less its wrappers (whitespace scans)
                alone = text[end:] in _LINE_ENDS
            except json.JSONDecodeError:
                alone = False
            if not alone:  # not one value alone on the line: json.loads says what is wrong, with the
                # column on this line, or allows the spaces around it
                value = json.loads(text.rstrip("\r\n"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            # json recurses a level per bracket: `[[[...]]]` a thousand deep exhausts Python's stack (msgspec,
            # in _clean_block, refuses such a row at its first bracket: no field of a row holds a container)
            message = (f"not UTF-8 ({err.reason})" if isinstance(err, UnicodeDecodeError)
                       else "JSON nested too deeply to read" if isinstance(err, RecursionError)
                       else f"not valid JSON: {err.msg} (column {err.colno})")
            if problems is None:
                raise ManifestError(message, path=path, line=number) from None
            problems.append(Problem(path, number, "malformed_row", message))
            continue
        yield number, value


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
    output_folder(path.parent)
    base = Path(os.path.abspath(path.parent))  # as read_manifest resolves: symlinks kept
    with atomic_write(path) as f:
        for u in utterances:
            row = {"id": u.id, "audio_path": _relative_or_absolute(u.audio_path, base), "text": u.text,
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


def _parse_row(row: object, folder: str, names: dict[str, str], layouts: set[tuple]) -> tuple:
    """One decoded manifest line → Utterance's fields from id to confidence, the audio path as _stored_path gives
    it; ValueError saying what is wrong. `names` holds one copy of each speaker and language name, shared by the
    rows that repeat it; `layouts`, the field names and value types of the rows whose fields passed
    _check_fields."""
    # The field checks depend on the names and types alone, which a manifest's rows share: a million rows are
    # read before training, a handful of layouts checked.
    if type(row) is not dict or (layout := (tuple(row), tuple(map(type, row.values())))) not in layouts:
        _check_fields(row)
        layouts.add(layout)
    duration_s, offset_s, confidence = row["duration_s"], row.get("offset_s", 0.0), row.get("confidence")
    for name, value in (("duration_s", duration_s), ("offset_s", offset_s), ("confidence", confidence)):
        if value is not None and not _finite(value):
            raise ValueError(f"field {name!r} is not finite")
    if not row["id"].strip():
        raise ValueError("empty id")
    speaker, language = row.get("speaker"), row.get("language")
    return (row["id"], _stored_path(row["audio_path"], folder), row["text"], float(duration_s),
            speaker and names.setdefault(speaker, speaker), language and names.setdefault(language, language),
            float(offset_s), row.get("pseudo_label", False), None if confidence is None else float(confidence))


def _finite(number: float) -> bool:
    """math.isfinite, False for an integer beyond any float (which json.loads reads from 1 and 400 zeros)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _clean_block(lines: list[bytes], folder: str, seen: set[str], names: dict[str, str],
                 check_files: bool) -> tuple | None:
    """The columns of a block of manifest lines (_read_table's, from ids to confidences) when every line is a row
    that _parse_row and _check_row take as it is; else None, and nothing changed (the block is then read row by
    row, which names each bad line). Adds the ids to `seen`; `names` keeps one copy of each repeated path and of
    each speaker and language name.

    msgspec decodes each line and checks its fields against _FIELDS in C (_ROW_DECODER), and the other checks run
    a column at a time: no Python code a row."""
    if not lines:  # a block of blank lines
        return None
    try:
        # one line at a time: lines never lend each other brackets
        columns = list(zip(*map(msgspec.structs.astuple, map(_ROW_DECODER.decode, lines))))
    except (msgspec.DecodeError, UnicodeDecodeError):  # not JSON (or UTF-8), a field missing, unknown or mistyped
        return None
    ids, audio_paths, texts, durations, speakers, languages, offsets, pseudo_labels, confidences = columns
    del columns
    try:  # JSON numbers as float() makes them, which is what _parse_row does (None: NaN, no confidence)
        durations_s, offsets_s, confidences = (np.array(column, dtype=np.float64)
                                               for column in (durations, offsets, confidences))
    except OverflowError:  # an integer beyond any float
        return None
    if (not np.isfinite(durations_s).all() or not np.isfinite(offsets_s).all() or np.isinf(confidences).any()
            or _any_blank(ids) or _any_blank(texts) or (durations_s <= 0).any() or (offsets_s < 0).any()
            or len(set(ids)) < len(ids) or not seen.isdisjoint(ids)):
        return None
    if not _all_stored_as_written(audio_paths):
        audio_paths = [_stored_path(path, folder) for path in audio_paths]
    distinct = set(audio_paths)
    if check_files and any(file_problem(_joined(folder, path)) is not None for path in distinct):
        return None
    if 2 * len(distinct) <= len(audio_paths):  # segments of fewer recordings: their rows share one copy of a path
        audio_paths = list(map(names.setdefault, audio_paths, audio_paths))
    seen.update(ids)
    # one copy of each name (None, absent or null, is a name here too)
    speakers, languages = (list(map(names.setdefault, column, column)) for column in (speakers, languages))
    return (list(ids), list(audio_paths), list(texts), durations_s, speakers, languages, offsets_s,
            np.array(pseudo_labels, dtype=bool), confidences)


def _any_blank(strings: Sequence[str]) -> bool:
    """Whether any of `strings` is empty or only whitespace (`not s.strip()`), tested in C."""
    return "" in strings or any(map(str.isspace, strings))


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


def _stored_path(audio_path: str, folder: str) -> str:
    """A manifest's audio path as an UtteranceTable holds it: unchanged when relative and already normal once
    joined to `folder` (the manifest's folder, absolute and normal), else absolute and normal, a leading ~ the
    user's home. _joined makes it absolute."""
    if (audio_path and audio_path[0] not in "~." and audio_path[-1] != "/" and "/." not in audio_path
            and "//" not in audio_path):  # normal once joined: no normpath (Python code in 3.11)
        return audio_path
    return os.path.normpath(os.path.join(folder, os.path.expanduser(audio_path)))


def _all_stored_as_written(audio_paths: Sequence[str]) -> bool:
    """Whether _stored_path leaves every one of `audio_paths` (at least one) unchanged: its test, on all of them at
    once in one joined string (the two must say the same)."""
    joined = "\0".join(audio_paths)
    return not (joined.count("\0") != len(audio_paths) - 1 or not audio_paths[0] or audio_paths[0][0] in "~."
                or audio_paths[-1][-1:] in ("", "/")
                or any(part in joined for part in ("/.", "//", "\0\0", "\0~", "\0.", "/\0")))


def _joined(folder: str, stored_path: str) -> str:
    """The absolute path of a path _stored_path gave for a manifest in `folder`."""
    if stored_path[0] == "/":
        return stored_path
    return folder + stored_path if folder == "/" else folder + "/" + stored_path


def _check_row(values: tuple, folder: str, seen: set[str], check_files: bool) -> tuple[str, str] | None:
    """(kind, message) of the first thing wrong with a row _parse_row gave, or None; with `check_files`, one stat
    of its audio file."""
    utterance_id, audio_path, text, duration_s, offset_s = values[0], values[1], values[2], values[3], values[6]
    if utterance_id in seen:
        return "duplicate_id", "id appears earlier in the manifest"
    if not text or text.isspace():  # as `not text.strip()`, without a copy
        return "empty_text", "empty transcript"
    if duration_s <= 0:
        return "zero_length", f"duration_s is {duration_s:g}"
    if offset_s < 0:
        return "malformed_row", f"offset_s is negative ({offset_s:g})"
    if check_files and (problem := file_problem(audio_path := _joined(folder, audio_path))) is not None:
        return problem[0], f"{problem[1]}: {audio_path}"
    return None


def _check_audio(u: Utterance) -> tuple[str, str] | None:
    """(kind, message) when the header of u's audio cannot be read, its samples are not finite, or it is shorter
    than listed (duration_mismatch); else None."""
    try:
        audio_s = audio_duration_s(u.audio_path, check_finite=True)
    except AudioError as err:
        return "unreadable_audio", f"{err.message}: {u.audio_path}"
    if (mismatch := duration_mismatch(u, audio_s - u.offset_s)) is not None:
        return "duration_mismatch", f"{mismatch}: {u.audio_path}"
    return None


def _relative_or_absolute(audio_path: str, base: Path) -> str:
    """Path relative to `base` when the file lies under it, else absolute."""
    absolute = Path(os.path.abspath(audio_path))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)
