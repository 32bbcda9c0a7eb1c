"""Corpus import: Common Voice, CSV/TSV, Kaldi, Hugging Face audiofolder, NeMo and Asterisk prompt folders become
one JSONL manifest per split, with every bad row reported (file and line) and skipped."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from speechxfer.audio import audio_duration_s, file_problem
from speechxfer.errors import AudioError, InputError, Problem, decoded_text
from speechxfer.manifest import ManifestSummary, Utterance, read_jsonl, summarize, write_manifest

FORMATS = ("commonvoice", "csv", "tsv", "kaldi", "audiofolder", "nemo", "asterisk")
COMMONVOICE_SPLITS = ("train", "dev", "test")
# where Debian's asterisk-core-sounds-<lang>(-wav) packages put the prompts and their transcripts
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds")
# the codecs Asterisk plays besides WAV, as file suffixes (a sounds folder of these alone cannot be read)
ASTERISK_CODECS = (".gsm", ".ulaw", ".alaw", ".g722", ".g729", ".sln", ".sln16", ".siren7", ".siren14")
ASTERISK_DOCS = Path("/usr/share/doc")
# a span may end this far past the end of its file (rounded timestamps) and still be accepted
SEGMENT_TOLERANCE_S = 0.05

# file and folder names that mean the development split
_SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev", "development": "dev"}
# words in file names that say what the file is, not which split it holds (train_manifest.json, dev-metadata.csv)
_NOT_SPLIT_WORDS = ("manifest", "metadata")
# column names tried in order when a column is not named explicitly
_COLUMN_CANDIDATES = {
    "audio": ("audio_path", "audio_filepath", "audio", "path", "file_name", "filename", "file", "wav"),
    "text": ("text", "transcription", "transcript", "sentence", "normalized_text"),
    "id": ("id", "utt_id", "utterance_id"),
    "speaker": ("speaker", "speaker_id", "client_id"),
    "duration": ("duration_s", "duration"),
}


@dataclass(frozen=True)
class Columns:
    """Column names in csv / tsv / audiofolder sources; None takes the first present of common names."""

    audio: str | None = None  # path to the audio file, relative to the table's folder
    text: str | None = None
    id: str | None = None  # absent: the audio file's name without its extension
    speaker: str | None = None  # absent: no speaker
    duration: str | None = None  # seconds; absent: read from the audio header


@dataclass(frozen=True)
class PrepareResult:
    """What `prepare` wrote: a manifest and its summary per split, and every row it skipped."""

    manifests: dict[str, Path]
    summaries: dict[str, ManifestSummary]
    problems: list[Problem]

    @property
    def utterances(self) -> int:
        return sum(s.utterances for s in self.summaries.values())


@dataclass(frozen=True)
class _Row:
    """One candidate utterance as a source gives it, before the checks every format shares."""

    source: str  # file the row was read from
    line: int | None
    id: str
    audio_path: str  # absolute
    text: str
    speaker: str | None = None
    language: str | None = None
    offset_s: float = 0.0
    duration_s: float | None = None  # given by the source (segments, a duration field); None: measured


@dataclass(frozen=True)
class _Options:
    columns: Columns
    split: str | None
    splits: tuple[str, ...] | None
    language: str | None


def prepare(format: str, source: str | os.PathLike, outdir: str | os.PathLike, *, columns: Columns | None = None,
            split: str | None = None, splits: Sequence[str] | None = None,
            language: str | None = None) -> PrepareResult:
    """Import the corpus at `source` (layout given by `format`, one of FORMATS) and write
    `outdir/<split>.jsonl` per split, `outdir/summary.json` and `outdir/problems.txt` (one skipped row a line).

    Durations come from the audio headers; only files in float formats (which can hold NaN or infinite samples)
    are read in full, to check their samples. Rows with a missing or unreadable file, no samples, non-finite
    samples, an empty transcript, a duplicate id (within a split), a span past the end of the file, or that are
    malformed are skipped and returned as Problems. `columns` names the columns of csv / tsv / audiofolder tables;
    `split` names the split when `source` holds a single one (and puts all Asterisk prompts in it); `splits`
    picks which splits to import (Common Voice: default train, dev, test; may add validated, other, ...);
    `language` fills the language of rows whose source does not give one. InputError when the source's layout
    is wrong (a missing folder, table or column).
    """
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    source = Path(source)
    if format != "asterisk" and not source.exists():
        raise InputError("no such file or folder", path=source)
    if columns is not None and format not in ("csv", "tsv", "audiofolder"):
        raise InputError(f"column names apply to csv, tsv and audiofolder sources, not {format}")
    options = _Options(columns or Columns(), split, None if splits is None else tuple(splits), language)
    problems: list[Problem] = []
    rows_by_split = _IMPORTERS[format](source, options, problems)
    if format != "commonvoice":  # Common Voice reads only the chosen splits' tables
        rows_by_split = _pick_splits(rows_by_split, options.splits, source)
    header_cache: dict[str, float | AudioError] = {}
    outdir = Path(outdir)
    manifests: dict[str, Path] = {}
    summaries: dict[str, ManifestSummary] = {}
    for name, rows in sorted(rows_by_split.items(), key=lambda item: _split_order(item[0])):
        utterances = _check_rows(rows, problems, header_cache)
        manifests[name] = outdir / f"{name}.jsonl"
        write_manifest(manifests[name], utterances)
        summaries[name] = summarize(utterances)
    summary = {name: {"manifest": manifests[name].name, "hours": s.hours, **asdict(s)}
               for name, s in summaries.items()}
    (outdir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (outdir / "problems.txt").write_text("".join(f"{p}\n" for p in problems), encoding="utf-8")
    return PrepareResult(manifests, summaries, problems)


# --- the checks every format shares ---------------------------------------------------------------------------


def _check_rows(rows: list[_Row], problems: list[Problem],
                header_cache: dict[str, float | AudioError]) -> list[Utterance]:
    """Rows → utterances, appending a Problem for each row skipped; `header_cache` keeps each file's duration
    (or the error reading it) so segments of one recording read its header once."""
    utterances: list[Utterance] = []
    seen: set[str] = set()
    for row in rows:
        problem = _row_problem(row, seen, header_cache)
        seen.add(row.id)
        if problem is not None:
            problems.append(Problem(row.source, row.line, problem[0], f"{row.id}: {problem[1]}", row.id))
            continue
        duration_s = row.duration_s if row.duration_s is not None else header_cache[row.audio_path] - row.offset_s
        utterances.append(Utterance(id=row.id, audio_path=row.audio_path, text=row.text, duration_s=duration_s,
                                    speaker=row.speaker, language=row.language, offset_s=row.offset_s))
    return utterances


def _row_problem(row: _Row, seen: set[str], header_cache: dict[str, float | AudioError]) -> tuple[str, str] | None:
    """(kind, message) of the first thing wrong with a row, or None."""
    if not row.id:
        return "malformed_row", "empty id"
    if row.id in seen:
        return "duplicate_id", "id appears earlier in this split"
    if not row.text:
        return "empty_text", "empty transcript"
    if row.duration_s is not None and row.duration_s <= 0:
        return "zero_length", f"duration is {row.duration_s:g} s"
    if row.offset_s < 0:
        return "malformed_row", f"negative offset {row.offset_s:g} s"
    if (problem := file_problem(row.audio_path)) is not None:
        return problem[0], f"{problem[1]}: {row.audio_path}"
    if row.audio_path not in header_cache:
        try:
            header_cache[row.audio_path] = audio_duration_s(row.audio_path, check_finite=True)
        except AudioError as err:
            header_cache[row.audio_path] = err
    file_duration_s = header_cache[row.audio_path]
    if isinstance(file_duration_s, AudioError):
        return "unreadable_audio", f"{file_duration_s.message}: {row.audio_path}"
    if file_duration_s <= 0:
        return "zero_length", f"no samples in {row.audio_path}"
    end_s = row.offset_s + (row.duration_s or 0.0)
    if row.offset_s >= file_duration_s or end_s > file_duration_s + SEGMENT_TOLERANCE_S:
        return "bad_segment", (f"span {row.offset_s:g}-{end_s:g} s lies past the end of the audio "
                               f"({file_duration_s:g} s)")
    return None


def _pick_splits(rows_by_split: dict[str, list[_Row]], splits: tuple[str, ...] | None,
                 source: Path) -> dict[str, list[_Row]]:
    if splits is None:
        return rows_by_split
    missing = [s for s in splits if s not in rows_by_split]
    if missing:
        raise InputError(f"no split {', '.join(missing)} here; found: {', '.join(rows_by_split) or 'none'}",
                         path=source)
    return {s: rows_by_split[s] for s in splits}


def _split_order(name: str) -> tuple[int, str]:
    """Sort key: train, dev, test first, then other splits by name."""
    return (("train", "dev", "test") + (name,)).index(name), name


def _split_name(stem: str) -> str:
    """The split a file or folder name stands for: 'train_manifest' → 'train', 'validation' → 'dev',
    'test_clean' → 'test_clean'."""
    words = [w for w in re.split(r"[_\-.]+", stem) if w and w.lower() not in _NOT_SPLIT_WORDS]
    name = "_".join(words) or stem
    return _SPLIT_ALIASES.get(name.lower(), name)


def _single_split(source: Path, options: _Options) -> str:
    return options.split or _split_name(source.stem if source.is_file() else source.name)


def _resolve(path: str, base: Path) -> str:
    """Absolute, normalized path of `path` taken relative to `base` (symlinks kept, as the source names them)."""
    return os.path.normpath(os.path.join(base.absolute(), os.path.expanduser(path)))


# --- tables: Common Voice, csv / tsv, audiofolder ------------------------------------------------------------


def _read_text(path: Path) -> str:
    """A UTF-8 file (gzip-compressed when named *.gz) as text without a byte-order mark; InputError naming the
    line of the first byte that is not UTF-8."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise InputError(f"cannot read: {err}", path=path) from err
    return decoded_text(data, path, encoding="utf-8-sig")


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, content) of a UTF-8 text file, line ends removed. Only \n ends a line: a transcript may
    hold other Unicode line separators."""
    for number, content in enumerate(_read_text(path).split("\n"), start=1):
        yield number, content.rstrip("\r")


def _read_table(path: Path, delimiter: str,
                problems: list[Problem]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line, row) pairs of a delimited file; rows with the wrong number of fields become
    malformed_row Problems. Tab-separated files are read without quoting, as Common Voice writes them."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    rows: list[tuple[int, dict[str, str]]] = []
    header: list[str] | None = None
    line = 1
    try:
        for record in reader:
            if record and any(field.strip() for field in record):
                if header is None:
                    header = [name.strip() for name in record]
                elif len(record) == len(header):
                    rows.append((line, dict(zip(header, record))))
                else:
                    problems.append(Problem(str(path), line, "malformed_row",
                                            f"{len(record)} fields where the header has {len(header)}"))
            line = reader.line_num + 1
    except csv.Error as err:
        raise InputError(f"unreadable row: {err}", path=path, line=line) from err
    if header is None:
        raise InputError("empty file: expected a header line", path=path)
    return header, rows


def _pick_columns(header: list[str], columns: Columns, path: Path) -> dict[str, str | None]:
    """Field → column name (None when an optional field is absent); InputError for a named column that is
    missing or an audio / text column that cannot be found."""
    picked: dict[str, str | None] = {}
    for field, candidates in _COLUMN_CANDIDATES.items():
        named = getattr(columns, field)
        if named is not None and named not in header:
            raise InputError(f"no {field} column {named!r}; the header has: {', '.join(header)}", path=path, line=1)
        picked[field] = named or next((c for c in candidates if c in header), None)
        if picked[field] is None and field in ("audio", "text"):
            raise InputError(f"no {field} column (looked for {', '.join(candidates)}; name it with "
                             f"--{field}-column); the header has: {', '.join(header)}", path=path, line=1)
    return picked


def _read_jsonl_table(path: Path, problems: list[Problem]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A JSON-lines table (Hugging Face's metadata.jsonl) as `_read_table` gives a delimited one: the keys seen
    (in order of first appearance) and (line, row) pairs with values as text; a line that is not a JSON object
    becomes a malformed_row Problem."""
    header: dict[str, None] = {}
    rows: list[tuple[int, dict[str, str]]] = []
    for line, entry in read_jsonl(path, problems=problems):
        if not isinstance(entry, dict):
            problems.append(Problem(str(path), line, "malformed_row", "not a JSON object"))
            continue
        header.update(dict.fromkeys(entry))
        rows.append((line, {key: "" if value is None else str(value) for key, value in entry.items()}))
    if not header:
        raise InputError("no JSON objects in this file", path=path)
    for line, row in rows:  # keys a row lacks read as empty, as an empty CSV field would
        for key in header:
            row.setdefault(key, "")
    return list(header), rows


