"""Guidance in a latent space (paper 5.3, rule 1 of Algorithm 3): the decoder is the first layer
of the classifier, so a pixel-space guidance steers latent samplers (DiT, EDM2 at 512).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checks import check_number

# Stable Diffusion's latent scale: latents are VAE posterior samples times this factor.
SD_LATENT_SCALE = 0.18215

Decoder = Callable[[torch.Tensor], torch.Tensor]


class VAEDecoder(nn.Module):
    """A diffusers `AutoencoderKL` as a decoder: unscaled latents (B, 4, h, w) -> images
    (B, 3, 8h, 8w) in about [-1, 1]. The input is cast to the VAE's dtype."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).sample


@torch.no_grad()
def decode_latents(decoder: Decoder, latents: torch.Tensor, *, latent_scale: float = SD_LATENT_SCALE) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], in the latents' dtype, from scaled latents (B, 4, h, w)."""
    return decoder(latents / latent_scale).clamp(-1, 1).to(latents.dtype)


class LatentGuidance(nn.Module):
    """A pixel-space guidance seen from latent space (paper 5.3, rule 1): the decoder is the first
    layer of the classifier, so

        grad_{z0} J(Dec(z0 / latent_scale)) = (dDec / dz0)^T grad_x J(x),  x = Dec(z0 / latent_scale)

    computed as one vector-Jacobian product through the decoder; nothing flows into the
    diffusion network.

    Args:
        guidance: pixel-space guidance, `guidance(x, labels) -> (grad_x J, J)` (a
            `ClassifierGuidance` or `CLIPGuidance`).
        decoder: scaled-down latents -> images in [-1, 1]; the real VAE or a cheaper stand-in.
        latent_scale: latents are divided by it before decoding.
        checkpointing: gradient checkpointing of the decoder (`torch.utils.checkpoint`): its
            activations are recomputed in the backward pass instead of being kept through the
            classifier's forward and backward (one more decoder forward). This path runs eager
            autograd, as does a decoder with its own block checkpointing (diffusers'
            `vae.enable_gradient_checkpointing()`, which needs it); the default path uses
            `torch.func.vjp`, which also runs under torch.compile and CUDA-graph capture but
            refuses checkpointing's saved-tensor hooks.

    Calling it with z0 (B, C, h, w) and labels returns (grad, J): grad_{z0} J in z0's shape and
    dtype, and J (B,) as the pixel-space guidance returns it.
    """

    def __init__(self, guidance: Callable, decoder: Decoder, *, latent_scale: float = SD_LATENT_SCALE,
                 checkpointing: bool = False):
        super().__init__()
        self.guidance = guidance
        self.decoder = decoder
        self.latent_scale = check_number("latent_scale", latent_scale, minimum=0, strict_minimum=True)
        self.checkpointing = bool(checkpointing)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) of scaled latents z (B, C, h, w)."""
        return self.decoder(z / self.latent_scale)

    def check_input(self, latent_shape: tuple[int, ...], labels: torch.Tensor, device: torch.device | str) -> None:
        """Runs once before sampling: decodes one zero latent of `latent_shape` (C, h, w) to learn
        the image shape, then lets the pixel-space guidance check images of that shape and the
        labels."""
        with torch.no_grad():
            images = self.decode(torch.zeros((1, *latent_shape), device=device,
                                             dtype=module_dtype(self.decoder, torch.float32)))
        if images.ndim != 4:
            raise ValueError(f"decoder: expected images (B, C, H, W), got shape {tuple(images.shape)}")
        if hasattr(self.guidance, "check_input"):
            self.guidance.check_input(tuple(images.shape[1:]), labels, device)

    def forward(self, z0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_in = z0.detach().to(module_dtype(self.decoder, z0.dtype))
        if self.checkpointing:
            with torch.enable_grad():
                z_in.requires_grad_(True)
                images = checkpoint(self.decode, z_in, use_reentrant=False)
                # The guidance gets a detached copy: its own backward must not run into the decoder.
                image_grad, objective = self.guidance(images.detach(), labels)
                (grad,) = torch.autograd.grad(images, z_in, grad_outputs=image_grad.to(images.dtype))
        else:
            try:
                images, pullback = torch.func.vjp(self.decode, z_in)
            except RuntimeError as err:
                if "saved tensor hooks" not in str(err):
                    raise
                raise RuntimeError("decoder: it checkpoints its own blocks, which torch.func.vjp cannot run; "
                                   "use decoder_checkpointing=True (LatentGuidance(checkpointing=True))") from err
            image_grad, objective = self.guidance(images, labels)
            (grad,) = pullback(image_grad.to(images.dtype))
        return grad.to(z0.dtype), objective


def module_dtype(module, default: torch.dtype) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (DiT may run in bf16 or fp16 while
    the sampler state stays float32); `default` for parameterless callables."""
    parameters = getattr(module, "parameters", None)
    for p in parameters() if callable(parameters) else ():
        if p.is_floating_point():
            return p.dtype
    return default



__all__ = ["SD_LATENT_SCALE", "Decoder", "LatentGuidance", "VAEDecoder", "decode_latents", "module_dtype"]
