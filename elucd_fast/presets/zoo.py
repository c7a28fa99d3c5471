"""The rest of the public checkpoint zoo as presets: guided-diffusion's 64, 256 (conditional and
unconditional) and 512 ImageNet models and DiT-XL/2 at 512, guided by ResNet-101 the way the
paper guides its ADM-128 and DiT rows. These are not paper rows: the paper reports none of them,
so their guidance settings are the paper's ADM-128 ones (DiT: our DiT defaults), untuned at these
sizes; the sampler settings are each model's own (guided-diffusion's README and DiT's sample.py:
250 respaced steps, learned variance, 1000 steps; cosine betas for the 64x64 model).
"""
from __future__ import annotations

from ..samplers import DDPMSettings, DiTSettings
from .checkpoint import ADM_SOURCE, DIT_SOURCE, VAE_SOURCE, CheckpointPreset
from .paper import DDPM_GUIDANCE
from .registry import register_preset

UNTUNED = "guidance settings are the paper's ADM-128 ones, untuned for this model (the paper has no such row)"


def _adm(name: str, file: str, size: int, beta_schedule: str, what: str) -> CheckpointPreset:
    return CheckpointPreset(
        name, f"ADM ImageNet-{size} {what}, 250 respaced steps, guided by ResNet-101 (x0 input, sine-added variance)",
        network_file=file, network_source=ADM_SOURCE, classifier_arch="resnet101",
        classifier_file="resnet101-cd907fc2.pth", image_shape=(3, size, size), guidance_settings=DDPM_GUIDANCE,
        settings=DDPMSettings(beta_schedule=beta_schedule, timestep_respacing="250", classifier_scale=1.0,
                              gamma_factor=0.3),
        quantize="floor", settings_note=UNTUNED)


ZOO_PRESETS = (
    _adm("adm64", "64x64_diffusion.pt", 64, "cosine", "class-conditional"),
    _adm("adm256", "256x256_diffusion.pt", 256, "linear", "class-conditional"),
    # The unconditional model: the class comes from the classifier alone.
    _adm("adm256-uncond", "256x256_diffusion_uncond.pt", 256, "linear", "unconditional"),
    _adm("adm512", "512x512_diffusion.pt", 512, "linear", "class-conditional"),
    CheckpointPreset(
        "dit512", "DiT-XL/2 512 with CFG 1.5 on 3 of 4 latent channels, guided by ResNet-101 through the VAE decoder",
        network_file="DiT-XL-2-512x512.pt", network_source=DIT_SOURCE, classifier_arch="resnet101",
        classifier_file="resnet101-cd907fc2.pth", image_shape=(3, 512, 512), guidance_settings=DDPM_GUIDANCE,
        vae_source=VAE_SOURCE,
        settings=DiTSettings(timestep_respacing="250", cfg_scale=1.5, cfg_channels=3, guidance_scale=0.1,
                             gamma_factor=0.3),
        settings_note="CFG settings are DiT's; beta, temperatures and gamma are our untuned DiT defaults"),
)

for _preset in ZOO_PRESETS:
    register_preset(_preset)