def _table_rows(path: Path, delimiter: str, options: _Options, problems: list[Problem]) -> list[_Row]:
    """Rows of a csv / tsv / metadata.csv / metadata.jsonl (delimiter None) table with a header; audio paths
    relative to the table's folder."""
    if delimiter is None:
        header, records = _read_jsonl_table(path, problems)
    else:
        header, records = _read_table(path, delimiter, problems)
    col = _pick_columns(header, options.columns, path)
    rows = []
    for line, record in records:
        audio = record[col["audio"]].strip()
        duration_s = None
        if col["duration"] is not None:
            try:
                duration_s = float(record[col["duration"]])
            except ValueError:
                problems.append(Problem(str(path), line, "malformed_row",
                                        f"duration {record[col['duration']]!r} is not a number"))
                continue
        rows.append(_Row(source=str(path), line=line,
                         id=record[col["id"]].strip() if col["id"] else Path(audio).stem,
                         audio_path=_resolve(audio, path.parent), text=record[col["text"]].strip(),
                         speaker=(record[col["speaker"]].strip() or None) if col["speaker"] else None,
                         language=options.language, duration_s=duration_s))
    return rows


def _read_commonvoice(source: Path, options: _Options, problems: list[Problem]) -> dict[str, list[_Row]]:
    """A Common Voice release folder: <split>.tsv (client_id, path, sentence, ..., locale) and clips/."""
    if options.split is not None:
        raise InputError("a Common Voice release has its own splits; choose them with --splits", path=source)
    rows_by_split = {}
    for name in options.splits or COMMONVOICE_SPLITS:
        table = source / f"{name}.tsv"
        if not table.is_file():
            raise InputError(f"no {table.name} in this Common Voice release folder", path=source)
        header, records = _read_table(table, "\t", problems)
        for column in ("path", "sentence"):
            if column not in header:
                raise InputError(f"no {column!r} column; is this a Common Voice release?", path=table, line=1)
        rows_by_split[name] = [
            _Row(source=str(table), line=line, id=Path(r["path"]).stem,
                 audio_path=_resolve(r["path"], source / "clips"), text=r["sentence"].strip(),
                 speaker=r.get("client_id") or None, language=r.get("locale") or options.language)
            for line, r in records]
    return rows_by_split


