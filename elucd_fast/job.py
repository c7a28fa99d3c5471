"""A sampling job: the networks, the guidance and the sampler settings that determine every
image, ready to turn per-seed latents into images. Presets build jobs; the engine sets up how
they run; `runs` and `tools` consume them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .guidance.latent import decode_latents
from .samplers import SamplerSettings, sampler_for
from .samplers.dit import DiTSettings
from .samplers.edm2 import EDM2Settings, decode_edm2_latents


@dataclass(frozen=True)
class Job:
    """Everything a sampler call needs besides the latents, labels and noise source.

    Attributes:
        net: the diffusion network (EDM interface for EDMSettings and EDM2Settings, an ADM
            eps-model for DDPMSettings, a DiT for DiTSettings).
        guidance: the classifier guidance, or None for unguided sampling.
        settings: the sampler's settings; their type selects the sampler.
        image_shape: (C, H, W) of the images.
        num_classes: number of classes labels are drawn from (None: unconditional).
        device: where the networks live.
        config: JSON-able description of everything that determines the images (recorded in
            manifests; two runs with equal configs give equal images for equal seeds).
        latent_shape: (C, h, w) of the noise the sampler starts from when it differs from the
            images' (latent samplers); None: image_shape.
        decoder: latents -> images for latent samplers (applied after sampling; for EDM2 the
            network's encoder, whose differentiable forward the classifier also sees through).
        quantize: how images become uint8: "round" (EDM's) or "floor" (ADM's).
        dtype, step_runner, ops: how the engine runs the sampler (state dtype, compiled or
            CUDA-graph step, fused step ops); None: the plain path.
        notes: lines the job's builder wants the user to read (e.g. a non-paper checkpoint).
        guide_net: EDM2's guide network (EDM2Settings with guide_weight != 1), else None.
        block_plans: one block plan per step for `net` (`models.block_plan`; a schedule file's),
            or None: every block runs (EDM2: for `net`, not the guide network).
    """

    net: Any
    guidance: Any
    settings: SamplerSettings
    image_shape: tuple[int, int, int] = (3, 64, 64)
    num_classes: int | None = 1000
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: dict = field(default_factory=dict)
    latent_shape: tuple[int, int, int] | None = None
    decoder: Callable | None = None
    quantize: str = "round"
    dtype: torch.dtype | None = None
    step_runner: Callable | None = None
    ops: Any = None
    notes: tuple[str, ...] = ()
    guide_net: Any = None
    block_plans: tuple | None = None

    def __post_init__(self):
        sampler_for(self.settings)  # a known settings type
        if self.block_plans is not None and len(self.block_plans) != self.settings.num_steps:
            raise ValueError(f"block plans: {len(self.block_plans)} plans for {self.settings.num_steps} steps")

    @property
    def sampler(self) -> str:
        """The sampler's name: "edm", "ddpm", "dit" or "edm2"."""
        return self.settings.name

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the per-seed starting noise."""
        return self.latent_shape or self.image_shape

    def sample(self, latents: torch.Tensor, labels: torch.Tensor | None,
               randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in about [-1, 1] from standard normal noise (B, *noise_shape)."""
        runtime = {"dtype": self.dtype, "step_runner": self.step_runner, "callback": callback}
        if self.ops is not None:
            runtime["ops"] = self.ops
        if self.block_plans is not None:
            runtime["block_plans"] = self.block_plans
        if isinstance(self.settings, (DiTSettings, EDM2Settings)):
            runtime["decoder"] = self.decoder
        if isinstance(self.settings, EDM2Settings):
            runtime["gnet"] = self.guide_net
        out = sampler_for(self.settings)(self.net, latents, labels, randn_like=randn_like, guidance=self.guidance,
                                         settings=self.settings, **runtime)
        if self.decoder is None:
            return out
        if isinstance(self.settings, DiTSettings):
            return decode_latents(self.decoder, out, latent_scale=self.settings.latent_scale)
        if isinstance(self.settings, EDM2Settings):
            return decode_edm2_latents(self.decoder, out)
        return self.decoder(out)
