"""Reading arrays from npz files with their sizes taken from the headers before any data.

An npz is a zip of `.npy` members. The zip directory gives each member's uncompressed size and
the `.npy` header its dtype and shape, so both are known from a few hundred bytes whatever the
member holds. Every array is checked against them before it is read:

- the header's shape and dtype must account for exactly the member's uncompressed size (a header
  declaring 300 GiB in a 4 KiB member is refused, naming the file, instead of failing inside mmap);
- a member read into memory (deflated, or wanted as an ordinary array) may hold at most
  `max_bytes` bytes (a 29 MB deflated member inflating to 6.6 GB is refused before inflating);
  callers take the limit from a flag the user can raise (`--max-array-bytes`);
- a stored (uncompressed) member can instead be memory-mapped, read lazily page by page, whatever
  its size, once the file is known to hold all of its bytes;
- object arrays (pickles) are refused: only numeric data is read.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .checks import check_regular_file

# In-memory arrays larger than this are refused unless the caller raises the limit: 2 GiB holds
# an FID set of 50,000 64x64 RGB images (614 MB) or 2048-d statistics (32 MB) many times over.
DEFAULT_MAX_ARRAY_BYTES = 2 << 30


class NpzError(ValueError):
    """An npz file is unreadable, lacks a member, or a member's header is inconsistent or too large."""


class NpzMember(NamedTuple):
    """One member of an npz, from its zip directory entry and `.npy` header.

    shape, dtype, fortran_order: the array's; nbytes: its data size in bytes; stored: whether it is
    uncompressed (memory-mappable); data_offset: where its data starts in the file (stored only).
    """

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    nbytes: int
    stored: bool
    data_offset: int | None


def npz_members(path: str | os.PathLike) -> dict[str, NpzMember]:
    """key -> NpzMember for every `.npy` member of the npz at `path`, reading headers only."""
    path = _regular(path)
    members: dict[str, NpzMember] = {}
    try:
        with open(path, "rb") as raw, zipfile.ZipFile(raw) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                with archive.open(info) as member:
                    shape, fortran, dtype, header_bytes = _read_header(member, path, key)
                nbytes = _nbytes(shape, dtype)
                if header_bytes + nbytes != info.file_size:
                    raise NpzError(f"{path}: member {key!r} declares {dtype} {shape} ({nbytes:,} bytes of data), but "
                                   f"the member holds {max(info.file_size - header_bytes, 0):,}; the file is damaged "
                                   "or forged")
                stored = info.compress_type == zipfile.ZIP_STORED
                offset = _data_offset(raw, info) + header_bytes if stored else None
                if stored and offset + nbytes > os.fstat(raw.fileno()).st_size:
                    raise NpzError(f"{path}: member {key!r} declares {nbytes:,} bytes of data, more than the file "
                                   "holds; the file is truncated or forged")
                members[key] = NpzMember(key, shape, dtype, fortran, nbytes, stored, offset)
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise NpzError(f"{path}: not a readable npz file ({type(err).__name__}: {err})") from err
    return members


def read_npz_member(path: str | os.PathLike, key: str, *, max_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
                    mmap: bool = False, member: NpzMember | None = None) -> np.ndarray:
    """The array `key` of the npz at `path`, after checking its header (see the module notes).

    With `mmap`, a stored member is memory-mapped read-only whatever its size; any other member is
    read into memory only if its data holds at most `max_bytes` bytes (NpzError otherwise, naming
    the file, the size and the limit). `member` (from `npz_members`) saves reading the headers again.
    """
    path = Path(path)
    if member is None:
        members = npz_members(path)
        if key not in members:
            raise NpzError(f"{path}: no {key!r} array (holds {sorted(members)})")
        member = members[key]
    if member.dtype.hasobject:
        raise NpzError(f"{path}: {key!r} holds Python objects; only numeric arrays are read")
    if mmap and member.stored:
        return np.memmap(path, dtype=member.dtype, mode="r", offset=member.data_offset, shape=member.shape,
                         order="F" if member.fortran_order else "C")
    if member.nbytes > max_bytes:
        raise NpzError(f"{path}: {key!r} is {member.dtype} {member.shape}, {member.nbytes:,} bytes once read, over the "
                       f"limit of {max_bytes:,} (max_array_bytes; --max-array-bytes to raise it)")
    try:
        with open(path, "rb") as raw, zipfile.ZipFile(raw) as archive, archive.open(f"{key}.npy") as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise NpzError(f"{path}: {key!r} is unreadable ({type(err).__name__}: {err})") from err


def _regular(path: str | os.PathLike) -> Path:
    try:
        return check_regular_file(path, "npz file")
    except ValueError as err:
        raise NpzError(str(err)) from None


def _read_header(member, path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length in bytes) of an `.npy` stream."""
    try:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(member)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise NpzError(f"{path}: member {key!r} has no readable .npy header ({err})") from err
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise NpzError(f"{path}: member {key!r} declares an invalid shape {shape}")
    return tuple(shape), bool(fortran), np.dtype(dtype), member.tell()


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    count = 1
    for n in shape:
        count *= n  # Python integers: a forged shape cannot overflow
    return count * dtype.itemsize


def _data_offset(raw, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's first byte: after its local header (30 bytes, name, extra)."""
    raw.seek(info.header_offset + 26)
    name_length, extra_length = int.from_bytes(raw.read(2), "little"), int.from_bytes(raw.read(2), "little")
    return info.header_offset + 30 + name_length + extra_length


__all__ = ["DEFAULT_MAX_ARRAY_BYTES", "NpzError", "NpzMember", "npz_members", "read_npz_member"]
