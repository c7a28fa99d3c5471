"""One prepared acceptance run of the fast path: on one CUDA GPU in under 8 minutes, or its CPU
half (under 2 minutes on 2 cores) on a machine without one.

    python bench/gpu_check.py [--out DIR] [--parts kernels,precision,...] [--list]

Writes DIR/gpu_check.json (every number, every skip with its reason, every failure with its
traceback summary) and DIR/gpu_check.md (the same as tables); default DIR: out/gpu_check.
Run it from an install of the repository (`pip install -e .`). Each part runs in its own process
under its own time budget, so a crash, a hung kernel or a CUDA error in one part is recorded and
the others still run; `--parts` reruns a subset and merges it into an existing gpu_check.json.
Exit status 0 when no part failed (skips are not failures), 1 otherwise.

Parts (GPU / CPU half):
- kernels: every fused kernel against its plain twin (guidance.update, the guidance's closed-form
  logit gradient, F.softplus) in float32/bfloat16/float16/float64 with non-finite inputs: max
  relative error, non-finite positions, time, GB/s and the fraction of the device's peak (memory
  clock x bus width from the device properties, else a table by name). CPU half: the C++ ops
  timed, the Triton kernels in Triton's interpreter on tiny shapes (correctness only).
- precision: fp16/bf16/TF32 network policies against strict float32 (denoiser output, guidance
  gradient, J) on EDM's ImageNet-64 ADM network and ResNet-101. CPU half: bf16 on tiny networks.
- step: guided and unguided Heun steps of EDM's ImageNet-64 ADM network (`EDMPrecond` with
  `DhariwalUNet`, model_channels 192, channel_mult 1,2,3,4, num_blocks 3, attention at 32,16,8,
  1000 classes, random weights) with ResNet-101 (random weights) at 64x64, batch 64, eager with
  plain pieces, eager with the fused kernels, and CUDA-graph replay: guided/unguided time ratio
  beside the FLOP floor (torch's flop counter), relative error against the plain eager step,
  kernel launches, device kernels and host syncs per step (torch.profiler), images/s and peak
  memory of 18-step runs, NVML power and energy (`elucd_fast.tools.telemetry`). GPU only.
- compiled: the same step under torch.compile (inductor), then compiled and graph-captured:
  compile time, relative error, guided/unguided ratio. CPU half: the digits networks.
- torchrun: `python -m elucd_fast generate` on the digits preset under a 1-process torchrun
  equals a plain run byte for byte, and a collective on the process group the launcher sets up
  (NCCL on a GPU, gloo on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCHEMA = 1
BATCH = 64
RESOLUTION = 64
SAMPLER_STEPS = 18

# Peak DRAM bandwidth (bytes/s) by device name, where the device properties give no memory clock.
PEAK_BANDWIDTH_BY_NAME = {
    "H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
    "GH200": 4.0e12, "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12,
    "L40S": 0.864e12, "L4": 0.3e12, "A10": 0.6e12, "RTX 4090": 1.008e12,
}


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the check: `gpu(ctx)` / `cpu(ctx)` return its result (None: no such half, with
    `cpu_skip` saying why); `budget_gpu` / `budget_cpu`: seconds before its process is stopped."""

    gpu: Callable
    cpu: Callable | None
    budget_gpu: float
    budget_cpu: float
    cpu_skip: str = ""


class Context:
    """What a part runs with: its device, its output folder, its deadline, the result it fills
    in, and the sub-items it skips (each with the reason). The result so far is written after
    every item, so a part stopped at its budget still reports what it finished."""

    def __init__(self, device: torch.device, out: Path, budget: float, name: str = "part"):
        self.device = device
        self.out = out
        self.deadline = time.monotonic() + budget
        self.result: dict = {}
        self.skipped: list[dict] = []
        self.partial_path = out / "parts" / f"{name}.partial.json"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": item, "reason": reason})

    def attempt(self, item: str, needs: float, call: Callable):
        """`call()`, or None when fewer than `needs` seconds are left or it fails; either way
        recorded as a skipped item (a failure with its traceback summary) and the part goes on."""
        if self.left() < needs:
            self.skip(item, f"time budget: {self.left():.0f} s left, about {needs:.0f} s needed")
            return None
        try:
            return call()
        except Exception as error:  # one item failing must not end the part
            self.skip(item, f"failed: {type(error).__name__}: {error}; {traceback_summary(error)}")
            return None
        finally:
            self.flush()

    def flush(self) -> None:
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        self.partial_path.write_text(json.dumps(_jsonable({"result": self.result, "skipped": self.skipped}), indent=1))


def traceback_summary(error: BaseException, frames: int = 4) -> str:
    """The last frames of a traceback, one line each."""
    entries = traceback.extract_tb(error.__traceback__)[-frames:]
    return " <- ".join(f"{Path(e.filename).name}:{e.lineno} {e.name}" for e in reversed(entries))


# ------------------------------------------------------------------------------------------------
# Measuring


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| over the positions where both are finite."""
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(actual) & torch.isfinite(expected)
    if not finite.any():
        return 0.0
    scale = expected[finite].abs().max().item()
    return (actual[finite] - expected[finite]).abs().max().item() / (scale if scale > 0 else 1.0)


def nonfinite_match(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """NaN and +-inf at the same positions."""
    return bool(torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isposinf(), expected.isposinf())
                and torch.equal(actual.isneginf(), expected.isneginf()))


def seconds_per_call(fn: Callable, device: torch.device, reps: int = 20, warmup: int = 3) -> dict:
    """Median and best seconds per call of `fn` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "best_s": min(times)}


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch")
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "aten::_local_scalar_dense")


