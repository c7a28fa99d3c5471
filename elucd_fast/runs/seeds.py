"""Seeds: EDM's command-line syntax, and the compact ranges `run.json` stores."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from ..rng import MAX_SEED

# One run's seeds are held as a list and checked for repeats: 10 million (200x an FID set) is the cap.
MAX_SEEDS_PER_RUN = 10_000_000

# ASCII digits only: `\d` and str.isdigit() also take "²" or "٣", which int() then refuses or reads.
_SEED = re.compile(r"^[0-9]+$")
_SEED_RANGE = re.compile(r"^([0-9]+)-([0-9]+)$")


def parse_seeds(text: str) -> list[int]:
    """Seeds from EDM's syntax: comma-separated integers and inclusive ranges, e.g.
    "0-49999,60000,70000-70009", written in ASCII digits. Refuses empty parts, reversed ranges,
    seeds outside [0, 2**32) and repeated seeds, naming the culprit."""
    seeds: list[int] = []
    count = 0
    for part in str(text).split(","):
        part = part.strip()
        match = _SEED_RANGE.match(part)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if first > last:
                raise ValueError(f"seeds: range {part!r} runs backwards")
        elif _SEED.match(part):
            first = last = int(part)
        else:
            raise ValueError(f"seeds: {part!r} is neither an integer nor a range like 0-49999 (in {text!r})")
        if last >= MAX_SEED:
            raise ValueError(f"seeds: {part!r} goes beyond the largest seed {MAX_SEED - 1}")
        # Counted before anything is expanded: "0-999999999" must not allocate a billion ints.
        count += last - first + 1
        if count > MAX_SEEDS_PER_RUN:
            raise ValueError(f"seeds: {text!r} asks for {count:,}+ seeds; one run takes at most "
                             f"{MAX_SEEDS_PER_RUN:,} (split a larger set into several runs)")
        seeds.extend(range(first, last + 1))
    repeated = sorted(seed for seed, count in Counter(seeds).items() if count > 1)
    if repeated:
        raise ValueError(f"seeds: {len(repeated)} seed(s) given more than once, e.g. {repeated[:5]} (in {text!r})")
    return seeds


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
