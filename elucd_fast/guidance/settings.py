"""The settings of a classifier guidance, validated once (SPEC §1-2)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..checks import check_softplus_beta, json_number
from .objective import check_temperatures


@dataclass(frozen=True)
class GuidanceSettings:
    """How the off-the-shelf classifier is prepared and what it is asked (paper §4.2-4.3)."""

    softplus_beta: float = field(default=math.inf, metadata={
        "help": "Every ReLU of the classifier becomes Softplus(beta); inf keeps ReLU (the paper: 5 for EDM, "
                "3 for DDPM).", "unit": "1 / activation value (larger: closer to ReLU)"})
    joint_temperature: float = field(default=1.0, metadata={
        "help": "tau_j: temperature of the target logit l_y in J = tau_j l_y - logsumexp(tau_m l).",
        "unit": "multiplier of the logits"})
    marginal_temperature: float | None = field(default=None, metadata={
        "help": "tau_m: temperature of the marginal logsumexp; 0 is pure joint guidance (the paper's EDM "
                "setting), tau_j ordinary log-softmax [None: tau_j].", "unit": "multiplier of the logits"})

    def __post_init__(self):
        check_softplus_beta(self.softplus_beta)
        joint, marginal = check_temperatures(self.joint_temperature, self.marginal_temperature)
        object.__setattr__(self, "softplus_beta", float(self.softplus_beta))
        object.__setattr__(self, "joint_temperature", joint)
        object.__setattr__(self, "marginal_temperature", marginal)

    def json(self) -> dict:
        return {"softplus_beta": json_number(self.softplus_beta), "joint_temperature": self.joint_temperature,
                "marginal_temperature": self.marginal_temperature}
