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


__all__ = ["FUSED_CHOICES", "fused_ops", "PRECISIONS", "COMPILE_MODES", "PrecisionPolicy", "AutocastModule", "resolve_precision", "apply_precision",
           "resolve_compile", "CompiledStepRunner", "CUDAGraphStepRunner", "make_step_runner"]
