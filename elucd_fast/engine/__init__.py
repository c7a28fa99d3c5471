"""The fast path: precision policy, compiled steps, CUDA-graph replay.

Each fast path runs the same step function as the plain path; tests compare them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .compile import COMPILE_MODES, CompiledStepRunner, resolve_compile
from .cuda_graph import CUDAGraphStepRunner
from .fused import FUSED_CHOICES, fused_ops
from .precision import PRECISIONS, AutocastModule, PrecisionPolicy, apply_precision, resolve_precision


def make_step_runner(*, compile: bool = False, cuda_graphs: bool = False, device: torch.device | str = "cpu",
                     backend: str = "inductor") -> Callable | None:
    """The step runner for the samplers' `step_runner` argument: None (plain eager), compiled,
    captured in CUDA graphs, or compiled then captured."""
    if cuda_graphs and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs: needs a CUDA device, got {device}")
    compiled = CompiledStepRunner(backend=backend) if compile else None
    graphed = CUDAGraphStepRunner() if cuda_graphs else None
    if compiled and graphed:
        return lambda step: graphed(compiled(step))
    return compiled or graphed


def configure_job(job, *, precision: str = "auto", compile: str = "off", cuda_graphs: bool = False,
                  fused: str = "off", num_images: int = 0, backend: str = "inductor"):
    """`job` set up to run fast: its networks under the precision policy, its sampler state
    dtype, and a compiled and/or CUDA-graph step runner and fused step ops where asked.

    Returns (job, messages): the messages say what was chosen and why (the CLI prints them);
    the choices are recorded in `job.config["engine"]`, since precision changes the images.
    """
    import dataclasses

    device = job.device
    policy = resolve_precision(precision, device)
    messages = [f"precision: {policy.name} ({policy.reason})"]
    net = apply_precision(job.net, policy, device)
    guidance = job.guidance
    if guidance is not None and policy.network_dtype is not None:
        guidance.classifier = apply_precision(guidance.classifier, policy, device)
    kwargs = dict(job.sampler_kwargs, dtype=policy.state_dtype)
    compiled, reason = resolve_compile(compile, num_images=num_images, device=device)
    messages.append(reason)
    runner = make_step_runner(compile=compiled, cuda_graphs=cuda_graphs, device=device, backend=backend)
    if cuda_graphs:
        messages.append("cuda graphs: each step variant is captured once and replayed")
    if runner is not None:
        kwargs["step_runner"] = runner
    if fused != "off":
        if job.sampler != "edm":
            raise ValueError(f"fused: fused step ops exist for the EDM sampler only, not {job.sampler!r}")
        kwargs["ops"], reason = fused_ops(device, fused)
        messages.append(reason)
    engine = {"precision": policy.name, "compile": compiled, "cuda_graphs": cuda_graphs, "fused": fused}
    config = dict(job.config, engine=engine)
    return dataclasses.replace(job, net=net, guidance=guidance, sampler_kwargs=kwargs, config=config), messages


__all__ = ["configure_job", "FUSED_CHOICES", "fused_ops", "PRECISIONS", "COMPILE_MODES", "PrecisionPolicy", "AutocastModule", "resolve_precision", "apply_precision",
           "resolve_compile", "CompiledStepRunner", "CUDAGraphStepRunner", "make_step_runner"]
