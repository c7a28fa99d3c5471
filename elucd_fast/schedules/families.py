"""Analytic step families (SPEC §10): each a pure function from a step count to a step sequence,
as k-diffusion's `get_sigmas_*` and diffusers' `timestep_spacing` are; a sampler takes the
sequence (`settings.with_steps(seq)`), never computes its own.

Two kinds of sequence:

- noise levels (EDM, EDM2): n floats sigma_0 > ... > sigma_{n-1} > 0, the final 0 implied;
- timesteps of an ADM chain (DDPM, DDIM, DiT): n distinct ints of 0..T-1, descending.

An ADM timestep t is a noise level too: x_t / sqrt(abar_t) = x_0 + sigma_t eps with
sigma_t = sqrt((1 - abar_t) / abar_t), so the noise-level families (rho, logSNR) serve ADM chains
by mapping their levels onto the chain's nearest timesteps (`timesteps_near_sigmas`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import check_int, check_number
from .gaussian_diffusion import named_beta_schedule, space_timesteps


def edm_rho_tensor(n: int, sigma_min: float, sigma_max: float, rho: float, *, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """EDM's rho family (Karras et al. 2022, Eq. 5) as an (n,) tensor in `dtype` on `device`:

        sigma_i = (smax^(1/rho) + i / (n - 1) (smin^(1/rho) - smax^(1/rho)))^rho,  i = 0 ... n-1

    computed in `dtype` as EDM (float64) and EDM2 (the state dtype) compute it, so that their
    samplers get their upstream's values bit for bit. n = 1 gives sigma_max alone."""
    step_indices = torch.arange(n, dtype=dtype, device=device)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (top + step_indices / max(n - 1, 1) * (bottom - top)) ** rho


def edm_rho_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> tuple[float, ...]:
    """n noise levels of EDM's rho family (float64), descending from sigma_max to sigma_min,
    no final 0. rho = 7 is EDM's; rho = 1 is uniform in sigma; large rho tends to logSNR-uniform."""
    _check_range(n, sigma_min, sigma_max)
    check_number("rho", rho, minimum=0, strict_minimum=True)
    return tuple(edm_rho_tensor(n, sigma_min, sigma_max, rho).tolist())


def logsnr_sigmas(n: int, sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """n noise levels evenly spaced in log sigma (so in log-SNR = -2 log sigma) from sigma_max to
    sigma_min, no final 0 (DPM-Solver's and UniPC's "logSNR" steps; the rho -> inf limit)."""
    _check_range(n, sigma_min, sigma_max)
    if n == 1:
        return (float(sigma_max),)
    logs = np.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=np.float64)
    inner = [float(v) for v in np.exp(logs[1:-1])]
    # The ends exactly (exp(log(80)) is not 80): the range is what the network accepts.
    return (float(sigma_max), *inner, float(sigma_min))


def adm_even_timesteps(n: int, T: int) -> tuple[int, ...]:
    """ADM's even respacing "n" (`space_timesteps(T, "n")`: from T - 1 down to 0, stride
    (T - 1) / (n - 1) rounded as ADM accumulates it), descending."""
    _check_count(n, T)
    return tuple(reversed(space_timesteps(T, str(n))))


def ddim_leading_timesteps(n: int, T: int) -> tuple[int, ...]:
    """DDIM's "leading" steps, ADM's `ddimN`: {0, s, 2s, ...} with the stride s for which
    range(0, T, s) has exactly n entries (s = T // n where that fits); they never reach t = T - 1.
    ADM refuses counts no stride gives exactly (as here: ValueError)."""
    _check_count(n, T)
    return tuple(reversed(space_timesteps(T, f"ddim{n}")))


def ddim_trailing_timesteps(n: int, T: int) -> tuple[int, ...]:
    """DDIM's "trailing" steps (diffusers' timestep_spacing="trailing"): round(T - k T / n) - 1
    for k = 0 ... n-1, so the first step is t = T - 1, the pure-noise end."""
    _check_count(n, T)
    steps = np.round(T - np.arange(n, dtype=np.float64) * (T / n)).astype(np.int64) - 1
    return tuple(int(t) for t in steps)


