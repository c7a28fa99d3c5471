"""Safe reading of checkpoint files: local paths only, tensors only, every problem named.

Nothing here runs code from a file: `torch.load` is always called with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checks import check_regular_file, file_kind


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model."""


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a regular file's bytes. Anything else (a FIFO, a device) is refused with
    ValueError before a byte is read: its read would block, or never end."""
    digest = hashlib.sha256()
    # O_NONBLOCK: opening a FIFO with no writer must not wait; the type is checked on the open file.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path}: is {file_kind(mode)}, not a regular file; only regular files are read")
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path after checking it names a regular local file (not a FIFO or device)."""
    try:
        return check_regular_file(path, what)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


# torchvision names its weight files `<arch>-<first 8 hex digits of sha256>.pth`.
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|safetensors)$")


def check_hash_in_name(path: str | os.PathLike) -> str | None:
    """Verifies the sha256 prefix encoded in a file name, when there is one; returns the full
    sha256 if it was checked, else None."""
    match = HASH_IN_NAME.search(Path(path).name)
    if match is None:
        return None
    full = sha256_file(path)
    if not full.startswith(match.group(1)):
        raise CheckpointError(
            f"{path}: sha256 {full[:len(match.group(1))]}... does not match the prefix "
            f"{match.group(1)} in the file name (corrupt or substituted file)")
    return full


# torch's weights-only refusal names the global a file wanted ("... unsupported GLOBAL posix.system ...").
_UNSUPPORTED_GLOBAL = re.compile(r"(?:unsupported|Unsupported global:) (GLOBAL [\w.]+)")


def load_tensors(path: str | os.PathLike, what: str = "checkpoint") -> object:
    """Reads a `.pt`/`.pth` (torch.load, weights_only=True) or `.safetensors` file."""
    p = existing_file(path, what)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as err:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{p}: not a readable safetensors file ({err})") from err
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message goes on to suggest weights_only=False, which would run the file's code:
        # keep only what the file asked for.
        found = _UNSUPPORTED_GLOBAL.search(str(err))
        asked = f"it needs {found.group(1)}, " if found else ""
        raise CheckpointError(f"{p}: refused: not a tensors-only checkpoint ({asked}which loading could run as "
                              "code). Only files of tensors, numbers, strings and containers are read; a file that "
                              "needs more must not be loaded") from err
    except Exception as err:  # torch raises many types for truncated or damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{p}: cannot be read as a tensors-only checkpoint ({type(err).__name__}: "
                              f"{reason[:300]})") from err


# safetensors' dtype names, and the header's size limit (the format's own: 100 MB).
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SAFETENSORS_MAX_HEADER = 100_000_000


def safetensors_shapes(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors a `.safetensors` file describes, as meta tensors (name -> dtype and shape, no
    data), read from its header alone: however large the tensors it declares, a few bytes are read.
    Every entry is checked against the file (dtype known, data within the file, size matching the
    shape), so a header that lies about the file is refused (CheckpointError) rather than believed."""
    p = existing_file(path, what)
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
                raise ValueError(f"a header of {length:,} bytes in a file of {size:,}")
            header = json.loads(f.read(length).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        tensors = {}
        data_bytes = size - 8 - length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            entry = entry if isinstance(entry, dict) else {}
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if (dtype is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2
                    or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in [*shape, *offsets])):
                raise ValueError(f"tensor {name!r} has an unreadable entry {entry!r:.120}")
            numel = 1
            for n in shape:
                numel *= n
            start, stop = offsets
            if stop - start != numel * dtype.itemsize or stop > data_bytes:
                raise ValueError(f"tensor {name!r} declares {shape} {entry['dtype']} at bytes {start}-{stop}, but the "
                                 f"file holds {data_bytes:,} bytes of data")
            tensors[name] = torch.empty(shape, dtype=dtype, device="meta")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{p}: not a readable safetensors file ({err})") from err
    return tensors


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuses a state dict holding NaN or Inf values, naming the first bad tensor."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or Inf values")


def load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(state, strict=True)` with an error that names the file and the
    missing, unexpected or mis-shaped keys."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (name -> tensor), got {type(state).__name__}")
    check_finite(state, source)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
