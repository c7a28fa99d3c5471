"""Where the time of a guided sampling step goes: a per-step cost profile of a job.

Parts of a step:

    denoiser             the network's forward calls (EDM Heun: 2 per step, 1 at the last; DDPM: 1; EDM2: its guide network's too)
    classifier_forward   the classifier's forward inside the guidance call
    classifier_gradient  the rest of the guidance call: the input gradient, objective, transform
    noise                the noise source (randn_like)
    update               the rest of the step: the sampler's own arithmetic and Python

The production sampler runs unchanged. The job's network, guidance and noise source are wrapped
in proxies that mark time at their call boundaries, hooks on the classifier mark its forward,
and the sampler's per-step callback closes each step, so update = step total - the other parts.
On the CPU a mark is `time.perf_counter()`; on CUDA it is a recorded `torch.cuda.Event`, and the
host waits for the device once per step, at its end, so the work inside a step stays as
asynchronous as in production. A warm-up batch runs first, untimed (first-call costs: allocator,
kernel selection), and the same job is also timed without guidance for the overhead ratio.

FLOPs (matrix multiplies and convolutions, as `torch.utils.flop_counter` counts them) come from
replaying one recorded call of each part; `flop_limit_ratio` is what guidance would cost if every
FLOP ran at the same rate, the bound the measured `guidance_overhead_ratio` is compared with.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..checks import check_int
from ..job import Job
from ..rng import StackedRandomGenerator, check_seeds
from ..runs.encoding import png_bytes
from ..runs.generation import draw_latents_and_labels, quantize_round
from .telemetry import TelemetryUnavailable, gpu_telemetry

PARTS = ("denoiser", "classifier_forward", "classifier_gradient", "noise", "update")
# Every sampler's loop starts a step with one of these calls: the first one opens step 0, so
# work before the loop (argument checks, the guidance's input probe) belongs to no step.
_STEP_OPENERS = ("denoiser", "noise")
# A profile samples batch_size images at once and keeps every round's timings: far beyond these
# a batch cannot fit in any accelerator and a run would not end.
MAX_PROFILE_BATCH = 1 << 16
MAX_PROFILE_ROUNDS = 10_000


class _HostTimer:
    """Marks are host clock readings: exact for work that runs synchronously (the CPU)."""

    name = "perf_counter"

    @staticmethod
    def mark() -> float:
        return time.perf_counter()

    def synchronize(self) -> None:
        """Nothing is pending on the host."""

    @staticmethod
    def seconds(start: float, end: float) -> float:
        return end - start


class _CudaEventTimer:
    """Marks are CUDA events recorded on the device's current stream; reading a duration needs
    `synchronize` first."""

    name = "cuda_events"

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def seconds(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3


def device_timer(device: torch.device) -> _HostTimer | _CudaEventTimer:
    """The profiler's clock for `device`: host marks on the CPU, CUDA events on CUDA (read a
    duration with `seconds(start, end)` after `synchronize()`)."""
    return _CudaEventTimer(device) if device.type == "cuda" else _HostTimer()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """Collects part intervals of the current step; the sampler callback closes the step."""

    def __init__(self, timer: _HostTimer | _CudaEventTimer):
        self.timer = timer
        self.step_start = None
        self.intervals: list[tuple[str, object, object]] = []
        self.steps: list[dict] = []

    def begin(self, part: str) -> object:
        mark = self.timer.mark()
        if self.step_start is None and part in _STEP_OPENERS:
            self.step_start = mark
        return mark

    def end(self, part: str, start: object) -> None:
        if self.step_start is not None:
            self.intervals.append((part, start, self.timer.mark()))

    def step_end(self, info: dict) -> None:
        end = self.timer.mark()
        self.timer.synchronize()
        seconds: Counter = Counter()
        calls: Counter = Counter()
        for part, start, stop in self.intervals:
            seconds[part] += self.timer.seconds(start, stop)
            calls[part] += 1
        total = self.timer.seconds(self.step_start, end)
        guidance, forward = seconds["guidance"], seconds["classifier_forward"]
        self.steps.append({
            "step": len(self.steps), "denoiser": seconds["denoiser"], "classifier_forward": forward,
            "classifier_gradient": guidance - forward, "noise": seconds["noise"],
            "update": total - seconds["denoiser"] - guidance - seconds["noise"], "total": total,
            "denoiser_calls": calls["denoiser"], "guidance_calls": calls["guidance"]})
        self.intervals = []
        # The next step starts after this bookkeeping (and the synchronisation), not before it.
        self.step_start = self.timer.mark()


class _Probe:
    """State the proxies share: the clock (None: not timing), whether to label calls for a
    trace, and the last arguments each part was called with (replayed to count FLOPs)."""

    def __init__(self):
        self.clock: _StepClock | None = None
        self.annotate = False
        self.last_call: dict[str, tuple[tuple, dict]] = {}
        self._classifier_start = None

    def classifier_pre_hook(self, module, args) -> None:
        self.last_call["classifier_forward"] = (args, {})
        if self.clock is not None:
            self._classifier_start = self.clock.begin("classifier_forward")

    def classifier_post_hook(self, module, args, output) -> None:
        if self.clock is not None and self._classifier_start is not None:
            self.clock.end("classifier_forward", self._classifier_start)
        self._classifier_start = None


class _TimedCall:
    """Calls `target` timed as `part`; every other attribute is the target's own."""

    def __init__(self, target: Callable, part: str, probe: _Probe):
        self._target, self._part, self._probe = target, part, probe

    def __call__(self, *args, **kwargs):
        self._probe.last_call[self._part] = (args, kwargs)
        clock = self._probe.clock
        start = clock.begin(self._part) if clock is not None else None
        label = torch.profiler.record_function(self._part) if self._probe.annotate else contextlib.nullcontext()
        with label:
            out = self._target(*args, **kwargs)
        if clock is not None:
            clock.end(self._part, start)
        return out

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_target"), name)


