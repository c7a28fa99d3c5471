"""Durable output of generated samples: PNG files, ADM npz shards and the manifest records that
vouch for them (layout in `runs.layout`), and the scan that tells a resumed run what is finished.

A record is appended to the manifest only after its file is durable, and names its file's
sha256, so a file damaged after the fact is detected too. A crash leaves, at worst, temporary
files and files without a record; resuming removes the dead temporaries, moves the unrecorded
files aside (`ownership.set_aside`) and regenerates their seeds. What a run may touch is the rule
of `runs.ownership`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..checks import file_kind
from ..models.checkpoint import sha256_file
from ..npz_reader import npz_members, read_npz_member
from ..rng import MAX_SEED
from .atomic import atomic_write, fsync_directory, remove_if_dead_temporary, remove_quietly
from .encoding import png_bytes, write_npz
from .layout import (DAMAGED_DIR, FORMATS, is_layout_file, is_temporary_name, manifest_name, manifest_paths,
                     output_files, png_relpath, shard_relpath, short_list)
from .ownership import open_run_file, set_aside
from .run_config import check_run_config


class SampleWriter:
    """Writes batches of one rank's images in the requested formats and records them.

    `done` maps a format to seeds already written intact in it (`finished_by_format`); those are
    not written again in that format. A seed whose PNG was damaged but whose shard is intact thus
    gets a new PNG and no second shard row, and no seed ever sits in two valid shards.
    """

    def __init__(self, outdir: str | os.PathLike, *, formats: Sequence[str] = ("png",), rank: int = 0,
                 done: Mapping[str, Collection[int]] | None = None):
        self.outdir = Path(outdir)
        self.formats = check_formats(formats)
        self.rank = rank
        self.done = {fmt: frozenset((done or {}).get(fmt, ())) for fmt in self.formats}
        self.manifest_path = self.outdir / manifest_name(rank)
        self._manifest_checked = False
        self.records_written = 0
        self.files_written: list[Path] = []  # every file this writer created or replaced

    def write(self, images: np.ndarray, labels: np.ndarray | None, seeds: Sequence[int]) -> list[dict]:
        """Writes one batch: images uint8 (B, H, W, C) with C in {1, 3}, labels int64 (B,) or None,
        B seeds. Returns its manifest records, already appended durably."""
        images = np.asarray(images)
        seeds = [int(s) for s in seeds]
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(seeds):
            raise ValueError(f"write: expected uint8 (B, H, W, C) images for {len(seeds)} seeds, "
                             f"got {images.dtype} {images.shape}")
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        records: list[dict] = []
        if "png" in self.formats:
            records += self._write_pngs(images, labels, seeds)
        if "npz" in self.formats:
            records += self._write_shard(images, labels, seeds)
        # The renames must be durable before a record may claim their files exist.
        for directory in sorted({(self.outdir / r["file"]).parent for r in records}):
            fsync_directory(directory)
        if records:
            self._append_records(records)
            self.records_written += len(records)
        return records

    def _write_pngs(self, images: np.ndarray, labels: np.ndarray | None, seeds: list[int]) -> list[dict]:
        records = []
        for row, seed in enumerate(seeds):
            if seed in self.done["png"]:
                continue
            relpath = png_relpath(seed)
            data = png_bytes(images[row])
            atomic_write(self.outdir / relpath, lambda f: f.write(data), sync_directory=False, remove_dead=False)
            self.files_written.append(self.outdir / relpath)
            records.append(_record(seed, _label(labels, row), "png", relpath, hashlib.sha256(data).hexdigest()))
        return records

    def _write_shard(self, images: np.ndarray, labels: np.ndarray | None, seeds: list[int]) -> list[dict]:
        rows = [row for row, seed in enumerate(seeds) if seed not in self.done["npz"]]
        if not rows:
            return []
        arrays = {"arr_0": images[rows]}
        if labels is not None:
            arrays["arr_1"] = labels[rows]
        arrays["seeds"] = np.asarray([seeds[row] for row in rows], dtype=np.int64)
        buffer = io.BytesIO()
        write_npz(buffer, arrays)
        data = buffer.getvalue()
        relpath = shard_relpath(self.rank, seeds[rows[0]])
        atomic_write(self.outdir / relpath, lambda f: f.write(data), sync_directory=False, remove_dead=False)
        self.files_written.append(self.outdir / relpath)
        digest = hashlib.sha256(data).hexdigest()
        return [_record(seeds[row], _label(labels, row), "npz", relpath, digest, row=shard_row)
                for shard_row, row in enumerate(rows)]

    def _append_records(self, records: list[dict]) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        if not self._manifest_checked:
            # A crash can cut the last line short; start on a fresh line so that the damaged
            # record stays alone (and ignored) instead of swallowing the next one.
            try:
                with os.fdopen(open_run_file(self.manifest_path, os.O_RDONLY), "rb") as f:
                    if os.fstat(f.fileno()).st_size > 0:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            lines = "\n" + lines
            except FileNotFoundError:
                pass
            self._manifest_checked = True
        try:
            # Appended without following a link: the manifest is the run's own file.
            with os.fdopen(open_run_file(self.manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as f:
                f.write(lines.encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror or err} while appending to the manifest; the images of "
                                     f"this batch carry no record and will be regenerated on resume",
                          str(self.manifest_path)) from err


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown or len(set(formats)) != len(formats):
        raise ValueError(f"formats: choose one or more distinct of {FORMATS}; got {formats}")
    return formats


def _label(labels: np.ndarray | None, row: int) -> int | None:
    return None if labels is None else int(labels[row])


def _record(seed: int, label: int | None, fmt: str, relpath: str, sha256: str, **extra) -> dict:
    return {"seed": seed, "label": label, "format": fmt, "file": relpath, "sha256": sha256, **extra}


# ---------------------------------------------------------------------------------------------
# Scanning a run directory: what is finished, what must go


class OutputScan(NamedTuple):
    """What a run directory holds.

    valid: format -> seed -> a record whose file is intact.
    problems: one message per damaged, missing or unrecorded file, or unreadable or refused record.
    temporaries: files named as our temporaries (a repair deletes those whose writer is gone).
    damaged: damaged files and files in the layout without a valid record (moved aside by a repair).
    """

    valid: dict[str, dict[int, dict]]
    problems: list[str]
    temporaries: list[Path]
    damaged: list[Path]


def scan_outputs(outdir: str | os.PathLike, label_of: Callable[[int], int | None] | None = None) -> OutputScan:
    """Checks every record of every manifest against its file (read-only): the file's sha256, the
    seed and label a shard holds at the record's row, a PNG's path for the seed, and, with
    `label_of` (seed -> the label the run draws for it), every record's label."""
    outdir = Path(outdir)
    records, problems = read_manifests(outdir)
    by_file: dict[str, list[dict]] = {}
    for record in records:
        by_file.setdefault(record["file"], []).append(record)

    valid: dict[str, dict[int, dict]] = {fmt: {} for fmt in FORMATS}
    damaged: list[Path] = []
    # Shards first: a PNG record's label is checked against its seed's shard record.
    for relpath, file_records in sorted(by_file.items(), key=lambda item: (item[1][0]["format"] != "npz", item[0])):
        good, reason = _check_file(outdir, relpath, file_records)
        if reason is None and good[0]["format"] == "png":
            reason = _png_label_problem(good, valid["npz"], label_of)
        if reason is not None:
            seeds = sorted({r["seed"] for r in file_records})
            problems.append(f"{relpath}: {reason}; seed(s) {short_list(seeds)} will be regenerated")
            if os.path.lexists(outdir / relpath):
                damaged.append(outdir / relpath)
            continue
        for record in good:
            valid[record["format"]][record["seed"]] = record

    temporaries: list[Path] = []
    for path in output_files(outdir):
        relpath = path.relative_to(outdir).as_posix()
        if is_temporary_name(path.name):
            temporaries.append(path)
        elif relpath not in by_file:
            problems.append(f"{relpath}: file without a record (the run stopped before recording it)")
            damaged.append(path)
    return OutputScan(valid, problems, temporaries, damaged)


