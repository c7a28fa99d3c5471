"""Guidance schedules (SPEC §3-5): when and how strongly each step is guided.

Schedules are computed on the host once per run, before the sampling loop; the loop only reads
them, so no step ever waits on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_int


def sine_factor(step: int | torch.Tensor, num_steps: int) -> float | torch.Tensor:
    """sin(pi * step / num_steps): zero at both ends of the chain, largest in the middle."""
    if isinstance(step, torch.Tensor):
        return torch.sin(math.pi * step / num_steps)
    return math.sin(math.pi * step / num_steps)


def edm_guidance_weights(num_steps: int, max_guidance: float, add_factor: float = 0.0) -> list[float]:
    """EDM per-step guidance weights w_i, i = 0 ... N-1 (SPEC §4):

        w_i = max(wmax * (N + 1 - i) / (N + 1), 1e-5) + sin(pi * i / N) * wmax * add

    A linear decay plus the sine-added bump. Units: multiples of rms(x_i) per step.
    """
    n = num_steps
    return [max(max_guidance * (n + 1 - i) / (n + 1), 1e-5) + math.sin(math.pi * i / n) * max_guidance * add_factor
            for i in range(n)]


def ddpm_sine_add(sine: float | torch.Tensor, vmax: torch.Tensor, gamma_factor: float) -> torch.Tensor:
    """DDPM sine-added variance a_t = max(sin(pi t / T) * vmax * gamma, 0) per sample (SPEC §3).

    Args:
        sine: sin(pi t / T) for respaced step t of T (`sine_factor(t, T)`).
        vmax: (B,) running max over the steps so far of each sample's Sigma[i, 0, 0, 0].
        gamma_factor: gamma.
    Returns:
        (B,) a_t in vmax's dtype.
    """
    return (sine * gamma_factor * vmax).clamp_min(0)


@dataclass(frozen=True)
class GuidanceInterval:
    """Which sampler steps are guided: steps i (counted from 0 at the start of sampling) with
    start <= i < stop and (i - start) % every == 0. The defaults guide every step."""

    start: int = 0
    stop: int | None = None
    every: int = 1

    def __post_init__(self):
        check_int("guidance_interval.start", self.start, minimum=0)
        if self.stop is not None and (isinstance(self.stop, bool) or not isinstance(self.stop, int)
                                      or self.stop <= self.start):
            raise ValueError(f"guidance_interval.stop: must be an integer > start ({self.start}) or None, got {self.stop!r}")
        check_int("guidance_interval.every", self.every, minimum=1)

    @classmethod
    def parse(cls, text: str) -> GuidanceInterval:
        """From "START:STOP:EVERY" (each part optional, e.g. "::2" every other step, "0:10"),
        the form the command line takes."""
        parts = str(text).split(":")
        if len(parts) > 3:
            raise ValueError(f"guidance_interval: expected START:STOP:EVERY (e.g. '::2' or '0:10'), got {text!r}")
        parts += [""] * (3 - len(parts))
        try:
            start, stop, every = (int(p) if p.strip() else None for p in parts)
        except ValueError:
            raise ValueError(f"guidance_interval: expected integers in START:STOP:EVERY, got {text!r}") from None
        return cls(0 if start is None else start, stop, 1 if every is None else every)

    def json(self) -> dict:
        return {"start": self.start, "stop": self.stop, "every": self.every}

    def active(self, step: int) -> bool:
        """Whether step `step` is guided."""
        in_range = step >= self.start and (self.stop is None or step < self.stop)
        return in_range and (step - self.start) % self.every == 0

    def steps(self, num_steps: int) -> list[bool]:
        return [self.active(i) for i in range(num_steps)]


def guided_steps(guidance, ids: torch.Tensor | None, shape: tuple[int, ...], device: torch.device,
                 num_steps: int, guidance_interval: GuidanceInterval | None = None) -> list[bool]:
    """Which of the `num_steps` steps are guided, after the guidance's one-time input checks
    (labels present, classifier accepts (C, H, W) `shape`, ids in range)."""
    if guidance is None:
        return [False] * num_steps
    if ids is None:
        raise ValueError("class_labels: guidance needs target labels")
    if hasattr(guidance, "check_input"):
        guidance.check_input(tuple(shape), ids, device)
    return (guidance_interval or GuidanceInterval()).steps(num_steps)
