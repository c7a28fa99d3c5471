"""What a command may touch: the one rule, enforced here.

A run creates, replaces and deletes only files it created and recorded, inside its output folder,
found by paths that resolve inside it:

- a manifest record names a file of the run's layout (`layout.is_layout_file`: no absolute path,
  no `..`, never `run.json` or a manifest); a record that does not is ignored with a message,
  never acted on;
- nothing on the way to a run's file is a symbolic link: a run's folders, manifests, `run.json`
  and lock files are real ones inside it (a link is refused by name), and a run's own files are
  opened without following links (`open_run_file`);
- a non-empty output folder that is not one of our runs (no `run.json`) is refused before
  anything is written, naming what is there;
- files of ours that are damaged, and files in the layout that no record vouches for, are moved
  aside into `damaged/` (`set_aside`), not deleted, unless the user asks; only our own dead
  temporary files are deleted (`atomic.remove_dead_temporaries`);
- every output path of a command is checked against every input path of the same command (the
  same file, or inside an input folder) before work starts (`check_output_apart`).
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..checks import file_kind
from .layout import DAMAGED_DIR, RUN_FILE, SHARD_DIR, is_lock_name, is_run_entry, is_temporary_name

# Ends the name of a file moved aside, so that no image reader takes it for one of the run's images.
ASIDE_SUFFIX = ".aside"
# How many entries a refusal names before "...".
_SHOWN = 5


class OwnershipError(ValueError):
    """A command would touch a file that is not its own."""


def check_output_apart(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str, *,
                       folder: bool = False) -> None:
    """Refuses `output` (a file, or with `folder` a folder whose contents are written) that is one of
    `inputs` (the same path or the same file through a link), lies inside an input folder or, for an
    output folder, holds an input; an output file is also refused where it would be one of any
    run's own files (run.json, a manifest, a file in its image folders). None inputs are skipped.
    Raises OwnershipError naming both."""
    out = _resolved(output)
    if not folder:
        _check_not_a_run_file(output, out, what)
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if out == source or _same_file(output, given):
            raise OwnershipError(f"{what}: {output} is the input {given}; writing it would destroy the input. "
                                 "Choose another output path")
        if source.is_dir() and out.is_relative_to(source):
            raise OwnershipError(f"{what}: {output} lies inside the input folder {given}; an output there would "
                                 "change the input. Choose a path outside it")
        if folder and source.is_relative_to(out):
            raise OwnershipError(f"{what}: the output folder {output} holds the input {given}; choose an output "
                                 "folder that does not contain the command's inputs")


def _check_not_a_run_file(output: str | os.PathLike, out: Path, what: str) -> None:
    """Refuses an output file that would be one of a run's own (its run.json, a manifest, a lock
    file, or a file in its image folders), whatever run folder it lies in."""
    for run_folder, entry in ((out.parent, out.name), (out.parent.parent, out.parent.name)):
        if is_run_entry(entry) and os.path.lexists(run_folder / RUN_FILE):
            raise OwnershipError(f"{what}: {output} is a file of the run in {run_folder} ({entry} is the run's own). "
                                 "Choose a path outside the run's own files and folders")


def check_run_folder(outdir: str | os.PathLike) -> None:
    """Refuses, before anything is written, an output folder that a run may not use: a folder that
    holds no `run.json` but holds anything besides our lock and temporary files (not one of our
    runs: the user's files), or a run whose own entries (run.json, manifests, lock files, image
    folders, damaged/) include a symbolic link or, for files, anything but a regular file. A
    missing or empty folder passes."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        return
    entries = sorted(outdir.iterdir())
    run_file = outdir / RUN_FILE
    if not os.path.lexists(run_file):
        # What a fresh run killed before its run.json was durable leaves: lock files, temporaries.
        foreign = [entry.name for entry in entries
                   if not ((is_lock_name(entry.name) or is_temporary_name(entry.name)) and _is_regular(entry))]
        if foreign:
            shown = ", ".join(foreign[:_SHOWN]) + (f", ... ({len(foreign)} in all)" if len(foreign) > _SHOWN else "")
            raise OwnershipError(f"{outdir}: not empty and not a run of elucd-fast (it holds no {RUN_FILE}, but "
                                 f"{shown}); nothing was written. Choose a new or empty output folder, or move those "
                                 "files elsewhere")
        return
    for entry in entries:
        if not is_run_entry(entry.name):
            continue
        mode = os.lstat(entry).st_mode
        if stat.S_ISLNK(mode):
            raise OwnershipError(f"{entry}: is a symbolic link; a run's own files and folders must be real ones "
                                 "inside its folder (remove the link, or use another output folder)")
        wanted_dir = not (entry.name == RUN_FILE or is_lock_name(entry.name) or entry.name.endswith(".jsonl"))
        if not (stat.S_ISDIR(mode) if wanted_dir else stat.S_ISREG(mode)):
            raise OwnershipError(f"{entry}: is {file_kind(mode)}; a run needs a "
                                 f"{'folder' if wanted_dir else 'regular file'} there (move it away)")


def run_entries(outdir: str | os.PathLike) -> list[Path]:
    """The run's own entries in `outdir` (run.json, manifests, lock files, image folders, damaged/),
    with shards/ and run.json named even where absent: the inputs an output must keep apart from."""
    outdir = Path(outdir)
    present = [entry for entry in sorted(outdir.iterdir()) if is_run_entry(entry.name)] if outdir.is_dir() else []
    return sorted({outdir / RUN_FILE, outdir / SHARD_DIR, *present})


def open_run_file(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """`os.open` of one of a run's own files without following a symbolic link (O_NOFOLLOW) and
    without blocking on a FIFO; anything but a regular file is refused (OwnershipError)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OwnershipError(f"{path}: is a symbolic link; a run opens only its own files, never through a "
                                 "link (remove the link)") from None
        raise
    file_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(file_mode):
        os.close(fd)
        raise OwnershipError(f"{path}: is {file_kind(file_mode)}, not a regular file; a run reads and writes "
                             "regular files only (move it away)")
    os.set_blocking(fd, True)
    return fd


def read_run_file(path: str | os.PathLike) -> bytes | None:
    """The bytes of one of a run's own files (`open_run_file`), or None where it does not exist."""
    try:
        fd = open_run_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def set_aside(outdir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Moves `path` (inside `outdir`; a file, link or FIFO, never followed) to the same relative
    place under `outdir/damaged/`, its name ending in `.aside` (and a number where that name is
    taken). Returns the new path. The bytes are kept: a damaged file may still be the only copy of
    something. The suffix keeps it out of every image set: `fid calc --samples OUTDIR` (and EDM's
    own tools) read every `*.png` below a folder, and must not count it."""
    outdir, path = Path(outdir), Path(path)
    target = outdir / DAMAGED_DIR / f"{path.relative_to(outdir)}{ASIDE_SUFFIX}"
    target.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = target, 1
    while os.path.lexists(candidate):
        candidate = target.with_name(f"{target.name}.{number}")
        number += 1
    os.rename(path, candidate)
    return candidate


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two existing paths are one file (a hard link included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_regular(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)


__all__ = ["ASIDE_SUFFIX", "OwnershipError", "check_output_apart", "check_run_folder", "open_run_file",
           "read_run_file", "run_entries", "set_aside"]