def profile_counts(fn: Callable, steps: int = 3) -> dict:
    """Per call of `fn`, counted with torch.profiler: launch calls the host makes (kernel and
    graph launches), kernels and copies the device runs, and host syncs (synchronize calls,
    synchronous copies, reads of a device scalar)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("gpu_check_calls"):
            for _ in range(steps):
                fn()
        torch.cuda.synchronize()
    events = prof.events()
    marker = next(e for e in events if e.name == "gpu_check_calls")

    def inside(e) -> bool:
        return e.device_type == DeviceType.CPU and marker.time_range.start <= e.time_range.start \
            and e.time_range.end <= marker.time_range.end

    host = [e for e in events if inside(e)]
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    return {"launch_calls_per_step": sum(e.name in LAUNCH_CALLS for e in host) / steps,
            "graph_launches_per_step": sum(e.name in ("cudaGraphLaunch", "cuGraphLaunch") for e in host) / steps,
            "device_kernels_per_step": sum(not e.name.lower().startswith(("memcpy", "memset")) for e in device) / steps,
            "host_syncs_per_step": sum(e.name in SYNC_CALLS for e in host) / steps}


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """(bytes/s, where the number comes from) of the device's DRAM."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        peak = 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate
        if 1e11 < peak < 2e13:
            return peak, f"device properties: 2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bit"
    for name, peak in PEAK_BANDWIDTH_BY_NAME.items():
        if name.lower() in props.name.lower():
            return peak, f"table by device name ({name})"
    return None, f"unknown for {props.name}"


# ------------------------------------------------------------------------------------------------
# The networks


def adm64_networks(device: torch.device):
    """EDM's ImageNet-64 ADM network and ResNet-101, random weights, frozen, on `device`. EDM
    zero-initialises output layers; those get small random weights so the network's output
    depends on its input (the precision errors then measure the whole network)."""
    import torchvision

    from elucd_fast.models.edm_networks import EDMPrecond

    torch.manual_seed(0)
    with torch.device(device):
        net = EDMPrecond(img_resolution=RESOLUTION, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                         model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8])
        classifier = torchvision.models.resnet101(num_classes=1000)
    for p in net.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.xavier_uniform_(p, gain=0.2)
    return net.eval().requires_grad_(False), classifier.eval()


def tiny_networks(device: torch.device):
    """bench_sampler's "tiny" size: a 32-channel DhariwalUNet at 16x16 and ResNet-18."""
    import torchvision

    from elucd_fast.models.edm_networks import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=32,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    for p in net.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.xavier_uniform_(p, gain=0.2)
    return net.to(device).eval().requires_grad_(False), torchvision.models.resnet18(num_classes=1000).to(device).eval()


def guidance_for(classifier):
    """The paper's EDM guidance settings: beta 5, tau_j 1, tau_m 0."""
    from elucd_fast.guidance import ClassifierGuidance

    return ClassifierGuidance(classifier, softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0)


def step_inputs(device: torch.device, batch: int, resolution: int, dtype=torch.float32):
    """A mid-chain Heun step's inputs (sigma 2 -> 1.5), fixed by seed."""
    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, 3, resolution, resolution, device=device, generator=generator, dtype=dtype) * 2.0
    z = torch.randn(x.shape, device=device, generator=generator, dtype=dtype)
    labels = torch.randint(0, 1000, (batch,), device=device, generator=generator)
    t = [torch.tensor(v, dtype=torch.float64, device=device) for v in (2.0, 2.0, 1.5)]
    weight = torch.tensor(0.004, dtype=dtype, device=device)
    one_hot = torch.nn.functional.one_hot(labels, 1000).float()
    return x, z, t, weight, one_hot, labels


# ------------------------------------------------------------------------------------------------
# Part: kernels


def _softplus_pair(apply):
    def run(x, dy):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = apply(x)
            (dx,) = torch.autograd.grad(y, x, dy)
        return y.detach(), dx

    return run


