"""Triton kernels of the guidance hot path.

Each module is one fused operation written as a small literate program: why it is fused (bytes
moved per element), the `@triton.jit` kernel, and its launcher, registered as a custom operator
`elucd_triton::*` (so torch.compile treats it as one opaque op with a shape-only fake version,
and CUDA-graph capture records its launches). The plain PyTorch twin each kernel is tested
against lives on the plain path (`elucd_fast.guidance.update`, `elucd_fast.guidance.objective`,
`torch.nn.functional.softplus`), which never imports these. Each module's `__all__` names its
launchers; `elucd_fast.engine.fused` is their one production caller.

Kernels import torch, triton and the working-dtype rule (`elucd_fast.numerics`) only. Importing
this package is cheap and never needs triton; the kernel modules import triton behind a guard.

Scalars that are fixed for a whole run (temperatures, softplus beta and threshold, the DDPM
guidance scale) travel as `tl.constexpr`: Triton types a plain Python float argument as
float32, which would round 0.7 in a float64 computation, while a constexpr float takes the type
of the tensor it meets. Scalars that change per step (noise scale, sin(pi t / T), gamma_t) are
0-d tensors read on the device: no host sync, no recompilation, CUDA-graph safe.
"""
from __future__ import annotations

import os

import torch

from elucd_fast.numerics import working_dtype
from elucd_fast.source_folders import source_folder

# The kernel modules sit in the repository's top-level kernels/ (see `source_folders` for why
# that folder is not itself a package): this module is the package's face.
__path__ = [str(source_folder("kernels", "guidance_update.py"))]
if __spec__ is not None:
    __spec__.submodule_search_locations = __path__

OP_NAMESPACE = "elucd_triton"


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


def device_scalar(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-step scalar as a 0-d tensor on `like`'s device, in `like`'s working dtype, for a
    kernel to read through a pointer. A float becomes a fill kernel (no host-to-device copy, so
    it is allowed during CUDA-graph capture)."""
    dtype = working_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected one value, got a tensor of shape {tuple(value.shape)}")
        return value.reshape(()).to(device=like.device, dtype=dtype)
    return torch.full((), float(value), dtype=dtype, device=like.device)
