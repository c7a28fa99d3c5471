"""Safe reading of checkpoint files: local paths only, tensors only, every problem named.

Nothing here runs code from a file: `torch.load` is always called with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model."""


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path after checking it names a readable local file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{what}: no such file: {p}")
    return p


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