def finished_by_format(outdir: str | os.PathLike, config: Mapping, formats: Sequence[str] = ("png",), *,
                       repair: bool = True, log: Callable[[str], None] | None = None,
                       label_of: Callable[[int], int | None] | None = None,
                       discard_damaged: bool = False) -> dict[str, set[int]]:
    """Per format, the seeds whose image exists intact in it, with a record.

    Refuses (RunConfigMismatchError) a directory whose `run.json` holds another configuration.
    Each damaged or missing file, unrecorded file and refused record is reported through `log`
    (default: stderr); their seeds are not finished, so a resumed run regenerates them. With
    `repair`, dead temporary files are deleted, damaged and unrecorded files are moved aside into
    `damaged/` (deleted instead with `discard_damaged`), and the manifests are rewritten without
    invalid records, so that afterwards every file has a valid record and every record a valid
    file. Only one process may repair (rank 0, before the other ranks scan).
    """
    formats = check_formats(formats)
    check_run_config(outdir, config)
    outdir = Path(outdir)
    if not outdir.exists():
        return {fmt: set() for fmt in formats}
    scan = scan_outputs(outdir, label_of)
    log = log or _print_stderr
    for message in scan.problems:
        log(message)
    if repair and (scan.problems or scan.temporaries):
        for message in _repair(outdir, scan, discard_damaged):
            log(message)
    return {fmt: set(scan.valid[fmt]) for fmt in formats}


