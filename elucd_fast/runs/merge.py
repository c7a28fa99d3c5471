"""Merging a run's npz shards into one ADM-evaluator file ordered by seed."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..models.checkpoint import sha256_file
from ..npz_reader import npz_members, read_npz_member
from .atomic import atomic_write, remove_dead_temporaries
from .encoding import StreamedArray, write_npz
from .layout import RUN_FILE, SHARD_DIR, short_list
from .outputs import read_manifests, scan_outputs
from .ownership import check_output_apart, check_run_folder, run_entries
from .run_config import read_run_config
from .seeds import expand_seed_ranges


class ShardMergeError(ValueError):
    """The npz shards of a run cannot be merged into one complete, ordered file."""


def merge_npz_shards(outdir: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Merges a run's npz shards into one ADM-evaluator file ordered by seed.

    `out_path` receives `arr_0` uint8 (N, H, W, C) and, for a conditional run, `arr_1` int64 (N,),
    for exactly the seeds last requested in `run.json`, ascending. Refuses (ShardMergeError) a run
    with damaged shards, missing seeds (gaps), seeds recorded twice with different content, or
    shards disagreeing with their records, and an `out_path` that is one of the run's own files or
    lies in one of its folders (shards/, the PNG folders), before anything is written. Streams the
    output, so the images need not fit in memory. Temporary files that an earlier merge to the
    same `out_path` left when it was killed are removed first (only those: a live merge's stay).
    Returns a summary: out_path, num_images, num_shards, sha256, removed_temporaries.
    """
    outdir = Path(outdir)
    check_run_folder(outdir)
    check_output_apart(out_path, run_entries(outdir), "out_path")
    run = read_run_config(outdir)
    if run is None:
        raise ShardMergeError(f"{outdir}: no {RUN_FILE}; not a run directory")
    seeds = expand_seed_ranges(run["seeds"])
    scan = scan_outputs(outdir)
    damaged = [m for m in scan.problems if m.startswith(f"{SHARD_DIR}/")]
    if damaged:
        raise ShardMergeError(f"{outdir}: {'; '.join(damaged[:5])}. Resume the run to regenerate them.")
    records = _unique_records(read_manifests(outdir)[0], scan.valid["npz"])
    missing = [s for s in seeds if s not in records]
    if missing:
        raise ShardMergeError(f"{outdir}: {len(missing)} of {len(seeds)} seeds have no npz shard "
                              f"({short_list(missing)}); resume the run to finish them")
    conditional = {records[s]["label"] is not None for s in seeds}
    if len(conditional) != 1:
        raise ShardMergeError(f"{outdir}: some seeds have labels and some do not")
    conditional = conditional.pop()

    first = _load_shard(outdir, records[seeds[0]]["file"])
    image_shape = first["arr_0"].shape[1:]
    shards_used = sorted({records[s]["file"] for s in seeds})

    def images() -> Iterator[np.ndarray]:
        for relpath, group in _consecutive_by_file(seeds, records):
            shard = _load_shard(outdir, relpath)
            if shard["arr_0"].shape[1:] != image_shape:
                raise ShardMergeError(f"{relpath}: images of shape {shard['arr_0'].shape[1:]}, "
                                      f"others have {image_shape}")
            rows = [records[s]["row"] for s in group]
            if [int(v) for v in shard["seeds"][rows]] != group:
                raise ShardMergeError(f"{relpath}: rows do not hold the recorded seeds")
            if conditional and [int(v) for v in shard["arr_1"][rows]] != [records[s]["label"] for s in group]:
                raise ShardMergeError(f"{relpath}: labels differ from the recorded ones")
            yield shard["arr_0"][rows]

    arrays: dict[str, np.ndarray | StreamedArray] = {
        "arr_0": StreamedArray(np.dtype(np.uint8), (len(seeds), *image_shape), images())}
    if conditional:
        arrays["arr_1"] = np.asarray([records[s]["label"] for s in seeds], dtype=np.int64)
    out_path = Path(out_path)
    removed = remove_dead_temporaries(out_path)
    atomic_write(out_path, lambda f: write_npz(f, arrays))
    return {"out_path": str(out_path), "num_images": len(seeds), "num_shards": len(shards_used),
            "sha256": sha256_file(out_path), "removed_temporaries": [str(path) for path in removed]}


def _unique_records(all_records: list[dict], valid: Mapping[int, dict]) -> dict[int, dict]:
    """seed -> its one valid npz record; two valid records that disagree are refused."""
    valid_keys = {(r["file"], r["sha256"]) for r in valid.values()}
    chosen: dict[int, dict] = {}
    for record in all_records:
        if record["format"] != "npz" or (record["file"], record["sha256"]) not in valid_keys:
            continue
        seed = record["seed"]
        known = chosen.get(seed)
        if known is not None and (known["file"], known.get("row"), known["label"]) != (
                record["file"], record.get("row"), record["label"]):
            raise ShardMergeError(f"seed {seed} is recorded twice, in {known['file']} and {record['file']}; "
                                  f"refusing to choose")
        chosen[seed] = record
    return chosen


def _consecutive_by_file(seeds: Sequence[int], records: Mapping[int, dict]) -> Iterator[tuple[str, list[int]]]:
    group: list[int] = []
    for seed in seeds:
        if group and records[seed]["file"] != records[group[0]]["file"]:
            yield records[group[0]]["file"], group
            group = []
        group.append(seed)
    if group:
        yield records[group[0]]["file"], group


def _load_shard(outdir: Path, relpath: str) -> dict[str, np.ndarray]:
    """A shard's arrays, checked from their headers first and memory-mapped (a shard is stored
    uncompressed): only the rows merged are read."""
    try:
        members = npz_members(outdir / relpath)
        arrays = {key: read_npz_member(outdir / relpath, key, mmap=True, member=member)
                  for key, member in members.items()}
    except (OSError, ValueError) as err:
        raise ShardMergeError(f"{relpath}: unreadable shard ({err})") from err
    if "arr_0" not in arrays or arrays["arr_0"].dtype != np.uint8 or arrays["arr_0"].ndim != 4:
        raise ShardMergeError(f"{relpath}: arr_0 must be uint8 (B, H, W, C)")
    return arrays