def _read_delimited(delimiter: str, extension: str) -> Callable[[Path, _Options, list[Problem]],
                                                               dict[str, list[_Row]]]:
    def read(source: Path, options: _Options, problems: list[Problem]) -> dict[str, list[_Row]]:
        """One table, or a folder of tables each named after its split (train.csv, dev.csv, ...)."""
        tables = [source] if source.is_file() else sorted(source.glob(f"*.{extension}"))
        if not tables:
            raise InputError(f"no *.{extension} files in this folder", path=source)
        if options.split is not None and len(tables) > 1:
            raise InputError(f"{len(tables)} tables here: a split name applies to a single one", path=source)
        rows_by_split: dict[str, list[_Row]] = {}
        for table in tables:
            rows_by_split.setdefault(_single_split(table, options), []).extend(
                _table_rows(table, delimiter, options, problems))
        return rows_by_split

    return read


# The table an audiofolder may hold, in the folder itself or in each split subfolder.
_AUDIOFOLDER_TABLES = ("metadata.csv", "metadata.jsonl")


def _read_audiofolder(source: Path, options: _Options, problems: list[Problem]) -> dict[str, list[_Row]]:
    """A Hugging Face audiofolder: metadata.csv or metadata.jsonl (file_name, a transcript column) in the folder
    itself, or in split subfolders train/, validation/ (→ dev), test/."""
    options = replace(options, columns=replace(options.columns, audio=options.columns.audio or "file_name"))
    if (table := _audiofolder_table(source)) is not None:
        return {options.split or "train": _audiofolder_rows(table, options, problems)}
    if options.split is not None:
        raise InputError("split subfolders here: a split name applies to a single folder", path=source)
    return _rows_by_split_folder(source, _AUDIOFOLDER_TABLES,
                                 lambda folder: _audiofolder_rows(_audiofolder_table(folder), options, problems),
                                 missing="no metadata.csv or metadata.jsonl here or in split subfolders")