@contextlib.contextmanager
def _instrumented(job: Job, probe: _Probe):
    """The job with its network (and EDM2's guide network, timed as denoiser work too) and its
    guidance behind timing proxies and hooks on its classifier (removed on exit)."""
    guidance = job.guidance
    timed = replace(job, net=_TimedCall(job.net, "denoiser", probe),
                    guide_net=None if job.guide_net is None else _TimedCall(job.guide_net, "denoiser", probe),
                    guidance=None if guidance is None else _TimedCall(guidance, "guidance", probe))
    handles = []
    if guidance is not None:
        handles = [guidance.classifier.register_forward_pre_hook(probe.classifier_pre_hook),
                   guidance.classifier.register_forward_hook(probe.classifier_post_hook)]
    try:
        yield timed
    finally:
        for handle in handles:
            handle.remove()


def _sample_batch(job: Job, seeds: Sequence[int], device: torch.device, probe: _Probe,
                  clock: _StepClock | None) -> tuple[torch.Tensor, float]:
    """One batch sampled as `generate` samples it; returns the images and the wall seconds."""
    rnd = StackedRandomGenerator(device, seeds)
    latents, labels = draw_latents_and_labels(rnd, job.image_shape, num_classes=job.num_classes,
                                              class_label=None, device=device)
    probe.clock = clock
    try:
        with _instrumented(job, probe) as timed:
            noise = _TimedCall(rnd.randn_like, "noise", probe)
            _synchronize(device)
            start = time.perf_counter()
            images = timed.sample(latents, labels, noise, callback=None if clock is None else clock.step_end)
            _synchronize(device)
            wall = time.perf_counter() - start
    finally:
        probe.clock = None
    return images, wall


def _encode_seconds(images: torch.Tensor) -> float:
    """Seconds to quantize a batch (EDM's rounding) and PNG-encode each image, as the writers do."""
    start = time.perf_counter()
    for image in quantize_round(images).permute(0, 2, 3, 1).cpu().numpy():
        png_bytes(image)
    return time.perf_counter() - start


def count_flops(call: Callable[[], object]) -> int:
    """Matrix-multiply and convolution FLOPs of `call()`, by torch's FLOP formulas."""
    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def _part_flops(job: Job, probe: _Probe) -> dict:
    """FLOPs of one recorded call of each part (at the profiled batch size).

    The classifier's forward + backward is replayed as a forward and a backward to its
    recorded (transformed) input: the same work as the guidance's input gradient, in the form
    the FLOP counter's module tracking supports (it rejects the guidance's own `torch.func.vjp`)."""
    args, kwargs = probe.last_call["denoiser"]
    with torch.no_grad():
        flops = {"denoiser_forward": count_flops(lambda: job.net(*args, **kwargs))}
    if job.guidance is not None:
        classifier = job.guidance.classifier
        (recorded, *rest), _ = probe.last_call["classifier_forward"]
        with torch.no_grad():
            flops["classifier_forward"] = count_flops(lambda: classifier(recorded.detach(), *rest))

        def forward_backward() -> None:
            x = recorded.detach().requires_grad_(True)
            logits = classifier(x, *rest)
            torch.autograd.backward(logits, torch.ones_like(logits), inputs=[x])

        flops["classifier_forward_backward"] = count_flops(forward_backward)
    return flops


def _mean_steps(batches: list[list[dict]]) -> list[dict]:
    """Per step, the mean over batches of each part's seconds (call counts from batch 0)."""
    steps = []
    for i, first in enumerate(batches[0]):
        row = dict(first)
        for key in (*PARTS, "total"):
            row[key] = float(np.mean([batch[i][key] for batch in batches]))
        steps.append(row)
    return steps