def finished_seeds(outdir: str | os.PathLike, config: Mapping, formats: Sequence[str] = ("png",), *,
                   repair: bool = True, log: Callable[[str], None] | None = None) -> set[int]:
    """Seeds whose images exist intact, with a record, in every one of `formats`: those a resumed
    run skips. Checks, reports and repairs as `finished_by_format` does."""
    return set.intersection(*finished_by_format(outdir, config, formats, repair=repair, log=log).values())


def _repair(outdir: Path, scan: OutputScan, discard_damaged: bool) -> list[str]:
    """Applies a scan: the only deletions are dead temporaries (ours by name and lock) and, when
    asked, damaged files; everything else found wrong is moved aside. Returns what it did."""
    directories, messages = set(), []
    for path in scan.temporaries:
        if remove_if_dead_temporary(path):
            messages.append(f"{path.relative_to(outdir).as_posix()}: temporary file left by an interrupted run; "
                            "removed")
            directories.add(path.parent)
    for path in scan.damaged:
        relpath = path.relative_to(outdir).as_posix()
        if discard_damaged:
            remove_quietly(path)
            messages.append(f"{relpath}: deleted (discard_damaged)")
        else:
            target = set_aside(outdir, path)
            messages.append(f"{relpath}: moved aside to {target.relative_to(outdir).as_posix()} (kept; delete "
                            f"{DAMAGED_DIR}/ when you no longer need it)")
            directories.add(target.parent)
        directories.add(path.parent)
    kept = sorted((r for per_format in scan.valid.values() for r in per_format.values()),
                  key=lambda r: (r["format"], r["seed"]))
    # Each manifest keeps its own valid records (one per seed and format), so it stays the
    # file of one rank.
    by_manifest: dict[str, list[dict]] = {path.name: [] for path in manifest_paths(outdir)}
    for record in kept:
        by_manifest[record["_manifest"]].append({k: v for k, v in record.items() if k != "_manifest"})
    for name, records in by_manifest.items():
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        atomic_write(outdir / name, lambda f, data=data: f.write(data), sync_directory=False, remove_dead=False)
    for directory in directories | {outdir}:
        fsync_directory(directory)
    return messages


def read_manifests(outdir: Path) -> tuple[list[dict], list[str]]:
    """Every well-formed record of the run's manifests (each with `_manifest`, the manifest's
    name), and one message per line that is not: torn by a crash (cut short, or bytes that are not
    UTF-8), not a record, or naming a file outside the run's layout. Such lines are ignored, never
    acted on."""
    records, problems = [], []
    for path in manifest_paths(outdir):
        try:
            manifest = os.fdopen(open_run_file(path, os.O_RDONLY), "rb")
        except FileNotFoundError:
            continue
        with manifest:
            problems += _read_manifest(manifest, path.name, records)
    return records, problems


