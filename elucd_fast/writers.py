"""Durable output of generated samples: a PNG tree, ADM npz shards, a manifest, and resume.

On-disk layout of one run directory:

    run.json                        the configuration that determines the images, its sha256 and
                                    the seeds last requested
    manifest-rank000.jsonl          one record per written image and format, appended by rank 0
    manifest-rank001.jsonl          ... one file per rank, so ranks never share a file
    000000/000000.png               EDM's PNG layout: {seed - seed % 1000:06d}/{seed:06d}.png
    shards/rank000-0000000000.npz   ADM npz shard: arr_0 uint8 NHWC, arr_1 int64 labels
                                    (conditional runs only), seeds int64; one per batch and rank

Every file is written atomically (a temporary file in the same directory, flushed and fsynced,
then `os.replace`d and the directory fsynced), and a record is appended to the manifest only after
its file is durable. A crash therefore leaves, at worst, temporary files and files without a
record; resuming removes both and regenerates their seeds. A record names its file's sha256, so
a file damaged after the fact is detected too.

One run writes to a directory at a time; running two at once in the same directory is unsupported.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from .models.checkpoint import sha256_file

FORMATS = ("png", "npz")
RUN_FILE = "run.json"
SHARD_DIR = "shards"
TEMP_SUFFIX = ".tmp"
RUN_FORMAT_VERSION = 1

_MANIFEST_NAME = re.compile(r"^manifest-rank(\d{3,})\.jsonl$")
_PNG_DIR = re.compile(r"^\d{6,}$")
_PNG_NAME = re.compile(r"^\d{6,}\.png$")
_SHARD_NAME = re.compile(r"^rank\d{3,}-\d{10}\.npz$")
# Fixed zip metadata: the bytes of an npz, and so its recorded sha256, must depend on its
# arrays only, not on the clock or on the zipfile module's defaults.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_ZIP_FILE_MODE = 0o644 << 16
# Fixed PNG encoder settings (EDM's defaults, written out): the same pixels give the same bytes.
_PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}


class RunConfigMismatchError(ValueError):
    """The output directory holds a run with a different configuration."""


class ShardMergeError(ValueError):
    """The npz shards of a run cannot be merged into one complete, ordered file."""


# ---------------------------------------------------------------------------------------------
# Atomic files


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
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except OSError as err:
        _remove_quietly(temp_name)
        reason = err.strerror or str(err)
        raise OSError(err.errno, f"{reason} while writing; no partial file was left, and files written "
                                 f"earlier are intact", str(path)) from err
    except BaseException:
        _remove_quietly(temp_name)
        raise
    if sync_directory:
        fsync_directory(path.parent)


def _remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Encoders


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of one uint8 image (H, W, C) with C = 3 (RGB) or 1 (L)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"png: expected a uint8 (H, W, 1|3) image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, **_PNG_OPTIONS)
    return buffer.getvalue()


class StreamedArray(NamedTuple):
    """An npz member written chunk by chunk: C-order `chunks` that concatenate to `shape`."""

    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Iterable[np.ndarray]


def write_npz(f: BinaryIO, arrays: Mapping[str, np.ndarray | StreamedArray]) -> None:
    """Writes an uncompressed npz (as `np.savez`) with fixed zip metadata, so equal arrays give
    equal bytes. A `StreamedArray` member never needs to be whole in memory."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            if isinstance(value, np.ndarray):
                value = StreamedArray(value.dtype, value.shape, [value])
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE_TIME)
            info.external_attr = _ZIP_FILE_MODE
            with archive.open(info, "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(value.dtype)),
                          "fortran_order": False, "shape": tuple(value.shape)}
                np.lib.format.write_array_header_1_0(member, header)
                written = 0
                for chunk in value.chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=value.dtype)
                    member.write(chunk.tobytes())
                    written += chunk.size
                if written != int(np.prod(value.shape)):
                    raise ValueError(f"npz member {key!r}: chunks hold {written} values, shape "
                                     f"{tuple(value.shape)} needs {int(np.prod(value.shape))}")


def png_relpath(seed: int) -> str:
    """EDM's path of a seed's PNG relative to the run directory."""
    return f"{seed - seed % 1000:06d}/{seed:06d}.png"


def shard_relpath(rank: int, first_seed: int) -> str:
    """Path of a rank's npz shard, named by its first seed (10 digits: seeds go up to 2**32 - 1)."""
    return f"{SHARD_DIR}/rank{rank:03d}-{first_seed:010d}.npz"