def _totals(batches: list[list[dict]], walls: list[float]) -> dict:
    """Seconds per part and in all, summed over every step of every batch."""
    totals = {key: float(sum(step[key] for batch in batches for step in batch)) for key in (*PARTS, "total")}
    for key in ("denoiser_calls", "guidance_calls"):
        totals[key] = int(sum(step[key] for batch in batches for step in batch))
    totals["sampling_wall"] = float(sum(walls))
    return totals


class _Run:
    """The timed batches of one variant (guided or unguided) of the job."""

    def __init__(self, job: Job, encode: bool):
        self.job, self.encode = job, encode
        self.steps: list[list[dict]] = []
        self.walls: list[float] = []
        self.io = 0.0
        self.windows: list[tuple[float, float]] = []

    def time_batch(self, seeds: Sequence[int], device: torch.device, probe: _Probe) -> float:
        """Samples one batch; returns its total step time."""
        clock = _StepClock(device_timer(device))
        start = time.monotonic()
        images, wall = _sample_batch(self.job, seeds, device, probe, clock)
        self.windows.append((start, time.monotonic()))
        self.steps.append(clock.steps)
        self.walls.append(wall)
        if self.encode:
            self.io += _encode_seconds(images)
        return float(sum(step["total"] for step in clock.steps))

    def totals(self) -> dict:
        totals = _totals(self.steps, self.walls)
        if self.encode:
            totals["io"] = self.io
        return totals


# ---------------------------------------------------------------------------------------------
# The profile


def _rate(flops: int, seconds: float) -> float | None:
    """Achieved FLOP/s, None when no time was measured."""
    return flops / seconds if seconds > 0 else None


