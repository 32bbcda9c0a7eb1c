"""Errors that carry the file and line they are about, and the record of one skipped bad row."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (its type's name when it has none): the rest (advice, URLs)
    would break the one-line report."""
    # Without terminal colour codes: torch's unpickling error starts with ANSI bold, which a log file shows raw.
    return (_ANSI.sub("", str(err)).strip().splitlines() or [type(err).__name__])[0]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def counted(count: int, noun: str) -> str:
    """`count` and `noun`, plural (an added s) unless the count is one: "1 utterance", "0 utterances"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class SpeechxferError(Exception):
    """Base of every error the CLI reports as one line (exit code 2) instead of a traceback."""


class InputError(SpeechxferError):
    """Bad input: names the file (and line) it came from."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, line: int | None = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


def decoded_text(data: bytes, path: str | os.PathLike, *, encoding: str = "utf-8") -> str:
    """`data`, a file's bytes, as text; InputError naming `path` and the line of the first byte that is not
    UTF-8 (`encoding`: "utf-8", or "utf-8-sig" to drop a byte-order mark)."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 ({err.reason})", path=path, line=data[:err.start].count(b"\n") + 1) from None


def output_folder(directory: str | os.PathLike, *, create: bool = True) -> Path:
    """`directory` as a Path, created with its parents unless create=False; InputError naming it when it is a
    file (mkdir would say only "File exists", or name a file inside it) or cannot be created."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise InputError("the output folder is a file", path=directory)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot create the output folder: {err.strerror}", path=directory) from None
    return path


class WriteError(InputError):
    """A save the file system refused (a full disk, no permission), naming what was being saved; `reason` is what
    the system said, for a caller that reports the failure in its own words."""

    def __init__(self, message: str, *, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(message, path=path)


class AudioError(InputError):
    """Audio that cannot be read, is empty, or holds non-finite samples."""


class ManifestError(InputError):
    """A malformed manifest file or row."""


class RecipeError(InputError):
    """A recipe with an unknown key, a wrong type, or a missing required field."""


@dataclass(frozen=True)
class Problem:
    """One bad row that was skipped, with where it came from."""

    path: str
    line: int | None
    kind: str  # missing_file, unreadable_audio, zero_length, empty_text, duplicate_id, malformed_row, ...
    message: str
    utterance_id: str | None = None

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: [{self.kind}] {self.message}"
