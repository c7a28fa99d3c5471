"""`configure_job`: a job set up to run fast, every choice announced and recorded."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

from ..job import Job
from .compile import CompiledStepRunner, resolve_compile
from .cost import step_flops_per_image
from .cuda_graph import CUDAGraphStepRunner
from .fused import choose_fused
from .precision import apply_precision, hardware_bf16, resolve_precision


class CompiledGraphedStepRunner:
    """A step compiled, then captured in CUDA graphs; `compile_seconds` is the compiler's."""

    def __init__(self, compiled: CompiledStepRunner, graphed: CUDAGraphStepRunner):
        self.compiled, self.graphed = compiled, graphed

    @property
    def compile_seconds(self) -> float:
        return self.compiled.compile_seconds

    def __call__(self, step: Callable) -> Callable:
        return self.graphed(self.compiled(step))


def make_step_runner(*, compile: bool = False, cuda_graphs: bool = False, device: torch.device | str = "cpu",
                     backend: str = "inductor") -> Callable | None:
    """The step runner for the samplers' `step_runner` argument: None (plain eager), compiled,
    captured in CUDA graphs, or compiled then captured. A compiling runner reports the time
    spent compiling as `compile_seconds` (reported apart from images/s)."""
    if cuda_graphs and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs: needs a CUDA device, got {device}")
    compiled = CompiledStepRunner(backend=backend) if compile else None
    graphed = CUDAGraphStepRunner() if cuda_graphs else None
    if compiled and graphed:
        return CompiledGraphedStepRunner(compiled, graphed)
    return compiled or graphed


def configure_job(job: Job, *, precision: str = "auto", compile: str = "off", cuda_graphs: bool = False,
                  fused: str = "off", num_images: int = 0, backend: str = "inductor") -> tuple[Job, list[str]]:
    """`job` set up to run fast: its networks under the precision policy, its sampler state
    dtype, a compiled and/or CUDA-graph step runner, and fused kernels (`engine.fused`) for the
    sampler's step piece and the classifier guidance's softplus and logit gradient.

    Returns (job, messages): the messages say what was chosen and why (the CLI prints them);
    the choices are recorded in `job.config["engine"]`, since they change the images (precision
    visibly, fused kernels in the last bits). The given job is left as it was.
    """
    device = job.device
    # `auto` weighs the job's cost per image (one step run for one image) where bf16 could pay.
    step_flops = step_flops_per_image(job) if precision == "auto" and hardware_bf16(device) else None
    policy = resolve_precision(precision, device, step_flops=step_flops)
    messages = [f"precision: {policy.name} ({policy.reason})"]
    net = apply_precision(job.net, policy, device)
    guide_net = None if job.guide_net is None else apply_precision(job.guide_net, policy, device)
    compiled, reason = resolve_compile(compile, num_images=num_images, device=device)
    messages.append(reason)
    runner = make_step_runner(compile=compiled, cuda_graphs=cuda_graphs, device=device, backend=backend)
    if cuda_graphs:
        messages.append("cuda graphs: each step variant is captured once and replayed")
    choice = choose_fused(device, fused, sampler=job.sampler, guidance=job.guidance, compiled=compiled)
    messages.extend(choice.messages)
    guidance = choice.prepare_guidance(job.guidance)
    if guidance is not None and policy.network_dtype is not None:
        if guidance is job.guidance:  # a copy with its own module table: the given job keeps its classifier
            guidance = copy.copy(guidance)
            guidance._modules = dict(guidance._modules)
        guidance.classifier = apply_precision(guidance.classifier, policy, device)
    engine = {"precision": policy.name, "compile": compiled, "cuda_graphs": cuda_graphs, "fused": fused,
              "fused_pieces": choice.implementations}
    config = dict(job.config, engine=engine)
    return dataclasses.replace(job, net=net, guide_net=guide_net, guidance=guidance, dtype=policy.state_dtype,
                               step_runner=runner, ops=choice.step_ops, config=config), messages
