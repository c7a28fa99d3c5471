"""The calibrated guidance objective (SPEC §1, paper Eq. 4).

    J(x) = tau_j * l_y(x) - logsumexp_k(tau_m * l_k(x))

computed in the logsumexp form: the authors' `log(exp(tau_j l_y) / sum exp(tau_m l))` overflows
for logits near 125 in float32 and 14 in float16. Everything here runs in float32 or wider.
"""
from __future__ import annotations

import torch

from ..checks import check_number
from ..numerics import working_dtype


def check_temperatures(joint_temperature: float, marginal_temperature: float | None) -> tuple[float, float]:
    """(tau_j, tau_m) as floats, tau_m = tau_j when None; both finite >= 0, not both 0."""
    joint = check_number("joint_temperature", joint_temperature, minimum=0)
    marginal = joint if marginal_temperature is None else check_number("marginal_temperature",
                                                                          marginal_temperature, minimum=0)
    if joint == 0 and marginal == 0:
        raise ValueError("joint_temperature, marginal_temperature: both 0 make the guidance identically zero; "
                         "give at least one a value > 0")
    return joint, marginal


def label_ids(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer class ids (B,) from ids (B,) or one-hot rows (B, K). Validation runs on the host
    before sampling, never inside a step."""
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"labels: one-hot width {labels.shape[1]} != number of classes {num_classes}")
        return labels.argmax(dim=1)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected ids (B,) or one-hot (B, K), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: class ids must be an integer tensor, got {labels.dtype}")
    return labels


def calibrated_objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    joint_temperature: float = 1.0,
    marginal_temperature: float | None = None,
) -> torch.Tensor:
    """J per sample.

    Args:
        logits: (B, K) classifier logits, any float dtype (computed in float32 or float64).
        labels: (B,) integer ids or (B, K) one-hot targets.
        joint_temperature: tau_j >= 0.
        marginal_temperature: tau_m >= 0; None means tau_m = tau_j (ordinary log-softmax).
    Returns:
        (B,) J in the working dtype (float32, or float64 for float64 logits).
    """
    return _objective(logits, labels, *check_temperatures(joint_temperature, marginal_temperature))


def _objective(logits: torch.Tensor, labels: torch.Tensor, joint_temperature: float,
               marginal_temperature: float) -> torch.Tensor:
    """`calibrated_objective` with temperatures already checked (the guidance's hot path)."""
    logits = logits.to(working_dtype(logits.dtype))
    ids = label_ids(labels, logits.shape[1])
    target = logits.gather(1, ids[:, None].long())[:, 0]
    return joint_temperature * target - torch.logsumexp(marginal_temperature * logits, dim=1)


def objective_logit_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    joint_temperature: float = 1.0,
    marginal_temperature: float | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form dJ/dl = tau_j * onehot(y) - tau_m * softmax(tau_m * l), times an optional
    per-sample weight (B,). Returns (B, K) in the working dtype."""
    return _logit_grad(logits, labels, *check_temperatures(joint_temperature, marginal_temperature), weight)


def _logit_grad(logits: torch.Tensor, labels: torch.Tensor, joint_temperature: float, marginal_temperature: float,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """`objective_logit_grad` with temperatures already checked (the guidance's hot path)."""
    logits = logits.to(working_dtype(logits.dtype))
    ids = label_ids(labels, logits.shape[1])
    grad = -marginal_temperature * torch.softmax(marginal_temperature * logits, dim=1)
    grad = grad.scatter_add(1, ids[:, None].long(), torch.full_like(grad[:, :1], joint_temperature))
    if weight is not None:
        grad = grad * weight.to(grad.dtype)[:, None]
    return grad
