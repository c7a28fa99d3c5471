"""The step search: the DP's optimum, the evolution's candidates, resuming, ranks, the command."""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from elucd_fast.cli import main
from elucd_fast.presets.digits import DigitsPreset
from elucd_fast.samplers import DDPMSettings, EDMSettings
from elucd_fast.schedules.schedule_file import read_schedule
from elucd_fast.search import (Candidate, EvolutionSettings, GuidanceAxis, SearchSettings, StepSearch, StepSpace,
                               best_path, evolve, steps_for_evaluations)
from elucd_fast.search.fitness import METRICS, check_metric
from elucd_fast.search.space import noise_level_grid

TORCHRUN = Path(sys.executable).with_name("torchrun")
TESTS_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Trajectory DP


def brute_force_path(cost: np.ndarray, num_edges: int) -> tuple[float, tuple[int, ...]]:
    size = len(cost)
    best = (math.inf, ())
    for inner in itertools.combinations(range(1, size - 1), num_edges - 1):
        path = (0, *inner, size - 1)
        total = sum(cost[a, b] for a, b in zip(path, path[1:]))
        best = min(best, (total, path))
    return best


@pytest.mark.parametrize("size,num_edges", [(6, 1), (7, 3), (9, 4), (10, 8)])
def test_dp_finds_the_least_cost_path_of_exactly_that_many_edges(size, num_edges):
    rng = np.random.default_rng(size * 10 + num_edges)
    for _ in range(5):
        cost = rng.uniform(0.1, 2.0, size=(size, size))
        path = best_path(cost, num_edges)
        total = sum(cost[a, b] for a, b in zip(path, path[1:]))
        expected_total, _ = brute_force_path(cost, num_edges)
        assert len(path) == num_edges + 1 and path[0] == 0 and path[-1] == size - 1
        assert all(a < b for a, b in zip(path, path[1:]))
        assert total == pytest.approx(expected_total, rel=1e-12)


def test_dp_takes_the_planted_cheap_path():
    cost = np.full((8, 8), 5.0)
    for a, b in [(0, 2), (2, 3), (3, 7)]:
        cost[a, b] = 0.1
    assert best_path(cost, 3) == (0, 2, 3, 7)
    with pytest.raises(ValueError, match="num_edges"):
        best_path(cost, 8)


# ---------------------------------------------------------------------------------------------
# Candidate space and evolution


def toy_space(size: int = 30, num_steps: int = 4, axes=()) -> StepSpace:
    return StepSpace(tuple(float(size - i) for i in range(size)), num_steps, axes)


def test_moves_give_sorted_distinct_candidates_only():
    space = toy_space(axes=(GuidanceAxis("max_guidance", (0.01, 0.02, 0.04)),))
    rng = random.Random(1)
    pool = [space.random(rng) for _ in range(20)]
    for _ in range(3000):
        a, b = rng.sample(pool, 2)
        for child in (space.mutate(a, rng, 0.5), space.crossover(a, b, rng)):
            space.check(child)  # raises on duplicates, disorder, wrong length or genes
            assert len(set(child.steps)) == space.num_steps
        pool[rng.randrange(len(pool))] = child
    # Crossing two parents that share steps cannot lose one: still N distinct steps.
    a, b = Candidate((0, 1, 2, 3), (0,)), Candidate((1, 2, 3, 4), (2,))
    for _ in range(200):
        assert len(space.check(space.crossover(a, b, rng)).steps) == 4


def test_a_reordered_or_repeated_step_is_not_a_new_candidate():
    space = toy_space()
    assert space.candidate([27.0, 30.0, 29.0, 28.0]) == space.candidate([30.0, 29.0, 28.0, 27.0])
    with pytest.raises(ValueError, match="distinct"):
        space.candidate([30.0, 30.0, 29.0, 28.0])
    with pytest.raises(ValueError, match="sorted distinct"):
        space.check(Candidate((3, 1, 2, 4)))


def test_evolution_scores_each_candidate_once_and_finds_a_toy_optimum():
    space = toy_space(size=40, num_steps=4)
    target = (3, 11, 24, 33)
    calls = []

    def score(candidate: Candidate) -> float:
        calls.append(candidate)
        return float(sum(abs(a - b) for a, b in zip(candidate.steps, target)))

    settings = EvolutionSettings(population=12, parents=4, mutants=6, crossovers=4, generations=15, seed=3)
    scores = evolve(space, score, [Candidate((0, 10, 20, 30))], settings)
    assert len(calls) == len(set(calls)) == len(scores)
    assert all(space.check(c) for c in calls)
    start, best = scores[Candidate((0, 10, 20, 30))], min(scores.values())
    assert start == 11 and best <= 3  # the moves make progress


def test_evolution_is_a_pure_function_of_its_seed_and_scores():
    space = toy_space()
    settings = EvolutionSettings(population=8, parents=3, mutants=3, crossovers=3, generations=4, seed=7)

    def score(c):
        return sum(c.steps) % 7 + 0.1 * c.steps[0]

    first = evolve(space, score, [Candidate((0, 5, 10, 15))], settings)
    second = evolve(space, score, [Candidate((0, 5, 10, 15))], settings)
    assert list(first) == list(second)


