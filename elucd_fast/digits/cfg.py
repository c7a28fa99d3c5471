"""Classifier-free guidance for EDM-interface denoisers (Ho & Salimans 2022):

    D_cfg(x, sigma, y) = D(x, sigma, 0) + s * (D(x, sigma, y) - D(x, sigma, 0))

with D(x, sigma, 0) the unconditional denoiser that label dropout trains (EDM zeroes the
one-hot label). s = 1 is plain conditional sampling, s = 0 unconditional.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_finite_number


class ClassifierFreeGuidance(nn.Module):
    """EDM network interface around a label-dropout-trained EDM denoiser.

    Args:
        denoiser: `denoiser(x, sigma, one-hot labels)` with `label_dim` > 0, `sigma_min`,
            `sigma_max`, `round_sigma`, `img_channels`, `img_resolution`.
        cfg_scale: s.
    """

    def __init__(self, denoiser: nn.Module, cfg_scale: float):
        super().__init__()
        if not getattr(denoiser, "label_dim", 0):
            raise ValueError("denoiser: classifier-free guidance needs a class-conditional denoiser (label_dim > 0)")
        self.denoiser = denoiser
        self.cfg_scale = check_finite_number("cfg_scale", cfg_scale)
        self.label_dim = denoiser.label_dim
        self.img_channels = denoiser.img_channels
        self.img_resolution = denoiser.img_resolution
        self.sigma_min = denoiser.sigma_min
        self.sigma_max = denoiser.sigma_max

    def round_sigma(self, sigma):
        return self.denoiser.round_sigma(sigma)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor) -> torch.Tensor:
        """D_cfg for x (B, C, H, W), sigma scalar or (B,), one-hot labels (B, K); float32
        (B, C, H, W). Both denoiser evaluations run as one batch of 2B."""
        # s = 0 and s = 1 need only one of the two evaluations.
        if self.cfg_scale == 0:
            return self.denoiser(x, sigma, torch.zeros_like(class_labels))
        if self.cfg_scale == 1:
            return self.denoiser(x, sigma, class_labels)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        if sigma.numel() > 1:
            sigma = torch.cat([sigma, sigma])
        labels = torch.cat([class_labels, torch.zeros_like(class_labels)])
        conditional, unconditional = self.denoiser(torch.cat([x, x]), sigma, labels).chunk(2)
        return unconditional + self.cfg_scale * (conditional - unconditional)


__all__ = ["ClassifierFreeGuidance"]
