"""The search's resumable state: `search.json`, rewritten atomically after every scored candidate.

It holds the search's configuration and every result so far (the DP's cost matrix and path, each
candidate's record per stage). Resuming replays the search from the start: the evolution is a
pure function of its settings and the scores it gets (`evolution.py`), so answering the scores
from this file takes it down exactly the same path to where it stopped, and on to the same end,
after a kill -9 at any point. A file of another configuration is refused, never mixed in.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..runs import dist
from ..atomic import atomic_write

FORMAT = "elucd-fast-search"
VERSION = 1


class SearchState:
    """`search.json` at `path` for a search of `config` (JSON-able); only rank 0 writes it.

    `records[stage][key]`: a result (dict) per stage ("search", "selection", ...) and candidate
    key; `values[name]`: other results (the DP's, the summary)."""

    def __init__(self, path: str | os.PathLike, config: dict):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))
        self.records: dict[str, dict[str, dict]] = {}
        self.values: dict[str, object] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{self.path}: unreadable search state ({err}); remove it or choose another --outdir") \
                from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not a search state file; choose another --outdir")
        if data.get("config") != self.config:
            theirs = data.get("config") or {}
            changed = sorted(k for k in set(theirs) | set(self.config) if theirs.get(k) != self.config.get(k))
            raise ValueError(f"{self.path}: holds a search with other settings (differing: {', '.join(changed)}); "
                             "rerun with the same settings to resume it, or choose another --outdir")
        self.records = {stage: {key: _decode(r) for key, r in records.items()}
                        for stage, records in data.get("records", {}).items()}
        self.values = data.get("values", {})

    @property
    def resumed(self) -> int:
        """Records read back from an earlier run."""
        return sum(len(r) for r in self.records.values())

    def lookup(self, stage: str, key: str) -> dict | None:
        return self.records.get(stage, {}).get(key)

    def record(self, stage: str, key: str, result: dict) -> None:
        """Stores one candidate's result and writes the file."""
        self.records.setdefault(stage, {})[key] = result
        self.save()

    def set(self, name: str, value) -> None:
        """Stores another result (JSON-able) and writes the file."""
        self.values[name] = json.loads(json.dumps(value))
        self.save()

    def json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "config": self.config,
                "records": {stage: {key: _encode(r) for key, r in records.items()}
                            for stage, records in self.records.items()},
                "values": self.values}

    def save(self) -> None:
        if not dist.is_main():
            return
        text = json.dumps(self.json(), indent=1, allow_nan=False) + "\n"
        atomic_write(self.path, lambda f: f.write(text.encode()))


def _encode(record: dict) -> dict:
    """Non-finite numbers (a failed candidate's score) as null: the file stays plain JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _decode(record: dict) -> dict:
    return {k: math.inf if k == "score" and v is None else v for k, v in record.items()}


__all__ = ["SearchState"]
