"""Guided sampling speed: step breakdown, ours vs the authors' way, syncs and ops per step.

Run: python -m pytest bench/bench_sampler.py --benchmark-only -s
With ELUCD_AUTHORS_REPO=/path/to/AlexMaOLS/EluCD (a local checkout) the end-to-end test also
runs the authors' own sampler (their EDM/generate.py, imported from there at run time).
Each test prints one line of results (also stored in the benchmark's extra_info).
"""
from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import authors
import baseline
from elucd_fast.engine import apply_precision, resolve_precision
from elucd_fast.engine.precision import hardware_bf16
from elucd_fast.guidance import ClassifierGuidance
from elucd_fast.models.edm_networks import Conv2d, EDMPrecond
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers.edm import edm_sampler, edm_step
from timing import classifier_flops, count_flops, interleaved_times, speed_ratios

# name -> (DhariwalUNet kwargs, resolution, classifier, batch, steps for end-to-end runs)
SETUPS = {
    "tiny": (dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]), 16, "resnet18", 8, 6),
    # The reference size: EDM's ImageNet-64 ADM network at 32x32 with ResNet-50, batch 8.
    "mid": (dict(), 32, "resnet50", 8, 3),
}


def build(setup: str):
    unet_kwargs, resolution, classifier_name, batch, steps = SETUPS[setup]
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                     **unet_kwargs).eval().requires_grad_(False)
    # EDM zero-initialises each block's last convolution, the attention projections and the
    # output layer: the network would return c_skip x whatever precision it computed in. Give
    # those layers random weights too (same cost), so that precision differences show.
    for layer in net.modules():
        if isinstance(layer, Conv2d) and layer.weight is not None and not layer.weight.any():
            bound = math.sqrt(1 / layer.weight[0].numel())
            layer.weight.copy_(torch.rand_like(layer.weight) * 2 * bound - bound)
    classifier = getattr(torchvision.models, classifier_name)(num_classes=1000).eval()
    seeds = list(range(batch))
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([batch, 3, resolution, resolution])
    labels = rnd.randint(1000, size=[batch])
    return net, classifier, seeds, latents, labels, steps


GUIDANCE = dict(softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0)
SAMPLING = dict(max_guidance=0.004, add_factor=0.3)


@pytest.mark.parametrize("setup", ["tiny", "mid"])
def test_step_breakdown(benchmark, setup, one_thread):
    """One guided step vs unguided vs the classifier alone (one thread, CPU-time medians of
    interleaved rounds); the FLOP-limit ratio beside it."""
    net, classifier, _, latents, labels, _ = build(setup)
    guide = ClassifierGuidance(classifier, **GUIDANCE)
    x = latents * 2.0
    z = torch.randn_like(x)
    one_hot = torch.nn.functional.one_hot(labels, 1000).float()
    t = [torch.tensor(v, dtype=torch.float64) for v in (2.0, 2.0, 1.5)]
    w = torch.tensor(0.004)

    def step(guided):
        with torch.no_grad():
            return edm_step(net, guide, x, z, *t, w, 1.0, one_hot, labels, guided=guided, heun=True)

    fns = {"guided": lambda: step(True), "unguided": lambda: step(False), "classifier": lambda: guide(x, labels)}
    times = interleaved_times(fns, rounds=5 if setup == "tiny" else 3, clocks={"cpu": time.process_time})["cpu"]
    med = {name: statistics.median(values) for name, values in times.items()}
    denoiser_flops = count_flops(lambda: net(x, t[1], one_hot))
    clf_flops = classifier_flops(guide.classifier, x)
    flop_limit = (2 * denoiser_flops + clf_flops) / (2 * denoiser_flops)
    overhead = med["guided"] / med["unguided"]
    beyond = (med["guided"] - med["unguided"] - med["classifier"]) / med["guided"]
    info = dict(guided_s=med["guided"], unguided_s=med["unguided"], classifier_s=med["classifier"],
                guided_over_unguided=overhead, flop_limit_ratio=flop_limit, beyond_classifier_fraction=beyond,
                denoiser_gflops=denoiser_flops / 1e9, classifier_fwd_bwd_gflops=clf_flops / 1e9)
    benchmark.extra_info.update(info)
    print(f"\n[step {setup}] guided {med['guided'] * 1e3:.1f} ms, unguided {med['unguided'] * 1e3:.1f} ms, "
          f"classifier fwd+grad {med['classifier'] * 1e3:.1f} ms; guided/unguided {overhead:.3f} "
          f"(FLOP limit {flop_limit:.3f}); time beyond classifier {100 * beyond:.1f}% of a guided step")
    benchmark.pedantic(lambda: step(True), rounds=1, iterations=1)


