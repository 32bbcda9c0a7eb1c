"""Atomic file writes: a crash or kill at any moment leaves the previous file or the new one, never a mix.

A leaf module (it imports nothing of speechxfer), so every stage of the pipeline can use it.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# Suffix of the temporary files of atomic_write: `.NAME.<8 hex digits>.tmp` beside NAME. One that a kill left
# behind is garbage and may be deleted.
TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_write(path: str | os.PathLike, *, binary: bool = False) -> Iterator[IO]:
    """Open a new temporary file beside `path` for writing (text in UTF-8, or bytes with binary=True); when the
    block ends without an exception, flush it to disk and rename it onto `path`, else delete it.

    The temporary file sits in the same folder so that the rename stays on one file system (and so is atomic); it
    is created by name, so the umask sets its mode as for any file written directly.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        f = open(temp, "xb") if binary else open(temp, "x", encoding="utf-8")
    except OSError as err:  # a read-only or missing folder: named by `path`, as the user gave it
        raise error_naming(err, path) from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data reaches the disk before the name does
        try:
            os.replace(temp, path)
        except OSError as err:  # `path` is a folder, say
            raise error_naming(err, path) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def error_naming(err: OSError, path: str | os.PathLike) -> OSError:
    """`err` (of its own subclass) naming `path` instead of the hidden temporary file or folder nobody asked for."""
    return OSError(err.errno, err.strerror, os.fspath(path))


def sync_folder(folder: str | os.PathLike, *, files: bool = False) -> None:
    """Flush a folder's entries (names created, renamed or deleted in it) to disk; with files=True first the
    contents of the regular files directly in it (say, a model folder written by a library before a rename)."""
    folder = Path(folder)
    if files:
        for entry in folder.iterdir():
            if entry.is_file():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def follow_umask(folder: str | os.PathLike) -> None:
    """Give the regular files directly in `folder` the mode that a file created there by name gets (0o666 less the
    umask): libraries that write through a private temporary file leave 0o600 (safetensors' save_file does)."""
    folder = Path(folder)
    probe = folder / f".mode.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    probe.touch(exist_ok=False)
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, mode)
