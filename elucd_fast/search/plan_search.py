"""The block-plan search: steps and a block plan per step (bypassed blocks, or a reused deep
feature) searched together under a budget of measured seconds per image, AutoDiffusion's second
stage with its progressive schedule (steps alone first, then the allowed pruning ramping up).

It is the step search (`step_search.StepSearch`) with another candidate space (`plan_space`):
the same fitness on fixed seeds, the same evolution, the same re-scoring on disjoint selection
seeds before a winner is declared, the same resumable `search.json` (the measured block costs are
recorded in it, so a resumed or multi-rank search uses the same budget), the same chart; the
winner's plans are written into `schedule.json`, which `generate --schedule` runs.

The budget is a fraction of what the `nfe`-evaluation schedule costs with every block run
(measured by `tools.block_costs` at the search's batch size): a candidate may spend it on more
steps with cheaper network calls, or on fewer full ones.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

from ..runs import dist
from ..schedules.families import family_steps
from ..tools.block_costs import BlockCosts, measure_block_costs
from .evolution import Generation, evolve, ranked
from .plan_space import MODES, PlanCandidate, PlanSpace, evaluations_per_step
from .step_search import (CHART_FILE, SCHEDULE_FILE, STAGE_SEARCH, STAGE_SELECTION, SearchSettings,
                          StepSearch, _model_hashes, _seed_text, analytic_families)
from .space import noise_level_grid, timestep_grid


@dataclass(frozen=True)
class PlanSettings:
    """What the block-plan part of a search does (recorded in search.json).

    mode: "prune" (bypass blocks) or "cache" (reuse a decoder feature, DeepCache).
    budget: seconds per image allowed, as a fraction of the nfe schedule's cost with every block.
    max_fraction: the allowed fraction's final value (prune: of the blocks per step; cache: of
        the steps that reuse).
    steps_generations: generations searching steps alone (AutoDiffusion: about 5 of 10) before
        the allowed fraction ramps linearly to `max_fraction` at the last generation.
    extra_steps: steps a candidate may have beyond the nfe schedule's.
    cost_batch, cost_repeats: batch size and repeats of the block-cost measurement.
    """

    mode: str = "prune"
    budget: float = 0.75
    max_fraction: float = 0.5
    steps_generations: int = 2
    extra_steps: int = 2
    cost_batch: int = 250
    cost_repeats: int = 5

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.budget <= 4:
            raise ValueError(f"budget: a fraction of the full network's cost in (0, 4], got {self.budget}")
        if not 0 <= self.max_fraction <= 1:
            raise ValueError(f"max fraction: must be in [0, 1], got {self.max_fraction}")
        for name in ("steps_generations", "extra_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.cost_batch < 1 or self.cost_repeats < 1:
            raise ValueError("cost batch and repeats: must be >= 1")


class PlanSearch(StepSearch):
    """A block-plan search of `job` (see the module docstring)."""

    def __init__(self, job, fitness, settings: SearchSettings, plan: PlanSettings, outdir, *, preset: str, **kw):
        if settings.guidance_axes:
            raise ValueError("block-plan search: searching guidance at the same time is not supported; drop "
                             "--search-guidance")
        if not callable(getattr(job.net, "block_names", None)):
            raise ValueError(f"block-plan search: the network ({type(job.net).__name__}) takes no block plans")
        super().__init__(job, fitness, settings, outdir, preset=preset, **kw)
        self.plan = plan
        self.config["plans"] = dataclasses.asdict(plan)
        self.costs: BlockCosts | None = None

    # -- candidates -> what runs --

    def settings_of(self, candidate: PlanCandidate):
        return self.job.settings.with_steps(self.space.steps(candidate))

    def _costs(self) -> BlockCosts:
        """The network's block costs: recorded in search.json, else measured on rank 0 and shared."""
        recorded = self.state.values.get("block_costs")
        if recorded is None:
            measured = None
            if dist.is_main():
                start = time.perf_counter()
                measured = measure_block_costs(self.job, batch_size=self.plan.cost_batch,
                                               repeats=self.plan.cost_repeats).json()
                self.log(f"block costs: {len(measured['skip_savings'])} blocks, "
                         f"{measured['seconds'] * 1e6:.1f} us per image per call at batch {self.plan.cost_batch} "
                         f"({time.perf_counter() - start:.1f} s)")
            recorded = dist.broadcast_from_main(measured)
            self.state.set("block_costs", recorded)
        return BlockCosts.from_json(recorded)

    def _build_plan_space(self) -> None:
        base, net = self.job.settings, self.job.net
        # The step search's grid, with every family at every step count a candidate may have.
        self.start_families = {count: analytic_families(base, count, net=net)
                               for count in range(2, self.num_steps + self.plan.extra_steps + 1)}
        if hasattr(base, "num_timesteps"):
            grid = timestep_grid(base.num_timesteps)
        else:
            top, bottom = family_steps(base, "rho", 2, net=net)
            grid = noise_level_grid(bottom, top, self.settings.grid_size,
                                    include=[s for f in self.start_families.values() for s in f.values()])
        total = lambda n: base.with_steps(grid[:n]).network_evaluations  # noqa: E731
        full = sum(evaluations_per_step(total, self.num_steps)) * self.costs.seconds
        self.space = PlanSpace(
            values=grid, min_steps=2, max_steps=self.num_steps + self.plan.extra_steps,
            mode=self.plan.mode, costs=self.costs, evaluations=lambda n: evaluations_per_step(total, n),
            budget=self.plan.budget * full, num_blocks=len(net.block_names()),
            cache_points=tuple(range(net.cache_points)), max_fraction=self.plan.max_fraction)
        self.full_cost = full

    def _fraction(self, generation: int) -> float:
        """AutoDiffusion's progressive schedule: 0 for the steps-only generations, then a linear
        ramp reaching `max_fraction` at the last generation."""
        first, last = self.plan.steps_generations, self.settings.evolution.generations
        if generation < first:
            return 0.0
        return self.plan.max_fraction * min(1.0, (generation - first + 1) / max(1, last - first + 1))

    # -- stages --

    def run(self) -> dict:
        start = time.perf_counter()
        self._open_state()
        self.costs = self._costs()
        self._build_plan_space()
        self.space.allowed_fraction = self._fraction(0)
        # Starting candidates: every analytic family at the nfe schedule's step count and below,
        # each cut to the budget (steps alone, in the first generations).
        rng = random.Random(self.settings.evolution.seed + 1)
        starts: dict[str, PlanCandidate] = {}
        for count in range(self.num_steps, 1, -1):
            for name, steps in self.start_families[count].items():
                fitted = self.space.fit(self.space.candidate(steps), rng)
                if fitted is not None and fitted not in starts.values():
                    starts[f"{name}-{len(fitted.steps)}"] = fitted
        self.log(f"block plans ({self.plan.mode}): budget {self.space.budget * 1e6:.1f} us per image "
                 f"({self.plan.budget:g} x the {self.settings.nfe}-evaluation schedule's "
                 f"{self.full_cost * 1e6:.1f} us with every block)")
        evolution = self.settings.evolution
        total = evolution.max_candidates + self.settings.rescore + len(starts) + 1
        with dist.progress_bar(total, desc=f"plan search nfe {self.settings.nfe}", enabled=self.progress) as self.bar:
            self.bar.unit = "cand"
            scores = evolve(self.space, lambda c: self._score(STAGE_SEARCH, c)["score"], list(starts.values()),
                            evolution, on_generation=self._on_generation)
            order = ranked(scores)
            best_plain = next((c for c in order if c.plain), None)
            finalists = list(dict.fromkeys([*order[:self.settings.rescore],
                                            *([best_plain] if best_plain else []), *starts.values()]))
            selection = {c: self._score(STAGE_SELECTION, c) for c in finalists}
        winner = min(finalists, key=lambda c: (selection[c]["score"], c))
        summary = self._plan_summary(scores, selection, starts, winner, best_plain, time.perf_counter() - start)
        self.state.set("summary", summary)
        if dist.is_main():
            self._write_plan_outputs(winner, selection[winner])
        return summary

    def _on_generation(self, generation: Generation) -> None:
        super()._on_generation(generation)
        self.space.allowed_fraction = self._fraction(generation.index + 1)

    def _evaluate(self, candidate: PlanCandidate, seeds) -> dict:
        cost = self.space.cost(candidate)
        record = {"steps": list(self.space.steps(candidate)),
                  "plans": [plan.to_json() for plan in self.space.plans(candidate)],
                  "seconds_per_image_estimate": cost, "budget_fraction": cost / self.full_cost}
        if cost > self.space.budget * (1 + 1e-9):  # never sampled: the moves keep to the budget
            return {**record, "score": float("inf"), "error": "over budget", "seconds": 0.0,
                    "network_evaluations": 0, "network_evaluations_total": 0}
        return {**record, **self.fitness(self.settings_of(candidate), seeds, self.space.plans(candidate))}

    def _plan_summary(self, scores, selection, starts, winner, best_plain, seconds) -> dict:
        records = self.state.records
        spent = sum(r["network_evaluations_total"] for stage in records.values() for r in stage.values())
        names = {c: name for name, c in starts.items()}
        if best_plain is not None:
            names.setdefault(best_plain, "best steps alone")

        def entry(c):
            return {"candidate": c.key, "source": names.get(c, "search"), "steps": list(self.space.steps(c)),
                    "plans": [p.to_json() for p in self.space.plans(c)], "search_score": scores.get(c),
                    "selection": selection[c], "seconds_per_image_estimate": self.space.cost(c)}

        return {
            "preset": self.preset, "sampler": self.job.settings.name, "nfe": self.settings.nfe,
            "num_steps": self.num_steps, "metric": self.settings.metric, "mode": self.plan.mode,
            "budget_seconds_per_image": self.space.budget, "full_seconds_per_image": self.full_cost,
            "winner": {**entry(winner), "search": records[STAGE_SEARCH].get(winner.key)},
            "finalists": [entry(c) for c in selection],
            "families": {names[c]: entry(c) for c in selection if c in names},
            "candidates_scored": len(scores), "network_evaluations_total": spent,
            "seconds_recorded": sum(r["seconds"] for stage in records.values() for r in stage.values()),
            "seconds_this_run": seconds,
        }

    def _write_plan_outputs(self, winner: PlanCandidate, record: dict) -> None:
        from ..schedules.schedule_file import block_plans_json, schedule_from_settings, write_schedule
        from .report import write_search_chart

        model, classifier = _model_hashes(self.job.config)
        scoring = {"metric": self.settings.metric, "seeds": _seed_text(self.settings.selection_seeds),
                   "search_seeds": _seed_text(self.settings.search_seeds), "mode": self.plan.mode,
                   "seconds_per_image_estimate": self.space.cost(winner),
                   "full_seconds_per_image": self.full_cost}
        scores = {key: record[key] for key in ("score", "fd_digits", "class_accuracy", "frechet_inception_distance",
                                                "fd_dinov2") if key in record}
        schedule = schedule_from_settings(self.settings_of(winner), net=self.job.net, preset=self.preset,
                                          model_sha256=model, classifier_sha256=classifier, scoring=scoring,
                                          scores=scores)
        schedule = dataclasses.replace(schedule, block_plans=block_plans_json(self.job.net, self.space.plans(winner)))
        write_schedule(self.outdir / SCHEDULE_FILE, schedule)
        write_search_chart(self.state.json(), self.outdir / CHART_FILE)


__all__ = ["PlanSearch", "PlanSettings"]
