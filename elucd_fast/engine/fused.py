"""Fused elementwise pieces of the guided EDM step: C++ ops on the CPU, Triton kernels on CUDA.

Measured on the CPU (bench/RESULTS.md, "Kernels"): the C++ guidance update is 4-6x faster than
the same arithmetic as PyTorch ops and the classifier-input normalisation about 2x; C++ Softplus
is no faster than PyTorch's own, so the classifier keeps `nn.Softplus` on the CPU. Both pieces
are a small part of a step whose cost is the networks, so the gain shows at small networks and
in launch counts on a GPU.
"""
from __future__ import annotations

import torch

from ..checks import check_choice
from ..samplers.edm import PLAIN_OPS, StepOps

FUSED_CHOICES = ("off", "on")


def fused_ops(device: torch.device | str, fused: str = "on", *, sampler: str = "edm") -> tuple[StepOps | None, str]:
    """The step ops of `sampler` for `device` and why they were chosen (for the run's log);
    None: the sampler's plain ops."""
    check_choice("fused", fused, FUSED_CHOICES)
    if fused == "off":
        return None, "fused ops off (requested): plain PyTorch step ops"
    if sampler != "edm":
        raise ValueError(f"fused: fused step ops exist for the EDM sampler only, not {sampler!r}")
    device = torch.device(device)
    if device.type == "cuda":
        from .. import kernels

        if not kernels.triton_available():
            return PLAIN_OPS, "fused ops: Triton is not importable; plain PyTorch step ops"
        from ..kernels import guidance_update

        return StepOps(guidance_update.classifier_input, guidance_update.guidance_update), "fused ops: Triton kernels"
    from ..csrc import ops

    if not ops.cpp_ops_available():
        return PLAIN_OPS, "fused ops: the C++ ops could not be built (see the warning above); plain PyTorch step ops"
    return StepOps(ops.classifier_input, ops.guidance_update), "fused ops: C++ CPU ops"
