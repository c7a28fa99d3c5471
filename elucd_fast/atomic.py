"""Atomic files: a path holds either its old content or all of the new, never a part.

Each file is written to a temporary file in the same directory, flushed and fsynced, then
`os.replace`d over its path and the directory fsynced. A crash therefore leaves, at worst, a
temporary file (which a resumed run removes). Files are created with the permissions the umask
allows (0644 under umask 022), as `open` would create them.

These primitives sit at the bottom of the package (beside `checks`) so that every layer that
writes a file (runs, metrics, the schedule files of `schedules`) writes it the same way.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Suffix of a file being written; a crash can leave one, which a resumed run removes.
TEMP_SUFFIX = ".tmp"


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
    fd, temp_name = _create_temporary(path)
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


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file next to `path`, created with mode 0o666 so that the umask decides its
    permissions as for any file the user creates (0644 under umask 022; `tempfile.mkstemp` would
    force 0600 and hide a shared sample set from its readers)."""
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file next to it")


def check_writable(path: str | os.PathLike, what: str, *, directory: bool = False) -> Path:
    """Checks, without creating anything, that `path` (a file, or a folder with `directory`) can be
    written: it is of the right kind if it exists, and its nearest existing ancestor is a writable
    folder. Raises ValueError naming `what`, the path and the reason, so a long computation is
    refused before it starts rather than failing at its end."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise ValueError(f"{what}: {path} exists and is not a folder")
        if not directory and path.is_dir():
            raise ValueError(f"{what}: {path} is a folder; give a file path")
        target = path if directory else path.parent
        if not os.access(target, os.W_OK | os.X_OK) or (not directory and not os.access(path, os.W_OK)):
            raise ValueError(f"{what}: {path} is not writable (permission denied or a read-only file system)")
        return path
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what}: {path} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {path} cannot be created: {ancestor} is not writable (permission denied or a "
                         "read-only file system)")
    return path


def check_free_space(path: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Refuses (ValueError) when the file system that `path` would live on has less free space than
    `needed_bytes` (an estimate of what a run writes), so the run does not stop half-way."""
    import shutil

    path = Path(path)
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise ValueError(f"{what}: the run needs about {needed_bytes / 2**20:,.0f} MiB, but only {free / 2**20:,.0f} "
                         f"MiB are free on the file system of {path}; free space or use another --outdir")


def remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