def _ours(net, classifier, seeds, latents, labels, steps, precision):
    policy = resolve_precision(precision, "cpu")
    fast_net = apply_precision(net, policy, "cpu")
    guide = ClassifierGuidance(classifier, **GUIDANCE)
    guide.classifier = apply_precision(guide.classifier, policy, "cpu")
    return lambda: edm_sampler(fast_net, latents, labels, randn_like=StackedRandomGenerator("cpu", seeds).randn_like,
                               num_steps=steps, guidance=guide, dtype=policy.state_dtype, **SAMPLING)


def _baseline(net, classifier, seeds, latents, labels, steps):
    smoothed = baseline.smooth_relu(classifier, GUIDANCE["softplus_beta"])
    return lambda: baseline.edm_sample(net, latents, labels, smoothed,
                                       randn_like=StackedRandomGenerator("cpu", seeds).randn_like, num_steps=steps,
                                       joint_temperature=1.0, marginal_temperature=0.0, **SAMPLING)


def _authors(repo, net, classifier, seeds, latents, labels, steps):
    sampler = authors.load_authors_edm_sampler(repo, authors.authors_classifier(classifier, GUIDANCE["softplus_beta"]))
    return lambda: authors.run_authors_edm_sampler(sampler, net, latents, labels,
                                                   StackedRandomGenerator("cpu", seeds).randn_like, num_steps=steps,
                                                   **GUIDANCE, **SAMPLING)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@pytest.mark.parametrize("setup", ["tiny", "mid"])
def test_end_to_end_vs_baseline_and_authors(benchmark, setup, one_thread):
    """Images/s of ours (fp32, bf16 where the CPU has it) vs the baseline (the spec written the
    authors' way) and, with $ELUCD_AUTHORS_REPO, vs the authors' own sampler; same networks,
    seeds and latents; one thread, interleaved rounds, CPU-time and wall-clock medians."""
    net, classifier, seeds, latents, labels, steps = build(setup)
    fns = {"baseline": _baseline(net, classifier, seeds, latents, labels, steps)}
    repo = authors.authors_repo()
    # Their Softplus swap walks Bottleneck blocks only: with a BasicBlock ResNet their classifier
    # keeps most ReLUs, so it is compared on the Bottleneck (ResNet-50) setup alone.
    bottleneck = any(isinstance(m, torchvision.models.resnet.Bottleneck) for m in classifier.modules())
    if repo is not None and bottleneck:
        fns["authors"] = _authors(repo, net, classifier, seeds, latents, labels, steps)
    fns["fp32"] = _ours(net, classifier, seeds, latents, labels, steps, "fp32")
    if hardware_bf16("cpu"):
        fns["bf16"] = _ours(net, classifier, seeds, latents, labels, steps, "bf16")
    with torch.no_grad():
        outputs = {name: fn().float() for name, fn in fns.items()}
        times = interleaved_times(fns, rounds=5 if setup == "tiny" else 3, warmup=0, clocks=CLOCKS)
    references = [name for name in ("authors", "baseline") if name in fns]
    info = {}
    lines = [f"\n[end-to-end {setup}, {len(seeds)} images x {steps} steps, 1 thread"
             + ("" if "authors" in fns else ", authors' sampler not run (set ELUCD_AUTHORS_REPO)" if bottleneck
                else ", authors' sampler not run (BasicBlock classifier)") + "]"]
    for clock, per_clock in times.items():
        medians = {name: statistics.median(values) for name, values in per_clock.items()}
        lines.append(f"  {clock} time per run: " + ", ".join(f"{name} {t:.2f} s" for name, t in medians.items()))
        for name, t in medians.items():
            info[f"{name}_images_per_s_{clock}"] = len(seeds) / t
        for ref in references:
            ratios = speed_ratios(per_clock, ref)
            shown = []
            for name, (ratio, low, high) in ratios.items():
                if name == ref:
                    continue
                info[f"{name}_speed_vs_{ref}_{clock}"] = ratio
                info[f"{name}_speed_vs_{ref}_{clock}_rounds"] = [low, high]
                shown.append(f"{name} x{ratio:.2f} ({low:.2f}-{high:.2f})")
            lines.append(f"    images/s vs {ref} ({clock}): " + ", ".join(shown))
    for ref in references:
        diffs = []
        for name in fns:
            if name != ref:
                rel = float((outputs[name] - outputs[ref]).abs().max() / outputs[ref].abs().max())
                info[f"{name}_rel_diff_vs_{ref}"] = rel
                diffs.append(f"{name} {rel:.1e}")
        lines.append(f"  relative difference vs {ref}: " + ", ".join(diffs))
    benchmark.extra_info.update(info)
    print("\n".join(lines))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