def kernel_cases(implementation: str, big: bool) -> list[dict]:
    """Every kernel of `implementation` ("triton" or "cpp") with its twin, inputs and
    compulsory bytes (each input read once, each output written once)."""
    import torch.nn.functional as F

    from elucd_fast.guidance import update as plain
    from elucd_fast.guidance.classifier import closed_form_logit_grad

    def shape(large, small):
        return large if big else small

    def randn(shape, dtype, device, seed, scale=1.0):
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)

    def edm_inputs(s, dtype, device):
        x, g, z = randn(s, dtype, device, 0, 3.0), randn(s, dtype, device, 1, 1e-3), randn(s, dtype, device, 2)
        return (x, g, z, torch.tensor(0.3, dtype=torch.float64, device=device),
                randn(s[:1], torch.float32, device, 3).abs()), 4 * x.numel() * x.element_size()

    def classifier_inputs(s, dtype, device):
        x = randn(s, dtype, device, 0, 3.0)
        return (x,), 2 * x.numel() * x.element_size()

    def dit_inputs(s, dtype, device):
        d = randn(s, dtype, device, 0, 0.5)
        g = randn((s[0], s[1] + 1, *s[2:]), dtype, device, 1, 1e-2)[:, :s[1]]
        return (d, g, torch.tensor(0.13, device=device)), 3 * d.numel() * d.element_size()

    def ddpm_inputs(s, dtype, device):
        mean, g = randn(s, dtype, device, 0), randn(s, dtype, device, 2)
        variance = randn(s, dtype, device, 1, 0.1).abs()
        vmax, sine = randn(s[:1], dtype, device, 3, 0.2).abs(), torch.tensor(0.6, device=device)
        return (mean, variance, g, vmax, sine, 1.0, 0.3), 4 * mean.numel() * mean.element_size()

    def softplus_inputs(s, dtype, device):
        x, dy = randn(s, dtype, device, 0, 4.0), randn(s, dtype, device, 1)
        return (x, dy), 5 * x.numel() * x.element_size()

    def logit_inputs(s, dtype, device):
        logits = randn(s, dtype, device, 0, 5.0)
        labels = torch.randint(0, s[1], s[:1], generator=torch.Generator().manual_seed(1)).to(device)
        return (logits, labels, 1.0, 0.5, randn(s[:1], torch.float32, device, 2)), \
            logits.numel() * (logits.element_size() + 4)

    edm_shape, latent_shape = shape((BATCH, 3, 64, 64), (3, 3, 5, 7)), shape((BATCH, 3, 32, 32), (3, 3, 5, 7))
    cases = []
    if implementation == "triton":
        from elucd_fast.kernels import ddpm_guided_mean, guidance_update, logit_grad, softplus

        cases += [
            dict(kernel="guidance_update", piece="edm_update", shape=edm_shape, inputs=edm_inputs,
                 fast=guidance_update.guidance_update, twin=plain.edm_guidance_update),
            dict(kernel="classifier_input", piece="edm_update", shape=edm_shape, inputs=classifier_inputs,
                 fast=guidance_update.classifier_input, twin=plain.edm_classifier_input),
            dict(kernel="dit_guided_difference", piece="dit_difference", shape=latent_shape, inputs=dit_inputs,
                 fast=guidance_update.dit_guided_difference, twin=plain.dit_guided_difference),
            dict(kernel="ddpm_guided_mean", piece="ddpm_mean", shape=shape((BATCH, 3, 128, 128), (3, 3, 5, 7)),
                 inputs=ddpm_inputs, fast=ddpm_guided_mean.ddpm_guided_mean, twin=plain.ddpm_guided_mean),
            dict(kernel="softplus forward+backward", piece="softplus", shape=shape((BATCH, 256, 16, 16), (3, 4, 5, 7)),
                 inputs=softplus_inputs, fast=_softplus_pair(lambda x: softplus.TritonSoftplus.apply(x, 5.0, 20.0)),
                 twin=_softplus_pair(lambda x: F.softplus(x, 5.0, 20.0))),
            dict(kernel="logit_grad", piece="logit_grad", shape=shape((BATCH, 1000), (5, 37)), inputs=logit_inputs,
                 fast=logit_grad.logit_grad, twin=closed_form_logit_grad),
        ]
    else:
        from elucd_fast.csrc import ops

        cases += [
            dict(kernel="guidance_update", piece="edm_update", shape=shape((8, 3, 64, 64), (8, 3, 64, 64)),
                 inputs=edm_inputs, fast=ops.guidance_update, twin=plain.edm_guidance_update),
            dict(kernel="classifier_input", piece="edm_update", shape=(8, 3, 64, 64), inputs=classifier_inputs,
                 fast=ops.classifier_input, twin=plain.edm_classifier_input),
            dict(kernel="dit_guided_difference", piece="dit_difference", shape=(8, 3, 32, 32), inputs=dit_inputs,
                 fast=ops.dit_guided_difference, twin=plain.dit_guided_difference),
            dict(kernel="ddpm_guided_mean", piece="ddpm_mean", shape=(8, 3, 64, 64), inputs=ddpm_inputs,
                 fast=ops.ddpm_guided_mean, twin=plain.ddpm_guided_mean),
        ]
    return cases


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _with_nonfinite(args: tuple) -> tuple:
    """The inputs with NaN in sample 1 and +inf in sample 2 of the first tensor (B >= 3)."""
    first = args[0].clone()
    first[1].view(-1)[0] = math.nan
    first[2].view(-1)[-1] = math.inf
    return (first, *args[1:])


def check_kernels(ctx: Context, implementation: str, big: bool, timed: bool, peak: float | None) -> None:
    """Appends one row per kernel and dtype to ctx.result["rows"]."""
    rows = ctx.result.setdefault("rows", [])
    device = ctx.device
    for case in kernel_cases(implementation, big):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            def measure(case=case, dtype=dtype):
                args, nbytes = case["inputs"](case["shape"], dtype, device)
                fast, twin = _as_tuple(case["fast"](*args)), _as_tuple(case["twin"](*args))
                row = {"kernel": case["kernel"], "piece": case["piece"], "implementation": implementation,
                       "dtype": str(dtype).removeprefix("torch."), "shape": list(case["shape"]),
                       "max_rel_error": max(rel_error(a, b) for a, b in zip(fast, twin))}
                special = _with_nonfinite(args)
                row["nonfinite_match"] = all(nonfinite_match(a, b) for a, b in
                                             zip(_as_tuple(case["fast"](*special)), _as_tuple(case["twin"](*special))))
                if timed and dtype in (torch.float32, torch.bfloat16):
                    reps = 20 if device.type == "cuda" else 10
                    fast_time = seconds_per_call(lambda: case["fast"](*args), device, reps)["median_s"]
                    twin_time = seconds_per_call(lambda: case["twin"](*args), device, reps)["median_s"]
                    row.update(ms=fast_time * 1e3, twin_ms=twin_time * 1e3, speedup=twin_time / fast_time,
                               GBps=nbytes / fast_time / 1e9, twin_GBps=nbytes / twin_time / 1e9)
                    if peak:
                        row["fraction_of_peak"] = nbytes / fast_time / peak
                return row

            row = ctx.attempt(f"{implementation} {case['kernel']} {dtype}", 2.0, measure)
            if row is not None:
                rows.append(row)


def _speedups(rows: list[dict]) -> dict:
    """piece -> the float32 speed-ups of its kernels over their twins (what `auto` reads)."""
    out: dict[str, dict] = {}
    for row in rows:
        if row["dtype"] == "float32" and "speedup" in row:
            out.setdefault(row["piece"], {})[row["kernel"]] = row["speedup"]
    return out


def part_kernels_gpu(ctx: Context) -> dict:
    peak, source = peak_bandwidth(ctx.device)
    ctx.result.update(peak_bandwidth_GBps=peak and peak / 1e9, peak_source=source)
    check_kernels(ctx, "triton", big=True, timed=True, peak=peak)
    ctx.result["speedups_float32"] = _speedups(ctx.result["rows"])
    return ctx.result