def adm_sigmas(alphas_cumprod) -> np.ndarray:
    """(T,) noise levels sigma_t = sqrt((1 - abar_t) / abar_t) of an ADM chain, ascending in t."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - abar) / abar)


def timesteps_near_sigmas(sigmas, alphas_cumprod) -> tuple[int, ...]:
    """The distinct timesteps of an ADM chain nearest, in log sigma, to the descending noise
    levels `sigmas`, descending.

    Each level takes the chain's timestep whose log sigma_t is closest; where that would repeat
    or pass the previous step (levels closer together than the chain's own steps, near t = 0),
    it takes the next free timestep below the previous one, and never one so low that the later
    levels would run out of distinct timesteps. So n levels always give n distinct timesteps.
    """
    log_chain = np.log(adm_sigmas(alphas_cumprod))
    T, n = len(log_chain), len(sigmas)
    out: list[int] = []
    for k, sigma in enumerate(sigmas):
        nearest = int(np.argmin(np.abs(log_chain - math.log(sigma))))
        highest = T - 1 if not out else out[-1] - 1
        lowest = n - 1 - k  # room for the n - 1 - k levels still to place
        out.append(min(max(nearest, lowest), highest))
    return tuple(out)


def adm_logsnr_timesteps(n: int, alphas_cumprod) -> tuple[int, ...]:
    """n timesteps of an ADM chain evenly spaced in log-SNR: `logsnr_sigmas` between the
    chain's own sigma_{T-1} and sigma_0, mapped by `timesteps_near_sigmas`; descending, from
    T - 1 to 0."""
    sigmas = adm_sigmas(alphas_cumprod)
    _check_count(n, len(sigmas))
    return timesteps_near_sigmas(logsnr_sigmas(n, float(sigmas[0]), float(sigmas[-1])), alphas_cumprod)


def adm_rho_timesteps(n: int, alphas_cumprod, rho: float) -> tuple[int, ...]:
    """n timesteps of an ADM chain after EDM's rho family between the chain's own sigma_{T-1}
    and sigma_0, mapped by `timesteps_near_sigmas`; descending, from T - 1 to 0."""
    sigmas = adm_sigmas(alphas_cumprod)
    _check_count(n, len(sigmas))
    return timesteps_near_sigmas(edm_rho_sigmas(n, float(sigmas[0]), float(sigmas[-1]), rho), alphas_cumprod)


@dataclass(frozen=True)
class StepFamily:
    """A named family: `sigmas(n, sigma_min, sigma_max, **params)` for noise-level samplers
    (None: not offered to them), `timesteps(n, T, alphas_cumprod, **params)` for ADM chains."""

    name: str
    description: str
    sigmas: Callable[..., tuple[float, ...]] | None
    timesteps: Callable[..., tuple[int, ...]]
    params: tuple[str, ...] = ()


STEP_FAMILIES: dict[str, StepFamily] = {family.name: family for family in (
    StepFamily("rho", "EDM's rho family (rho 7: EDM's default schedule)",
               lambda n, lo, hi, rho=7.0: edm_rho_sigmas(n, lo, hi, rho),
               lambda n, T, abar, rho=7.0: adm_rho_timesteps(n, abar, rho), ("rho",)),
    StepFamily("logsnr", "evenly spaced in log-SNR (DPM-Solver, UniPC)",
               lambda n, lo, hi: logsnr_sigmas(n, lo, hi), lambda n, T, abar: adm_logsnr_timesteps(n, abar)),
    StepFamily("even", "ADM's even respacing 'N' (ADM chains only)", None,
               lambda n, T, abar: adm_even_timesteps(n, T)),
    StepFamily("leading", "DDIM leading, ADM's 'ddimN': 0, s, 2s, ... (ADM chains only)", None,
               lambda n, T, abar: ddim_leading_timesteps(n, T)),
    StepFamily("trailing", "DDIM trailing: from T - 1 down in steps of T / N (ADM chains only)", None,
               lambda n, T, abar: ddim_trailing_timesteps(n, T)),
)}


def family_steps(settings, family: str, n: int, *, net=None, **params) -> tuple:
    """The n-step sequence of `family` for a sampler's settings: noise levels (floats) for EDM
    and EDM2, between the settings' sigma_min and sigma_max (clamped to `net`'s range when a
    network with one is given, as EDM's sampler clamps); timesteps (ints) for DDPM and DiT, of
    the settings' T-step chain. `params` are the family's (rho: default the settings' rho where
    it has one, else 7). Pass the result to `settings.with_steps`."""
    if family not in STEP_FAMILIES:
        raise ValueError(f"step family: expected one of {', '.join(STEP_FAMILIES)}, got {family!r}")
    chosen = STEP_FAMILIES[family]
    unknown = sorted(set(params) - set(chosen.params))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a parameter of the {family!r} step family"
                         + (f" (its parameters: {', '.join(chosen.params)})" if chosen.params else " (it has none)"))
    if "rho" in chosen.params and "rho" not in params and hasattr(settings, "rho"):
        params["rho"] = settings.rho
    if hasattr(settings, "num_timesteps"):
        T = settings.num_timesteps
        abar = np.cumprod(1.0 - named_beta_schedule(settings.beta_schedule, T))
        return chosen.timesteps(n, T, abar, **params)
    if chosen.sigmas is None:
        raise ValueError(f"step family {family!r}: only for ADM chains (ddpm, dit), not the {settings.name} "
                         f"sampler; its families: "
                         f"{', '.join(name for name, f in STEP_FAMILIES.items() if f.sigmas is not None)}")
    sigma_min, sigma_max = settings.sigma_min, settings.sigma_max
    if net is not None and hasattr(net, "sigma_min"):
        sigma_min, sigma_max = max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))
    return chosen.sigmas(n, sigma_min, sigma_max, **params)


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    check_int("n (steps)", n, minimum=1)
    check_number("sigma_min", sigma_min, minimum=0, strict_minimum=True)
    check_number("sigma_max", sigma_max, minimum=0, strict_minimum=True)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


def _check_count(n: int, T: int) -> None:
    check_int("T (num_timesteps)", T, minimum=2)
    check_int("n (steps)", n, minimum=2, maximum=T)


__all__ = ["STEP_FAMILIES", "StepFamily", "adm_even_timesteps", "adm_logsnr_timesteps", "adm_rho_timesteps",
           "adm_sigmas", "ddim_leading_timesteps", "ddim_trailing_timesteps", "edm_rho_sigmas", "edm_rho_tensor",
           "family_steps", "logsnr_sigmas", "timesteps_near_sigmas"]
