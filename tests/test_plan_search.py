"""The block-plan search: its space's moves (skip sets follow their steps, mutation changes plans,
crossover keeps a parent's step count, every move within the measured budget), and the search
end to end on digits: it resumes from a truncated search.json to the same schedule, and the
schedule it writes runs under `generate`."""
from __future__ import annotations

import json
import random
import shutil

import pytest
from click.testing import CliRunner

from elucd_fast.cli import main
from elucd_fast.models.block_plan import BlockPlan
from elucd_fast.search.plan_space import PlanCandidate, PlanSpace, evaluations_per_step
from elucd_fast.tools.block_costs import BlockCosts

NUM_BLOCKS = 6
COSTS = BlockCosts(network="0" * 16, batch_size=1, device="cpu", precision="float32", seconds=10.0,
                   skip_savings=(1.0, 2.0, 3.0, 0.5, 0.5, 1.0), reuse_seconds=(8.0, 4.0),
                   shallow=((0, 1, 4, 5), (0, 5)), flops=100, skip_flop_savings=(10,) * 6, reuse_flops=(80, 40))


def _space(mode="prune", budget=35.0, fraction=0.5):
    return PlanSpace(values=tuple(range(20, 0, -1)), min_steps=2, max_steps=5, mode=mode, costs=COSTS,
                     evaluations=lambda n: (1,) * n, budget=budget, num_blocks=NUM_BLOCKS, cache_points=(0, 1),
                     allowed_fraction=fraction, max_fraction=fraction)


def test_costs_and_plans_of_a_candidate():
    space = _space("cache")
    candidate = PlanCandidate((0, 4, 9), ((), (1,), (2, 3)), reuse=(9,), cache_point=1)
    # Every full step before a reusing one refreshes the cache (DeepCache's full steps).
    assert space.plans(candidate) == (BlockPlan(store=1), BlockPlan(frozenset({1}), store=1),
                                      BlockPlan(frozenset({2, 3}), reuse=1))
    # 10 + (10 - 2) + (4 - 0: blocks 2 and 3 do not run under reuse 1)
    assert space.cost(candidate) == pytest.approx(22.0)
    assert evaluations_per_step(lambda n: 2 * n - 1, 3) == (2, 2, 1)


@pytest.mark.parametrize("mode", ["prune", "cache"])
def test_every_move_stays_within_the_budget_and_the_allowed_fraction(mode):
    space, rng = _space(mode), random.Random(0)
    population = [space.random(rng) for _ in range(30)]
    for _ in range(200):
        a, b = rng.sample(population, 2)
        population.append(rng.choice([space.mutate(a, rng, 0.5), space.crossover(a, b, rng), space.random(rng)]))
    for candidate in population:
        space.check(candidate)
        assert space.cost(candidate) <= space.budget
        assert all(len(s) <= NUM_BLOCKS // 2 for s in candidate.skips)
        assert len(candidate.reuse) <= len(candidate.steps) // 2
    assert any(not c.plain for c in population)


def test_with_no_allowed_fraction_only_steps_change():
    space, rng = _space(fraction=0.0), random.Random(1)
    candidates = [space.random(rng) for _ in range(20)]
    assert all(c.plain and len(c.steps) <= 3 for c in candidates)  # 35 / 10: three full calls fit


def test_mutation_changes_skip_sets_and_they_stay_with_their_steps():
    space, rng = _space(budget=100.0), random.Random(2)
    parent = PlanCandidate((0, 5, 10, 15), ((1,), (2,), (), (4,)))
    changed = 0
    for _ in range(100):
        child = space.mutate(parent, rng, 0.3)
        kept = set(child.steps) & set(parent.steps)
        # A kept step's skip set is its own (changed by at most one block), never another step's.
        for step in kept:
            assert len(child.skip_map()[step] ^ parent.skip_map()[step]) <= 1
        changed += any(child.skip_map()[s] != parent.skip_map()[s] for s in kept)
    assert changed > 20  # AutoDiffusion's skip-set mutation never happened


def test_crossover_keeps_a_parents_step_count_and_plans_by_step():
    space, rng = _space(budget=100.0), random.Random(3)
    first = PlanCandidate((0, 5, 10), ((1,), (2,), (3,)))
    second = PlanCandidate((2, 5, 12, 18, 19), ((), (0,), (), (), ()))
    counts = set()
    for _ in range(50):
        child = space.crossover(first, second, rng)
        counts.add(len(child.steps))
        for step, skips in child.skip_map().items():
            owners = [p.skip_map()[step] for p in (first, second) if step in p.steps]
            assert skips in owners
    assert counts == {3, 5}


def _search(outdir, *extra):
    return CliRunner().invoke(main, [
        "search", "--preset", "digits", "--nfe", "5", "--prune", "--search-seeds", "0-99",
        "--selection-seeds", "20000-20099", "--population", "4", "--parents", "2", "--mutants", "1",
        "--crossovers", "1", "--generations", "2", "--steps-generations", "1", "--rescore", "1", "--dp-steps", "0",
        "--batch", "100", "--outdir", str(outdir), "--no-progress", *extra])


@pytest.mark.slow
def test_the_search_resumes_to_the_same_schedule_and_generate_runs_it(tmp_path):
    first = tmp_path / "first"
    result = _search(first)
    assert result.exit_code == 0, result.output
    state = json.loads((first / "search.json").read_text())
    assert state["values"]["block_costs"]["batch_size"] == 100
    # A search killed after a few candidates: its state file holds only those (and the costs).
    killed = tmp_path / "killed"
    killed.mkdir()
    truncated = dict(state, records={"search": dict(list(state["records"]["search"].items())[:5])})
    truncated["values"] = {"block_costs": state["values"]["block_costs"]}
    (killed / "search.json").write_text(json.dumps(truncated))
    result = _search(killed)
    assert result.exit_code == 0, result.output and "resuming, 5 result(s)" in result.output
    assert (killed / "schedule.json").read_text() == (first / "schedule.json").read_text()
    def untimed(records):
        return {stage: {key: {k: v for k, v in r.items() if k != "seconds"} for key, r in rs.items()}
                for stage, rs in records.items()}
    assert untimed(json.loads((killed / "search.json").read_text())["records"]) == untimed(state["records"])
    schedule = json.loads((first / "schedule.json").read_text())
    assert schedule["block_plans"]["blocks"] == 11 and len(schedule["block_plans"]["plans"]) == len(schedule["steps"])
    result = CliRunner().invoke(main, ["generate", "--seeds", "0-9", "--outdir", str(tmp_path / "gen"), "--no-progress",
                                       "--no-metrics", "--schedule", str(first / "schedule.json")])
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "gen")


def test_bad_plan_flags_exit_2_before_anything_loads(tmp_path):
    for flags, message in [(["--budget", "0"], "budget"), (["--max-fraction", "2"], "max fraction"),
                           (["--search-guidance"], "not with --prune"),
                           (["--preset", "digits-ddpm"], "measured for the edm, edm2 samplers")]:
        result = _search(tmp_path / "bad", *flags)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "bad").exists()
