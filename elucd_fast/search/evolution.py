"""AutoDiffusion's evolutionary search (Li et al., ICCV 2023), with its defects fixed.

Each generation: the `parents` best candidates ever scored are the parents; `mutants` children are
mutations of random parents, `crossovers` children crossings of two distinct random parents, and
random candidates fill the generation up to `population`. A child already scored (the visited
cache, keyed on the sorted candidate, so a reordering is the same candidate) is redrawn, up to a
bounded number of tries. The first generation is the given starting candidates (the analytic
families and the trajectory DP's result), their mutants, and random ones.

The search is a pure function of its settings, its starting candidates and the scores it is
given: its random numbers come from one `random.Random(seed)`, and candidates are ranked by
(score, candidate), never by dictionary or set order. So a run replayed with the scores of an
interrupted one (the resumable state) takes exactly the same path, and so does every rank of a
distributed run.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..checks import check_int, check_number
from .space import Candidate, StepSpace

# Draws per child before a generation gives up on finding an unvisited one (a tiny space can be
# exhausted; the generation is then smaller).
MAX_DRAWS_PER_CHILD = 50


@dataclass(frozen=True)
class EvolutionSettings:
    """The evolutionary search's sizes (AutoDiffusion's: population 50, parents 10, 25 mutants,
    15 crossovers, mutation probability 0.25, 10 epochs; ours are smaller for CPU budgets)."""

    population: int = 16       # candidates per generation
    parents: int = 6           # the best ever scored, parents of the next generation
    mutants: int = 8           # mutated children per generation
    crossovers: int = 5        # crossed children per generation (the rest is random)
    mutation_probability: float = 0.25  # per step of a mutant
    generations: int = 6       # generations after the first
    seed: int = 0              # of the search's own random numbers

    def __post_init__(self):
        check_int("population", self.population, minimum=2)
        check_int("parents", self.parents, minimum=1, maximum=self.population)
        check_int("mutants", self.mutants, minimum=0)
        check_int("crossovers", self.crossovers, minimum=0)
        if self.mutants + self.crossovers > self.population:
            raise ValueError(f"mutants + crossovers ({self.mutants + self.crossovers}) exceed the population "
                             f"({self.population})")
        check_number("mutation_probability", self.mutation_probability, minimum=0, maximum=1)
        check_int("generations", self.generations, minimum=0)
        check_int("seed", self.seed, minimum=0)

    @property
    def max_candidates(self) -> int:
        """An upper bound on the candidates the search scores."""
        return self.population * (self.generations + 1)


@dataclass(frozen=True)
class Generation:
    """One generation's outcome: its new candidates (in scoring order) and the best ever so far."""

    index: int
    candidates: tuple[Candidate, ...]
    best: Candidate
    best_score: float


def ranked(scores: dict[Candidate, float]) -> list[Candidate]:
    """Candidates best first: by score (NaN last), ties by the candidate itself."""
    return sorted(scores, key=lambda c: (math.isnan(scores[c]), scores[c], c))


def evolve(space: StepSpace, score: Callable[[Candidate], float], start: Sequence[Candidate],
           settings: EvolutionSettings, *, on_generation: Callable[[Generation], None] | None = None
           ) -> dict[Candidate, float]:
    """Runs the search; `score(candidate)` -> fitness (lower is better; inf for a failed one) is
    called once per distinct candidate. Returns every scored candidate's fitness."""
    rng = random.Random(settings.seed)
    scores: dict[Candidate, float] = {}

    def run(index: int, children: list[Candidate]) -> None:
        for child in children:
            scores[child] = float(score(child))
        best = ranked(scores)[0]
        if on_generation is not None:
            on_generation(Generation(index, tuple(children), best, scores[best]))

    first: list[Candidate] = []
    for candidate in start:
        candidate = space.check(candidate)
        if candidate not in first:
            first.append(candidate)
    first = first[:settings.population]
    seen = set(first)
    # The rest of the first generation: half mutants of the starting candidates, half random.
    wanted = settings.population - len(first)
    mutants = wanted // 2 if first else 0
    first += _draw(lambda: space.mutate(rng.choice(first[:len(start)] or first), rng,
                                        settings.mutation_probability), mutants, seen)
    first += _draw(lambda: space.random(rng), settings.population - len(first), seen)
    run(0, first)

    for index in range(1, settings.generations + 1):
        parents = ranked(scores)[:settings.parents]
        seen = set(scores)
        children = _draw(lambda: space.mutate(rng.choice(parents), rng, settings.mutation_probability),
                         settings.mutants, seen)
        if len(parents) > 1:
            children += _draw(lambda: space.crossover(*rng.sample(parents, 2), rng), settings.crossovers, seen)
        children += _draw(lambda: space.random(rng), settings.population - len(children), seen)
        run(index, children)
    return scores


def _draw(make: Callable[[], Candidate], count: int, seen: set[Candidate]) -> list[Candidate]:
    """Up to `count` new candidates from `make`, none in `seen` (which they join)."""
    out: list[Candidate] = []
    for _ in range(count * MAX_DRAWS_PER_CHILD):
        if len(out) == count:
            break
        candidate = make()
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
    return out


__all__ = ["EvolutionSettings", "Generation", "evolve", "ranked"]