def part_kernels_cpu(ctx: Context) -> dict:
    from elucd_fast import kernels
    from elucd_fast.csrc import ops

    ctx.result["rows"] = []
    if ops.cpp_ops_available():
        check_kernels(ctx, "cpp", big=False, timed=True, peak=None)
    else:
        ctx.skip("cpp kernels", "the C++ ops could not be built here")
    if kernels.triton_available():
        check_kernels(ctx, "triton", big=False, timed=False, peak=None)
        ctx.skip("triton timings", "Triton's interpreter is an emulator, not a speed: Triton is timed on a GPU")
    else:
        ctx.skip("triton kernels", "Triton cannot run here (not importable, or TRITON_INTERPRET unset)")
    ctx.skip("GB/s against peak", "no peak bandwidth for a CPU: C++ rows give GB/s only")
    ctx.result["speedups_float32"] = _speedups(ctx.result["rows"])
    return ctx.result


# ------------------------------------------------------------------------------------------------
# Part: precision


def _policy_errors(net, guide, policy_name: str, device: torch.device, x, sigma, one_hot, labels, reference) -> dict:
    from elucd_fast.engine import apply_precision, resolve_precision

    policy = resolve_precision(policy_name, device)
    fast_net = apply_precision(net, policy, device)
    fast_guide = guide.with_pieces()
    fast_guide.classifier = apply_precision(fast_guide.classifier, policy, device)
    with torch.no_grad():
        denoised = fast_net(x, sigma, one_hot)
    grad, objective = fast_guide(x / x.square().mean().sqrt(), labels)
    return {"policy": policy_name, "denoiser_rel_error": rel_error(denoised, reference[0]),
            "guidance_grad_rel_error": rel_error(grad, reference[1]), "J_rel_error": rel_error(objective, reference[2]),
            "finite": bool(torch.isfinite(denoised).all() and torch.isfinite(grad).all()),
            "output_dtype": str(denoised.dtype).removeprefix("torch.")}


@contextlib.contextmanager
def tf32(enabled: bool):
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _precision_rows(ctx: Context, net, classifier, batch: int, resolution: int, policies: list[str]) -> None:
    """Fills ctx.result["rows"]: one row per policy."""
    guide = guidance_for(classifier)
    x, _, t, _, one_hot, labels = step_inputs(ctx.device, batch, resolution)
    sigma = t[1].float()
    with tf32(False), torch.no_grad():
        reference_denoised = net(x, sigma, one_hot)
    with tf32(False):
        reference = (reference_denoised, *guide(x / x.square().mean().sqrt(), labels))
    rows = ctx.result.setdefault("rows", [])
    rows.append({"policy": "fp32 (strict)", "denoiser_rel_error": 0.0, "guidance_grad_rel_error": 0.0,
                 "J_rel_error": 0.0, "finite": bool(all(torch.isfinite(r).all() for r in reference))})
    if ctx.cuda:
        def tf32_row():
            with tf32(True), torch.no_grad():
                denoised = net(x, sigma, one_hot)
            with tf32(True):
                grad, objective = guide(x / x.square().mean().sqrt(), labels)
            return {"policy": "tf32 (fp32 policy on CUDA)", "denoiser_rel_error": rel_error(denoised, reference[0]),
                    "guidance_grad_rel_error": rel_error(grad, reference[1]),
                    "J_rel_error": rel_error(objective, reference[2]),
                    "finite": bool(torch.isfinite(denoised).all() and torch.isfinite(grad).all())}

        row = ctx.attempt("tf32", 5, tf32_row)
        rows += [row] if row else []
    for name in policies:
        with tf32(False):
            row = ctx.attempt(name, 5, lambda name=name: _policy_errors(net, guide, name, ctx.device, x, sigma,
                                                                       one_hot, labels, reference))
        rows += [row] if row else []


def part_precision_gpu(ctx: Context) -> dict:
    ctx.result["networks"] = "EDM ImageNet-64 ADM + ResNet-101, batch 8"
    net, classifier = adm64_networks(ctx.device)
    _precision_rows(ctx, net, classifier, 8, RESOLUTION, ["bf16", "fp16"])
    return ctx.result


def part_precision_cpu(ctx: Context) -> dict:
    from elucd_fast.engine.precision import hardware_bf16

    ctx.result["networks"] = "DhariwalUNet 32 channels 16x16 + ResNet-18, batch 4"
    net, classifier = tiny_networks(ctx.device)
    ctx.skip("fp16, tf32", "CUDA only")
    policies = ["bf16"] if hardware_bf16("cpu") else []
    if not policies:
        ctx.skip("bf16", "this CPU has no bf16 hardware (AMX or AVX512-BF16)")
    _precision_rows(ctx, net, classifier, 4, 16, policies)
    return ctx.result


# ------------------------------------------------------------------------------------------------
# Parts: step (eager, fused, CUDA graphs) and compiled


def _call_step(step, net, guide, ops, inputs, guided: bool) -> torch.Tensor:
    """x_next of one Heun step (sigma 2 -> 1.5) of `step` (edm_step or a runner's version)."""
    x, z, t, weight, one_hot, labels = inputs
    with torch.no_grad():
        return step(net, guide, x, z, *t, weight, 1.0, one_hot, labels, guided=guided, heun=True,
                    **({"ops": ops} if ops is not None else {}))[0]


def _measure_guided(ctx: Context, step, net, guide, ops, inputs, reference) -> dict:
    out = _call_step(step, net, guide, ops, inputs, True).clone()
    guided = seconds_per_call(lambda: _call_step(step, net, guide, ops, inputs, True), ctx.device, reps=10)
    return {"guided_ms": guided["median_s"] * 1e3, "rel_error_vs_plain_eager": rel_error(out, reference),
            "finite": bool(torch.isfinite(out).all())}


def _measure_unguided(ctx: Context, step, net, guide, ops, inputs, row: dict) -> dict:
    unguided = seconds_per_call(lambda: _call_step(step, net, guide, ops, inputs, False), ctx.device, reps=10)
    row.update(unguided_ms=unguided["median_s"] * 1e3,
               guided_over_unguided=row["guided_ms"] / (unguided["median_s"] * 1e3))
    return row


