"""Denoiser views `D(x, sigma, class_labels)` (k-diffusion's protocol, EDM's network interface),
so EDM networks and ADM eps-models serve the same samplers and tools.

An ADM eps-model defines a denoiser through the VP <-> VE change of variables: with
abar = 1 / (1 + sigma^2), the VP state is x * sqrt(abar) and D(x, sigma) = x - sigma * eps.
Only the model's discrete noise levels are valid inputs, so `round_sigma` snaps to them (as
EDM's iDDPMPrecond does).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..schedules.gaussian_diffusion import GaussianDiffusion


class EpsModelDenoiser(nn.Module):
    """EDM network interface around an ADM eps-model `model(x, t, y)`.

    Args:
        model: eps-model taking the ORIGINAL integer timesteps; with `learn_sigma`, its output
            has 2C channels and the variance half is dropped.
        diffusion: the model's (un-respaced) diffusion; default ADM's 1000-step linear chain.
        learn_sigma: whether the output carries variance channels.
        img_channels, img_resolution: image shape (C, H = W).
        label_dim: number of classes the model is conditioned on (0: unconditional).
    """

    def __init__(self, model, *, diffusion: GaussianDiffusion | None = None, learn_sigma: bool = True,
                 img_channels: int = 3, img_resolution: int = 64, label_dim: int = 0):
        super().__init__()
        self.model = model
        diffusion = diffusion or GaussianDiffusion.create(1000, "linear", None)
        self.register_buffer("sigmas", torch.from_numpy(diffusion.sigmas()), persistent=False)  # (T,) ascending
        self.timestep_map = np.asarray(diffusion.timestep_map)
        self.register_buffer("model_timesteps", torch.from_numpy(self.timestep_map).long(), persistent=False)
        self.learn_sigma = learn_sigma
        self.img_channels, self.img_resolution, self.label_dim = img_channels, img_resolution, label_dim
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def _index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest discrete noise level (in log sigma)."""
        log_sigmas = self.sigmas.log()
        return (sigma.to(self.sigmas.device, torch.float64).log().reshape(-1, 1) - log_sigmas).abs().argmin(dim=1)

    def round_sigma(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.sigmas[self._index(sigma)].reshape(sigma.shape).to(sigma.dtype)

    def block_names(self) -> tuple[str, ...]:
        """The eps-model's block names by id (`models.block_plan`)."""
        return self.model.block_names()

    @property
    def cache_points(self) -> int:
        return self.model.cache_points

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                **model_kwargs) -> torch.Tensor:
        """D(x, sigma): x (B, C, H, W) in the VE scale, sigma scalar or (B,); labels one-hot
        (B, K) or ids (B,). Returns the denoised estimate (B, C, H, W), float32. `model_kwargs`
        (a block plan and its cache) go to the eps-model."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        t = self.model_timesteps.to(x.device)[self._index(sigma).to(x.device)]
        y = None
        if self.label_dim and class_labels is not None:
            y = class_labels.argmax(dim=1) if class_labels.ndim == 2 else class_labels
        c_in = (1 + sigma.square()).rsqrt().reshape(-1, 1, 1, 1)
        eps = self.model(x * c_in, t, y, **model_kwargs).to(torch.float32)
        if self.learn_sigma:
            eps = eps[:, : x.shape[1]]
        return x - sigma.reshape(-1, 1, 1, 1) * eps


class DenoiserEpsModel(nn.Module):
    """ADM eps-model interface `model(x, t, y)` around an EDM-interface denoiser, so a network
    trained with EDM's objective also runs under the DDPM/DDIM sampler (with fixed variances:
    `learn_sigma=False`).

    With abar_t of `diffusion` at ORIGINAL timestep t: sigma_t = sqrt((1 - abar_t) / abar_t),
    the VE state is x / sqrt(abar_t), and eps = (x_ve - D(x_ve, sigma_t)) / sigma_t.
    """

    def __init__(self, denoiser, diffusion: GaussianDiffusion | None = None):
        super().__init__()
        self.denoiser = denoiser
        diffusion = diffusion or GaussianDiffusion.create(1000, "linear", None)
        self.register_buffer("sigmas", torch.from_numpy(diffusion.sigmas()), persistent=False)
        label_dim = getattr(denoiser, "label_dim", 0) or 0
        self.num_classes = label_dim or None

    def block_names(self) -> tuple[str, ...]:
        """The denoiser's block names by id (`models.block_plan`)."""
        return self.denoiser.block_names()

    @property
    def cache_points(self) -> int:
        return self.denoiser.cache_points

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                **model_kwargs) -> torch.Tensor:
        """eps (B, C, H, W) for the VP state x (B, C, H, W) at original timesteps t (B,);
        `model_kwargs` (a block plan and its cache) go to the denoiser."""
        sigma = self.sigmas.to(x.device)[t].to(x.dtype).reshape(-1, 1, 1, 1)
        x_ve = x * (1 + sigma.square()).sqrt()
        labels = None
        if self.num_classes and y is not None:
            labels = torch.nn.functional.one_hot(y.long(), self.num_classes).to(torch.float32)
        denoised = self.denoiser(x_ve, sigma.reshape(-1), labels, **model_kwargs).to(x.dtype)
        return (x_ve - denoised) / sigma
