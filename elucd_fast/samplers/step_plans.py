"""Per-step block plans, as a sampler passes them: opaque values handed to the network.

A sampler does not know what a plan means or which network takes it (`models.block_plan` does);
it only gives step i's plan to every network call of step i, with one cache dict that lives as
long as the sampling run, so that a plan can reuse what an earlier step's call stored.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

class NetworkKwargs(Mapping):
    """The keyword arguments of one step's network calls: its block plan and the run's cache.
    Read-only and hashable (by the plan and the cache's identity), as every step flag is, so a
    step runner can key its variants by the flags."""

    def __init__(self, items: Mapping | None = None):
        self._items = dict(items or {})

    def __getitem__(self, key: str):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def _identity(self) -> tuple:
        return tuple(sorted((key, id(value) if isinstance(value, dict) else value)
                            for key, value in self._items.items()))

    def __hash__(self) -> int:
        return hash(self._identity())

    def __eq__(self, other) -> bool:
        return isinstance(other, NetworkKwargs) and self._identity() == other._identity()

    def __repr__(self) -> str:
        return f"NetworkKwargs(block_plan={self._items.get('block_plan')!r})"


NO_EXTRA = NetworkKwargs()


def step_network_kwargs(block_plans: Sequence | None, num_steps: int) -> list[Mapping]:
    """The keyword arguments of each step's network calls: `{"block_plan": plan_i, "block_cache":
    cache}` with one new cache for the run, or nothing for a step without a plan (so a network
    that takes no plans still runs). Refuses a plan count other than `num_steps`."""
    if block_plans is None:
        return [NO_EXTRA] * num_steps
    block_plans = tuple(block_plans)
    if len(block_plans) != num_steps:
        raise ValueError(f"block_plans: {len(block_plans)} plans for {num_steps} steps; give one per step")
    cache: dict = {}
    return [NO_EXTRA if plan is None else NetworkKwargs({"block_plan": plan, "block_cache": cache})
            for plan in block_plans]


__all__ = ["NO_EXTRA", "NetworkKwargs", "step_network_kwargs"]
