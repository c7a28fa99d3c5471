"""ADM's Gaussian diffusion: beta schedules, timestep respacing, posterior and variance terms.

Numbers follow openai/guided-diffusion (`gaussian_diffusion.py`, `respace.py`): the schedule is
built in float64 numpy; a respaced chain keeps the chosen timesteps' alpha-bar values and the
model still receives the original integer timesteps (`timestep_map`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "cosine")


def named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """(T,) float64 betas: ADM's `linear` (scaled so any T matches the 1000-step range) or the
    improved-DDPM `cosine` schedule."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES}, got {name!r}")


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
    """The original timesteps kept by a respacing ("250", "10,15,20" per equal section, or
    "ddimN" for DDIM's even stride), sorted ascending."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"timestep_respacing: cannot take exactly {desired} evenly strided steps of {num_timesteps}")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep_respacing: expected e.g. '250', '10,15,20' or 'ddim25', got {section_counts!r}") from None
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"timestep_respacing: cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the stride as ADM does: multiplying instead can round differently at .5.
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


@dataclass
class GaussianDiffusion:
    """A (respaced) ADM diffusion chain of T steps; arrays are (T,) float64."""

    betas: np.ndarray
    timestep_map: np.ndarray

    @classmethod
    def create(cls, num_timesteps: int = 1000, beta_schedule: str = "linear",
               timestep_respacing: str | list[int] | None = None,
               timesteps: tuple[int, ...] | None = None) -> GaussianDiffusion:
        """The chain of `num_timesteps` steps, respaced by `timestep_respacing` or kept at the
        explicit `timesteps` (distinct ints of 0..T-1, any order; they take precedence)."""
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps: must be an integer >= 2, got {num_timesteps!r}")
        base = named_beta_schedule(beta_schedule, num_timesteps)
        if timesteps is not None:
            keep = sorted(timesteps)
        elif not timestep_respacing:
            return cls(base, np.arange(num_timesteps))
        else:
            keep = space_timesteps(num_timesteps, timestep_respacing)
        alphas_cumprod = np.cumprod(1.0 - base)
        betas, last = [], 1.0
        for t in keep:
            betas.append(1 - alphas_cumprod[t] / last)
            last = alphas_cumprod[t]
        return cls(np.array(betas, dtype=np.float64), np.array(keep))

    def __post_init__(self):
        b = self.betas
        self.num_steps = len(b)
        if self.num_steps < 2:
            raise ValueError(f"timestep_respacing: a chain needs at least 2 steps, got {self.num_steps}")
        self.alphas_cumprod = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; ADM clips the log with the t = 1 value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - b) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(b)
        # ADM's fixed-large variance: betas, with the posterior variance at t = 0.
        self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], b[1:]))

    def sigmas(self) -> np.ndarray:
        """(T,) noise levels sigma_t = sqrt((1 - abar_t) / abar_t) of the VE view x / sqrt(abar)."""
        return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    STEP_COEFFICIENTS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "log_betas",
                         "posterior_log_variance_clipped", "fixed_large_log_variance", "posterior_mean_coef1",
                         "posterior_mean_coef2", "alphas_cumprod", "alphas_cumprod_prev")

    def step_coefficients(self, t: int, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The schedule values a sampler step reads at respaced step t, as 0-d tensors made
        before the step: the loop then reads no host value from the device, and a compiled step
        is reused for every t."""
        return {name: torch.tensor(getattr(self, name)[t], dtype=dtype, device=device)
                for name in self.STEP_COEFFICIENTS}


# ---------------------------------------------------------------------------------------------
# Step maths shared by the DDPM and DiT samplers. `c` is `step_coefficients(t, ...)`: the
# schedule values at respaced step t as 0-d tensors.


def predict_x0(c: dict[str, torch.Tensor], x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps


def eps_from_x0(c: dict[str, torch.Tensor], x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The eps that `predict_x0` maps to x0."""
    return (c["sqrt_recip_alphas_cumprod"] * x - x0) / c["sqrt_recipm1_alphas_cumprod"]


def posterior_mean(c: dict[str, torch.Tensor], x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x0)."""
    return c["posterior_mean_coef1"] * x0 + c["posterior_mean_coef2"] * x


def model_log_variance(c: dict[str, torch.Tensor], x: torch.Tensor, var_values: torch.Tensor | None) -> torch.Tensor:
    """log Sigma (x's shape): ADM's learned range between log beta_t and the clipped posterior log
    variance, interpolated by the model's `var_values` in [-1, 1]; without them, ADM's fixed-large
    variance."""
    if var_values is None:
        return c["fixed_large_log_variance"].expand_as(x)
    frac = (var_values + 1) / 2
    return frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance_clipped"]


def ancestral_step(mean: torch.Tensor, log_variance: torch.Tensor, z: torch.Tensor, *, last: bool) -> torch.Tensor:
    """x_{t-1} = mu + 1[t > 0] exp(log Sigma / 2) z."""
    return mean if last else mean + (0.5 * log_variance).exp() * z


def ddim_step(c: dict[str, torch.Tensor], x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, eta: float, *,
              last: bool) -> torch.Tensor:
    """DDIM's x_{t-1} from x0 and eps with stochasticity eta (z drawn every step, used for t > 0)."""
    abar, abar_prev = c["alphas_cumprod"], c["alphas_cumprod_prev"]
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    x_prev = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).sqrt() * eps
    return x_prev if last else x_prev + sigma * z