def _measure_mode(ctx: Context, name: str, step, net, guide, ops, inputs, reference, modes: dict) -> None:
    """Fills modes[name]: guided and unguided step times, their ratio, the error against the
    plain eager step, and (on a GPU) the profiler's launch, kernel and sync counts."""
    row = ctx.attempt(f"{name}: guided step", 10, lambda: _measure_guided(ctx, step, net, guide, ops, inputs,
                                                                          reference))
    if row is None:
        return
    modes[name] = row
    ctx.attempt(f"{name}: unguided step", 10, lambda: _measure_unguided(ctx, step, net, guide, ops, inputs, row))
    if ctx.cuda:
        counts = ctx.attempt(f"{name}: profiler counts", 10, lambda: profile_counts(
            lambda: _call_step(step, net, guide, ops, inputs, True)))
        row.update(counts or {})


def _flop_floor(net, guide, inputs) -> dict:
    from timing import classifier_flops, count_flops

    x, _, t, _, one_hot, _ = inputs
    with torch.no_grad():
        denoiser = count_flops(lambda: net(x, t[1], one_hot))
    classifier = classifier_flops(guide.classifier, x)
    return {"denoiser_gflops": denoiser / 1e9, "classifier_fwd_bwd_gflops": classifier / 1e9,
            "flop_floor": (2 * denoiser + classifier) / (2 * denoiser)}


def _sampler_run(ctx: Context, net, guide, ops, step_runner, batch: int, resolution: int, telemetry: bool) -> dict:
    """images/s, peak memory (and NVML power/energy) of one 18-step guided run, after a warm-up run."""
    from elucd_fast.rng import StackedRandomGenerator
    from elucd_fast.samplers.edm import edm_sampler

    seeds = list(range(batch))

    def run():
        rnd = StackedRandomGenerator(ctx.device, seeds)
        latents = rnd.randn([batch, 3, resolution, resolution], device=ctx.device)
        labels = rnd.randint(1000, size=[batch], device=ctx.device)
        out = edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=SAMPLER_STEPS, guidance=guide,
                          max_guidance=0.004, add_factor=0.3, step_runner=step_runner,
                          **({"ops": ops} if ops is not None else {}))
        if ctx.cuda:
            torch.cuda.synchronize(ctx.device)
        return out

    run()
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    meter = contextlib.nullcontext()
    telemetry_error = None
    if telemetry:
        from elucd_fast.tools.telemetry import TelemetryUnavailable, gpu_telemetry

        try:
            meter = gpu_telemetry(ctx.device, interval_s=0.05)
        except TelemetryUnavailable as error:
            telemetry_error = str(error)
    with meter:
        start = time.monotonic()
        out = run()
        end = time.monotonic()
    row = {"images_per_s": batch / (end - start), "sampler_finite": bool(torch.isfinite(out).all())}
    if ctx.cuda:
        row["peak_memory_GiB"] = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30
    if telemetry:
        if telemetry_error is None:
            summary = meter.summary(start, end)
            row["telemetry"] = summary
            if summary.get("energy_j") is not None:
                row["joules_per_image"] = summary["energy_j"] / batch
        else:
            ctx.skip("NVML telemetry", telemetry_error)
    return row


def _engine_setup(ctx: Context, compiled: bool):
    """The step networks as `configure_job` sets them up: the engine's `auto` precision policy
    (float32 with TF32 and channels-last on a GPU) and `--fused on`. Returns (net, plain
    guidance, fused guidance, choice, policy name)."""
    from elucd_fast.engine import apply_precision, choose_fused, resolve_precision

    net, classifier = adm64_networks(ctx.device)
    guide = guidance_for(classifier)
    choice = choose_fused(ctx.device, "on", sampler="edm", guidance=guide, compiled=compiled)
    fused_guide = choice.prepare_guidance(guide)
    policy = resolve_precision("auto", ctx.device)
    net = apply_precision(net, policy, ctx.device)
    for each in (guide, fused_guide):
        each.classifier = apply_precision(each.classifier, policy, ctx.device)
    return net, guide, fused_guide, choice, f"{policy.name} ({policy.reason})"


def part_step_gpu(ctx: Context) -> dict:
    from elucd_fast.engine import CUDAGraphStepRunner
    from elucd_fast.samplers.edm import edm_step

    result = ctx.result
    result["setup"] = (f"EDM ImageNet-64 ADM (EDMPrecond + DhariwalUNet 192, [1,2,3,4], 3 blocks, attention 32/16/8) "
                       f"+ ResNet-101, batch {BATCH}, {RESOLUTION}x{RESOLUTION}, one Heun step sigma 2 -> 1.5; "
                       f"{SAMPLER_STEPS}-step runs for images/s")
    net, guide, fused_guide, choice, precision = _engine_setup(ctx, compiled=False)
    inputs = step_inputs(ctx.device, BATCH, RESOLUTION)
    result.update(precision=precision, fused_pieces=choice.implementations, fused_messages=list(choice.messages),
                  modes={})
    reference = _call_step(edm_step, net, guide, None, inputs, True).clone()
    result.update(ctx.attempt("FLOP floor", 10, lambda: _flop_floor(net, guide, inputs)) or {})
    graphs = CUDAGraphStepRunner()
    modes = {"eager (plain pieces)": (edm_step, guide, None), "eager (fused kernels)": (edm_step, fused_guide,
                                                                                           choice.step_ops),
             "CUDA graphs (fused kernels)": (graphs(edm_step), fused_guide, choice.step_ops)}
    for name, (step, mode_guide, ops) in modes.items():
        _measure_mode(ctx, name, step, net, mode_guide, ops, inputs, reference, result["modes"])
        if name not in result["modes"]:
            continue
        runner = CUDAGraphStepRunner() if step is not edm_step else None
        sampler = ctx.attempt(f"{name}: {SAMPLER_STEPS}-step run", 20, lambda: _sampler_run(
            ctx, net, mode_guide, ops, runner, BATCH, RESOLUTION, telemetry=name == "eager (fused kernels)"))
        result["modes"][name].update(sampler or {})
        if runner is not None:
            result["modes"][name]["graph_fallbacks"] = _fallbacks(graphs, runner)
    return result


