"""The step search, end to end: for a job (a preset and its flags) and a number of network
evaluations, find the step sequence (and optionally the guidance settings) that minimises a
metric, as AutoDiffusion does, on fixed seeds, resumably.

1. The candidate space (`space.py`): N steps, N the count the sampler turns into the requested
   evaluations (Heun: 2N - 1; multistep solvers and ADM chains: N).
2. Stage 1 (`trajectory_dp.py`): the trajectory-matching DP's N steps on a pilot.
3. Stage 2 (`evolution.py`): the evolutionary search from the analytic families, the DP's result,
   their mutants and random candidates, scored on the search seeds (`fitness.py`).
4. Selection: the best candidates, the DP's and every family's re-scored on disjoint selection
   seeds; the best there is declared (a winner by luck on the search seeds does not survive it).

Every scored candidate is recorded in `search.json` at once (`state.py`); the winner is written
as a schedule file, `schedule.json`, and the course of the search drawn in `search.png`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..runs import dist
from ..samplers import SamplerSettings
from ..schedules.families import STEP_FAMILIES, family_steps
from .evolution import EvolutionSettings, Generation, evolve, ranked
from .fitness import Fitness
from .space import Candidate, GuidanceAxis, StepSpace, noise_level_grid, timestep_grid
from .state import SearchState
from .trajectory_dp import best_path, teacher_costs

STAGE_SEARCH, STAGE_SELECTION = "search", "selection"
SEARCH_FILE, SCHEDULE_FILE, CHART_FILE = "search.json", "schedule.json", "search.png"


@dataclass(frozen=True)
class SearchSettings:
    """What a step search does (every field is recorded in search.json, and a resumed search
    must match it).

    nfe: network evaluations per image of the searched schedule.
    metric: the fitness's name (`fitness.METRICS`).
    search_seeds: the fixed seeds every candidate is scored on.
    selection_seeds: disjoint seeds the best candidates are re-scored on before one is declared.
    rescore: how many of the best search candidates are re-scored (beside the DP and families).
    pilot_seeds: the DP's pilot (only their noise is used; no data).
    dp_steps: the DP teacher's step count G (0: no DP).
    grid_size: log-uniform noise levels of a noise-level sampler's search grid (ADM chains search
        every timestep).
    evolution: the evolutionary search's sizes and random seed.
    guidance_axes: guidance settings searched with the steps (empty: the job's own).
    """

    nfe: int
    metric: str = "fd_acc"
    search_seeds: tuple[int, ...] = tuple(range(0, 500))
    selection_seeds: tuple[int, ...] = tuple(range(20000, 22000))
    rescore: int = 3
    pilot_seeds: tuple[int, ...] = tuple(range(50000, 50128))
    dp_steps: int = 40
    grid_size: int = 200
    evolution: EvolutionSettings = field(default_factory=EvolutionSettings)
    guidance_axes: tuple[GuidanceAxis, ...] = ()

    def __post_init__(self):
        overlap = set(self.search_seeds) & set(self.selection_seeds)
        if overlap:
            raise ValueError(f"selection seeds: must be disjoint from the search seeds; both hold {len(overlap)} "
                             f"(e.g. {min(overlap)})")

    def json(self) -> dict:
        return {"nfe": self.nfe, "metric": self.metric, "search_seeds": _seed_text(self.search_seeds),
                "selection_seeds": _seed_text(self.selection_seeds), "rescore": self.rescore,
                "pilot_seeds": _seed_text(self.pilot_seeds), "dp_steps": self.dp_steps, "grid_size": self.grid_size,
                "evolution": dataclasses.asdict(self.evolution),
                "guidance_axes": {axis.field: list(axis.values) for axis in self.guidance_axes}}


def steps_for_evaluations(settings: SamplerSettings, nfe: int, *, net=None) -> int:
    """The step count N with which `settings` make exactly `nfe` network evaluations per image;
    ValueError naming the counts they can make otherwise."""
    possible = []
    for n in range(1, max(nfe, 1) * 2 + 2):
        try:
            count = settings.with_steps(family_steps(settings, "rho", n, net=net)).network_evaluations
        except ValueError:
            continue
        if count == nfe:
            return n
        possible.append(count)
    solver = getattr(settings, "solver", None)
    raise ValueError(f"nfe: the {settings.name} sampler{f' ({solver})' if solver else ''} cannot make exactly {nfe} "
                     f"network evaluations; it makes {', '.join(map(str, sorted(set(possible))[:12]))}, ...")


def analytic_families(settings: SamplerSettings, num_steps: int, *, net=None) -> dict[str, tuple]:
    """name -> the N-step sequence of each analytic family the sampler takes (EDM rho 7,
    logSNR; for ADM chains also even, DDIM leading and trailing); a family that cannot make N
    steps is left out."""
    out = {}
    for name, family in STEP_FAMILIES.items():
        if family.sigmas is None and not hasattr(settings, "num_timesteps"):
            continue
        params = {"rho": 7.0} if "rho" in family.params else {}
        try:
            out[f"{name}{'7' if params else ''}"] = tuple(family_steps(settings, name, num_steps, net=net, **params))
        except ValueError:
            continue
    return out


class StepSearch:
    """One search of `job` (sampled through `fitness`), recorded under `outdir`.

    `log` receives one line per stage and generation (rank 0 prints); `progress` shows a bar.
    """

    def __init__(self, job, fitness: Fitness, settings: SearchSettings, outdir: str | Path, *, preset: str,
                 log: Callable[[str], None] = dist.print_main, progress: bool = True):
        self.job, self.fitness, self.settings, self.preset = job, fitness, settings, preset
        self.outdir, self.log, self.progress = Path(outdir), log, progress
        base = job.settings
        self.num_steps = steps_for_evaluations(base, settings.nfe, net=job.net)
        self.families = analytic_families(base, self.num_steps, net=job.net)
        self.config = {"preset": preset, "job": job.config, "search": settings.json(), "num_steps": self.num_steps}
        self.state: SearchState | None = None
        self.space: StepSpace | None = None
        self.bar = None
        self.search_evaluations = 0  # spent on the search seeds up to the evolution's current point

    # -- candidates <-> settings --

    def settings_of(self, candidate: Candidate) -> SamplerSettings:
        guidance = self.space.guidance(candidate)
        base = self.job.settings.with_changes(**guidance) if guidance else self.job.settings
        return base.with_steps(self.space.steps(candidate))

    def _build_space(self, dp_steps: tuple | None) -> None:
        base = self.job.settings
        axes = self.settings.guidance_axes
        if hasattr(base, "num_timesteps"):
            grid = timestep_grid(base.num_timesteps)
        else:
            top, bottom = family_steps(base, "rho", 2, net=self.job.net)
            grid = noise_level_grid(bottom, top, self.settings.grid_size,
                                    include=[*self.families.values(), *([dp_steps] if dp_steps else [])])
        self.space = StepSpace(grid, self.num_steps, axes)

    def _own_guidance(self) -> dict:
        return {axis.field: getattr(self.job.settings, axis.field) for axis in self.settings.guidance_axes}

    # -- stages --

    def _open_state(self) -> None:
        """search.json: a fresh one, or the recorded results of a search with this config."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.state = SearchState(self.outdir / SEARCH_FILE, self.config)
        if self.state.resumed:
            self.log(f"{self.outdir / SEARCH_FILE}: resuming, {self.state.resumed} result(s) recorded")

    def run(self) -> dict:
        """Runs (or resumes) the search; returns the summary written into search.json."""
        start = time.perf_counter()
        self._open_state()
        dp_steps = self._dp()
        self._build_space(dp_steps)
        starts = {name: self.space.candidate(steps, self._own_guidance()) for name, steps in self.families.items()}
        if dp_steps:
            starts["dp"] = self.space.candidate(dp_steps, self._own_guidance())
        evolution = self.settings.evolution
        total = evolution.max_candidates + self.settings.rescore + len(starts)
        with dist.progress_bar(total, desc=f"search nfe {self.settings.nfe}", enabled=self.progress, unit="candidate",
                               per_rank=False) as self.bar:
            scores = evolve(self.space, lambda c: self._score(STAGE_SEARCH, c)["score"], list(starts.values()),
                            evolution, on_generation=self._on_generation)
            finalists = list(dict.fromkeys([*ranked(scores)[:self.settings.rescore], *starts.values()]))
            selection = {c: self._score(STAGE_SELECTION, c) for c in finalists}
        winner = min(finalists, key=lambda c: (selection[c]["score"], c))
        summary = self._summary(scores, selection, starts, winner, time.perf_counter() - start)
        self.state.set("summary", summary)
        if dist.is_main():
            self._write_outputs(winner, selection[winner], summary)
        return summary

    def _dp(self) -> tuple | None:
        """Stage 1: the DP's N steps (recorded, so a resumed search reuses them); None without DP."""
        if not self.settings.dp_steps:
            return None
        recorded = self.state.values.get("dp")
        if recorded is not None:
            return tuple(recorded["steps"])
        start = time.perf_counter()
        base = self.job.settings
        teacher = family_steps(base, "rho", self.settings.dp_steps, net=self.job.net, rho=7.0)
        cost = teacher_costs(self.job, tuple(teacher), list(self.settings.pilot_seeds))
        path = best_path(cost, self.num_steps)
        steps = tuple(teacher[i] for i in path[:-1])
        seconds = time.perf_counter() - start
        teacher_evaluations = base.with_steps(teacher).network_evaluations + len(teacher)
        self.state.set("dp", {"steps": list(steps), "path": list(path), "path_cost": float(
            sum(cost[a, b] for a, b in zip(path, path[1:]))), "teacher_steps": list(teacher), "seconds": seconds,
            "network_evaluations_total": teacher_evaluations * len(self.settings.pilot_seeds)})
        self.log(f"trajectory DP: {self.num_steps} steps {_steps_text(steps)} from a {len(teacher)}-step teacher on "
                 f"{len(self.settings.pilot_seeds)} pilot seeds in {seconds:.1f} s")
        return tuple(self.state.values["dp"]["steps"])

    def _score(self, stage: str, candidate: Candidate) -> dict:
        record = self.state.lookup(stage, candidate.key)
        if record is None:
            seeds = self.settings.search_seeds if stage == STAGE_SEARCH else self.settings.selection_seeds
            record = self._evaluate(candidate, seeds)
            self.state.record(stage, candidate.key, record)
        if stage == STAGE_SEARCH:
            self.search_evaluations += record["network_evaluations_total"]
        if self.bar is not None:
            self.bar.update(1)
        return record

    def _evaluate(self, candidate: Candidate, seeds: Sequence[int]) -> dict:
        """A new candidate's record: what it runs and its fitness on `seeds`."""
        return {"steps": list(self.space.steps(candidate)), "guidance": self.space.guidance(candidate),
                **self.fitness(self.settings_of(candidate), seeds)}

    def _on_generation(self, generation: Generation) -> None:
        records = self.state.records.get(STAGE_SEARCH, {})
        spent = self.search_evaluations
        best = records[generation.best.key]
        extras = "".join(f", {key} {best[key]:.3f}" for key in ("fd_digits", "class_accuracy") if key in best)
        message = (f"generation {generation.index}/{self.settings.evolution.generations}: "
                   f"{len(generation.candidates)} new, best {generation.best_score:.3f}{extras} "
                   f"{_steps_text(self.space.steps(generation.best))}; {spent:,} network evaluations so far")
        if self.bar is not None and self.progress and dist.is_main():
            self.bar.write(message)  # above the bar, which stays at the bottom
        else:
            self.log(message)
        history = self.state.values.get("generations", [])[:generation.index]
        scored = [records[c.key]["score"] for c in generation.candidates]
        finite = sorted(s for s in scored if s == s and s != float("inf"))
        history.append({"index": generation.index, "new": len(generation.candidates), "best": generation.best_score,
                        "best_candidate": generation.best.key,
                        "median_new": finite[len(finite) // 2] if finite else None})
        self.state.set("generations", history)

    def _summary(self, scores: dict, selection: dict, starts: dict, winner: Candidate, seconds: float) -> dict:
        records = self.state.records
        spent = sum(r["network_evaluations_total"] for stage in records.values() for r in stage.values())
        spent += (self.state.values.get("dp") or {}).get("network_evaluations_total", 0)
        recorded_seconds = sum(r["seconds"] for stage in records.values() for r in stage.values())
        recorded_seconds += (self.state.values.get("dp") or {}).get("seconds", 0.0)
        names = {c: name for name, c in starts.items()}
        return {
            "preset": self.preset, "sampler": self.job.settings.name, "nfe": self.settings.nfe,
            "num_steps": self.num_steps, "metric": self.settings.metric,
            "winner": {"candidate": winner.key, "source": names.get(winner, "search"),
                       "steps": list(self.space.steps(winner)), "guidance": self.space.guidance(winner),
                       "selection": selection[winner], "search": records[STAGE_SEARCH][winner.key]},
            "finalists": [{"candidate": c.key, "source": names.get(c, "search"), "steps": list(self.space.steps(c)),
                           "search_score": scores[c], "selection_score": selection[c]["score"]} for c in selection],
            "families": {name: {"steps": list(self.space.steps(c)), "search_score": scores[c],
                                "selection": selection[c]} for name, c in starts.items()},
            "candidates_scored": len(scores), "network_evaluations_total": spent,
            "seconds_recorded": recorded_seconds, "seconds_this_run": seconds,
        }

    def _write_outputs(self, winner: Candidate, record: dict, summary: dict) -> None:
        from ..schedules.schedule_file import schedule_from_settings, write_schedule
        from .report import write_search_chart

        model, classifier = _model_hashes(self.job.config)
        scoring = {"metric": self.settings.metric, "seeds": _seed_text(self.settings.selection_seeds),
                   "search_seeds": _seed_text(self.settings.search_seeds)}
        scores = {key: record[key] for key in ("score", "fd_digits", "class_accuracy", "frechet_inception_distance",
                                                "fd_dinov2") if key in record}
        schedule = schedule_from_settings(self.settings_of(winner), net=self.job.net,
                                          guidance_keys=tuple(a.field for a in self.settings.guidance_axes),
                                          preset=self.preset, model_sha256=model, classifier_sha256=classifier,
                                          scoring=scoring, scores=scores)
        write_schedule(self.outdir / SCHEDULE_FILE, schedule)
        write_search_chart(self.state.json(), self.outdir / CHART_FILE)


def _model_hashes(config: dict) -> tuple[str | None, str | None]:
    """(model sha256, classifier sha256) as a job's config records them (digits or paper presets)."""
    weights = config.get("weights_sha256") or {}
    model = weights.get("denoiser") or weights.get("edm2_denoiser") or config.get("network_sha256")
    classifier = weights.get("classifier") or config.get("classifier_sha256")
    return model, classifier


def _seed_text(seeds: Sequence[int]) -> str:
    """Seeds as ranges: "0-999,20000-20499"."""
    parts, run = [], []
    for seed in seeds:
        if run and seed == run[-1] + 1:
            run.append(seed)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [seed]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def _steps_text(steps: Sequence) -> str:
    return "[" + ", ".join(f"{s:.4g}" if isinstance(s, float) else str(s) for s in steps) + "]"


__all__ = ["CHART_FILE", "SCHEDULE_FILE", "SEARCH_FILE", "SearchSettings", "StepSearch", "analytic_families",
           "steps_for_evaluations"]
