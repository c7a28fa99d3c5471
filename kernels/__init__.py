"""Triton kernels of the guidance hot path.

Each module is one fused operation written as a small literate program: why it is fused (bytes
moved per element), the `@triton.jit` kernel, the launcher, and the plain PyTorch reference the
tests compare it against lives in `elucd_fast.guidance.update` (the plain path never imports
these). Kernels import torch, triton and the working-dtype rule (`elucd_fast.numerics`) only.
Importing this package is cheap and never needs triton; the kernel modules import triton behind
a guard.
"""
from __future__ import annotations

import os

import torch

from elucd_fast.numerics import working_dtype


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


def triton_compute_dtype(dtype: torch.dtype):
    """`working_dtype` as a triton.language dtype, for a kernel's COMPUTE constexpr."""
    import triton.language as tl

    return tl.float64 if working_dtype(dtype) == torch.float64 else tl.float32
