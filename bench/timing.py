"""Interleaved timing: the machines are noisy, so variants are timed in alternation and
compared by the ratio of their medians, never by absolute times across runs.

On a shared CPU, one thread's process CPU time (`time.process_time`) is the steadier clock: it
does not count the time other processes hold the core. With one intra-op thread torch computes
on the calling thread, so it is the work done; wall time is reported beside it."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1, device: str = "cpu",
                      clocks: dict[str, Callable[[], float]] | None = None) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function, calls interleaved round by round, by each clock:
    {clock: {function: [seconds of round 0, round 1, ...]}}. Default clock: wall time."""
    clocks = clocks or {"wall": time.perf_counter}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {clock: {name: [] for name in fns} for clock in clocks}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = {clock: read() for clock, read in clocks.items()}
            fn()
            _sync(device)
            for clock, read in clocks.items():
                times[clock][name].append(read() - start[clock])
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
                        device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round."""
    times = interleaved_times(fns, rounds, warmup, device)["wall"]
    return {name: statistics.median(values) for name, values in times.items()}


def speed_ratios(times: dict[str, list[float]], reference: str) -> dict[str, tuple[float, float, float]]:
    """Speed of each function relative to `reference` (> 1: faster) from interleaved times:
    (ratio of the medians, lowest and highest ratio within one round)."""
    ref = times[reference]
    out = {}
    for name, values in times.items():
        per_round = [r / v for r, v in zip(ref, values)]
        out[name] = (statistics.median(ref) / statistics.median(values), min(per_round), max(per_round))
    return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, by torch's flop counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def classifier_flops(classifier: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of the classifier's forward plus input gradient on x (B, C, H, W)."""
    def forward_backward():
        # .backward() rather than autograd.grad: the flop counter's module tracking refuses
        # autograd.grad on a leaf input.
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            classifier(x_in).sum().backward()

    return count_flops(forward_backward)
