"""Interleaved timing: the machines are noisy, so variants are timed in alternation and
compared by the ratio of their medians, never by absolute times across runs."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
                        device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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