def _read_manifest(manifest, name: str, records: list[dict]) -> list[str]:
    """Appends the well-formed records of one manifest (a binary file, read line by line) to
    `records`; returns one message per line that is not."""
    problems = []
    for number, raw in enumerate(manifest, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if (not isinstance(record, dict) or record["format"] not in FORMATS
                    or isinstance(record["seed"], bool) or not isinstance(record["seed"], int)
                    or not 0 <= record["seed"] < MAX_SEED or not isinstance(record["file"], str)
                    or not isinstance(record["sha256"], str) or not _is_label(record["label"])):
                raise ValueError("unexpected field values")
        # UnicodeDecodeError is a ValueError; RecursionError: brackets nested beyond the parser.
        except (ValueError, KeyError, TypeError, RecursionError):
            problems.append(f"{name}:{number}: unreadable record (torn by a crash, or damaged); ignored")
            continue
        if not is_layout_file(record["file"], record["format"], record["seed"]):
            problems.append(f"{name}:{number}: record names {record['file']!r:.200}, which is not a file of this "
                            f"run (a {record['format']} record may name only its seed's own "
                            f"{'PNG path' if record['format'] == 'png' else 'shard in shards/'}); ignored, "
                            "nothing was done to that path")
            continue
        record["_manifest"] = name
        records.append(record)
    return problems


def _is_label(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _check_file(outdir: Path, relpath: str, records: list[dict]) -> tuple[list[dict], str | None]:
    """The records that describe the file's current bytes, every field verified (seed, label,
    sha256, row), or a reason the file is unusable."""
    path = outdir / relpath
    if not os.path.lexists(path):
        return [], "file is missing"
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        return [], f"is {file_kind(mode)}, not a file the run wrote"
    digest = sha256_file(path)
    good = [r for r in records if r["sha256"] == digest]
    if not good:
        return [], "file is damaged or truncated (sha256 differs from its record)"
    if records[0]["format"] == "png":  # its path is its seed's (`read_manifests` checked it)
        return good, None
    try:
        members = npz_members(path)
        shard_seeds = [int(s) for s in read_npz_member(path, "seeds", member=members.get("seeds"))]
        shard_labels = ([int(v) for v in read_npz_member(path, "arr_1", member=members["arr_1"])]
                        if "arr_1" in members else None)
    except (OSError, ValueError) as err:
        return [], f"shard is unreadable ({err})"
    # A shard whose seeds are not all recorded was cut off mid-record; it is dropped whole so
    # that a regenerated batch can never collide with it by name.
    recorded = {r["seed"]: r.get("row") for r in good}
    rows_match = all(isinstance(row, int) and 0 <= row < len(shard_seeds) and shard_seeds[row] == seed
                     for seed, row in recorded.items())
    if set(recorded) != set(shard_seeds) or not rows_match:
        return [], "shard's seeds do not match its records"
    for record in good:
        label = None if shard_labels is None else shard_labels[record["row"]]
        if record["label"] != label:
            return [], (f"record of seed {record['seed']} says label {record['label']!r}, the shard holds "
                        f"{label!r} (edited record)")
    return good, None


def _png_label_problem(records: list[dict], shards: Mapping[int, dict],
                       label_of: Callable[[int], int | None] | None) -> str | None:
    """Why a PNG's records cannot be trusted for their label (a PNG holds no label of its own):
    it differs from the seed's shard record or, without one, from what the seed draws."""
    for record in records:
        seed = record["seed"]
        if seed in shards:
            expected, source = shards[seed]["label"], "its shard holds"
        elif label_of is not None:
            expected, source = label_of(seed), "the seed draws"
        else:
            continue
        if record["label"] != expected:
            return f"record of seed {seed} says label {record['label']!r}, {source} {expected!r} (edited record)"
    return None


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr)
