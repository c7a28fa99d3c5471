"""The calibrated guidance objective (SPEC §1, paper Eq. 4).

    J(x) = tau_j * l_y(x) - logsumexp_k(tau_m * l_k(x))

computed in the logsumexp form: the authors' `log(exp(tau_j l_y) / sum exp(tau_m l))` overflows
for logits near 125 in float32 and 14 in float16. Everything here runs in float32 or wider.
"""
from __future__ import annotations

import math

import torch


def _validate_temperatures(joint_temperature: float, marginal_temperature: float) -> None:
    for name, value in (("joint_temperature", joint_temperature), ("marginal_temperature", marginal_temperature)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    if joint_temperature == 0 and marginal_temperature == 0:
        raise ValueError("joint_temperature and marginal_temperature are both 0: the guidance would be identically zero")


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


def _working_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


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
    if marginal_temperature is None:
        marginal_temperature = joint_temperature
    _validate_temperatures(joint_temperature, marginal_temperature)
    logits = logits.to(_working_dtype(logits))
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
    if marginal_temperature is None:
        marginal_temperature = joint_temperature
    _validate_temperatures(joint_temperature, marginal_temperature)
    logits = logits.to(_working_dtype(logits))
    ids = label_ids(labels, logits.shape[1])
    grad = -marginal_temperature * torch.softmax(marginal_temperature * logits, dim=1)
    grad = grad.scatter_add(1, ids[:, None].long(), torch.full_like(grad[:, :1], joint_temperature))
    if weight is not None:
        grad = grad * weight.to(grad.dtype)[:, None]
    return grad
