"""Block plans on their way to the network: the EDM sampler hands step i's plan to every network
call of step i with one cache per run; schedule files carry plans and refuse bad ones; `generate
--schedule` runs them, records them, and refuses plans made for another network with exit 2
before sampling."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from elucd_fast.cli import main
from elucd_fast.digits.load import load_denoiser
from elucd_fast.digits.networks import build_edm2_denoiser
from elucd_fast.models.block_plan import BlockPlan
from elucd_fast.samplers.edm import edm_sampler
from elucd_fast.schedules.schedule_file import (ScheduleError, ScheduleFile, block_plans_json, read_schedule,
                                                schedule_block_plans, write_schedule)

SIGMAS = (80.0, 5.0, 1.0, 0.2)


class PlanRecorder(torch.nn.Module):
    """Wraps a network and records the plan and the cache object of each call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []
        for name in ("sigma_min", "sigma_max", "label_dim", "img_channels", "img_resolution"):
            setattr(self, name, getattr(net, name))

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, labels=None, **extra):
        self.calls.append((extra.get("block_plan"), id(extra["block_cache"]) if "block_cache" in extra else None))
        return self.net(x, sigma, labels, **extra)


@pytest.fixture(scope="module")
def digits_net():
    return load_denoiser()


def _plans(net):
    store, reuse = 2, 2
    skip = frozenset({len(net.block_names()) - 2})
    return (BlockPlan(), BlockPlan(store=store), BlockPlan(skip=skip, reuse=reuse), BlockPlan(reuse=reuse))


@pytest.mark.parametrize("solver", ["heun", "ipndm"])
def test_the_sampler_gives_each_step_its_plan_and_one_cache_per_run(digits_net, solver):
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    plans = _plans(digits_net)
    recorder = PlanRecorder(digits_net)
    plain = edm_sampler(digits_net, latents, labels, sigmas=SIGMAS, solver=solver)
    assert torch.equal(edm_sampler(digits_net, latents, labels, sigmas=SIGMAS, solver=solver,
                                   block_plans=(BlockPlan(),) * 4), plain)
    for run in range(2):
        recorder.calls.clear()
        out = edm_sampler(recorder, latents, labels, sigmas=SIGMAS, solver=solver, block_plans=plans)
        calls_per_step = [2, 2, 2, 1] if solver == "heun" else [1, 1, 1, 1]
        expected = [plan for plan, n in zip(plans, calls_per_step) for _ in range(n)]
        assert [plan for plan, _ in recorder.calls] == expected
        assert len({cache for _, cache in recorder.calls}) == 1  # one cache for the whole run
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
        if run == 0:
            first = out
    assert torch.equal(out, first)  # a fresh cache each run: nothing leaks from the previous one
    with pytest.raises(ValueError, match="3 plans for 4 steps"):
        edm_sampler(digits_net, latents, labels, sigmas=SIGMAS, solver=solver, block_plans=plans[:3])


def _schedule(net, plans, **changes):
    return ScheduleFile(sampler="edm", steps=SIGMAS, network_evaluations=4, solver="ipndm",
                        block_plans={**block_plans_json(net, plans), **changes})


def test_schedule_files_carry_plans_and_refuse_bad_ones(tmp_path, digits_net):
    plans = _plans(digits_net)
    path = tmp_path / "schedule.json"
    write_schedule(path, _schedule(digits_net, plans))
    schedule = read_schedule(path)
    assert schedule.plans() == plans and schedule_block_plans(schedule, digits_net) == plans
    good = json.loads(path.read_text())
    defects = [
        (lambda d: d["block_plans"]["plans"].pop(), "one plan per step .4."),
        (lambda d: d["block_plans"]["plans"].__setitem__(1, {"skip": [], "store": None, "reuse": 2}),
         r"plans\[1\]: reuses cache point 2, which no earlier step stores"),
        (lambda d: d["block_plans"]["plans"].__setitem__(0, {"skip": [99]}), r"plans\[0\]: skips \[99\], outside"),
        (lambda d: d["block_plans"]["plans"].__setitem__(0, {"skip": [1, 1]}), "lists a block twice"),
        (lambda d: d["block_plans"].__setitem__("network", "xyz"), "16 lowercase hex"),
        (lambda d: d["block_plans"].pop("blocks"), "keys network, blocks, plans"),
    ]
    for damage, message in defects:
        data = json.loads(json.dumps(good))
        damage(data)
        path.write_text(json.dumps(data))
        with pytest.raises(ScheduleError, match=message):
            read_schedule(path)
    with pytest.raises(ScheduleError, match="block plans are for another network"):
        schedule_block_plans(schedule, build_edm2_denoiser())


