"""Triton kernels of the guidance hot path.

Each module is one fused operation written as a small literate program: why it is fused (bytes
moved per element), the `@triton.jit` kernel, the launcher, and the plain PyTorch reference the
tests compare it against. Importing this package is cheap and never needs triton; the kernel
modules import triton behind a guard, so their references work everywhere.
"""
from __future__ import annotations

import os

import torch


def triton_importable() -> bool:
    """True when the `triton` package imports on this machine."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret_mode() -> bool:
    """True when TRITON_INTERPRET=1, Triton's CPU interpreter (numpy emulation; slow, tests only).

    Triton reads the variable when a kernel is decorated, so it must be set before the kernel
    modules are first imported, and stay set while they run."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton imports, and either a CUDA device is
    present or the interpreter is switched on (then the kernels take CPU tensors)."""
    return triton_importable() and (torch.cuda.is_available() or triton_interpret_mode())


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in for inputs of `dtype`: float64 stays float64, every other
    float dtype (float32, bfloat16, float16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_compute_dtype(dtype: torch.dtype):
    """`working_dtype` as a triton.language dtype, for a kernel's COMPUTE constexpr."""
    import triton.language as tl

    return tl.float64 if working_dtype(dtype) == torch.float64 else tl.float32


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| / |expected| over the elements where expected is finite and
    nonzero (float64 arithmetic), for reporting how far a fast path is from its reference;
    0.0 when there are none. Non-finite elements are compared separately by the caller."""
    actual, expected = actual.double(), expected.double()
    where = torch.isfinite(expected) & (expected != 0)
    if not where.any():
        return 0.0
    return ((actual[where] - expected[where]).abs() / expected[where].abs()).max().item()