def test_noise_level_grid_holds_the_family_levels_exactly():
    rho = EDMSettings().with_num_steps(5).step_sequence()
    grid = noise_level_grid(0.002, 80.0, 50, include=[rho])
    assert set(rho) <= set(grid) and list(grid) == sorted(grid, reverse=True)


# ---------------------------------------------------------------------------------------------
# Evaluation counts and metrics


def test_steps_for_evaluations_follows_each_solver():
    assert steps_for_evaluations(EDMSettings(), 5) == 3  # Heun: 2N - 1
    assert steps_for_evaluations(EDMSettings(solver="ipndm"), 5) == 5
    assert steps_for_evaluations(DDPMSettings(learn_sigma=False), 4) == 4
    with pytest.raises(ValueError, match="cannot make exactly 4"):
        steps_for_evaluations(EDMSettings(), 4)


def test_metrics_rank_by_fd_and_accuracy():
    metric = METRICS["fd_acc"]
    assert metric.value({"fd_digits": 17.0, "class_accuracy": 0.98}) == pytest.approx(19.0)
    with pytest.raises(ValueError, match="unknown 'fid2'"):
        check_metric("fid2", digits=True)
    with pytest.raises(ValueError, match="not available"):
        check_metric("fid", digits=True)


# ---------------------------------------------------------------------------------------------
# Resuming (a toy fitness of the sigmas; the job is only the settings it searches)