def _audiofolder_table(folder: Path) -> Path | None:
    tables = [folder / name for name in _AUDIOFOLDER_TABLES if (folder / name).is_file()]
    if len(tables) > 1:
        raise InputError("both metadata.csv and metadata.jsonl here: keep one", path=folder)
    return tables[0] if tables else None


def _audiofolder_rows(table: Path, options: _Options, problems: list[Problem]) -> list[_Row]:
    return _table_rows(table, "," if table.suffix == ".csv" else None, options, problems)


# --- Kaldi data directories ----------------------------------------------------------------------------------


def _read_kaldi(source: Path, options: _Options, problems: list[Problem]) -> dict[str, list[_Row]]:
    """A Kaldi data dir (wav.scp, text, optional utt2spk and segments), or a folder of them, one per split.
    Relative paths in wav.scp resolve against the current directory, as in Kaldi recipes."""
    if not source.is_dir():
        raise InputError("a file, not a folder: give the Kaldi data dir that holds wav.scp and text, or a folder "
                         "of such dirs", path=source)
    if (source / "wav.scp").is_file():
        return {_single_split(source, options): _kaldi_rows(source, options, problems)}
    if options.split is not None:
        raise InputError("data dirs here: a split name applies to a single one", path=source)
    return _rows_by_split_folder(source, ("wav.scp",), lambda folder: _kaldi_rows(folder, options, problems),
                                 missing="no wav.scp here or in subfolders: not a Kaldi data dir")