def _generate(outdir, schedule_path):
    return CliRunner().invoke(main, ["generate", "--seeds", "0-19", "--batch", "20", "--outdir", str(outdir),
                                     "--no-progress", "--schedule", str(schedule_path), "--no-metrics"])


def test_generate_runs_a_schedule_with_plans_and_refuses_another_networks(tmp_path, digits_net):
    plans = _plans(digits_net)
    path = tmp_path / "schedule.json"
    write_schedule(path, _schedule(digits_net, plans))
    result = _generate(tmp_path / "run", path)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    recorded = run["config"]["schedule"]["content"]["block_plans"]
    assert [BlockPlan.from_json(p) for p in recorded["plans"]] == list(plans)

    write_schedule(path, _schedule(build_edm2_denoiser(), plans[:1] * 4))
    result = _generate(tmp_path / "other", path)
    assert result.exit_code == 2 and "block plans are for another network" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_a_compiled_step_keeps_one_graph_per_distinct_plan(digits_net):
    from elucd_fast.engine.compile import CompiledStepRunner

    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([4, 5])
    plans = (BlockPlan(store=2), BlockPlan(store=2), BlockPlan(frozenset({9}), reuse=2), BlockPlan(reuse=2))
    eager = edm_sampler(digits_net, latents, labels, sigmas=SIGMAS, solver="ipndm", block_plans=plans)
    runner = CompiledStepRunner(backend="aot_eager")
    compiled = edm_sampler(digits_net, latents, labels, sigmas=SIGMAS, solver="ipndm", block_plans=plans,
                           step_runner=runner)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    # Three distinct plans in four steps: one compiled variant per distinct (plan, step flags).
    assert runner.graphs == 3


def _recorded_plans(module):
    """Records the block plan of every call of `module` (a forward pre-hook with its keywords)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("block_plan")),
                                              with_kwargs=True)
    return seen, handle


def test_every_sampler_hands_each_step_its_plan():
    from elucd_fast.digits.load import load_edm2_denoiser
    from elucd_fast.models.dit import DiT
    from elucd_fast.presets import build_job
    from elucd_fast.samplers.ddpm import ddpm_sampler
    from elucd_fast.samplers.dit import dit_sampler
    from elucd_fast.samplers.edm2 import edm2_sampler

    ddpm_net = build_job("digits-ddpm").net
    torch.manual_seed(0)
    dit = DiT(input_size=8, num_classes=10, patch_size=2, hidden_size=32, depth=3, num_heads=2).eval()
    edm2 = load_edm2_denoiser()
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([3, 7])
    runs = {
        "ddpm": (ddpm_net, lambda plans: ddpm_sampler(ddpm_net, latents, labels, timestep_respacing="3",
                                                      learn_sigma=False, use_ddim=True, block_plans=plans)),
        "dit": (dit, lambda plans: dit_sampler(dit, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)),
                                               labels, timestep_respacing="3", cfg_scale=1.5, use_ddim=True,
                                               block_plans=plans)),
        "edm2": (edm2, lambda plans: edm2_sampler(edm2, latents, labels, num_steps=3, solver="ipndm",
                                                  block_plans=plans)),
    }
    for name, (net, run) in runs.items():
        plans = (BlockPlan(frozenset({0})), BlockPlan(), BlockPlan(frozenset({1})))
        plain = run(None)
        assert torch.equal(run((BlockPlan(),) * 3), plain), name
        seen, handle = _recorded_plans(net)
        out = run(plans)
        handle.remove()
        assert seen == list(plans), name
        assert not torch.equal(out, plain), name


def test_no_host_sync_inside_the_loop_with_plans(digits_net):
    from test_edm_sampler import count_syncs_after_first_step

    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 9])
    plans = (BlockPlan(store=3), BlockPlan(frozenset({1, 5}), reuse=3), BlockPlan(store=3), BlockPlan(reuse=3))
    syncs = count_syncs_after_first_step(lambda cb: edm_sampler(
        digits_net, latents, labels, sigmas=SIGMAS, solver="heun", block_plans=plans, callback=cb))
    assert syncs == []
