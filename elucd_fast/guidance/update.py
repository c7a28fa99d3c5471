"""How a guidance gradient moves a sampler's state, in plain PyTorch: the one home of each update
(SPEC §3-5). The samplers and integrations call these; every fused kernel (`elucd_fast.kernels`,
`elucd_fast.csrc`) computes the same function and is tested against these.

EDM (Algorithm 2), per sample b with its elements as one row:

    r_b   = rms(x_b)
    xc_b  = x_b / r_b if r_b > 1 else x_b                           # edm_classifier_input
    dx_b  = g_b / max(rms(g_b), tiny) * r_b * w_b                   # edm_displacement
    x_hat = x_b + noise_scale * z_b + dx_b                          # edm_guidance_update

DDPM (Algorithm 1): mu' = mu + s (Sigma + a_t) g, a_t = max(sin(pi t / T) vmax gamma, 0).
DiT (Algorithm 3, rule 2): d' = d - g / max(rms(g), tiny) * gamma_t rms(d), d = eps_c - eps_u.

Why `g / max(rms(g), tiny)` comes before the multiplication by `r * w`: the quotient is bounded by
sqrt(N) and exactly 0 where g is 0, so an all-zero gradient moves nothing. Grouping as
`g * (r * w / max(rms(g), tiny))` would give 0 * inf = NaN once r * w exceeds about 4.

All arithmetic runs in float32 (float64 for float64 states); outputs take the state's dtype.
"""
from __future__ import annotations

import torch

from ..numerics import per_sample, working_dtype
from .schedules import ddpm_sine_add

# The rms(g) clamp: float32's smallest normal number, also for float64 states, so every path
# (plain, C++, Triton) clamps alike.
FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).to(dtype)


def _row_rms(rows: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B,) root mean square of each row."""
    return rows.square().mean(dim=1).sqrt()


def edm_classifier_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's view of an EDM state: xc (x's shape and dtype) and r = rms(x) (B,) in the
    working dtype."""
    x_rows = _rows(x, working_dtype(x.dtype))
    r = _row_rms(x_rows)
    xc = x_rows / torch.where(r > 1, r, torch.ones_like(r))[:, None]
    return xc.to(x.dtype).reshape(x.shape), r


def edm_classifier_gradient(guidance, x: torch.Tensor, ids: torch.Tensor | None, classifier_input=edm_classifier_input,
                            x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 2's classifier term before the update: g = grad J at the normalised state
    x_i / max(rms(x_i), 1) (`classifier_input`, plain or fused), or at `x0` when given (a latent
    sampler's decoded estimate, SPEC §9). Returns (g (B, C, H, W), J (B,))."""
    if x0 is not None:
        return guidance(x0, ids)
    xc, _ = classifier_input(x)
    return guidance(xc, ids)


def edm_displacement(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Algorithm 2's guidance step dx = g / rms(g) * rms(x) * w (x's shape, working dtype).

    Args:
        x: (B, ...) state; g: its classifier gradient, same shape, any float dtype.
        w: (B,) per-sample weights, or one value for all (a 0-d tensor w_i).
    """
    dtype = working_dtype(x.dtype)
    x_rows, g_rows = _rows(x, dtype), _rows(g, dtype)
    unit_g = g_rows / _row_rms(g_rows).clamp_min(FLOAT32_TINY)[:, None]
    return (unit_g * (_row_rms(x_rows) * w.to(dtype).reshape(-1))[:, None]).reshape(x.shape)


def edm_guidance_update(x: torch.Tensor, g: torch.Tensor, z: torch.Tensor, noise_scale: float | torch.Tensor,
                        w: torch.Tensor) -> torch.Tensor:
    """x_hat = x + noise_scale * z + dx (x's shape and dtype; see the module docstring).

    Args:
        x: (B, ...) state; g, z: same shape, any float dtype.
        noise_scale: float or one-element tensor, sqrt(t_hat^2 - sigma_i^2) S_noise.
        w: (B,) per-sample weights, or one value for all.
    """
    dtype = working_dtype(x.dtype)
    if isinstance(noise_scale, torch.Tensor):
        noise_scale = noise_scale.to(dtype).reshape(())
    moved = x.to(dtype) + noise_scale * z.to(dtype) + edm_displacement(x, g, w)
    return moved.to(x.dtype)


def ddpm_guided_mean(mean: torch.Tensor, variance: torch.Tensor, g: torch.Tensor, vmax: torch.Tensor,
                     sine: torch.Tensor, classifier_scale: float | torch.Tensor,
                     gamma_factor: float | torch.Tensor) -> torch.Tensor:
    """Algorithm 1's shifted mean mu' = mu + s (Sigma + a_t) g (SPEC §3), in mean's dtype.

    Args:
        mean, variance, g: (B, C, H, W) posterior mean mu, variance Sigma, gradient at x0.
        vmax: (B,) running max of Sigma[:, 0, 0, 0] including this step.
        sine: sin(pi t / T) (0-d tensor or float).
        classifier_scale: s; gamma_factor: gamma.
    """
    dtype = working_dtype(mean.dtype)
    if isinstance(sine, torch.Tensor):
        sine = sine.to(dtype)
    variance = variance.to(dtype)
    a_t = ddpm_sine_add(sine, vmax.to(dtype), gamma_factor)
    moved = mean.to(dtype) + classifier_scale * (variance + per_sample(a_t, variance)) * g.to(dtype)
    return moved.to(mean.dtype)


def dit_guided_difference(difference: torch.Tensor, g: torch.Tensor, gamma: float | torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 3's rule 2: the CFG difference d = eps_c - eps_u (B, k, h, w) minus the classifier
    gradient g (same shape) normalised to rms(d), times gamma_t. Returns (d' in d's dtype,
    rms(g) (B,) in the working dtype). As in EDM's displacement, g / max(rms(g), tiny) comes
    first, so rms(g) = 0 (g = 0) keeps that sample's term exactly 0 however large rms(d) is."""
    dtype = working_dtype(difference.dtype)
    d_rows, g_rows = _rows(difference, dtype), _rows(g, dtype)
    guidance_norm = _row_rms(g_rows)
    unit_g = g_rows / guidance_norm.clamp_min(FLOAT32_TINY)[:, None]
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(dtype)
    moved = d_rows - unit_g * (gamma * _row_rms(d_rows))[:, None]
    return moved.to(difference.dtype).reshape(difference.shape), guidance_norm
