"""Per-sample random number generation: one generator per seed.

Sample i's noise depends only on its own seed, never on batch size, batch position, world size
or resume point. The draw order equals EDM's `StackedRandomGenerator`, so a seed reproduces the
noise of EDM's own `generate.py` exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_SEED = 1 << 32


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Returns seeds as ints after checking each is in [0, 2**32) and none repeats."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: need at least one seed")
    bad = [s for s in seeds if not 0 <= s < MAX_SEED]
    if bad:
        raise ValueError(f"seeds: each seed must be in [0, 2**32); got {bad[:5]}")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds: seeds must be unique (a repeated seed repeats its image)")
    return seeds


class StackedRandomGenerator:
    """A batch of independent generators, one per sample, seeded with `seeds`."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.seeds = check_seeds(seeds)
        self.generators = [torch.Generator(device).manual_seed(s) for s in self.seeds]

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Standard normal noise of `size`; row i comes from generator i."""
        if size[0] != len(self.generators):
            raise ValueError(f"randn: leading size {size[0]} != number of seeds {len(self.generators)}")
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Integers as `torch.randint(*args)`; row i comes from generator i."""
        if size[0] != len(self.generators):
            raise ValueError(f"randint: leading size {size[0]} != number of seeds {len(self.generators)}")
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])
