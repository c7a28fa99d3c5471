"""The on-disk layout of one run directory:

    run.json                        the configuration that determines the images, its sha256 and
                                    the seeds last requested
    manifest-rank000.jsonl          one record per written image and format, appended by rank 0
    manifest-rank001.jsonl          ... one file per rank, so ranks never share a file
    000000/000000.png               EDM's PNG layout: {seed - seed % 1000:06d}/{seed:06d}.png
    shards/rank000-0000000000.npz   ADM npz shard: arr_0 uint8 NHWC, arr_1 int64 labels
                                    (conditional runs only), seeds int64; one per batch and rank
    .lock                           held by the process writing the run
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..atomic import TEMP_SUFFIX

FORMATS = ("png", "npz")
RUN_FILE = "run.json"
SHARD_DIR = "shards"

_MANIFEST_NAME = re.compile(r"^manifest-rank(\d{3,})\.jsonl$")
_PNG_DIR = re.compile(r"^\d{6,}$")
_PNG_NAME = re.compile(r"^\d{6,}\.png$")
_SHARD_NAME = re.compile(r"^rank\d{3,}-\d{10}\.npz$")


def png_relpath(seed: int) -> str:
    """EDM's path of a seed's PNG relative to the run directory."""
    return f"{seed - seed % 1000:06d}/{seed:06d}.png"


def shard_relpath(rank: int, first_seed: int) -> str:
    """Path of a rank's npz shard, named by its first seed (10 digits: seeds go up to 2**32 - 1)."""
    return f"{SHARD_DIR}/rank{rank:03d}-{first_seed:010d}.npz"


def manifest_name(rank: int) -> str:
    return f"manifest-rank{rank:03d}.jsonl"


def output_files(outdir: Path) -> Iterator[Path]:
    """Files in the run layout: PNGs, shards and temporary files (other files are left alone)."""
    if not outdir.is_dir():
        return
    for entry in sorted(outdir.iterdir()):
        if entry.is_file() and entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
            yield entry
        elif entry.is_dir() and (_PNG_DIR.match(entry.name) or entry.name == SHARD_DIR):
            pattern = _SHARD_NAME if entry.name == SHARD_DIR else _PNG_NAME
            for path in sorted(entry.iterdir()):
                if path.is_file() and (pattern.match(path.name)
                                       or (path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX))):
                    yield path


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
