"""An advisory lock on a run folder, one per rank: a second process writing the same run is
refused at once instead of doubling the manifest.

The lock is `fcntl.flock` on `.lock-rankNNN` in the run folder, which the kernel releases when the
holder exits, however it exits (kill -9 included), so a crashed run never blocks its resume.
flock is honoured between processes of one machine and on most cluster file systems; where a file
system ignores it (some NFS mounts), two runs are not told apart.
"""
from __future__ import annotations

import os
from pathlib import Path

from .atomic import remove_quietly
from .ownership import open_run_file


class RunLockedError(ValueError):
    """Another process holds the run folder's lock."""


def lock_name(rank: int) -> str:
    return f".lock-rank{rank:03d}"


class RunLock:
    """`with RunLock(outdir, rank):` holds rank `rank`'s lock on `outdir` (which must exist)."""

    def __init__(self, outdir: str | os.PathLike, rank: int = 0):
        self.path = Path(outdir) / lock_name(rank)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        # Never through a link: a `.lock-rank000` planted to point elsewhere would have its target
        # truncated and overwritten with our pid.
        fd = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent}: another process (pid {holder}) is writing this run; wait for "
                                 "it to finish, or use another --outdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            remove_quietly(self.path)  # before unlocking: the next holder creates a fresh file
            os.close(self._fd)
            self._fd = None
