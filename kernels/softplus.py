"""Softplus with PyTorch's threshold semantics, one pass forward and one pass backward.

    y  = x                            if beta * x > threshold
         log1p(exp(beta * x)) / beta  otherwise
    dx = dy                           if beta * x > threshold
         dy * sigmoid(beta * x)       otherwise

This is `torch.nn.functional.softplus(x, beta, threshold)` (threshold 20 by default), the
activation that replaces every ReLU of a guidance classifier (SPEC §2); guidance runs the
classifier's backward at every sampling step, so both directions sit on the hot path.

Bytes moved per element (s = element size, 2 for bfloat16):
- forward: read x, write y: 2s. Written as PyTorch ops (`beta * x`, `exp`, `log1p`, `/ beta`,
  the comparison and `where`), every intermediate is written and read back: about 16s.
- backward: read dy and x, write dx: 3s. The sigmoid is recomputed from the saved input instead
  of being stored by the forward, which would cost one more write per element there and keep a
  second activation-sized tensor alive until the backward; recomputing it is a few instructions
  on data already in registers.

Half-precision inputs are computed in float32 (float64 inputs in float64) and stored back in
the input dtype, as PyTorch does. Special values: NaN gives NaN; +inf gives +inf with gradient
dy; -inf gives 0 with gradient 0. The sigmoid is computed as 1 / (1 + exp(-t)), which stays
finite for every finite t; PyTorch's exp(t) / (1 + exp(t)) gives NaN where exp(t) overflows,
which only a threshold above 88 (float32) can reach. beta and threshold are compile-time
constants (fixed per classifier; exact in float64 arithmetic).

Production use: `FusedSoftplus` is the `make_softplus` module the engine hands to
`ClassifierGuidance` on CUDA, so every smoothed ReLU of the classifier runs these kernels. The
autograd function defines `setup_context`, which `torch.func.vjp` (the guidance's gradient)
requires. It runs eagerly and under CUDA-graph capture; torch.compile cannot trace it inside
`torch.func.vjp` (functorch's wrapped tensors have no storage for a kernel launch), so the engine
keeps `nn.Softplus` for compiled steps, where inductor generates its own fused softplus.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elucd_fast.kernels import OP_NAMESPACE, triton_compute_dtype, triton_interpret_mode

try:
    import triton
    import triton.language as tl
except ImportError:  # the launchers below need triton; importing this module does not
    triton = None

__all__ = ["FusedSoftplus", "softplus_forward", "softplus_backward"]

BLOCK = 1024  # elements per program: 4 KiB of float32, 8 per thread at the default 4 warps


if triton is not None:

    @triton.jit
    def _log1p(e):
        """log(1 + e) for e >= 0, accurate where 1 + e rounds (Triton has no log1p).

        d = (1 + e) - 1 is the part of e that survived the rounding of 1 + e, so log(1 + e) * e / d
        undoes that rounding. Where nothing survived, log1p(e) = e to working precision; where
        e is so large that 1 + e == e (inf included), log(1 + e) is already exact."""
        u = 1.0 + e
        d = u - 1.0
        corrected = tl.log(u) * (e / tl.where(d == 0.0, 1.0, d))
        return tl.where(d == 0.0, e, tl.where(u == e, tl.log(u), corrected))

    @triton.jit
    def _softplus_forward_kernel(x_ptr, y_ptr, n_elements, BETA: tl.constexpr, THRESHOLD: tl.constexpr,
                                 BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        scaled = x * BETA
        y = tl.where(scaled > THRESHOLD, x, _log1p(tl.exp(scaled)) / BETA)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _softplus_backward_kernel(grad_ptr, x_ptr, grad_input_ptr, n_elements, BETA: tl.constexpr,
                                  THRESHOLD: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        scaled = x * BETA
        dx = tl.where(scaled > THRESHOLD, dy, dy / (1.0 + tl.exp(-scaled)))
        tl.store(grad_input_ptr + offsets, dx.to(grad_input_ptr.dtype.element_ty), mask=mask)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if one flat walk over its storage visits each element once (contiguous or
    channels_last, the layouts convolutional classifiers use), else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as `_dense(x)`."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


if triton is not None:

    @torch.library.custom_op(f"{OP_NAMESPACE}::softplus_forward", mutates_args=())
    def _softplus_forward_op(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
        x = _dense(x)
        y = torch.empty_like(x)
        if x.numel():
            _softplus_forward_kernel[(triton.cdiv(x.numel(), BLOCK),)](
                x, y, x.numel(), BETA=beta, THRESHOLD=threshold, BLOCK=BLOCK, COMPUTE=triton_compute_dtype(x.dtype))
        return y

    @_softplus_forward_op.register_fake
    def _(x, beta, threshold):
        return _dense_like(x)

    @torch.library.custom_op(f"{OP_NAMESPACE}::softplus_backward", mutates_args=())
    def _softplus_backward_op(grad: torch.Tensor, x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
        x = _dense(x)
        grad_input = torch.empty_like(x)
        if grad.stride() != x.stride():
            grad = torch.empty_like(x).copy_(grad)
        if x.numel():
            _softplus_backward_kernel[(triton.cdiv(x.numel(), BLOCK),)](
                grad, x, grad_input, x.numel(), BETA=beta, THRESHOLD=threshold,
                BLOCK=BLOCK, COMPUTE=triton_compute_dtype(x.dtype))
        return grad_input

    @_softplus_backward_op.register_fake
    def _(grad, x, beta, threshold):
        return _dense_like(x)


def softplus_forward(x: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """Triton softplus forward: any shape, float dtype; y has x's dtype, and x's layout when x is
    contiguous or channels_last (elementwise over storage order)."""
    return _softplus_forward_op(x, float(beta), float(threshold))


def softplus_backward(grad: torch.Tensor, x: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """Triton softplus backward: dx from the output gradient and the forward's input x."""
    if grad.shape != x.shape:
        raise ValueError(f"softplus_backward: grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}")
    return _softplus_backward_op(grad, x, float(beta), float(threshold))


class TritonSoftplus(torch.autograd.Function):
    """Softplus through the Triton kernels; saves the input x (not y, not the sigmoid). The
    forward/setup_context split is what torch.func transforms require."""

    @staticmethod
    def forward(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
        return softplus_forward(x, beta, threshold)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, beta, threshold = inputs
        ctx.save_for_backward(x)
        ctx.beta, ctx.threshold = beta, threshold

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return softplus_backward(grad, x, ctx.beta, ctx.threshold), None, None


def triton_runs_on(x: torch.Tensor) -> bool:
    """True when the Triton kernels can take this tensor: CUDA, or CPU under TRITON_INTERPRET=1."""
    return triton is not None and (x.is_cuda or (x.device.type == "cpu" and triton_interpret_mode()))


class FusedSoftplus(nn.Module):
    """Drop-in for `nn.Softplus(beta, threshold)`: the Triton kernels where they can run on the
    input (see `triton_runs_on`), PyTorch's softplus elsewhere; both compute the same function."""

    def __init__(self, beta: float = 1.0, threshold: float = 20.0) -> None:
        super().__init__()
        self.beta = beta
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_runs_on(x):
            return TritonSoftplus.apply(x, self.beta, self.threshold)
        return F.softplus(x, self.beta, self.threshold)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, threshold={self.threshold}"