def _fallbacks(*runners) -> dict:
    """Step variants a CUDA-graph runner ran uncaptured, with the first line of the reason
    (none expected)."""
    return {", ".join(f"{flag}={value}" for flag, value in key if flag != "ops"): reason.splitlines()[0]
            for runner in runners for key, reason in runner.fallbacks.items()}


def _compiled_modes(ctx: Context, net, guide, choice, inputs, reference, backend: str, graphs: bool) -> dict:
    """Compiles the step, then measures it, and compiled + graph-captured, into ctx.result."""
    from elucd_fast.engine import CompiledStepRunner, CUDAGraphStepRunner
    from elucd_fast.samplers.edm import edm_step

    result = ctx.result
    result.update(backend=backend, fused_pieces=choice.implementations, modes={})
    runner = CompiledStepRunner(backend=backend)
    compiled = runner(edm_step)
    ops = choice.step_ops

    def first_call(guided: bool) -> float:
        start = time.perf_counter()
        _call_step(compiled, net, guide, ops, inputs, guided)
        result["compile_seconds"] = runner.compile_seconds
        return time.perf_counter() - start

    ctx.attempt("compile of the guided step", 30, lambda: result.update(guided_first_call_s=first_call(True)))
    if "guided_first_call_s" not in result:
        return result
    row = ctx.attempt("compiled: guided step", 5, lambda: _measure_guided(ctx, compiled, net, guide, ops, inputs,
                                                                         reference))
    if row is None:
        return result
    row["images_per_s_estimate"] = inputs[0].shape[0] / (SAMPLER_STEPS * row["guided_ms"] / 1e3)
    result["modes"]["compiled"] = row
    ctx.attempt("compile of the unguided step", 30, lambda: result.update(unguided_first_call_s=first_call(False)))
    if "unguided_first_call_s" in result:
        ctx.attempt("compiled: unguided step", 5,
                    lambda: _measure_unguided(ctx, compiled, net, guide, ops, inputs, row))
    result["graphs"] = runner.graphs
    if graphs:
        graph_runner = CUDAGraphStepRunner()
        _measure_mode(ctx, "compiled + CUDA graphs", graph_runner(compiled), net, guide, ops, inputs, reference,
                      result["modes"])
        graphed = result["modes"].get("compiled + CUDA graphs")
        if graphed:
            graphed["images_per_s_estimate"] = inputs[0].shape[0] / (SAMPLER_STEPS * graphed["guided_ms"] / 1e3)
            graphed["graph_fallbacks"] = _fallbacks(graph_runner)
    return result


def part_compiled_gpu(ctx: Context) -> dict:
    from elucd_fast.samplers.edm import edm_step

    net, guide, fused_guide, choice, precision = _engine_setup(ctx, compiled=True)
    inputs = step_inputs(ctx.device, BATCH, RESOLUTION)
    reference = _call_step(edm_step, net, guide, None, inputs, True).clone()
    ctx.result.update(setup=f"as step (ADM-64 + ResNet-101, batch {BATCH}), --fused on under torch.compile",
                      precision=precision)
    return _compiled_modes(ctx, net, fused_guide, choice, inputs, reference, "inductor", graphs=True)


