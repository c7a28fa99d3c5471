"""EDM's time steps (Karras et al. 2022, Eq. 5; SPEC §4) and its churn: the whole schedule of a
Heun run, known before the loop so no step reads a device value on the host."""
from __future__ import annotations

import math

import torch


def edm_sigma_steps(net, num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM's time steps sigma_0 > ... > sigma_{N-1} > sigma_N = 0, float64, rounded by the
    network, on the network's sigma device (the host for EDM networks)."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.as_tensor(net.round_sigma(t_steps))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def edm_churn(net, t_steps: torch.Tensor, S_churn: float, S_min: float, S_max: float) -> list[torch.Tensor]:
    """t_hat_i = round(sigma_i (1 + gamma_i)) for i = 0 ... N-1, with EDM's
    gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0."""
    num_steps = len(t_steps) - 1
    t_host = t_steps.cpu().tolist()
    gammas = [min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t <= S_max else 0 for t in t_host[:-1]]
    return [torch.as_tensor(net.round_sigma(t_steps[i] + gammas[i] * t_steps[i])) for i in range(num_steps)]
