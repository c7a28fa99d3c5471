"""The measured cost model of block plans (`tools.block_costs`): its FLOP part is exactly
additive (checked against counted calls of combined plans), its times are positive and
consistent with the FLOPs' ordering where the difference is large."""
from __future__ import annotations

import pytest
import torch

from elucd_fast.models.block_plan import BlockPlan
from elucd_fast.presets import build_job
from elucd_fast.tools.block_costs import BlockCosts, measure_block_costs
from elucd_fast.tools.profile import count_flops


@pytest.fixture(scope="module")
def digits():
    job = build_job("digits")
    return job, measure_block_costs(job, batch_size=16, repeats=2)


def test_costs_cover_every_block_and_cache_point(digits):
    job, costs = digits
    n = len(job.net.block_names())
    assert len(costs.skip_savings) == len(costs.skip_flop_savings) == n
    assert len(costs.reuse_seconds) == len(costs.shallow) == job.net.cache_points
    assert costs.seconds > 0 and all(s > 0 for s in costs.reuse_seconds)
    assert all(f > 0 for f in costs.skip_flop_savings) and all(f < costs.flops for f in costs.reuse_flops)
    # Reusing a deeper decoder block (a smaller k) leaves more of the shallow path to run.
    assert list(costs.reuse_flops) == sorted(costs.reuse_flops, reverse=True)
    assert BlockCosts.from_json(costs.json()) == costs


@pytest.mark.parametrize("plan", [BlockPlan(frozenset({0, 3, 5})), BlockPlan(frozenset({1, 8}), reuse=4),
                                  BlockPlan(frozenset({2}), reuse=6)])
def test_plan_flops_are_exactly_the_sum_of_block_savings(digits, plan):
    job, costs = digits
    x = torch.randn(4, 1, 8, 8)
    labels = torch.eye(10)[:4]
    cache = {}
    job.net(x, torch.tensor(1.0), labels, block_plan=BlockPlan(store=plan.reuse) if plan.reuse is not None else None,
            block_cache=cache)
    counted = count_flops(lambda: job.net(x, torch.tensor(1.0), labels, block_plan=plan, block_cache=cache)) / 4
    assert costs.call_flops(plan) == counted


def test_jobs_without_plans_are_refused():
    with pytest.raises(ValueError, match="not the ddpm sampler"):
        measure_block_costs(build_job("digits-ddpm"), batch_size=2)