def part_compiled_cpu(ctx: Context) -> dict:
    """torch.compile of the guided digits EDM step against its plain eager run. The aot_eager
    backend traces the whole step (dynamo, AOTAutograd, the kernels' fake versions) without
    generating code: inductor's code generation took 146 s for this step on a loaded 2-core
    machine, so it is checked in the GPU half."""
    from elucd_fast.engine import choose_fused
    from elucd_fast.presets import get_preset
    from elucd_fast.samplers.edm import edm_step

    batch = 16
    ctx.result["setup"] = f"digits preset networks (1x8x8, 10 classes), batch {batch}, --fused on under torch.compile"
    job = get_preset("digits").build(device="cpu")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=generator) * 2.0
    z = torch.randn(x.shape, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    t = [torch.tensor(v, dtype=torch.float64) for v in (2.0, 2.0, 1.5)]
    inputs = (x, z, t, torch.tensor(0.02), torch.nn.functional.one_hot(labels, 10).float(), labels)
    guide = job.guidance
    guide.check_input((1, 8, 8), labels, "cpu")
    reference = _call_step(edm_step, job.net, guide, None, inputs, True).clone()
    choice = choose_fused("cpu", "on", sampler="edm", guidance=guide, compiled=True)
    ctx.skip("compiled + CUDA graphs", "CUDA only")
    ctx.skip("inductor code generation", "GPU half (the aot_eager backend traces the same step here: inductor took "
                                         "146 s to compile it on a loaded 2-core machine)")
    return _compiled_modes(ctx, job.net, choice.prepare_guidance(guide), choice, inputs, reference, "aot_eager",
                           graphs=False)


# ------------------------------------------------------------------------------------------------
# Part: torchrun

PROBE = """
import json, os, torch, torch.distributed as dist
cuda = torch.cuda.is_available()
backend = "nccl" if cuda else "gloo"
kwargs = {}
if cuda:
    kwargs["device_id"] = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(kwargs["device_id"])
dist.init_process_group(backend, **kwargs)
value = torch.full((4,), float(dist.get_rank() + 1), device="cuda" if cuda else "cpu")
dist.all_reduce(value)
dist.barrier()
print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(), "all_reduce": value.tolist()}))
dist.destroy_process_group()
"""


def _run(command: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {result.returncode}: {result.stderr[-1500:]}")
    return result


def part_torchrun(ctx: Context) -> dict:
    import numpy as np

    work = ctx.out / "torchrun"
    work.mkdir(parents=True, exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    generate = ["-m", "elucd_fast", "generate", "--preset", "digits", "--seeds", "0-47", "--batch", "32",
                "--no-metrics", "--no-progress"]
    result = ctx.result
    result["backend"] = "nccl" if ctx.cuda else "gloo"
    result["note"] = ("a 1-process torchrun makes a world of one, which generate runs without a process group; "
                      "the probe joins the launcher's process group and runs a collective on it")
    probe = work / "probe.py"
    probe.write_text(PROBE)
    start = time.monotonic()
    reply = _run([*torchrun, str(probe)], timeout=max(ctx.left() - 5, 10), cwd=work)
    result["process_group"] = json.loads(reply.stdout.strip().splitlines()[-1])
    result["probe_seconds"] = time.monotonic() - start
    runs = {}
    for name, prefix in (("plain", [sys.executable]), ("torchrun", torchrun)):
        folder = work / name
        start = time.monotonic()
        _run([*prefix, *generate, "--outdir", str(folder)], timeout=max(ctx.left() - 5, 10), cwd=work)
        with np.load(folder / "samples.npz") as data:
            runs[name] = {key: data[key] for key in data.files}
        result[f"{name}_seconds"] = time.monotonic() - start
    plain, launched = runs["plain"], runs["torchrun"]
    result["byte_equal"] = plain.keys() == launched.keys() and all(
        plain[key].shape == launched[key].shape and plain[key].tobytes() == launched[key].tobytes() for key in plain)
    result["images"] = int(plain["arr_0"].shape[0])
    if not result["byte_equal"] and plain["arr_0"].shape == launched["arr_0"].shape:
        differ = (plain["arr_0"] != launched["arr_0"]).reshape(len(plain["arr_0"]), -1).any(axis=1)
        result["images_differing"] = int(differ.sum())
        result["max_abs_uint8_difference"] = int(np.abs(plain["arr_0"].astype(int) - launched["arr_0"]).max())
    return result


# ------------------------------------------------------------------------------------------------
# Running parts, each in its own process

PARTS = {
    "kernels": Part(part_kernels_gpu, part_kernels_cpu, 50, 45),
    "precision": Part(part_precision_gpu, part_precision_cpu, 40, 20),
    "step": Part(part_step_gpu, None, 100, 0, cpu_skip="needs a CUDA device: batch 64 of EDM's ADM-64 network with "
                                                     "ResNet-101 takes minutes per step on a CPU, and CUDA graphs, "
                                                     "the profiler's launch counts and NVML need a GPU"),
    "compiled": Part(part_compiled_gpu, part_compiled_cpu, 180, 45),
    "torchrun": Part(part_torchrun, part_torchrun, 50, 45),
}
STARTUP_GRACE_S = 10  # a part's process may take this long to start on top of its budget


def _jsonable(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_part_here(name: str, out: Path) -> None:
    """The child process's work: run part `name`, write parts/NAME.json."""
    cuda = torch.cuda.is_available()
    part = PARTS[name]
    ctx = Context(torch.device("cuda" if cuda else "cpu"), out, part.budget_gpu if cuda else part.budget_cpu, name)
    start = time.monotonic()
    record = {"part": name}
    try:
        record.update(status="ok", result=(part.gpu if cuda else part.cpu)(ctx))
    except Exception as error:  # recorded for the report; the parent goes on with the next part
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback_summary(error, 8))
    if record["status"] != "ok":
        record["result"] = ctx.result  # what the part finished before it failed
    record.update(seconds=time.monotonic() - start, skipped=ctx.skipped)
    path = out / "parts" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(record), indent=1))
    ctx.partial_path.unlink(missing_ok=True)


def run_part(name: str, out: Path, cuda: bool) -> dict:
    """Runs part `name` in a child process under its budget (plus start-up grace)."""
    part = PARTS[name]
    if not cuda and part.cpu is None:
        return {"part": name, "status": "skipped", "reason": part.cpu_skip, "seconds": 0.0, "skipped": []}
    budget = part.budget_gpu if cuda else part.budget_cpu
    env = dict(os.environ)
    if not cuda:
        env["TRITON_INTERPRET"] = "1"  # Triton kernels run in the interpreter on CPU tensors
        # One thread per process: on a shared few-core machine more threads than free cores make
        # every op wait (a digits run took 64 s with 2 threads next to other jobs, 3.7 s with 1).
        env.setdefault("OMP_NUM_THREADS", "1")
    path, partial = out / "parts" / f"{name}.json", out / "parts" / f"{name}.partial.json"
    path.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    start = time.monotonic()
    command = [sys.executable, str(Path(__file__).resolve()), "--run-part", name, "--out", str(out)]
    try:
        child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=budget + STARTUP_GRACE_S)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr or ""
        record = {"part": name, "status": "timeout", "seconds": time.monotonic() - start, "skipped": [],
                  "error": f"stopped after its budget of {budget:.0f} s (+{STARTUP_GRACE_S} s start-up)",
                  "stderr_tail": stderr[-2000:]}
        if partial.exists():  # what it finished before the budget ran out
            record.update(json.loads(partial.read_text()))
        return record
    if path.exists():
        record = json.loads(path.read_text())
        if record["status"] != "ok":
            record["stderr_tail"] = child.stderr[-2000:]
        return record
    return {"part": name, "status": "failed", "seconds": time.monotonic() - start, "skipped": [],
            "error": f"the part's process exited {child.returncode} without a result",
            "stderr_tail": child.stderr[-3000:]}


def environment(cuda: bool) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "cuda": cuda}
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        timeout=10).stdout.strip()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        peak, source = peak_bandwidth(torch.device("cuda", 0))
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_GiB=props.total_memory / 2 ** 30, cuda_runtime=torch.version.cuda,
                    peak_bandwidth_GBps=peak and peak / 1e9, peak_source=source)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