class _OpCounter(TorchDispatchMode):
    SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero"}

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func._schema.name in self.SYNCS
        return func(*args, **(kwargs or {}))


def test_syncs_and_ops_per_step(benchmark):
    """Device-independent proxies for GPU cost: host syncs and aten ops per guided step."""
    net, classifier, seeds, latents, labels, steps = build("tiny")
    results = {}
    for name, fn in (("ours", _ours(net, classifier, seeds, latents, labels, steps, "fp32")),
                     ("baseline", _baseline(net, classifier, seeds, latents, labels, steps))):
        counter = _OpCounter()
        with counter, torch.no_grad():
            fn()
        results[name] = (counter.syncs / steps, counter.ops / steps)
    benchmark.extra_info.update({f"{k}_syncs_per_step": v[0] for k, v in results.items()})
    benchmark.extra_info.update({f"{k}_aten_ops_per_step": v[1] for k, v in results.items()})
    print(f"\n[per step, batch {len(seeds)}] ours: {results['ours'][0]:.1f} syncs, {results['ours'][1]:.0f} aten ops; "
          f"baseline: {results['baseline'][0]:.1f} syncs, {results['baseline'][1]:.0f} aten ops "
          "(ours: the syncs are the set-up checks before the loop, spread over the steps)")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _digits_speeds(benchmark, title: str, jobs: dict) -> None:
    """Images/s of digits jobs on the same 250 seeds, relative to the first (one thread,
    interleaved rounds, wall-clock medians); printed and stored in the benchmark's extra_info."""
    seeds = list(range(250))
    rnd = StackedRandomGenerator("cpu", seeds)
    latents, labels = rnd.randn([len(seeds), 1, 8, 8]), rnd.randint(10, size=[len(seeds)])
    fns = {name: (lambda job=job: job.sample(latents, labels, StackedRandomGenerator("cpu", seeds).randn_like))
           for name, job in jobs.items()}
    reference = next(iter(jobs))
    with torch.no_grad():
        times = interleaved_times(fns, rounds=5, warmup=1)["wall"]
    ratios = speed_ratios(times, reference)
    info = {f"{name}_images_per_s": len(seeds) / statistics.median(values) for name, values in times.items()}
    info.update({f"{name}_speed_vs_{reference}": ratio for name, (ratio, _, _) in ratios.items() if name != reference})
    benchmark.extra_info.update(info)
    print(f"\n[{title}, batch {len(seeds)}, 1 thread] "
          + ", ".join(f"{name} {info[f'{name}_images_per_s']:.0f} images/s" for name in fns) + f"; vs {reference}: "
          + ", ".join(f"{name} x{ratio:.2f} ({low:.2f}-{high:.2f})" for name, (ratio, low, high) in ratios.items()
                      if name != reference))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("preset", ["digits", "digits-unguided"])
@pytest.mark.parametrize("evaluations", [5, 11])
def test_multistep_vs_heun_at_equal_network_evaluations(benchmark, evaluations, preset, one_thread):
    """A digits job (shipped weights) with Heun (N steps: 2N - 1 network evaluations) against
    iPNDM and DPM-Solver++(2M) taking the same number of evaluations (one per step). Unguided,
    equal evaluations should give about equal speed (the solvers' own work is a few elementwise
    ops per step); guided, the multistep solvers take a classifier gradient before each of their
    N calls, Heun before N of its 2N - 1."""
    from elucd_fast.presets import build_job

    jobs = {"heun": build_job(preset, num_steps=(evaluations + 1) // 2),
            **{solver: build_job(preset, num_steps=evaluations, solver=solver) for solver in ("ipndm", "dpmpp_2m")}}
    assert all(job.settings.network_evaluations == evaluations for job in jobs.values())
    _digits_speeds(benchmark, f"{preset}, {evaluations} network evaluations", jobs)


def test_five_evaluation_multistep_vs_the_default(benchmark, one_thread):
    """The guided digits default (Heun, 18 steps, 35 evaluations) against DPM-Solver++(2M) at 5
    evaluations, which matches its FD and accuracy (README, few-step solvers)."""
    from elucd_fast.presets import build_job

    _digits_speeds(benchmark, "digits, default vs 5 evaluations",
                   {"heun_18": build_job("digits"), "dpmpp_2m_5": build_job("digits", num_steps=5, solver="dpmpp_2m")})
