"""A run's configuration (`run.json`): what determines its images, hashed, so that a resumed
run is refused when anything that changes an image differs."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .atomic import atomic_write
from .layout import RUN_FILE, manifest_paths
from .seeds import seed_ranges

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
