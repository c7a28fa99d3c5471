"""The fast path: precision policy, compiled steps, CUDA-graph replay, fused step ops.

Each fast path runs the same step function as the plain path; tests compare them.
"""
from .compile import COMPILE_MODES, CompiledStepRunner, resolve_compile
from .configure import configure_job, make_step_runner
from .cuda_graph import CUDAGraphStepRunner
from .fused import FUSED_CHOICES, FusedChoice, choose_fused
from .precision import PRECISIONS, AutocastModule, PrecisionPolicy, apply_precision, resolve_precision

__all__ = ["configure_job", "FUSED_CHOICES", "FusedChoice", "choose_fused", "PRECISIONS", "COMPILE_MODES",
           "PrecisionPolicy", "AutocastModule", "resolve_precision", "apply_precision", "resolve_compile", "CompiledStepRunner",
           "CUDAGraphStepRunner", "make_step_runner"]