class ToyFitness:
    """Fitness of EDM settings: distance of log sigma to a planted schedule; fails on demand."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, settings, seeds):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        planted = (80.0, 6.0, 0.6, 0.002)
        score = sum(abs(math.log(a) - math.log(b)) for a, b in zip(settings.sigmas, planted)) + 1e-3 * sum(seeds[:3])
        return {"score": score, "network_evaluations": settings.network_evaluations, "num_seeds": len(seeds),
                "network_evaluations_total": settings.network_evaluations * len(seeds), "seconds": 0.0}


def toy_search(outdir: Path, fitness) -> StepSearch:
    job = SimpleNamespace(settings=EDMSettings(solver="ipndm"), net=None, config={"toy": 1})
    settings = SearchSettings(nfe=4, metric="fd", search_seeds=tuple(range(100)),
                              selection_seeds=tuple(range(200, 300)), rescore=2, dp_steps=0, grid_size=40,
                              evolution=EvolutionSettings(population=8, parents=3, mutants=3, crossovers=3,
                                                          generations=3, seed=5))
    return StepSearch(job, fitness, settings, outdir, preset="toy", progress=False, log=lambda line: None)


def test_a_killed_search_resumes_to_the_same_schedule(tmp_path):
    whole = toy_search(tmp_path / "whole", ToyFitness()).run()
    for fail_after in (5, 13, 20):
        outdir = tmp_path / f"killed{fail_after}"
        with pytest.raises(KeyboardInterrupt):
            toy_search(outdir, ToyFitness(fail_after=fail_after)).run()
        recorded = json.loads((outdir / "search.json").read_text())
        assert sum(len(r) for r in recorded["records"].values()) == fail_after
        assert not (outdir / "schedule.json").exists()
        resumed_fitness = ToyFitness()
        resumed = toy_search(outdir, resumed_fitness).run()
        assert resumed_fitness.calls == whole["candidates_scored"] + len(whole["finalists"]) - fail_after
        assert (outdir / "schedule.json").read_bytes() == (tmp_path / "whole" / "schedule.json").read_bytes()
        assert resumed["winner"] == whole["winner"]
    schedule = read_schedule(tmp_path / "whole" / "schedule.json")
    assert schedule.sampler == "edm" and schedule.solver == "ipndm" and schedule.network_evaluations == 4
    assert (tmp_path / "whole" / "search.png").stat().st_size > 0


def test_a_search_of_other_settings_is_refused(tmp_path):
    toy_search(tmp_path, ToyFitness()).run()
    job = SimpleNamespace(settings=EDMSettings(solver="ipndm"), net=None, config={"toy": 2})
    other = StepSearch(job, ToyFitness(), toy_search(tmp_path, None).settings, tmp_path, preset="toy",
                       progress=False, log=lambda line: None)
    with pytest.raises(ValueError, match="other settings"):
        other.run()


# ---------------------------------------------------------------------------------------------
# The command: bad flags before anything loads, and a tiny search end to end


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(DigitsPreset, "build", refuse)


@pytest.mark.parametrize("flags,message", [
    (["--nfe", "4"], "cannot make exactly 4"),
    (["--nfe", "5", "--search-seeds", "0-9"], "too few"),
    (["--nfe", "5", "--selection-seeds", "0-99"], "disjoint"),
    (["--nfe", "5", "--metric", "sharpness"], "unknown 'sharpness'"),
    (["--nfe", "5", "--metric", "fid"], "not available"),
    (["--nfe", "5", "--steps", "3"], "the search chooses the steps"),
    (["--nfe", "5", "--population", "1"], "population"),
    (["--nfe", "5", "--dp-steps", "4"], "--dp-steps"),
])
def test_bad_flags_exit_2_before_anything_loads(no_loading, tmp_path, flags, message):
    result = CliRunner().invoke(main, ["search", "--preset", "digits", "--outdir", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


TINY = ["--preset", "digits", "--nfe", "3", "--search-seeds", "0-99", "--selection-seeds", "1000-1099",
        "--pilot-seeds", "500-515", "--dp-steps", "8", "--population", "4", "--generations", "1", "--parents", "2",
        "--mutants", "2", "--crossovers", "1", "--rescore", "1", "--grid-size", "30", "--no-progress"]


@pytest.mark.slow
def test_a_tiny_digits_search_end_to_end(tmp_path):
    outdir = tmp_path / "search"
    result = CliRunner().invoke(main, ["search", *TINY, "--outdir", str(outdir)])
    assert result.exit_code == 0, result.output
    state = json.loads((outdir / "search.json").read_text())
    summary = state["values"]["summary"]
    assert summary["num_steps"] == 2 and summary["network_evaluations_total"] > 0
    assert set(summary["families"]) == {"rho7", "logsnr", "dp"} or set(summary["families"]) >= {"rho7", "logsnr"}
    schedule = read_schedule(outdir / "schedule.json")
    assert schedule.network_evaluations == 3 and schedule.preset == "digits"
    assert schedule.scores["class_accuracy"] == summary["winner"]["selection"]["class_accuracy"]
    # generate runs the searched schedule
    run = CliRunner().invoke(main, ["generate", "--preset", "digits", "--schedule", str(outdir / "schedule.json"),
                                    "--seeds", "0-19", "--no-metrics", "--no-progress",
                                    "--outdir", str(tmp_path / "gen")])
    assert run.exit_code == 0, run.output


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this python")
def test_two_ranks_give_the_one_process_result(tmp_path):
    one = tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [*TINY, "--dp-steps", "0", "--generations", "0", "--population", "3"]
    single = subprocess.run([sys.executable, "-m", "elucd_fast", "search", *flags, "--outdir", str(one)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two = tmp_path / "two"
    process = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "elucd_fast", "search",
                              *flags, "--outdir", str(two)], capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    assert (two / "schedule.json").read_bytes() == (one / "schedule.json").read_bytes()
    records = [json.loads((d / "search.json").read_text())["records"] for d in (one, two)]
    scores = [{stage: {key: r["score"] for key, r in stage_records.items()} for stage, stage_records in rec.items()}
              for rec in records]
    assert scores[0] == scores[1]


def test_guidance_is_searched_with_the_steps(tmp_path):
    from elucd_fast.search.space import default_guidance_axes

    settings = EDMSettings(solver="ipndm", max_guidance=0.02, add_factor=0.3)
    axes = default_guidance_axes(settings, classifier_guided=True)
    assert [a.field for a in axes] == ["max_guidance", "add_factor"]
    assert 0.02 in axes[0].values and 0.3 in axes[1].values
    with pytest.raises(ValueError, match="unguided"):
        default_guidance_axes(settings, classifier_guided=False)

    class GuidedToy(ToyFitness):
        def __call__(self, settings, seeds):
            record = super().__call__(settings, seeds)
            record["score"] += abs(settings.max_guidance - 0.04) * 100 + settings.add_factor
            return record

    job = SimpleNamespace(settings=settings, net=None, config={})
    search_settings = SearchSettings(nfe=4, metric="fd", search_seeds=tuple(range(100)),
                                     selection_seeds=tuple(range(200, 300)), rescore=2, dp_steps=0, grid_size=40,
                                     evolution=EvolutionSettings(population=10, parents=3, mutants=5, crossovers=3,
                                                                 generations=6, seed=1), guidance_axes=axes)
    summary = StepSearch(job, GuidedToy(), search_settings, tmp_path, preset="toy", progress=False,
                         log=lambda line: None).run()
    schedule = read_schedule(tmp_path / "schedule.json")
    assert set(schedule.guidance) == {"max_guidance", "add_factor"}
    assert schedule.guidance == summary["winner"]["guidance"]
    assert schedule.guidance["max_guidance"] == 0.04 and schedule.guidance["add_factor"] == 0.0


@pytest.mark.parametrize("name,nfe", [("digits-fast", 5), ("digits-fast3", 3)])
def test_digits_fast_runs_the_shipped_searched_schedule(tmp_path, name, nfe):
    from elucd_fast.presets import get_preset
    from elucd_fast.presets.digits import SHIPPED_SCHEDULES

    preset = get_preset(name)
    schedule = read_schedule(SHIPPED_SCHEDULES / f"{name}.json")
    assert preset.settings.sigmas == tuple(schedule.steps) and preset.settings.solver == schedule.solver
    assert preset.settings.network_evaluations == schedule.network_evaluations == nfe
    result = CliRunner().invoke(main, ["generate", "--preset", name, "--seeds", "0-9", "--no-metrics",
                                       "--no-progress", "--outdir", str(tmp_path / "fast")])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "fast" / "run.json").read_text())
    assert run["config"]["preset"]["settings"]["sigmas"] == list(schedule.steps)