def _rows_by_split_folder(source: Path, markers: tuple[str, ...], read_folder, *,
                          missing: str) -> dict[str, list[_Row]]:
    """Rows of every subfolder holding one of the `markers` files, grouped by the split its name maps to
    (validation → dev, ...)."""
    folders = [d for d in sorted(source.iterdir()) if any((d / marker).is_file() for marker in markers)]
    if not folders:
        raise InputError(missing, path=source)
    rows_by_split: dict[str, list[_Row]] = {}
    for folder in folders:
        rows_by_split.setdefault(_split_name(folder.name), []).extend(read_folder(folder))
    return rows_by_split


def _kaldi_rows(folder: Path, options: _Options, problems: list[Problem]) -> list[_Row]:
    if not (folder / "text").is_file():
        raise InputError("no text file in this Kaldi data dir", path=folder)
    recordings = {}
    for line, key, value in _kaldi_lines(folder / "wav.scp", problems, fields=2):
        if value.endswith("|"):
            problems.append(Problem(str(folder / "wav.scp"), line, "malformed_row",
                                    f"{key}: piped commands are not supported; write the audio to files "
                                    f"and list their paths", key))
        elif re.search(r"\.ark:\d+$", value):
            problems.append(Problem(str(folder / "wav.scp"), line, "malformed_row",
                                    f"{key}: archive offsets (.ark:N) are not supported; list audio files", key))
        else:
            # Kaldi reads relative paths from the directory its scripts run in: the current one
            recordings[key] = _resolve(value, Path.cwd())
    speakers = {key: value for _, key, value in _kaldi_lines(folder / "utt2spk", problems, fields=2)}
    segments = None
    if (folder / "segments").is_file():
        segments = {}
        for line, key, value in _kaldi_lines(folder / "segments", problems, fields=4):
            recording, start, end = value.split()
            try:
                segments[key] = (recording, float(start), float(end) - float(start))
            except ValueError:
                problems.append(Problem(str(folder / "segments"), line, "malformed_row",
                                        f"{key}: start {start!r} or end {end!r} is not a number", key))
    text_path = str(folder / "text")
    rows = []
    for line, key, text in _kaldi_lines(folder / "text", problems, fields=1):
        recording, offset_s, duration_s = key, 0.0, None
        if segments is not None:
            if key not in segments:
                problems.append(Problem(text_path, line, "missing_file", f"{key}: no line in segments", key))
                continue
            recording, offset_s, duration_s = segments[key]
        if recording not in recordings:
            problems.append(Problem(text_path, line, "missing_file",
                                    f"{key}: recording {recording} has no usable line in wav.scp", key))
            continue
        rows.append(_Row(source=text_path, line=line, id=key, audio_path=recordings[recording], text=text,
                         speaker=speakers.get(key), language=options.language, offset_s=offset_s,
                         duration_s=duration_s))
    return rows