def manifest_name(rank: int) -> str:
    return f"manifest-rank{rank:03d}.jsonl"


# ---------------------------------------------------------------------------------------------
# Run configuration


def config_hash(config: Mapping) -> str:
    """sha256 of the canonical JSON of `config` (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def config_differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configurations (nested dicts are compared key
    by key)."""
    differences = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        if key not in old or key not in new:
            differences.append(name)
        elif isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
            differences += config_differences(old[key], new[key], prefix=f"{name}.")
        elif old[key] != new[key]:
            differences.append(name)
    return differences


def read_run_config(outdir: str | os.PathLike) -> dict | None:
    """The parsed `run.json` of a run directory, or None where there is none."""
    path = Path(outdir) / RUN_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        run = json.loads(text)
        run["config"], run["config_sha256"], run["seeds"]
    except (ValueError, KeyError, TypeError) as err:
        raise RunConfigMismatchError(f"{path}: not a run description written by elucd-fast ({err})") from err
    return run


def check_run_config(outdir: str | os.PathLike, config: Mapping) -> None:
    """Refuses to continue a run directory whose `run.json` holds a different configuration,
    naming the keys that differ."""
    config = _json_roundtrip(config)
    run = read_run_config(outdir)
    if run is None:
        if any(_manifest_paths(Path(outdir))):
            raise RunConfigMismatchError(
                f"{outdir}: holds sample records but no {RUN_FILE}; refusing to mix runs "
                f"(use a new output directory)")
        return
    if run["config_sha256"] == config_hash(config):
        return
    differing = config_differences(run["config"], config)
    shown = ", ".join(
        f"{key}: {_lookup(run['config'], key)!r} -> {_lookup(config, key)!r}" for key in differing[:10])
    raise RunConfigMismatchError(
        f"{outdir}: already holds a run with a different configuration; differing keys: {shown}"
        f"{' ...' if len(differing) > 10 else ''}. Use a new output directory, or the original settings "
        f"to resume.")


