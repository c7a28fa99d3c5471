"""The paper's result-table rows as presets (SPEC §3-5, §8), so

    elucd-fast generate --preset edm64-18 --network edm-imagenet-64x64-cond-adm.pkl \\
        --classifier resnet101-cd907fc2.pth --seeds 0-49999

runs the paper's setting.
"""
from __future__ import annotations

from ..guidance.settings import GuidanceSettings
from ..samplers import DDPMSettings, DiTSettings, EDMSettings
from .checkpoint import ADM_SOURCE, DIT_SOURCE, EDM_PICKLE_SOURCE, VAE_SOURCE, CheckpointPreset
from .registry import register_preset

# The paper's DDPM guidance (SPEC §3): beta 3, tau_j 1, tau_m = tau_j / 2; gamma 0.3, s 1.
DDPM_GUIDANCE = GuidanceSettings(3.0, 1.0, 0.5)


def _edm(name, steps, max_guidance, unguided, guided, **churn):
    return CheckpointPreset(
        name, f"EDM ImageNet-64 Heun, {steps} steps{' (SDE)' if churn else ''}, guided by ResNet-101",
        network_file="edm-imagenet-64x64-cond-adm.pkl", network_source=EDM_PICKLE_SOURCE,
        classifier_arch="resnet101", classifier_file="resnet101-cd907fc2.pth", image_shape=(3, 64, 64),
        paper_fid=(unguided, guided), guidance_settings=GuidanceSettings(5.0, 1.0, 0.0),
        settings=EDMSettings(num_steps=steps, max_guidance=max_guidance, add_factor=0.3, **churn))


def _ddpm(name, arch, file, guided):
    return CheckpointPreset(
        name, f"ADM ImageNet-128 DDPM, 250 respaced steps, guided by {arch}",
        network_file="128x128_diffusion.pt", network_source=ADM_SOURCE, classifier_arch=arch,
        classifier_file=file, image_shape=(3, 128, 128), paper_fid=(5.91, guided),
        guidance_settings=DDPM_GUIDANCE,
        settings=DDPMSettings(timestep_respacing="250", classifier_scale=1.0, gamma_factor=0.3), quantize="floor")


PAPER_PRESETS = (
    _edm("edm64-10", 10, 0.004, 3.64, 3.38),
    _edm("edm64-18", 18, 0.004, 2.54, 2.35),
    _edm("edm64-36", 36, 0.0018, 2.35, 2.22),
    _edm("edm64-sde256", 256, 0.001, 1.41, 1.33, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),
    _ddpm("ddpm128-r101", "resnet101", "resnet101-cd907fc2.pth", 2.19),
    _ddpm("ddpm128-r50", "resnet50", "resnet50-11ad3fa6.pth", 2.36),
    CheckpointPreset(
        "dit256", "DiT-XL/2 256 with CFG 1.5 on 3 of 4 latent channels, guided by ResNet-101 through the VAE decoder",
        network_file="DiT-XL-2-256x256.pt", network_source=DIT_SOURCE, classifier_arch="resnet101",
        classifier_file="resnet101-cd907fc2.pth", image_shape=(3, 256, 256), paper_fid=(2.27, 2.12),
        guidance_settings=GuidanceSettings(3.0, 1.0, 0.5), vae_source=VAE_SOURCE,
        settings=DiTSettings(timestep_respacing="250", cfg_scale=1.5, cfg_channels=3, guidance_scale=0.1,
                             gamma_factor=0.3),
        settings_note="CFG settings are DiT's; beta, temperatures and gamma are our defaults (the paper gives none)"),
)

for _preset in PAPER_PRESETS:
    register_preset(_preset)
