"""Block plans: what one network call does with each of its blocks (AutoDiffusion's pruning,
DeepCache's caching).

A network that takes a plan numbers its *blocks*, in execution order, with ids 0 ... n-1 (`block
names` says what each id is, e.g. "enc.8x8_block0" and "enc.8x8_block0.attn"): every residual
block and every attention layer; stems, output heads and plain resampling layers never skip. A
plan for one call says

- `skip`: the ids bypassed. A bypassed residual block returns its shortcut alone (identity, or the
  1x1 projection; a resampling block resamples first), a bypassed attention layer returns its
  input, a bypassed transformer block returns its input: AutoDiffusion's rules
  (`guided_diffusion/dynamic_unet.py`), applied to every architecture's residual form.
- `store`: a *cache point* (the output of decoder block k of a U-Net) this call writes into the
  run's cache;
- `reuse`: a cache point this call reads from the run's cache instead of computing it, and with
  it everything only it needs: the deep path below decoder block k. Only the shallow encoder
  blocks whose skip connections the later decoder blocks consume, and those decoder blocks, run
  (DeepCache, Ma et al. 2024: the deep features change slowly between adjacent steps).

The cache is a plain dict (cache point -> tensor) that whoever runs a sampling loop creates for that
run and passes with every call (`block_cache=`); a module never holds one, so two runs, two
networks (an autoguidance guide) or two threads never see each other's features. A sampler passes
the plans through without reading them.

An empty plan (or None) is the network's ordinary forward, bit for bit.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BlockPlan:
    """One network call's plan. Hashable, so a compiled step keys one graph per distinct plan.

    skip: ids of bypassed blocks; store / reuse: a cache point (decoder block index) or None.
    """

    skip: frozenset[int] = field(default_factory=frozenset)
    store: int | None = None
    reuse: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "skip", frozenset(int(i) for i in self.skip))
        if self.store is not None and self.reuse is not None and self.store != self.reuse:
            raise ValueError(f"a plan reads and writes one cache point; got store {self.store}, reuse {self.reuse}")
        if self.store is not None and self.store == self.reuse:
            raise ValueError(f"cache point {self.store}: a call that reuses it computes nothing to store")

    @property
    def empty(self) -> bool:
        return not self.skip and self.store is None and self.reuse is None

    def to_json(self) -> dict:
        """{"skip": sorted ids, "store": k or null, "reuse": k or null}."""
        return {"skip": sorted(self.skip), "store": self.store, "reuse": self.reuse}

    @classmethod
    def from_json(cls, value: Mapping) -> BlockPlan:
        """The inverse of `to_json`; a clear error for anything else."""
        if not isinstance(value, Mapping) or set(value) - {"skip", "store", "reuse"}:
            raise ValueError(f"a block plan is an object with keys skip, store, reuse; got {value!r}")
        skip = value.get("skip", [])
        if not isinstance(skip, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
            raise ValueError(f"a block plan's skip is a list of integer block ids; got {skip!r}")
        if len(set(skip)) != len(skip):
            raise ValueError(f"a block plan's skip lists a block twice: {skip}")
        points = {}
        for key in ("store", "reuse"):
            point = value.get(key)
            if point is not None and (not isinstance(point, int) or isinstance(point, bool)):
                raise ValueError(f"a block plan's {key} is an integer cache point or null; got {point!r}")
            points[key] = point
        return cls(frozenset(skip), **points)


BlockCache = dict  # cache point -> tensor, one per sampling run


def is_bypassed(plan: BlockPlan | None, block_id: int) -> bool:
    """Whether `plan` bypasses block `block_id` (False for no plan)."""
    return plan is not None and block_id in plan.skip


def cached_output(plan: BlockPlan | None, cache: BlockCache | None) -> torch.Tensor | None:
    """The tensor `plan` reuses from `cache`, or None when it reuses nothing."""
    if plan is None or plan.reuse is None:
        return None
    if cache is None or plan.reuse not in cache:
        raise ValueError(f"the plan reuses cache point {plan.reuse}, which no earlier call of this run stored")
    return cache[plan.reuse]


def store_output(plan: BlockPlan | None, cache: BlockCache | None, point: int, value: torch.Tensor) -> None:
    """Writes decoder block `point`'s output into `cache` when `plan` asks for it."""
    if plan is not None and plan.store == point:
        if cache is None:
            raise ValueError(f"the plan stores cache point {point}: pass a block_cache dict for the run")
        cache[point] = value


def check_plan(plan: BlockPlan, names: Sequence[str], cache_points: int, network: str) -> None:
    """Refuses ids or cache points `network` (with block `names` and `cache_points` decoder
    blocks) does not have."""
    unknown = sorted(i for i in plan.skip if not 0 <= i < len(names))
    if unknown:
        raise ValueError(f"block ids {unknown} are not blocks of {network} (it has ids 0..{len(names) - 1})")
    for key in ("store", "reuse"):
        point = getattr(plan, key)
        if point is not None and not 0 <= point < cache_points:
            allowed = f"0..{cache_points - 1}" if cache_points else "none: it has no cache points"
            raise ValueError(f"{key} {point} is not a cache point of {network} (allowed: {allowed})")


def assign_block_ids(blocks: Iterable[tuple[str, torch.nn.Module, bool]]) -> tuple[str, ...]:
    """Numbers residual blocks in the given (execution) order: each `(name, module, has_attention)`
    gets `module.block_id`, and one with attention also `module.attention_id` (the next id, named
    name + ".attn"), so its attention can be bypassed alone. Returns the names by id."""
    names: list[str] = []
    for name, module, has_attention in blocks:
        module.block_id = len(names)
        names.append(name)
        if has_attention:
            module.attention_id = len(names)
            names.append(f"{name}.attn")
    return tuple(names)


def plan_fingerprint(names: Iterable[str]) -> str:
    """A short digest of a network's block names: a plan searched for one network carries it,
    and another network refuses the plan unless its digest matches."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


__all__ = ["BlockCache", "BlockPlan", "assign_block_ids", "cached_output", "check_plan", "is_bypassed",
           "plan_fingerprint", "store_output"]
