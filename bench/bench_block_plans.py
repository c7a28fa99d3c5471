"""Block plans on the reference network: the measured speed of each plan class against its FLOP
estimate.

Run: python -m pytest bench/bench_block_plans.py --benchmark-only -s

The network is the Sampler section's reference setting (EDM's ImageNet-64 ADM network,
`EDMPrecond` + `DhariwalUNet`, random weights, at 32x32, batch 8, one thread). Plan classes:
bypassing every attention layer alone; bypassing every fourth block; bypassing the decoder's
blocks at the two lowest resolutions; DeepCache-style reuse of the decoder feature entering the
16x16 and the 32x32 level (only the shallower encoder blocks and the rest of the decoder run).
For each: the FLOP ratio full / plan (torch's counter) and the measured speed ratio (process CPU
time, interleaved rounds, median and per-round range), and the measured time against the
additive estimate of `tools.block_costs` at the same batch size.
"""
from __future__ import annotations

import time

import pytest
import torch

from bench_sampler import build
from elucd_fast.models.block_plan import BlockPlan
from timing import count_flops, interleaved_times, speed_ratios


def plan_classes(net) -> dict[str, BlockPlan]:
    names = net.block_names()
    decoder = [name for name in names if name.startswith("dec.") and not name.endswith(".attn")]

    def decoder_point(name: str) -> int:
        return decoder.index(name)

    return {
        "full": BlockPlan(),
        "skip all attention": BlockPlan(frozenset(i for i, n in enumerate(names) if n.endswith(".attn"))),
        "skip every 4th block": BlockPlan(frozenset(range(3, len(names), 4))),
        "skip decoder 4x4+8x8": BlockPlan(frozenset(i for i, n in enumerate(names)
                                                   if n.startswith(("dec.4x4", "dec.8x8")))),
        "reuse before 16x16": BlockPlan(reuse=decoder_point("dec.16x16_up")),
        "reuse before 32x32": BlockPlan(reuse=decoder_point("dec.32x32_up")),
    }


@pytest.mark.benchmark(group="block_plans")
def test_plan_classes_speed_against_flops(benchmark, one_thread):
    net, _, _, latents, labels, _ = build("mid")
    x = latents * 2.0
    sigma = torch.tensor(2.0)
    onehot = torch.nn.functional.one_hot(labels.long(), 1000).float()
    plans = plan_classes(net)
    cache: dict = {}
    for point in {p.reuse for p in plans.values() if p.reuse is not None}:
        net(x, sigma, onehot, block_plan=BlockPlan(store=point), block_cache=cache)

    def call(plan):
        return lambda: net(x, sigma, onehot, block_plan=plan, block_cache=cache)

    with torch.no_grad():
        flops = {name: count_flops(call(plan)) for name, plan in plans.items()}
        times = interleaved_times({name: call(plan) for name, plan in plans.items()}, rounds=3, warmup=1,
                                  clocks={"cpu": time.process_time, "wall": time.perf_counter})
        benchmark.pedantic(call(plans["full"]), rounds=1, iterations=1)
    ratios = speed_ratios(times["cpu"], "full")
    rows = []
    for name in plans:
        flop_ratio = flops["full"] / flops[name]
        speed, low, high = ratios[name]
        rows.append((name, flops[name] / 8 / 1e9, flop_ratio, speed, low, high))
        print(f"{name:24s} {flops[name] / 8 / 1e9:7.3f} GFLOP/img  FLOP ratio {flop_ratio:5.2f}x  "
              f"measured {speed:5.2f}x ({low:.2f}-{high:.2f})")
        benchmark.extra_info[name] = {"gflop_per_image": flops[name] / 8 / 1e9, "flop_ratio": flop_ratio,
                                      "speed_ratio": speed, "speed_range": [low, high]}
        assert torch.isfinite(call(plans[name])()).all()
