"""What one sampling step of a job costs: the FLOPs its networks spend per image, counted on
the job's first step for a single image. The precision policy's `auto` choice reads it (bf16
pays only for networks large enough to be limited by arithmetic, not by memory traffic and
per-op overheads)."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..job import Job


class _FlopCount(TorchDispatchMode):
    """Counts matmul and convolution FLOPs (forward and backward) by torch's FLOP formulas.
    `FlopCounterMode` itself cannot be used: its module tracking rejects the guidance's
    input-gradient call."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class _FirstStepDone(Exception):
    pass


def step_flops_per_image(job: Job) -> int | None:
    """FLOPs of the job's first sampling step (its denoiser calls, classifier forward and input
    gradient, decoder where the step has one) for one image; None when the job cannot be run
    this way (the caller then makes the safe choice). The step is counted through the samplers'
    `step_runner` hook, so the set-up checks before the loop are not part of it."""
    counter = _FlopCount()

    def counting_runner(step):
        def first_step(*args, **kwargs):
            with counter:
                step(*args, **kwargs)
            raise _FirstStepDone

        return first_step

    generator = torch.Generator(job.device).manual_seed(0)
    latents = torch.randn((1, *job.noise_shape), generator=generator, device=job.device)
    labels = torch.zeros(1, dtype=torch.long, device=job.device) if job.num_classes else None
    try:
        with torch.no_grad():
            dataclasses.replace(job, step_runner=counting_runner).sample(latents, labels)
    except _FirstStepDone:
        return int(counter.flops)
    except Exception:  # any failure only means the cost is unknown
        return None
    return None
