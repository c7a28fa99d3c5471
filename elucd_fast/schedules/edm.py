"""EDM's time steps (Karras et al. 2022, Eq. 5; SPEC §4) and its churn: the whole schedule of a
Heun run, known before the loop so no step reads a device value on the host."""
from __future__ import annotations

import math

import torch

from .families import edm_rho_tensor


def edm_sigma_steps(net, num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                    sigmas: tuple[float, ...] | None = None) -> torch.Tensor:
    """EDM's time steps sigma_0 > ... > sigma_{N-1} > sigma_N = 0, float64, rounded by the
    network, on the network's sigma device (the host for EDM networks).

    Without `sigmas`: EDM's rho family between sigma_min and sigma_max clamped to the network's
    range, as EDM's sampler computes it. With `sigmas` (explicit, strictly decreasing, the final
    0 implied): those levels, each rounded by the network as EDM rounds its own; a level outside
    the network's [sigma_min, sigma_max] (by more than a relative 1e-6) is refused."""
    if sigmas is None:
        sigma_min = max(sigma_min, net.sigma_min)
        sigma_max = min(sigma_max, net.sigma_max)
        t_steps = edm_rho_tensor(num_steps, sigma_min, sigma_max, rho)
    else:
        low, high = float(net.sigma_min), float(net.sigma_max)
        # A relative 1e-6 of slack admits the range's own ends however they were computed
        # ((80^(1/7))^7 is not exactly 80) or stored (as float32).
        outside = [s for s in sigmas if not low * (1 - 1e-6) <= s <= high * (1 + 1e-6)]
        if outside:
            raise ValueError(f"sigmas: {', '.join(f'{s:g}' for s in outside)} outside the network's noise range "
                             f"[{low:g}, {high:g}]; give levels within it (the final 0 is implied)")
        t_steps = torch.tensor(sigmas, dtype=torch.float64)
    t_steps = torch.as_tensor(net.round_sigma(t_steps))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def edm_churn(net, t_steps: torch.Tensor, S_churn: float, S_min: float, S_max: float) -> list[torch.Tensor]:
    """t_hat_i = round(sigma_i (1 + gamma_i)) for i = 0 ... N-1, with EDM's
    gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0."""
    num_steps = len(t_steps) - 1
    t_host = t_steps.cpu().tolist()
    gammas = [min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t <= S_max else 0 for t in t_host[:-1]]
    return [torch.as_tensor(net.round_sigma(t_steps[i] + gammas[i] * t_steps[i])) for i in range(num_steps)]