def _kaldi_lines(path: Path, problems: list[Problem], *, fields: int) -> Iterator[tuple[int, str, str]]:
    """(line, key, rest) of a Kaldi table; nothing when the file does not exist. Lines with fewer than `fields`
    whitespace-separated fields, or more than `fields` when `fields` > 2 (segments), become malformed_row;
    a repeated key becomes duplicate_id (text's repeats are left to the shared check)."""
    if not path.is_file():
        return
    seen = set()
    for line, content in _numbered_lines(path):
        parts = content.split(maxsplit=1)
        if not parts:
            continue
        key, rest = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        count = 1 + len(rest.split())
        if count < fields or (fields > 2 and count != fields):
            problems.append(Problem(str(path), line, "malformed_row",
                                    f"{key}: expected {fields} fields, found {count}", key))
            continue
        if path.name != "text":
            if key in seen:
                problems.append(Problem(str(path), line, "duplicate_id", f"{key}: repeated key", key))
                continue
            seen.add(key)
        yield line, key, rest


# --- NeMo manifests ------------------------------------------------------------------------------------------


def _read_nemo(source: Path, options: _Options, problems: list[Problem]) -> dict[str, list[_Row]]:
    """NeMo JSONL manifests (audio_filepath, text, duration, optional offset and lang): one file, or a folder of
    them each named after its split. Relative audio paths resolve against the manifest's folder, as in NeMo."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.suffix in (".json", ".jsonl"))
    if not files:
        raise InputError("no *.json or *.jsonl manifests in this folder", path=source)
    if options.split is not None and len(files) > 1:
        raise InputError(f"{len(files)} manifests here: a split name applies to a single one", path=source)
    rows_by_split: dict[str, list[_Row]] = {}
    for file in files:
        rows = rows_by_split.setdefault(_single_split(file, options), [])
        for line, entry in read_jsonl(file, problems=problems):
            try:
                rows.append(_nemo_row(entry, file, line, options))
            except ValueError as err:
                problems.append(Problem(str(file), line, "malformed_row", str(err)))
    return rows_by_split


def _nemo_row(entry: object, file: Path, line: int, options: _Options) -> _Row:
    """One NeMo manifest entry → _Row; ValueError saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    for field in ("audio_filepath", "text"):
        if field not in entry:
            raise ValueError(f"missing field {field!r}")
    for field, types in (("audio_filepath", str), ("text", str), ("duration", (int, float)),
                         ("offset", (int, float)), ("lang", str)):
        if field in entry and (not isinstance(entry[field], types) or isinstance(entry[field], bool)):
            raise ValueError(f"field {field!r} has type {type(entry[field]).__name__}")
    offset_s = float(entry.get("offset", 0.0))
    stem = Path(entry["audio_filepath"]).stem
    # one file cut into several utterances needs an id per span
    utterance_id = f"{stem}-{round(offset_s * 1000):08d}" if offset_s else stem
    return _Row(source=str(file), line=line, id=utterance_id, audio_path=_resolve(entry["audio_filepath"], file.parent),
                text=entry["text"].strip(), language=entry.get("lang", options.language), offset_s=offset_s,
                duration_s=float(entry["duration"]) if "duration" in entry else None)


# --- Asterisk prompt folders ---------------------------------------------------------------------------------


