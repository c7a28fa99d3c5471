"""A run's configuration (`run.json`): what determines its images, hashed, so that a resumed
run is refused when anything that changes an image differs."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..rng import MAX_SEED
from .atomic import atomic_write
from .layout import RUN_FILE, manifest_paths
from .ownership import read_run_file
from .seeds import MAX_SEEDS_PER_RUN, seed_ranges

RUN_FORMAT_VERSION = 1


class RunConfigMismatchError(ValueError):
    """The output directory holds a run with a different configuration."""


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
    """The parsed `run.json` of a run directory, validated as a whole, or None where there is none.

    Refuses (RunConfigMismatchError, naming the file and the field) anything `write_run_config`
    would not have written: another format version, a configuration that is not an object or does
    not match its recorded sha256, seeds that are not ascending, disjoint [first, last] ranges of
    integers in [0, 2**32) holding at most MAX_SEEDS_PER_RUN seeds in all. `run.json` is read
    without following a link, as every file of a run."""
    path = Path(outdir) / RUN_FILE
    data = read_run_file(path)
    if data is None:
        return None
    try:
        run = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError included; brackets nested too deep
        raise RunConfigMismatchError(f"{path}: not a run description written by elucd-fast (not JSON: "
                                     f"{type(err).__name__}: {str(err)[:200]})") from err
    problem = _run_problem(run)
    if problem:
        raise RunConfigMismatchError(f"{path}: not a run description written by elucd-fast ({problem}); restore it, or "
                                     "use a new output directory")
    return run


def _run_problem(run: object) -> str | None:
    """What is wrong with a parsed run.json, or None."""
    if not isinstance(run, dict):
        return f"expected a JSON object, got {type(run).__name__}"
    missing = sorted({"format_version", "config", "config_sha256", "seeds"} - set(run))
    if missing:
        return f"missing {', '.join(missing)}"
    if run["format_version"] != RUN_FORMAT_VERSION or isinstance(run["format_version"], bool):
        return f"format_version {run['format_version']!r}; this version reads {RUN_FORMAT_VERSION}"
    if not isinstance(run["config"], dict):
        return f"config must be an object, got {type(run['config']).__name__}"
    try:
        matches = run["config_sha256"] == config_hash(run["config"])
    except (ValueError, RecursionError):  # NaN or Infinity in the configuration; nesting beyond the encoder
        matches = False
    if not matches:
        return "config_sha256 does not match config (the configuration was edited)"
    seeds = run["seeds"]
    if not isinstance(seeds, list) or not seeds:
        return f"seeds must be a non-empty list of [first, last] ranges, got {seeds!r:.60}"
    total, previous = 0, -1
    for item in seeds:
        if (not isinstance(item, list) or len(item) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in item)):
            return f"seeds: {item!r:.60} is not a [first, last] pair of integers"
        first, last = item
        if not previous < first <= last < MAX_SEED:
            return (f"seeds: range {item} must lie in [0, {MAX_SEED - 1}], run forwards and come after the previous "
                    "range")
        total += last - first + 1
        if total > MAX_SEEDS_PER_RUN:
            return f"seeds: more than {MAX_SEEDS_PER_RUN:,} seeds (one run's limit)"
        previous = last
    return None


def check_run_config(outdir: str | os.PathLike, config: Mapping) -> None:
    """Refuses to continue a run directory whose `run.json` holds a different configuration,
    naming the keys that differ."""
    config = _json_roundtrip(config)
    run = read_run_config(outdir)
    if run is None:
        if any(manifest_paths(Path(outdir))):
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
