"""Atomic files: a path holds either its old content or all of the new, never a part.

Each file is written to a temporary file in the same directory, flushed and fsynced, then
`os.replace`d over its path and the directory fsynced. A crash therefore leaves, at worst, a
temporary file (which a resumed run removes). Files are created with the permissions the umask
allows (0644 under umask 022), as `open` would create them.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .layout import TEMP_SUFFIX


def fsync_directory(directory: str | os.PathLike) -> None:
    """Makes renames and unlinks in `directory` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                 sync_directory: bool = True) -> None:
    """Writes a file so that `path` holds either its old content or all of the new, never a part.

    `write(f)` writes the content to a temporary file in the same directory, which is flushed,
    fsynced and renamed over `path`. With `sync_directory=False` the caller fsyncs the directory
    (once for many files) before relying on the rename being durable.

    On any error, including a full disk, the temporary file is removed and an OSError naming
    `path` is raised; files written earlier are untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except OSError as err:
        remove_quietly(temp_name)
        reason = err.strerror or str(err)
        raise OSError(err.errno, f"{reason} while writing; no partial file was left, and files written "
                                 f"earlier are intact", str(path)) from err
    except BaseException:
        remove_quietly(temp_name)
        raise
    if sync_directory:
        fsync_directory(path.parent)


def remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
