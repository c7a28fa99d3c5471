"""The on-disk layout of one run directory:

    run.json                        the configuration that determines the images, its sha256 and
                                    the seeds last requested
    manifest-rank000.jsonl          one record per written image and format, appended by rank 0
    manifest-rank001.jsonl          ... one file per rank, so ranks never share a file
    000000/000000.png               EDM's PNG layout: {seed - seed % 1000:06d}/{seed:06d}.png
    shards/rank000-0000000000.npz   ADM npz shard: arr_0 uint8 NHWC, arr_1 int64 labels
                                    (conditional runs only), seeds int64; one per batch and rank
    .lock-rank000                   held by the process writing the run (one per rank)
    damaged/                        files of the run found damaged or unrecorded, moved aside
                                    (kept, never deleted by a run)

Temporary files are named `.{name}.{12 hex digits}.tmp` beside the file they become.
"""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..atomic import TEMP_SUFFIX

FORMATS = ("png", "npz")
RUN_FILE = "run.json"
SHARD_DIR = "shards"
DAMAGED_DIR = "damaged"

# ASCII digits only: `\d` would also take other scripts' digits.
_MANIFEST_NAME = re.compile(r"^manifest-rank([0-9]{3,})\.jsonl$")
_LOCK_NAME = re.compile(r"^\.lock-rank[0-9]{3,}$")
_PNG_DIR = re.compile(r"^[0-9]{6,}$")
_PNG_NAME = re.compile(r"^[0-9]{6,}\.png$")
_SHARD_NAME = re.compile(r"^rank[0-9]{3,}-[0-9]{10}\.npz$")
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def is_temporary_name(name: str) -> bool:
    """Whether `name` is one of our temporary files' (`atomic.atomic_write`): `.{name}.{12 hex}.tmp`."""
    return bool(_TEMP_NAME.match(name))


def is_lock_name(name: str) -> bool:
    return bool(_LOCK_NAME.match(name))


def is_run_entry(name: str) -> bool:
    """Whether an entry of a run folder is one of the run's own: run.json, a manifest, a lock
    file, an image folder (PNG or shards) or the folder of damaged files."""
    return (name in (RUN_FILE, SHARD_DIR, DAMAGED_DIR) or bool(_MANIFEST_NAME.match(name) or _LOCK_NAME.match(name)
                                                              or _PNG_DIR.match(name)))


def is_layout_file(relpath: object, fmt: object, seed: object) -> bool:
    """Whether a manifest record may name `relpath`: a seed's own PNG path, or a shard path, exactly
    as this layout writes them (so never absolute, never with `..`, never run.json or a manifest)."""
    if not isinstance(relpath, str) or isinstance(seed, bool) or not isinstance(seed, int):
        return False
    if fmt == "png":
        return seed >= 0 and relpath == png_relpath(seed)
    folder, _, name = relpath.partition("/")
    return fmt == "npz" and folder == SHARD_DIR and bool(_SHARD_NAME.match(name))


def png_relpath(seed: int) -> str:
    """EDM's path of a seed's PNG relative to the run directory."""
    return f"{seed - seed % 1000:06d}/{seed:06d}.png"


def shard_relpath(rank: int, first_seed: int) -> str:
    """Path of a rank's npz shard, named by its first seed (10 digits: seeds go up to 2**32 - 1)."""
    return f"{SHARD_DIR}/rank{rank:03d}-{first_seed:010d}.npz"


def manifest_name(rank: int) -> str:
    return f"manifest-rank{rank:03d}.jsonl"


def output_files(outdir: Path) -> Iterator[Path]:
    """Entries in the run layout's places, none followed if a link: PNGs, shards, and our
    temporary files (named as `is_temporary_name` says) at the top level and in the image
    folders. Other files are not the run's and are left alone."""
    if not outdir.is_dir():
        return
    for entry in sorted(outdir.iterdir()):
        if is_temporary_name(entry.name) and not _is_real_dir(entry):
            yield entry
        elif _is_real_dir(entry) and (_PNG_DIR.match(entry.name) or entry.name == SHARD_DIR):
            pattern = _SHARD_NAME if entry.name == SHARD_DIR else _PNG_NAME
            for path in sorted(entry.iterdir()):
                if not _is_real_dir(path) and (pattern.match(path.name) or is_temporary_name(path.name)):
                    yield path


def _is_real_dir(path: Path) -> bool:
    """A folder, not a link to one."""
    return stat.S_ISDIR(os.lstat(path).st_mode)


def estimated_run_bytes(num_images: int, image_shape: Sequence[int], formats: Sequence[str], *,
                        merged: bool = True) -> int:
    """An upper estimate of the bytes a run writes: raw uint8 pixels per image in each format
    (PNG rarely exceeds them), plus a merged copy of the shards when `merged`, plus 1 KiB of
    manifest and headers per image and format."""
    pixels = 1
    for n in image_shape:
        pixels *= int(n)
    copies = len(formats) + (1 if merged and "npz" in formats else 0)
    return num_images * copies * (pixels + 1024)


def manifest_paths(outdir: Path) -> list[Path]:
    """The run's per-rank manifests, sorted."""
    if not outdir.is_dir():
        return []
    return sorted(p for p in outdir.iterdir() if _MANIFEST_NAME.match(p.name))


def short_list(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"{shown}, ... ({len(values)} in all)" if len(values) > limit else shown