def write_run_config(outdir: str | os.PathLike, config: Mapping, seeds: Sequence[int]) -> None:
    """Writes `run.json`: the configuration, its hash and the requested seeds (as ranges).

    Seeds are outside the hash: a run may be resumed with more seeds than it started with."""
    config = _json_roundtrip(config)
    run = {"format_version": RUN_FORMAT_VERSION, "config_sha256": config_hash(config), "config": config,
           "seeds": seed_ranges(seeds)}
    data = (json.dumps(run, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(Path(outdir) / RUN_FILE, lambda f: f.write(data))


def seed_ranges(seeds: Iterable[int]) -> list[list[int]]:
    """Sorted seeds compressed to inclusive [first, last] ranges: [0, 1, 2, 5] -> [[0, 2], [5, 5]]."""
    ranges: list[list[int]] = []
    for seed in sorted(set(seeds)):
        if ranges and seed == ranges[-1][1] + 1:
            ranges[-1][1] = seed
        else:
            ranges.append([seed, seed])
    return ranges


def expand_seed_ranges(ranges: Iterable[Sequence[int]]) -> list[int]:
    """The inverse of `seed_ranges`."""
    return [seed for first, last in ranges for seed in range(first, last + 1)]


def _json_roundtrip(config: Mapping) -> dict:
    """`config` as JSON would give it back (tuples become lists), so stored and fresh configurations
    compare equal; a value JSON cannot hold is an error here, not in the middle of a run."""
    try:
        return json.loads(json.dumps(dict(config), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"run config: must be JSON-serialisable without NaN ({err})") from err


def _lookup(config: Mapping, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return "<absent>"
        value = value[part]
    return value


# ---------------------------------------------------------------------------------------------
# Writing samples


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
        return records

    def _write_pngs(self, images: np.ndarray, labels: np.ndarray | None, seeds: list[int]) -> list[dict]:
        records = []
        for row, seed in enumerate(seeds):
            if seed in self.done["png"]:
                continue
            relpath = png_relpath(seed)
            data = png_bytes(images[row])
            atomic_write(self.outdir / relpath, lambda f: f.write(data), sync_directory=False)
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
        atomic_write(self.outdir / relpath, lambda f: f.write(data), sync_directory=False)
        digest = hashlib.sha256(data).hexdigest()
        return [_record(seeds[row], _label(labels, row), "npz", relpath, digest, row=shard_row)
                for shard_row, row in enumerate(rows)]

    def _append_records(self, records: list[dict]) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        if not self._manifest_checked:
            # A crash can cut the last line short; start on a fresh line so that the damaged
            # record stays alone (and ignored) instead of swallowing the next one.
            if self.manifest_path.exists() and self.manifest_path.stat().st_size > 0:
                with open(self.manifest_path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        lines = "\n" + lines
            self._manifest_checked = True
        try:
            with open(self.manifest_path, "a") as f:
                f.write(lines)
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
    problems: one message per damaged, missing or unrecorded file, or unreadable record.
    removable: temporary files, damaged files and files without a valid record (paths).
    """

    valid: dict[str, dict[int, dict]]
    problems: list[str]
    removable: list[Path]


def scan_outputs(outdir: str | os.PathLike) -> OutputScan:
    """Checks every record of every manifest against its file's bytes (read-only)."""
    outdir = Path(outdir)
    records, problems = _read_manifests(outdir)
    by_file: dict[str, list[dict]] = {}
    for record in records:
        by_file.setdefault(record["file"], []).append(record)

    valid: dict[str, dict[int, dict]] = {fmt: {} for fmt in FORMATS}
    removable: list[Path] = []
    for relpath, file_records in sorted(by_file.items()):
        good, reason = _check_file(outdir, relpath, file_records)
        if reason is not None:
            seeds = sorted({r["seed"] for r in file_records})
            problems.append(f"{relpath}: {reason}; seed(s) {_short_list(seeds)} will be regenerated")
            if (outdir / relpath).exists():
                removable.append(outdir / relpath)
            continue
        for record in good:
            valid[record["format"]][record["seed"]] = record

    for path in _output_files(outdir):
        relpath = path.relative_to(outdir).as_posix()
        if path.name.endswith(TEMP_SUFFIX):
            problems.append(f"{relpath}: temporary file left by an interrupted run")
            removable.append(path)
        elif relpath not in by_file:
            problems.append(f"{relpath}: file without a record (the run stopped before recording it)")
            removable.append(path)
    return OutputScan(valid, problems, removable)


def finished_by_format(outdir: str | os.PathLike, config: Mapping, formats: Sequence[str] = ("png",), *,
                       repair: bool = True, log: Callable[[str], None] | None = None) -> dict[str, set[int]]:
    """Per format, the seeds whose image exists intact in it, with a record.

    Refuses (RunConfigMismatchError) a directory whose `run.json` holds another configuration.
    Each damaged or missing file, temporary file and unrecorded file is reported through `log`
    (default: stderr); their seeds are not finished, so a resumed run regenerates them. With
    `repair`, those files are deleted and the manifests rewritten without invalid records, so
    that afterwards every file has a valid record and every record a valid file. Only one
    process may repair (rank 0, before the other ranks scan).
    """
    formats = check_formats(formats)
    check_run_config(outdir, config)
    outdir = Path(outdir)
    if not outdir.exists():
        return {fmt: set() for fmt in formats}
    scan = scan_outputs(outdir)
    log = log or _print_stderr
    for message in scan.problems:
        log(message)
    if repair and scan.problems:
        _repair(outdir, scan)
    return {fmt: set(scan.valid[fmt]) for fmt in formats}


def finished_seeds(outdir: str | os.PathLike, config: Mapping, formats: Sequence[str] = ("png",), *,
                   repair: bool = True, log: Callable[[str], None] | None = None) -> set[int]:
    """Seeds whose images exist intact, with a record, in every one of `formats`: those a resumed
    run skips. Checks, reports and repairs as `finished_by_format` does."""
    return set.intersection(*finished_by_format(outdir, config, formats, repair=repair, log=log).values())


def _repair(outdir: Path, scan: OutputScan) -> None:
    directories = set()
    for path in scan.removable:
        _remove_quietly(path)
        directories.add(path.parent)
    kept = sorted((r for per_format in scan.valid.values() for r in per_format.values()),
                  key=lambda r: (r["format"], r["seed"]))
    # Each manifest keeps its own valid records (one per seed and format), so it stays the
    # file of one rank.
    by_manifest: dict[str, list[dict]] = {path.name: [] for path in _manifest_paths(outdir)}
    for record in kept:
        by_manifest[record["_manifest"]].append({k: v for k, v in record.items() if k != "_manifest"})
    for name, records in by_manifest.items():
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        atomic_write(outdir / name, lambda f, data=data: f.write(data), sync_directory=False)
    for directory in directories | {outdir}:
        fsync_directory(directory)


def _read_manifests(outdir: Path) -> tuple[list[dict], list[str]]:
    records, problems = [], []
    for path in _manifest_paths(outdir):
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if (record["format"] not in FORMATS or not isinstance(record["seed"], int)
                            or not isinstance(record["file"], str) or not isinstance(record["sha256"], str)):
                        raise ValueError("unexpected field values")
                except (ValueError, KeyError, TypeError):
                    problems.append(f"{path.name}:{number}: unreadable record (cut short by a crash?); ignored")
                    continue
                record["_manifest"] = path.name
                records.append(record)
    return records, problems


def _check_file(outdir: Path, relpath: str, records: list[dict]) -> tuple[list[dict], str | None]:
    """The records that describe the file's current bytes, or a reason the file is unusable."""
    path = outdir / relpath
    if not path.is_file():
        return [], "file is missing"
    digest = sha256_file(path)
    good = [r for r in records if r["sha256"] == digest]
    if not good:
        return [], "file is damaged or truncated (sha256 differs from its record)"
    if records[0]["format"] == "npz":
        try:
            with np.load(path) as shard:
                shard_seeds = [int(s) for s in shard["seeds"]]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            return [], f"shard is unreadable ({err})"
        # A shard whose seeds are not all recorded was cut off mid-record; it is dropped whole so
        # that a regenerated batch can never collide with it by name.
        recorded = {r["seed"]: r.get("row") for r in good}
        rows_match = all(isinstance(row, int) and 0 <= row < len(shard_seeds) and shard_seeds[row] == seed
                         for seed, row in recorded.items())
        if set(recorded) != set(shard_seeds) or not rows_match:
            return [], "shard's seeds do not match its records"
    return good, None


def _output_files(outdir: Path) -> Iterator[Path]:
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


def _manifest_paths(outdir: Path) -> list[Path]:
    if not outdir.is_dir():
        return []
    return sorted(p for p in outdir.iterdir() if _MANIFEST_NAME.match(p.name))


def _short_list(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"{shown}, ... ({len(values)} in all)" if len(values) > limit else shown


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Merging shards


def merge_npz_shards(outdir: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Merges a run's npz shards into one ADM-evaluator file ordered by seed.

    `out_path` receives `arr_0` uint8 (N, H, W, C) and, for a conditional run, `arr_1` int64 (N,),
    for exactly the seeds last requested in `run.json`, ascending. Refuses (ShardMergeError) a run
    with damaged shards, missing seeds (gaps), seeds recorded twice with different content, or
    shards disagreeing with their records. Streams the output, so the images need not fit in memory.
    Returns a summary: out_path, num_images, num_shards, sha256.
    """
    outdir = Path(outdir)
    run = read_run_config(outdir)
    if run is None:
        raise ShardMergeError(f"{outdir}: no {RUN_FILE}; not a run directory")
    seeds = expand_seed_ranges(run["seeds"])
    scan = scan_outputs(outdir)
    damaged = [m for m in scan.problems if m.startswith(f"{SHARD_DIR}/")]
    if damaged:
        raise ShardMergeError(f"{outdir}: {'; '.join(damaged[:5])}. Resume the run to regenerate them.")
    records = _unique_records(_read_manifests(outdir)[0], scan.valid["npz"])
    missing = [s for s in seeds if s not in records]
    if missing:
        raise ShardMergeError(f"{outdir}: {len(missing)} of {len(seeds)} seeds have no npz shard "
                              f"({_short_list(missing)}); resume the run to finish them")
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
    atomic_write(out_path, lambda f: write_npz(f, arrays))
    return {"out_path": str(out_path), "num_images": len(seeds), "num_shards": len(shards_used),
            "sha256": sha256_file(out_path)}


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
    try:
        with np.load(outdir / relpath) as shard:
            arrays = {key: shard[key] for key in shard.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ShardMergeError(f"{relpath}: unreadable shard ({err})") from err
    if "arr_0" not in arrays or arrays["arr_0"].dtype != np.uint8 or arrays["arr_0"].ndim != 4:
        raise ShardMergeError(f"{relpath}: arr_0 must be uint8 (B, H, W, C)")
    return arrays


__all__ = [
    "FORMATS", "RUN_FILE", "SHARD_DIR", "TEMP_SUFFIX", "RunConfigMismatchError", "ShardMergeError",
    "OutputScan", "SampleWriter", "StreamedArray", "atomic_write", "check_formats", "check_run_config",
    "config_differences", "config_hash", "expand_seed_ranges", "finished_by_format", "finished_seeds",
    "fsync_directory", "merge_npz_shards", "png_bytes", "png_relpath", "read_run_config", "scan_outputs", "seed_ranges",
    "shard_relpath", "write_npz", "write_run_config",
]
