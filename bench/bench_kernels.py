"""Fused kernels vs their plain PyTorch references: time per call and effective bandwidth.

Run: python -m pytest -q bench/bench_kernels.py --benchmark-only
(prefix OMP_NUM_THREADS=1 to compare single-threaded, steadier on a busy machine).

Effective GB/s = compulsory bytes / time (best round and median round), where the compulsory
bytes are each input read once and each output written once (what a perfect single pass would
move): the same numerator for both implementations, so the ratio of GB/s is the speed-up.
Softplus counts its forward and backward together (read x, write y; read dy and x, write dx).
The C++ ops run on CPU; the Triton kernels only on a CUDA device (skipped otherwise: the
interpreter is an emulator, not a speed), each against its plain twin ("torch") on the same
device. There is no C++ softplus or logit gradient: the softplus measured no faster than
PyTorch's (bench/RESULTS.md) and was removed. bench/gpu_check.py times the Triton kernels at
the GPU sizes in one run.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from elucd_fast.csrc import ops
from elucd_fast.guidance import update as plain_update
from elucd_fast.guidance.classifier import closed_form_logit_grad
from elucd_fast.kernels import ddpm_guided_mean as ddpm_kernels
from elucd_fast.kernels import guidance_update as guidance_kernels
from elucd_fast.kernels import logit_grad as logit_grad_kernels
from elucd_fast.kernels import softplus as softplus_kernels
from elucd_fast.kernels import triton_available

ROUNDS = 30


def softplus_forward_backward(softplus: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """One forward and one backward, returning dx (autograd.grad: no accumulation into .grad)."""

    def run(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(softplus(x, 5.0), x, dy)[0]

    return run


def triton_softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    return softplus_kernels.TritonSoftplus.apply(x, beta, 20.0)


# case -> (shape, function of (shape, dtype, device) -> (args, compulsory bytes), implementations)
def softplus_inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype, device=device)
    return (x, dy), 5 * x.numel() * x.element_size()


def guidance_inputs(shape, dtype, device):
    x, g, z = (torch.randn(shape, dtype=dtype, device=device) for _ in range(3))
    w = torch.full((shape[0],), 0.004, device=device)
    noise_scale = torch.tensor(0.3, dtype=torch.float64, device=device)
    return (x, g, z, noise_scale, w), 4 * x.numel() * x.element_size()


def classifier_inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    return (x,), 2 * x.numel() * x.element_size()


def dit_inputs(shape, dtype, device):
    difference = torch.randn(shape, dtype=dtype, device=device)
    g = torch.randn((shape[0], shape[1] + 1, *shape[2:]), dtype=dtype, device=device)[:, :shape[1]]  # as DiT slices
    return (difference, g, torch.tensor(0.1, dtype=dtype, device=device)), 3 * g.numel() * g.element_size()


def ddpm_inputs(shape, dtype, device):
    mean, variance, g = (torch.randn(shape, dtype=dtype, device=device) for _ in range(3))
    vmax, sine = torch.rand(shape[0], dtype=dtype, device=device), torch.tensor(0.5, dtype=dtype, device=device)
    return (mean, variance.abs(), g, vmax, sine, 1.0, 0.3), 4 * mean.numel() * mean.element_size()


def logit_inputs(shape, dtype, device):
    logits = torch.randn(shape, dtype=dtype, device=device) * 5
    labels = torch.randint(0, shape[1], shape[:1], device=device)
    return (logits, labels, 1.0, 0.5, torch.rand(shape[0], device=device)), logits.numel() * (logits.element_size() + 4)


CASES = {
    "softplus_fwd_bwd": ((8, 64, 32, 32), softplus_inputs, {
        "torch": softplus_forward_backward(F.softplus),
        "triton": softplus_forward_backward(triton_softplus),
    }),
    "guidance_update": ((8, 3, 64, 64), guidance_inputs, {
        "torch": plain_update.edm_guidance_update,
        "cpp": ops.guidance_update,
        "triton": guidance_kernels.guidance_update,
    }),
    "classifier_input": ((8, 3, 64, 64), classifier_inputs, {
        "torch": plain_update.edm_classifier_input,
        "cpp": ops.classifier_input,
        "triton": guidance_kernels.classifier_input,
    }),
    "dit_guided_difference": ((8, 3, 32, 32), dit_inputs, {
        "torch": plain_update.dit_guided_difference,
        "cpp": ops.dit_guided_difference,
        "triton": guidance_kernels.dit_guided_difference,
    }),
    "ddpm_guided_mean": ((8, 3, 64, 64), ddpm_inputs, {
        "torch": plain_update.ddpm_guided_mean,
        "cpp": ops.ddpm_guided_mean,
        "triton": ddpm_kernels.ddpm_guided_mean,
    }),
    "logit_grad": ((64, 1000), logit_inputs, {
        "torch": closed_form_logit_grad,
        "triton": logit_grad_kernels.logit_grad,
    }),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# (implementation, device): the reference runs on both devices so each fast path has its baseline.
IMPLEMENTATIONS = [("torch", "cpu"), ("cpp", "cpu"), ("torch", "cuda"), ("triton", "cuda")]
PARAMS = [
    pytest.param(case, dtype, implementation, device, id=f"{case}-{dtype}-{implementation}-{device}")
    for case, (_, _, implementations) in CASES.items()
    for dtype in (["float32", "bfloat16"] if case in ("softplus_fwd_bwd", "logit_grad") else ["float32", "float64"])
    for implementation, device in IMPLEMENTATIONS
    if implementation in implementations
]


@pytest.mark.parametrize("case,dtype_name,implementation,device", PARAMS)
def test_kernel_bandwidth(benchmark, case, dtype_name, implementation, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if implementation == "triton" and not triton_available():
        pytest.skip("triton is not importable")
    if implementation == "cpp" and not ops.cpp_ops_available():
        pytest.skip("C++ ops unavailable here")
    shape, make_inputs, implementations = CASES[case]
    args, compulsory_bytes = make_inputs(shape, DTYPES[dtype_name], device)
    function = implementations[implementation]

    def call():
        function(*args)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case} {dtype_name} {tuple(shape)} {device}"
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=3)
    stats = benchmark.stats.stats
    # On a shared machine the median includes time other processes held the cores; the best
    # round is the closer estimate of what the kernel itself costs. Both are reported.
    benchmark.extra_info.update(
        bytes=compulsory_bytes, threads=torch.get_num_threads(), min_ms=stats.min * 1e3, median_ms=stats.median * 1e3,
        GBps_best=compulsory_bytes / stats.min / 1e9, GBps_median=compulsory_bytes / stats.median / 1e9)
