"""The candidate space of the step search: which step sequences (and, optionally, which guidance
settings) a candidate may be, and the moves of the evolutionary search within it.

A candidate's steps are N distinct positions on a fixed grid of allowed steps, ordered from the
noisiest: `values[0]` is the highest noise level (EDM: the largest sigma; an ADM chain: t = T - 1).
Kept as a sorted tuple of grid indices, a candidate is its own canonical form: the same set of
steps in another order, or a repeated step, cannot arise (AutoDiffusion's crossover could produce
both, silently running fewer steps or re-scoring a reordering). The grid is the whole chain for
ADM samplers (every timestep of 0..T-1, as AutoDiffusion searches) and, for EDM's continuous noise
levels, log-uniform levels between the network's sigma_min and sigma_max plus every level of the
schedules the search starts from (so the analytic families are candidates exactly).

Joint guidance search adds genes: one index per `GuidanceAxis` into that axis' allowed values.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..checks import check_int, check_number


@dataclass(frozen=True, order=True)
class Candidate:
    """Steps: sorted distinct grid indices (N,), index 0 the noisiest; guidance: one value index
    per guidance axis (empty when guidance is not searched)."""

    steps: tuple[int, ...]
    guidance: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """A stable text key, e.g. "0,17,80|2" (the visited cache's and the state file's)."""
        text = ",".join(map(str, self.steps))
        return text + ("|" + ",".join(map(str, self.guidance)) if self.guidance else "")


@dataclass(frozen=True)
class GuidanceAxis:
    """A guidance setting searched with the steps: a settings field and its allowed values."""

    field: str
    values: tuple[float, ...]

    def __post_init__(self):
        if not self.values:
            raise ValueError(f"guidance axis {self.field}: needs at least one value")
        for value in self.values:
            check_number(self.field, value)


@dataclass(frozen=True)
class StepSpace:
    """N-step candidates on the grid `values` (descending noise: floats for noise levels, ints
    for ADM timesteps), with optional guidance axes."""

    values: tuple
    num_steps: int
    guidance_axes: tuple[GuidanceAxis, ...] = ()

    def __post_init__(self):
        check_int("num_steps", self.num_steps, minimum=1)
        if len(set(self.values)) != len(self.values):
            raise ValueError("step grid: values must be distinct")
        if len(self.values) < self.num_steps:
            raise ValueError(f"step grid: {len(self.values)} allowed steps cannot make {self.num_steps} distinct ones")

    @property
    def size(self) -> int:
        return len(self.values)

    def steps(self, candidate: Candidate) -> tuple:
        """The step sequence of a candidate, noisiest first."""
        return tuple(self.values[i] for i in candidate.steps)

    def guidance(self, candidate: Candidate) -> dict[str, float]:
        """The guidance settings of a candidate (empty without guidance axes)."""
        return {axis.field: axis.values[i] for axis, i in zip(self.guidance_axes, candidate.guidance)}

    def candidate(self, steps: Sequence, guidance: dict[str, float] | None = None) -> Candidate:
        """The candidate of a step sequence made of grid values (any order) and, with guidance
        axes, of guidance values on them (default: each axis' first value)."""
        index = {v: i for i, v in enumerate(self.values)}
        missing = [s for s in steps if s not in index]
        if missing:
            raise ValueError(f"steps {missing} are not on the search grid")
        chosen = tuple(sorted({index[s] for s in steps}))
        if len(chosen) != self.num_steps:
            raise ValueError(f"expected {self.num_steps} distinct steps, got {len(chosen)}")
        genes = []
        for axis in self.guidance_axes:
            value = (guidance or {}).get(axis.field, axis.values[0])
            if value not in axis.values:
                raise ValueError(f"{axis.field}={value} is not among the searched values {axis.values}")
            genes.append(axis.values.index(value))
        return self.check(Candidate(chosen, tuple(genes)))

    def check(self, candidate: Candidate) -> Candidate:
        """`candidate`, if it is valid in this space: N sorted distinct indices on the grid and
        one gene per guidance axis; ValueError otherwise."""
        steps = candidate.steps
        if len(steps) != self.num_steps or any(not 0 <= i < self.size for i in steps) \
                or any(a >= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"candidate {candidate.key}: expected {self.num_steps} sorted distinct indices in "
                             f"[0, {self.size})")
        if len(candidate.guidance) != len(self.guidance_axes) or any(
                not 0 <= g < len(axis.values) for g, axis in zip(candidate.guidance, self.guidance_axes)):
            raise ValueError(f"candidate {candidate.key}: one guidance index per axis expected")
        return candidate

    # -- the evolutionary moves (each returns a valid candidate) --

    def random(self, rng: random.Random) -> Candidate:
        """N distinct steps drawn uniformly; guidance genes uniform."""
        steps = tuple(sorted(rng.sample(range(self.size), self.num_steps)))
        return Candidate(steps, tuple(rng.randrange(len(axis.values)) for axis in self.guidance_axes))

    def mutate(self, candidate: Candidate, rng: random.Random, probability: float) -> Candidate:
        """Each step redrawn with `probability` from the grid steps the candidate does not hold
        (AutoDiffusion's mutation), each guidance gene redrawn with `probability` to another value."""
        steps = set(candidate.steps)
        for i in candidate.steps:
            if rng.random() < probability:
                unused = [v for v in range(self.size) if v not in steps]
                if unused:
                    steps.discard(i)
                    steps.add(rng.choice(unused))
        genes = list(candidate.guidance)
        for k, axis in enumerate(self.guidance_axes):
            if len(axis.values) > 1 and rng.random() < probability:
                genes[k] = rng.choice([g for g in range(len(axis.values)) if g != genes[k]])
        return Candidate(tuple(sorted(steps)), tuple(genes))

    def crossover(self, first: Candidate, second: Candidate, rng: random.Random) -> Candidate:
        """Each position k of the sorted steps from one parent or the other, chosen at random;
        where the choice is already in the child, the other parent's step at k, and where both
        are, a step neither parent holds at random: always N distinct steps. Guidance genes each
        from one parent."""
        child: set[int] = set()
        for a, b in zip(first.steps, second.steps):
            pick, other = (a, b) if rng.random() < 0.5 else (b, a)
            if pick not in child:
                child.add(pick)
            elif other not in child:
                child.add(other)
            else:
                child.add(rng.choice([v for v in range(self.size) if v not in child]))
        genes = tuple(g if rng.random() < 0.5 else h for g, h in zip(first.guidance, second.guidance))
        return Candidate(tuple(sorted(child)), genes)


def log_uniform_levels(count: int, sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """`count` noise levels evenly spaced in log sigma, descending from sigma_max to sigma_min
    (the ends exact)."""
    check_int("grid size", count, minimum=2)
    step = (math.log(sigma_min) - math.log(sigma_max)) / (count - 1)
    inner = tuple(math.exp(math.log(sigma_max) + k * step) for k in range(1, count - 1))
    return (float(sigma_max), *inner, float(sigma_min))


def noise_level_grid(sigma_min: float, sigma_max: float, count: int, include: Sequence[Sequence[float]] = ()
                     ) -> tuple[float, ...]:
    """The search grid of a noise-level sampler: `log_uniform_levels` plus every level of the
    sequences in `include` (the families' own ends may differ from sigma_min, sigma_max in the
    last bit), descending, distinct."""
    levels = set(log_uniform_levels(count, sigma_min, sigma_max))
    levels.update(float(s) for sequence in include for s in sequence)
    return tuple(sorted(levels, reverse=True))


def timestep_grid(num_timesteps: int) -> tuple[int, ...]:
    """The search grid of an ADM chain: every timestep, T - 1 first."""
    return tuple(range(num_timesteps - 1, -1, -1))



# Multiples of the preset's own strength tried by the joint guidance search, and absolute values of
# the sine-added fraction (add_factor, gamma_factor).
STRENGTH_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
ADD_FACTORS = (0.0, 0.3, 0.6)


def default_guidance_axes(settings, *, classifier_guided: bool) -> tuple[GuidanceAxis, ...]:
    """The guidance settings searched jointly with the steps: with classifier guidance, EluCD's
    wmax and add factor (EDM, EDM2) or the classifier scale and gamma (ADM ancestral); EDM2's
    guide weight where a guide network is used. Each axis holds the settings' own value."""
    def axis(name: str, values) -> GuidanceAxis:
        own = getattr(settings, name)
        return GuidanceAxis(name, tuple(sorted({float(own), *(float(v) for v in values)})))

    axes = []
    if classifier_guided and hasattr(settings, "max_guidance"):
        axes += [axis("max_guidance", (settings.max_guidance * f for f in STRENGTH_FACTORS)),
                 axis("add_factor", ADD_FACTORS)]
    elif classifier_guided and hasattr(settings, "classifier_scale"):
        axes.append(axis("classifier_scale", (settings.classifier_scale * f for f in STRENGTH_FACTORS)))
        if not settings.use_ddim:
            axes.append(axis("gamma_factor", ADD_FACTORS))
    if getattr(settings, "guide_weight", 1.0) != 1.0:
        axes.append(axis("guide_weight", (1 + (settings.guide_weight - 1) * f for f in STRENGTH_FACTORS)))
    if not axes:
        raise ValueError("guidance search: this preset has no guidance settings to search (it is unguided)")
    return tuple(axes)


__all__ = ["Candidate", "GuidanceAxis", "StepSpace", "default_guidance_axes", "log_uniform_levels", "noise_level_grid",
           "timestep_grid"]
