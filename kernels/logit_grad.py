"""Calibrated-objective logit gradient and objective in one pass per row (SPEC §1).

For logits l (B, K), target ids y (B,), temperatures tau_j, tau_m >= 0 and a per-sample weight w:

    J_b      = tau_j * l_{b,y_b} - logsumexp_k(tau_m * l_{b,k})
    grad_b,k = w_b * (tau_j * [k == y_b] - tau_m * softmax_k(tau_m * l_b))      # = w_b * dJ_b/dl_b,k

The gradient seeds the classifier's backward at every guidance step. Both outputs need the same
row statistics, the maximum M and the sum S of exp(tau_m * l - M), so one program per row
computes them once: J = tau_j * l_y - (M + log S), and grad = w * (tau_j * onehot - tau_m * exp(tau_m * l - M) / S).

Bytes moved per element (s = logit size): read the row twice (statistics, then gradient) and
write the float32 gradient: 2s + 4, against about 12 passes for the PyTorch composition (cast,
scale, softmax's max/exp/sum/divide, scale, scatter, weight) and a second read for J. With
K = 1000 and a few dozen rows this op is launch-bound rather than bandwidth-bound; fusing it
saves the launches as much as the bytes.

Rows longer than one block are handled by an online maximum and sum (the running sum is rescaled
by exp(M_old - M_new) whenever the maximum grows), so any K works with a bounded block; for
K <= 4096 the loop runs once. Large logits (±1e4) stay finite because every exponent is taken
relative to the row maximum. NaN or +inf logits make that row's outputs NaN, as in the reference;
other rows are untouched. A label outside [0, K) gives a NaN row instead of an out-of-bounds read
(the check costs no host sync).

Arithmetic and outputs are float32 (float64 for float64 logits, matching the reference); the
temperatures are compile-time constants (fixed for a run; exact in float64 arithmetic). They are
not validated here, on the hot path: `elucd_fast.guidance.objective` holds the rules (both >= 0,
not both 0) for the caller (`ClassifierGuidance`) to apply once.
"""
from __future__ import annotations

import torch

from elucd_fast.kernels import OP_NAMESPACE, triton_compute_dtype
from elucd_fast.numerics import working_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # the launcher below needs triton; importing this module does not
    triton = None

__all__ = ["logit_grad"]

MAX_BLOCK_K = 4096  # one loop step covers 4096 classes; ImageNet's 1000 fit in one


if triton is not None:

    @triton.jit
    def _logit_grad_kernel(logits_ptr, labels_ptr, weight_ptr, grad_ptr, objective_ptr, num_classes,
                           JOINT_TEMPERATURE: tl.constexpr, MARGINAL_TEMPERATURE: tl.constexpr,
                           HAS_WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_logits = logits_ptr + row * num_classes
        label = tl.load(labels_ptr + row)

        # Pass 1: running maximum and rescaled sum of exp(tau_m * l), and the target logit.
        running_max = tl.full([], float("-inf"), COMPUTE)
        running_sum = tl.zeros([], COMPUTE)
        target = tl.zeros([], COMPUTE)
        for start in range(0, num_classes, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            mask = cols < num_classes
            logits = tl.load(row_logits + cols, mask=mask, other=0.0).to(COMPUTE)
            scaled = tl.where(mask, logits * MARGINAL_TEMPERATURE, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scaled, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(scaled - new_max), axis=0)
            running_max = new_max
            target += tl.sum(tl.where(cols == label, logits, 0.0), axis=0)

        valid = (label >= 0) & (label < num_classes)
        # As torch.logsumexp: an infinite maximum is the result (an all -inf row gives -inf, a
        # row holding +inf gives +inf) rather than the NaN of inf - inf.
        log_normaliser = tl.where(tl.abs(running_max) == float("inf"), running_max,
                                  running_max + tl.log(running_sum))
        objective = JOINT_TEMPERATURE * target - log_normaliser
        tl.store(objective_ptr + row, tl.where(valid, objective, float("nan")))

        # Pass 2: the gradient, reading the row again (it is still in L1/L2 for K ~ 1000).
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + row).to(COMPUTE)
        else:
            weight = 1.0
        softmax_scale = MARGINAL_TEMPERATURE / running_sum
        row_grad = grad_ptr + row * num_classes
        for start in range(0, num_classes, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            mask = cols < num_classes
            logits = tl.load(row_logits + cols, mask=mask, other=0.0).to(COMPUTE)
            # onehot * tau_j as a product: tl.where would make the constant a float32 value.
            grad = (cols == label).to(COMPUTE) * JOINT_TEMPERATURE - softmax_scale * tl.exp(
                logits * MARGINAL_TEMPERATURE - running_max)
            grad = tl.where(valid, weight * grad, float("nan"))
            tl.store(row_grad + cols, grad, mask=mask)


if triton is not None:

    @torch.library.custom_op(f"{OP_NAMESPACE}::logit_grad", mutates_args=())
    def _logit_grad_op(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None,
                       joint_temperature: float, marginal_temperature: float,
                       max_block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_classes = logits.shape
        dtype = working_dtype(logits.dtype)
        grad = torch.empty((batch, num_classes), dtype=dtype, device=logits.device)
        objective = torch.empty((batch,), dtype=dtype, device=logits.device)
        if batch == 0:
            return grad, objective
        # Without a weight the kernel never reads weight_ptr (HAS_WEIGHT is a compile-time False);
        # any tensor fills the slot.
        _logit_grad_kernel[(batch,)](
            logits.contiguous(), labels.contiguous(), grad if weight is None else weight.contiguous(), grad, objective,
            num_classes, JOINT_TEMPERATURE=joint_temperature, MARGINAL_TEMPERATURE=marginal_temperature,
            HAS_WEIGHT=weight is not None, BLOCK_K=min(triton.next_power_of_2(num_classes), max_block_k),
            COMPUTE=triton_compute_dtype(logits.dtype))
        return grad, objective

    @_logit_grad_op.register_fake
    def _(logits, labels, weight, joint_temperature, marginal_temperature, max_block_k):
        dtype = working_dtype(logits.dtype)
        return logits.new_empty(logits.shape, dtype=dtype), logits.new_empty(logits.shape[:1], dtype=dtype)


def logit_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    joint_temperature: float = 1.0,
    marginal_temperature: float | None = None,
    weight: torch.Tensor | None = None,
    *,
    max_block_k: int = MAX_BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton calibrated-objective logit gradient and objective; the twin is
    `elucd_fast.guidance.classifier.closed_form_logit_grad`.

    Args:
        logits: (B, K) any float dtype.
        labels: (B,) integer class ids.
        joint_temperature, marginal_temperature: tau_j, tau_m >= 0 (tau_m None means tau_j).
        weight: optional (B,) per-sample factor on the gradient (not on J).
        max_block_k: largest power-of-2 block of classes per loop step; smaller values exercise
            the online reduction on small K.
    Returns:
        grad (B, K) and J (B,), float32 (float64 for float64 logits).
    """
    if marginal_temperature is None:
        marginal_temperature = joint_temperature
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logit_grad: expected logits (B, K) and labels (B,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if weight is not None and weight.shape != labels.shape:
        raise ValueError(f"logit_grad: weight must be (B,), got {tuple(weight.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logit_grad: logits have no classes")
    return _logit_grad_op(logits, labels, weight, float(joint_temperature), float(marginal_temperature), max_block_k)
