"""EDM2's conversions from a network's "final latents" to images (`training/encoders.py`).

An EDM2 pickle holds, beside the network, the encoder its model was trained with: the identity
for ImageNet-64 (`StandardRGBEncoder`: latents are pixels scaled to [-1, 1]) or the Stability AI
VAE for ImageNet-512 (`StabilityVAEEncoder`: latents are raw SD-VAE latents whitened per
channel). Each of ours has two decodings:

- `decode(x)`: uint8 pixels (B, 3, H, W), exactly as EDM2 writes its images;
- `forward(x)`: float images (B, 3, H, W) in about [-1, 1], differentiable, for guidance with a
  pixel-space classifier: the `decoder` of `samplers.dit.LatentGuidance` (with `latent_scale=1`:
  the whitening is undone here), the role `samplers.dit.VAEDecoder` plays for DiT.

Both are built from what the pickle's encoder record holds (its `__dict__`): nothing for the RGB
encoder; `scale`, `bias` (float32 arrays of 4), `vae_name` and `batch_size` for the VAE one. The
record never holds the VAE itself: it is a diffusers `AutoencoderKL` (`stabilityai/sd-vae-ft-mse`)
the caller loads from local files and passes in.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

#: EDM2's defaults for ImageNet-512: the assumed statistics of raw SD-VAE latents (of images in
#: [0, 1], see `StabilityVAEEncoder`) and those wanted for the network's latents.
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN = 0.0
FINAL_STD = 0.5
SD_VAE_NAME = "stabilityai/sd-vae-ft-mse"


class StandardRGBEncoder(torch.nn.Module):
    """ImageNet-64: the network's latents are the pixels p in [0, 255] as p / 127.5 - 1."""

    latent_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]: the latents themselves."""
        return x

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels: x * 127.5 + 128 clipped to [0, 255] and truncated (so rounded to the
        nearest level of x * 127.5 + 127.5)."""
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


class StabilityVAEEncoder(torch.nn.Module):
    """ImageNet-512: the network's latents x (B, 4, h, w) are raw SD-VAE latents z whitened per
    channel, x = z * scale + bias, and decode through the VAE to (B, 3, 8h, 8w).

    EDM2 runs the VAE on images in [0, 1], not the [-1, 1] of Stable Diffusion, and without SD's
    0.18215 factor (the whitening replaces it): its output v is read as pixels 255 v.

    Args:
        scale, bias: per-channel whitening (4 values each), as stored in the pickle record.
        vae_name: the VAE the model was trained with (recorded, not loaded here).
        batch_size: images per VAE call in `decode`.
        vae: the diffusers `AutoencoderKL` (or any module with `.decode(z).sample` and
            `.dtype`); may be given later with `use_vae`.
    """

    latent_channels = 4

    def __init__(self, scale: Sequence[float] | torch.Tensor, bias: Sequence[float] | torch.Tensor, *,
                 vae_name: str = SD_VAE_NAME, batch_size: int = 8, vae: torch.nn.Module | None = None) -> None:
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32).flatten()
        bias = torch.as_tensor(bias, dtype=torch.float32).flatten()
        if scale.shape != (self.latent_channels,) or bias.shape != (self.latent_channels,):
            raise ValueError(f"StabilityVAEEncoder: scale and bias need {self.latent_channels} values each, "
                             f"got {tuple(scale.shape)} and {tuple(bias.shape)}")
        if not (torch.isfinite(scale).all() and torch.isfinite(bias).all() and (scale != 0).all()):
            raise ValueError("StabilityVAEEncoder: scale and bias must be finite and scale nonzero")
        if int(batch_size) < 1:
            raise ValueError(f"StabilityVAEEncoder: batch_size must be >= 1, got {batch_size!r}")
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.vae_name = str(vae_name)
        self.batch_size = int(batch_size)
        self.vae = vae

    @classmethod
    def from_statistics(cls, raw_mean: Sequence[float] = RAW_MEAN, raw_std: Sequence[float] = RAW_STD,
                        final_mean: float = FINAL_MEAN, final_std: float = FINAL_STD, **kwargs) -> StabilityVAEEncoder:
        """The encoder that maps latents of mean `raw_mean` and std `raw_std` to `final_mean`,
        `final_std` (EDM2's constructor arguments): scale = final_std / raw_std, bias =
        final_mean - raw_mean * scale, in float32 as EDM2 computes them."""
        raw_mean = torch.as_tensor(raw_mean, dtype=torch.float32)
        raw_std = torch.as_tensor(raw_std, dtype=torch.float32)
        scale = torch.as_tensor(final_std, dtype=torch.float32) / raw_std
        bias = torch.as_tensor(final_mean, dtype=torch.float32) - raw_mean * scale
        return cls(scale, bias, **kwargs)

    def use_vae(self, vae: torch.nn.Module) -> StabilityVAEEncoder:
        """Attaches the VAE (in place) and returns self."""
        self.vae = vae
        return self

    def raw_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(x - bias) / scale in at least float32: the VAE's latents."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        return (x - self.bias.to(dtype).reshape(1, -1, 1, 1)) / self.scale.to(dtype).reshape(1, -1, 1, 1)

    def _run_vae(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise RuntimeError(f"StabilityVAEEncoder: no VAE attached; load {self.vae_name!r} and call use_vae(vae)")
        return self.vae.decode(z.to(self.vae.dtype)).sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] (2 v - 1 of the VAE output v, not clamped), differentiable in
        x, in the VAE's dtype."""
        return self._run_vae(self.raw_latents(x)) * 2 - 1

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels: VAE output clamped to [0, 1], times 255, truncated; the VAE runs on
        `batch_size` latents at a time."""
        z = self.raw_latents(x.to(torch.float32))
        v = torch.cat([self._run_vae(batch).to(torch.float32) for batch in z.split(self.batch_size)])
        return v.clamp(0, 1).mul(255).to(torch.uint8)


#: EDM2's encoder class names (as its pickles name them) -> ours.
EDM2_ENCODER_CLASSES = {"StandardRGBEncoder": StandardRGBEncoder, "StabilityVAEEncoder": StabilityVAEEncoder}
