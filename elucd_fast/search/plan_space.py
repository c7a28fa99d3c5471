"""The candidate space of the block-plan search: step sequences with a block plan per step, under
a budget of measured seconds per image (AutoDiffusion's second stage, its defects fixed).

A candidate holds N sorted distinct grid steps (N may vary between `min_steps` and `max_steps`:
a step can be bought with bypassed blocks) and, per step, either

- `prune` mode: the set of bypassed block ids, kept *by step*: a skip set belongs to the step it
  was found for and leaves with it (AutoDiffusion indexed skip sets by the rank of the sorted
  step, so a step mutation silently moved every later skip set onto another step);
- `cache` mode: whether the step reuses the run's cache point `cache_point` (DeepCache) instead
  of running the deep path; every full step stores it. The first step never reuses.

Every move (random, mutate, crossover) returns a candidate within the budget: if its measured
cost (`tools.block_costs.BlockCosts`, summed over the sampler's network evaluations per step) is
over, it is repaired by bypassing the block with the largest measured saving at a random step
(or reusing at one more step), within the allowed fraction, else by dropping a step. The allowed
fraction (of a network's blocks per step, or of the steps) is `allowed_fraction`, which the search
raises generation by generation (AutoDiffusion's progressive schedule: steps alone first).
AutoDiffusion's mutation of skip sets never happened (`==` for `=`); here every step's plan is
redrawn with the mutation probability, and crossover compares lengths, not lists.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..models.block_plan import BlockPlan

MODES = ("prune", "cache")
# Tries before a move gives up finding a candidate within the budget.
MAX_REPAIRS = 200


@dataclass(frozen=True, order=True)
class PlanCandidate:
    """steps: sorted distinct grid indices, 0 the noisiest; skips[i]: sorted block ids bypassed at
    steps[i] (prune mode); reuse: the grid steps that reuse `cache_point` (cache mode; -1: none)."""

    steps: tuple[int, ...]
    skips: tuple[tuple[int, ...], ...]
    reuse: tuple[int, ...] = ()
    cache_point: int = -1

    @property
    def key(self) -> str:
        """A stable text key: "0,17,80|1,4;;3|17|2" (steps | skip sets | reuse steps | cache point)."""
        return "|".join((",".join(map(str, self.steps)), ";".join(",".join(map(str, s)) for s in self.skips),
                         ",".join(map(str, self.reuse)), str(self.cache_point)))

    @property
    def plain(self) -> bool:
        """No block bypassed or reused: the step schedule alone."""
        return not any(self.skips) and not self.reuse

    def skip_map(self) -> dict[int, frozenset[int]]:
        return {step: frozenset(blocks) for step, blocks in zip(self.steps, self.skips)}


def evaluations_per_step(total: Callable[[int], int], num_steps: int) -> tuple[int, ...]:
    """Network evaluations of each of `num_steps` steps, from `total(n)` (the settings' count for
    n steps): N for one-call steps, 2N - 1 for Heun (the last step has no correction)."""
    count = total(num_steps)
    if count == num_steps:
        return (1,) * num_steps
    if count == 2 * num_steps - 1:
        return (2,) * (num_steps - 1) + (1,)
    raise ValueError(f"block plans: {num_steps} steps cost {count} network evaluations, neither N nor 2N - 1")


@dataclass
class PlanSpace:
    """Candidates on the grid `values` (descending noise) with `min_steps`..`max_steps` steps.

    costs: the network's measured `BlockCosts`; evaluations(n): network evaluations per step of
    an n-step schedule; budget: seconds per image; max_fraction: the allowed fraction's final
    value; allowed_fraction: its current value (the search raises it); cache_points: the ones
    cache mode may use.
    """

    values: tuple
    min_steps: int
    max_steps: int
    mode: str
    costs: object
    evaluations: Callable[[int], tuple[int, ...]]
    budget: float
    num_blocks: int
    cache_points: tuple[int, ...] = ()
    max_fraction: float = 0.5
    allowed_fraction: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"block-plan search: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.min_steps <= self.max_steps <= len(self.values):
            raise ValueError(f"block-plan search: steps {self.min_steps}..{self.max_steps} on a grid of "
                             f"{len(self.values)}")
        if self.mode == "cache" and not self.cache_points:
            raise ValueError("block-plan search: the network has no cache points to reuse")

    # -- what a candidate is --

    def steps(self, candidate: PlanCandidate) -> tuple:
        return tuple(self.values[i] for i in candidate.steps)

    def plans(self, candidate: PlanCandidate) -> tuple[BlockPlan, ...]:
        """The block plan of each step: its skip set; in cache mode, full steps store the cache
        point (when a later step reuses it) and reuse steps read it."""
        reuse = set(candidate.reuse)
        later_reuse = [any(s in reuse for s in candidate.steps[i + 1:]) for i in range(len(candidate.steps))]
        plans = []
        for i, (step, skips) in enumerate(zip(candidate.steps, candidate.skips)):
            if step in reuse:
                plans.append(BlockPlan(frozenset(skips), reuse=candidate.cache_point))
            elif later_reuse[i]:
                plans.append(BlockPlan(frozenset(skips), store=candidate.cache_point))
            else:
                plans.append(BlockPlan(frozenset(skips)))
        return tuple(plans)

    def cost(self, candidate: PlanCandidate) -> float:
        """Measured seconds per image of the candidate's network calls (the sampler's own
        arithmetic, the same for every candidate of one step count, is left out)."""
        calls = self.evaluations(len(candidate.steps))
        return sum(n * self.costs.call_seconds(plan) for n, plan in zip(calls, self.plans(candidate)))

    def candidate(self, steps: Sequence) -> PlanCandidate:
        """The plain candidate of a step sequence on the grid."""
        index = {v: i for i, v in enumerate(self.values)}
        missing = [s for s in steps if s not in index]
        if missing:
            raise ValueError(f"steps {missing} are not on the search grid")
        chosen = tuple(sorted({index[s] for s in steps}))
        return PlanCandidate(chosen, ((),) * len(chosen))

    def check(self, candidate: PlanCandidate) -> PlanCandidate:
        """`candidate` if valid here; ValueError otherwise."""
        steps = candidate.steps
        ok = (self.min_steps <= len(steps) <= self.max_steps and len(candidate.skips) == len(steps)
              and all(0 <= i < len(self.values) for i in steps) and all(a < b for a, b in zip(steps, steps[1:]))
              and all(0 <= b < self.num_blocks for s in candidate.skips for b in s)
              and set(candidate.reuse) <= set(steps[1:]))
        if not ok or (candidate.reuse and candidate.cache_point not in self.cache_points):
            raise ValueError(f"candidate {candidate.key}: not a candidate of this space")
        return candidate

    # -- the moves --

    def _cap(self) -> int:
        """Bypassed blocks allowed per step (prune), or reusing steps per candidate (cache) for N steps."""
        return math.floor(self.allowed_fraction * self.num_blocks + 1e-9)

    def _reuse_cap(self, num_steps: int) -> int:
        return min(num_steps - 1, math.floor(self.allowed_fraction * num_steps + 1e-9))

    def _make(self, skips: dict[int, set[int]], reuse: set[int], point: int) -> PlanCandidate:
        steps = tuple(sorted(skips))
        reuse = {s for s in reuse if s in skips and s != steps[0]}
        return PlanCandidate(steps, tuple(tuple(sorted(skips[s])) for s in steps), tuple(sorted(reuse)),
                             point if reuse else -1)

    def fit(self, candidate: PlanCandidate, rng: random.Random) -> PlanCandidate | None:
        """`candidate` within the budget and the allowed fraction (see the module docstring), or
        None if it cannot be made to fit."""
        skips = {s: set(b) for s, b in candidate.skip_map().items()}
        reuse, point = set(candidate.reuse), candidate.cache_point
        if point == -1 and self.cache_points:
            point = rng.choice(self.cache_points)
        cap = self._cap()
        for s in skips:  # the allowed fraction may be lower than when the candidate was made
            while len(skips[s]) > cap:
                skips[s].discard(rng.choice(sorted(skips[s])))
        for _ in range(MAX_REPAIRS):
            reuse &= set(sorted(skips)[1:])
            for s in sorted(reuse)[self._reuse_cap(len(skips)):]:  # the cap shrinks with the steps
                reuse.discard(s)
            current = self._make(skips, reuse, point)
            if len(current.steps) <= self.max_steps and self.cost(current) <= self.budget:
                return current
            steps = current.steps
            if self.mode == "prune":
                open_steps = [s for s in steps if len(skips[s]) < cap]
                if open_steps and len(steps) <= self.max_steps:
                    step = rng.choice(open_steps)
                    savings = self.costs.skip_savings
                    best = sorted((b for b in range(self.num_blocks) if b not in skips[step]),
                                  key=lambda b: (-savings[b], b))[:3]
                    skips[step].add(rng.choice(best))
                    continue
            else:
                free = [s for s in steps[1:] if s not in reuse]
                if free and len(reuse) < self._reuse_cap(len(steps)) and len(steps) <= self.max_steps:
                    reuse.add(rng.choice(free))
                    continue
            if len(steps) <= self.min_steps:
                return None
            drop = rng.choice(steps)
            skips.pop(drop)
            reuse.discard(drop)
        return None

    def _fitted(self, make: Callable[[], PlanCandidate], rng: random.Random) -> PlanCandidate:
        for _ in range(MAX_REPAIRS):
            candidate = self.fit(make(), rng)
            if candidate is not None:
                return candidate
        raise ValueError(f"block-plan search: no candidate fits the budget of {self.budget * 1e6:.1f} us per image; "
                         f"raise --budget")

    def random(self, rng: random.Random) -> PlanCandidate:
        """A random step count and steps; random plans within the allowed fraction."""
        def make():
            n = rng.randint(self.min_steps, self.max_steps)
            steps = rng.sample(range(len(self.values)), n)
            cap = self._cap()
            skips = {s: set(rng.sample(range(self.num_blocks), rng.randint(0, cap))) if self.mode == "prune"
                     else set() for s in steps}
            ordered = sorted(steps)
            reuse = set(rng.sample(ordered[1:], rng.randint(0, self._reuse_cap(n)))) if self.mode == "cache" else set()
            return self._make(skips, reuse, rng.choice(self.cache_points) if self.cache_points else -1)
        return self._fitted(make, rng)

    def mutate(self, candidate: PlanCandidate, rng: random.Random, probability: float) -> PlanCandidate:
        """Each step redrawn from the unused grid steps with `probability` (its plan leaves with
        it), one step added or removed with `probability`, and each step's plan changed with
        `probability` (a block bypassed or restored; a reuse toggled), the cache point too."""
        def make():
            skips = {s: set(b) for s, b in candidate.skip_map().items()}
            reuse, point = set(candidate.reuse), candidate.cache_point
            for step in list(skips):
                if rng.random() < probability:
                    unused = [v for v in range(len(self.values)) if v not in skips]
                    if unused:
                        skips.pop(step)
                        reuse.discard(step)
                        skips[rng.choice(unused)] = set()
            if rng.random() < probability:
                if len(skips) < self.max_steps and (len(skips) <= self.min_steps or rng.random() < 0.5):
                    unused = [v for v in range(len(self.values)) if v not in skips]
                    skips[rng.choice(unused)] = set()
                elif len(skips) > self.min_steps:
                    drop = rng.choice(sorted(skips))
                    skips.pop(drop)
                    reuse.discard(drop)
            cap = self._cap()
            for step in sorted(skips):
                if self.mode == "prune" and rng.random() < probability and cap:
                    if skips[step] and (len(skips[step]) >= cap or rng.random() < 0.5):
                        skips[step].discard(rng.choice(sorted(skips[step])))
                    else:
                        skips[step].add(rng.choice([b for b in range(self.num_blocks) if b not in skips[step]]))
                if self.mode == "cache" and rng.random() < probability:
                    reuse ^= {step}
            if self.mode == "cache" and rng.random() < probability and len(self.cache_points) > 1:
                point = rng.choice([p for p in self.cache_points if p != point] or [point])
            return self._make(skips, reuse, point if point != -1 else rng.choice(self.cache_points or (-1,)))
        return self._fitted(make, rng)

    def crossover(self, first: PlanCandidate, second: PlanCandidate, rng: random.Random) -> PlanCandidate:
        """The child's step count is one parent's (compared as counts); its steps are drawn from
        the parents' steps (common ones first); each step's plan comes from a parent holding that
        step; the cache point from either parent."""
        def make():
            n = len(first.steps) if rng.random() < 0.5 else len(second.steps)
            a, b = first.skip_map(), second.skip_map()
            common = sorted(set(a) & set(b))
            either = sorted(set(a) ^ set(b))
            rng.shuffle(common)
            rng.shuffle(either)
            chosen = (common + either)[:n]
            skips, reuse = {}, set()
            for step in chosen:
                owners = [p for p in (first, second) if step in p.steps]
                owner = rng.choice(owners)
                skips[step] = set(owner.skip_map()[step])
                if step in owner.reuse:
                    reuse.add(step)
            point = rng.choice([first.cache_point, second.cache_point])
            return self._make(skips, reuse, point if point != -1 else rng.choice(self.cache_points or (-1,)))
        return self._fitted(make, rng)


__all__ = ["MODES", "PlanCandidate", "PlanSpace", "evaluations_per_step"]
