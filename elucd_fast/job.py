"""A sampling job: the networks, the guidance and the sampler settings that determine every
image, ready to turn per-seed latents into images. Presets build jobs; `generate`, `profile`,
`calibrate` and `ablate` consume them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .guidance.classifier import ClassifierGuidance
from .samplers.ddpm import ddpm_sampler
from .samplers.dit import decode_latents, dit_sampler
from .samplers.edm import edm_sampler

SAMPLERS = {"edm": edm_sampler, "ddpm": ddpm_sampler, "dit": dit_sampler}


@dataclass
class Job:
    """Everything a sampler call needs besides the latents, labels and noise source.

    Attributes:
        sampler: "edm" (net is an EDM-interface denoiser), "ddpm" (an ADM eps-model) or "dit"
            (a latent DiT; `decoder` maps its final latents to images).
        net: the diffusion network.
        guidance: the classifier guidance, or None for unguided sampling.
        sampler_kwargs: keyword arguments of the sampler function (steps, schedule, scales...).
        image_shape: (C, H, W) of the images.
        num_classes: number of classes labels are drawn from.
        device: where the networks live.
        config: JSON-able description of everything that determines the images (recorded in
            manifests; two runs with equal configs give equal images for equal seeds).
        latent_shape: (C, h, w) of the noise the sampler starts from when it differs from the
            images' (latent samplers); None: image_shape.
        decoder: latents -> images for latent samplers (applied after sampling).
        quantize: how images become uint8: "round" (EDM's) or "floor" (ADM's, for comparison
            with ADM-evaluated sample sets).
    """

    sampler: str
    net: Any
    guidance: ClassifierGuidance | None
    sampler_kwargs: dict = field(default_factory=dict)
    image_shape: tuple[int, int, int] = (3, 64, 64)
    num_classes: int = 1000
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: dict = field(default_factory=dict)
    latent_shape: tuple[int, int, int] | None = None
    decoder: Callable | None = None
    quantize: str = "round"

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the per-seed starting noise."""
        return self.latent_shape or self.image_shape

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {sorted(SAMPLERS)}, got {self.sampler!r}")

    def sample(self, latents: torch.Tensor, labels: torch.Tensor | None,
               randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in about [-1, 1] from standard normal noise (B, *noise_shape)."""
        out = SAMPLERS[self.sampler](self.net, latents, labels, randn_like=randn_like, guidance=self.guidance,
                                     callback=callback, **self.sampler_kwargs)
        return out if self.decoder is None else decode_latents(self.decoder, out)