# ------------------------------------------------------------------------------------------------
# The report


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_number(row.get(key)) if not isinstance(row.get(key), list)
                                       else "x".join(map(str, row[key])) for key, _ in columns) + " |")
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check: {env.get('device')}", "",
             f"{report['finished']}, torch {env['torch']}, triton {env.get('triton', '-')}, commit "
             f"{env.get('commit', '-')[:12]}; total {report['seconds']:.0f} s.", "",
             "| part | status | seconds |", "|---|---|---|"]
    for name, record in report["parts"].items():
        lines.append(f"| {name} | {record['status']} | {record['seconds']:.0f} |")
    parts = report["parts"]
    kernels = parts.get("kernels", {}).get("result")
    if kernels:
        lines += ["", "## Kernels against their plain twins", ""]
        if kernels.get("peak_bandwidth_GBps"):
            lines += [f"Peak bandwidth {kernels['peak_bandwidth_GBps']:.0f} GB/s ({kernels['peak_source']}).", ""]
        lines += _table(kernels["rows"], [("implementation", "impl"), ("kernel", "kernel"), ("dtype", "dtype"),
                                          ("shape", "shape"), ("max_rel_error", "max rel. error"),
                                          ("nonfinite_match", "non-finite match"), ("ms", "ms"), ("twin_ms", "twin ms"),
                                          ("speedup", "speed-up"), ("GBps", "GB/s"),
                                          ("fraction_of_peak", "fraction of peak")])
    precision = parts.get("precision", {}).get("result")
    if precision:
        lines += ["", f"## Precision policies against strict float32 ({precision['networks']})", ""]
        lines += _table(precision["rows"], [("policy", "policy"), ("denoiser_rel_error", "denoiser rel. error"),
                                            ("guidance_grad_rel_error", "guidance gradient rel. error"),
                                            ("J_rel_error", "J rel. error"), ("finite", "finite")])
    for name in ("step", "compiled"):
        result = parts.get(name, {}).get("result")
        if not result or not result.get("modes"):
            continue
        lines += ["", f"## {name}: {result.get('setup', '')}", ""]
        if result.get("precision"):
            lines += [f"Precision policy: {result['precision']}; pieces: {result.get('fused_pieces')}.", ""]
        if "flop_floor" in result:
            lines += [f"FLOP floor of guided/unguided: {result['flop_floor']:.4f} (denoiser "
                      f"{result['denoiser_gflops']:.0f} GFLOP per call, classifier forward+backward "
                      f"{result['classifier_fwd_bwd_gflops']:.0f} GFLOP).", ""]
        if "compile_seconds" in result:
            lines += [f"Compile time {result['compile_seconds']:.0f} s ({result.get('graphs')} step variants).", ""]
        rows = [dict(mode=mode, **row) for mode, row in result["modes"].items()]
        lines += _table(rows, [("mode", "mode"), ("guided_ms", "guided ms"), ("unguided_ms", "unguided ms"),
                               ("guided_over_unguided", "guided/unguided"),
                               ("rel_error_vs_plain_eager", "rel. error vs plain eager"),
                               ("launch_calls_per_step", "launch calls/step"),
                               ("device_kernels_per_step", "device kernels/step"),
                               ("host_syncs_per_step", "host syncs/step"), ("images_per_s", "images/s"),
                               ("images_per_s_estimate", "images/s (from step time)"),
                               ("peak_memory_GiB", "peak GiB"), ("joules_per_image", "J/image")])
    torchrun = parts.get("torchrun", {}).get("result")
    if torchrun:
        lines += ["", "## torchrun", "",
                  f"Process group: {torchrun.get('process_group', '-')}; generate under torchrun equals a plain run "
                  f"byte for byte: {_number(torchrun.get('byte_equal'))} "
                  f"({torchrun.get('images', '-')} images). {torchrun.get('note', '')}"]
    failures = [(name, r) for name, r in parts.items() if r["status"] in ("failed", "timeout")]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {name} ({r['status']}): {r.get('error')} {r.get('traceback', '')}" for name, r in failures]
    skipped = skip_list(report)
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {item}: {reason}" for item, reason in skipped]
    return "\n".join(lines) + "\n"


def skip_list(report: dict) -> list[tuple[str, str]]:
    """(what, why) for every part and sub-item skipped."""
    out = []
    for name, record in report["parts"].items():
        if record["status"] == "skipped":
            out.append((name, record["reason"]))
        out += [(f"{name}: {s['item']}", s["reason"]) for s in record.get("skipped", [])]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out") / "gpu_check", help="output folder")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: all of {', '.join(PARTS)})")
    parser.add_argument("--list", action="store_true", help="list the parts and their budgets, then exit")
    parser.add_argument("--run-part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.run_part:
        run_part_here(args.run_part, out)
        return 0
    cuda = torch.cuda.is_available()
    if args.list:
        for name, part in PARTS.items():
            cpu = f"{part.budget_cpu:.0f} s" if part.cpu else f"skipped ({part.cpu_skip})"
            print(f"{name}: GPU budget {part.budget_gpu:.0f} s, CPU half {cpu}")
        return 0
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; the parts: {', '.join(PARTS)}")
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "gpu_check.json"
    report = {"schema": SCHEMA, "parts": {}}
    if report_path.exists() and set(names) != set(PARTS):  # a rerun of some parts completes the last report
        with contextlib.suppress(ValueError, KeyError):
            previous = json.loads(report_path.read_text())
            if previous.get("schema") == SCHEMA and previous["environment"]["cuda"] == cuda:
                report["parts"] = previous["parts"]
    report["environment"] = environment(cuda)
    print(f"gpu_check on {report['environment']['device']}; writing {out}", flush=True)
    start = time.monotonic()
    for name in names:
        print(f"[{name}] ...", flush=True)
        record = run_part(name, out, cuda)
        report["parts"][name] = record
        extra = f": {record.get('reason') or record.get('error')}" if record["status"] != "ok" else ""
        print(f"[{name}] {record['status']} in {record['seconds']:.0f} s{extra}", flush=True)
    report["parts"] = {name: report["parts"][name] for name in PARTS if name in report["parts"]}
    report["seconds"] = time.monotonic() - start
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report["skipped"] = [{"what": what, "why": why} for what, why in skip_list(report)]
    report_path.write_text(json.dumps(_jsonable(report), indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    for what, why in skip_list(report):
        print(f"skipped: {what}: {why}")
    failed = [name for name, r in report["parts"].items() if r["status"] in ("failed", "timeout")]
    print(f"wrote {report_path} and {out / 'gpu_check.md'} in {report['seconds']:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