def profile_job(job: Job, *, batch_size: int, num_batches: int = 1, seeds: Sequence[int] | None = None,
                device: torch.device | str | None = None, trace_path: str | Path | None = None,
                telemetry_interval_s: float = 0.1, warmup: bool = True) -> dict:
    """Per-step cost of sampling `num_batches` batches of `batch_size` images with `job`.

    Args:
        job: the job to profile, as generation would run it (networks already on `device`).
        batch_size: images per sampler call.
        num_batches: timed rounds: each samples one guided batch, then the same seeds unguided.
        seeds: batch_size * num_batches seeds, default 0, 1, ...; latents and labels are drawn
            per seed as `generate` draws them.
        device: where latents and noise live; default the job's device.
        trace_path: if given, one more guided batch runs under torch.profiler and its Chrome
            trace is written there (calls labelled denoiser / guidance / noise).
        telemetry_interval_s: seconds between GPU telemetry samples.
        warmup: sample the first batch once, untimed, before timing.
    Returns:
        JSON-able dict. Times are seconds per batch (steps) or summed over all batches (totals):
        steps / unguided_steps: per step (mean over batches) denoiser, classifier_forward,
            classifier_gradient, noise, update, total, denoiser_calls, guidance_calls.
        totals / unguided_totals: the parts and total summed over steps and batches, call
            counts, sampling_wall (host clock around the sampler calls), io (guided: quantize +
            PNG-encode every image), images, seconds_per_image ((sampling_wall + io) / images).
        flops: per call at batch_size: denoiser_forward, classifier_forward,
            classifier_forward_backward (the whole guidance call).
        flop_rates: achieved FLOP/s of denoiser, classifier_forward, classifier_gradient.
        guidance_overhead_ratio: the median over rounds of guided / unguided total step time (None
            without guidance); guidance_overhead_spread: [min, max] over rounds;
            guidance_overhead_rounds: every round's ratio.
        flop_limit_ratio: (denoiser FLOPs + guided steps * classifier fwd+bwd FLOPs) / denoiser
            FLOPs over the run: the overhead ratio if all FLOPs ran equally fast.
        telemetry: per-phase GPU summaries and samples, or "no GPU telemetry: <reason>".
        step_runner: a note when the job's compiled / graph-captured step runner was removed.
        timer, device, sampler, batch_size, num_batches, num_steps, image_shape, trace;
        step_sequence (the noise levels or timesteps run), network_evaluations (per image),
        schedule (the schedule file's record, when the job ran one).
    """
    check_int("batch_size", batch_size, minimum=1, maximum=MAX_PROFILE_BATCH)
    check_int("num_batches", num_batches, minimum=1, maximum=MAX_PROFILE_ROUNDS)
    if not isinstance(telemetry_interval_s, (int, float)) or not 0 < telemetry_interval_s < math.inf:
        raise ValueError(f"telemetry_interval_s: must be a positive number, got {telemetry_interval_s!r}")
    seeds = check_seeds(range(batch_size * num_batches) if seeds is None else seeds)
    if len(seeds) != batch_size * num_batches:
        raise ValueError(f"seeds: need batch_size * num_batches = {batch_size * num_batches} seeds, got {len(seeds)}")
    device = torch.device(job.device if device is None else device)
    step_runner_note = None
    if job.step_runner is not None:
        # A compiled or graph-captured step runs as one unit: its parts cannot be told apart.
        job = replace(job, step_runner=None)
        step_runner_note = "removed: the parts are measured on the eager step"
    batches = [seeds[k * batch_size:(k + 1) * batch_size] for k in range(num_batches)]
    unguided = replace(job, guidance=None) if job.guidance is not None else None
    probe = _Probe()
    if warmup:
        _sample_batch(job, batches[0], device, probe, None)
        if unguided is not None:
            _sample_batch(unguided, batches[0], device, probe, None)

    try:
        telemetry = gpu_telemetry(device, telemetry_interval_s)
        telemetry_report: dict | str = {}
    except TelemetryUnavailable as err:
        telemetry, telemetry_report = None, f"no GPU telemetry: {err}"
    guided_run = _Run(job, encode=True)
    unguided_run = _Run(unguided, encode=False) if unguided is not None else None
    ratios = []
    flops = None
    with telemetry or contextlib.nullcontext():
        # Guided and unguided batches alternate, so a change in the machine's load between them
        # shows as spread in the per-round ratios instead of biasing the overhead.
        for seeds in batches:
            guided_time = guided_run.time_batch(seeds, device, probe)
            if flops is None:
                # The guided batch's recorded calls are the ones replayed for FLOPs: the unguided
                # batch would overwrite the denoiser's, with equal shapes.
                flops = _part_flops(job, probe)
            if unguided_run is not None:
                ratios.append(guided_time / unguided_run.time_batch(seeds, device, probe))
    if telemetry is not None:
        telemetry_report = {"interval_s": telemetry_interval_s, "guided": telemetry.summary(guided_run.windows),
                            "samples": telemetry.samples}
        if unguided_run is not None:
            telemetry_report["unguided"] = telemetry.summary(unguided_run.windows)
    steps, totals = guided_run.steps, guided_run.totals()
    if unguided_run is not None:
        unguided_steps, unguided_totals = unguided_run.steps, unguided_run.totals()

    if trace_path is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        probe.annotate = True
        with torch.profiler.profile(activities=activities) as profiler:
            _sample_batch(job, batches[0], device, probe, None)
        probe.annotate = False
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(trace_path))

    images = batch_size * num_batches
    for run_totals in (totals, unguided_totals) if unguided is not None else (totals,):
        run_totals["images"] = images
        run_totals["seconds_per_image"] = (run_totals["sampling_wall"] + run_totals.get("io", 0.0)) / images
    denoiser_flops = flops["denoiser_forward"] * totals["denoiser_calls"]
    rates = {"denoiser": _rate(denoiser_flops, totals["denoiser"])}
    flop_limit_ratio = 1.0
    if job.guidance is not None:
        calls = totals["guidance_calls"]
        forward = flops["classifier_forward"]
        backward = flops["classifier_forward_backward"] - forward
        rates["classifier_forward"] = _rate(forward * calls, totals["classifier_forward"])
        rates["classifier_gradient"] = _rate(backward * calls, totals["classifier_gradient"])
        flop_limit_ratio = (denoiser_flops + flops["classifier_forward_backward"] * calls) / denoiser_flops \
            if denoiser_flops > 0 else None
    return {
        "sampler": job.sampler, "device": str(device), "timer": device_timer(device).name, "batch_size": batch_size,
        "num_batches": num_batches, "num_steps": len(steps[0]), "image_shape": list(job.image_shape),
        "step_sequence": list(job.settings.step_sequence(job.net)),
        "network_evaluations": job.settings.network_evaluations, "schedule": job.config.get("schedule"),
        "parts": list(PARTS), "steps": _mean_steps(steps), "totals": totals,
        "unguided_steps": _mean_steps(unguided_steps) if unguided is not None else None,
        "unguided_totals": unguided_totals if unguided is not None else None,
        "flops": flops, "flop_rates": rates,
        # Median over the rounds of guided / unguided step time, with the rounds' range.
        "guidance_overhead_ratio": float(np.median(ratios)) if ratios else None,
        "guidance_overhead_spread": [min(ratios), max(ratios)] if ratios else None,
        "guidance_overhead_rounds": ratios,
        "flop_limit_ratio": flop_limit_ratio,
        "telemetry": telemetry_report, "trace": None if trace_path is None else str(trace_path),
        "step_runner": step_runner_note,
    }