def _read_asterisk(source: Path, options: _Options, problems: list[Problem]) -> dict[str, list[_Row]]:
    """An Asterisk sounds folder (e.g. /usr/share/asterisk/sounds/es, or just "es"): <name>.wav prompts, also in
    subfolders (digits/1.wav), transcribed in core-sounds-<lang>.txt[.gz] as `name: text` lines, one speaker.

    Prompts whose transcript is all in brackets ("[tono simple]") are sounds, not speech: skipped as
    non_speech. Brackets inside a transcript mark words that are spoken: the brackets are dropped, the words kept.
    Split by a stable hash of the prompt name: 80% train, 10% dev, 10% test (or all in `options.split`).
    """
    folder = source if source.is_dir() or os.sep in str(source) else ASTERISK_SOUNDS / source
    if not folder.is_dir():
        raise InputError("no such Asterisk sounds folder (install asterisk-core-sounds-<lang>-wav)", path=folder)
    name = folder.name
    language = options.language or name.split("_")[0]
    transcript = _asterisk_transcript(folder, name, language)
    speaker = folder.resolve().name  # the voice, e.g. es_MX_f_Allison behind the es link
    recorded = {wav.relative_to(folder).with_suffix("").as_posix() for wav in folder.rglob("*.wav")}
    if not recorded:
        # Debian's asterisk-core-sounds-<lang> (without -wav) and asterisk-prompt-* ship GSM or other telephone
        # codecs only; without this every transcript line would read as a missing file.
        codecs = Counter(f.suffix.lower() for f in folder.rglob("*") if f.suffix.lower() in ASTERISK_CODECS)
        found = ", ".join(f"{n} {suffix}" for suffix, n in codecs.most_common()) or "no audio files"
        raise InputError(f"no .wav prompts in this Asterisk sounds folder ({found}): install "
                         "asterisk-core-sounds-<lang>-wav, or convert the files to .wav (e.g. sox x.gsm x.wav)",
                         path=folder)
    # transcripts name some prompts in another case than their files (letters/O for letters/o.wav)
    by_lowercase = {prompt.lower(): prompt for prompt in recorded}
    rows_by_split: dict[str, list[_Row]] = {}
    listed = set()
    for line, content in _numbered_lines(transcript):
        content = content.strip()
        if not content or content.startswith(";"):
            continue
        prompt, colon, text = content.partition(":")
        prompt, text = prompt.strip(), text.strip()
        if not colon or not prompt or any(c.isspace() for c in prompt):
            problems.append(Problem(str(transcript), line, "malformed_row", "expected `name: transcript`"))
            continue
        if prompt not in recorded:
            prompt = by_lowercase.get(prompt.lower(), prompt)
        listed.add(prompt)
        if re.fullmatch(r"\[[^\]]*\]", text):
            problems.append(Problem(str(transcript), line, "non_speech", f"{prompt}: {text}", prompt))
            continue
        text = " ".join(re.sub(r"[\[\]]", " ", text).split())
        rows_by_split.setdefault(options.split or _hash_split(prompt), []).append(
            _Row(source=str(transcript), line=line, id=prompt, audio_path=_resolve(f"{prompt}.wav", folder),
                 text=text, speaker=speaker, language=language))
    for prompt in sorted(recorded - listed):
        problems.append(Problem(str(folder / f"{prompt}.wav"), None, "no_transcript",
                                f"{prompt}: no line in {transcript}", prompt))
    return rows_by_split


def _asterisk_transcript(folder: Path, name: str, language: str) -> Path:
    candidates = [folder / f"core-sounds-{name}.txt"]
    for code in dict.fromkeys((name, language)):
        candidates.append(ASTERISK_DOCS / f"asterisk-core-sounds-{code}" / f"core-sounds-{code}.txt.gz")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(f"no transcript file; looked for {', '.join(map(str, candidates))} "
                     f"(install asterisk-core-sounds-{language})", path=folder)


def _hash_split(utterance_id: str) -> str:
    """train / dev / test as 8 / 1 / 1 by a hash of the id that is the same on every machine and run."""
    bucket = int.from_bytes(hashlib.sha1(utterance_id.encode("utf-8")).digest()[:4], "big") % 10
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


_IMPORTERS: dict[str, Callable[[Path, _Options, list[Problem]], dict[str, list[_Row]]]] = {
    "commonvoice": _read_commonvoice,
    "csv": _read_delimited(",", "csv"),
    "tsv": _read_delimited("\t", "tsv"),
    "kaldi": _read_kaldi,
    "audiofolder": _read_audiofolder,
    "nemo": _read_nemo,
    "asterisk": _read_asterisk,
}
