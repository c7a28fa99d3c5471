"""The paper's result-table rows as presets (SPEC §3-5, §8): each names the checkpoint files it
expects, where users get them, and the FID the paper reports, so

    elucd-fast generate --preset edm64-18 --network edm-imagenet-64x64-cond-adm.pkl \\
        --classifier resnet101-cd907fc2.pth --seeds 0-49999

runs the paper's setting. Nothing is fetched: every file is a local path the user passes.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

import torch

from .guidance.classifier import ClassifierGuidance
from .guidance.schedules import check_finite_number
from .job import Job
from .models.checkpoint import CheckpointError
from .presets import register_preset

EDM_PICKLE_SOURCE = "the EDM repository's release (NVlabs/edm, 'Pre-trained models')"
ADM_SOURCE = "the guided-diffusion repository's release (openai/guided-diffusion, 'Download pre-trained models')"
DIT_SOURCE = "the DiT repository's release (facebookresearch/DiT, 'Sampling': download.py's file list)"
VAE_SOURCE = "the stabilityai/sd-vae-ft-ema model page (a diffusers directory or its .safetensors file)"
TORCHVISION_SOURCE = "torchvision's weight files (e.g. torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url)"


@dataclass(frozen=True)
class PaperPreset:
    """One row of the paper's results, with the checkpoints it needs.

    Overridable through `build(**overrides)`: the keys of `sampler_settings` (sampler keywords)
    and `softplus_beta`, `joint_temperature`, `marginal_temperature` (ClassifierGuidance).
    """

    name: str
    description: str
    sampler: str                                  # "edm", "ddpm" or "dit"
    network_file: str                             # the expected checkpoint file name
    network_source: str                           # where users get it
    classifier_arch: str                          # torchvision architecture
    classifier_file: str
    image_shape: tuple[int, int, int]             # (C, H, W) of the images
    paper_fid: tuple[float, float]                # (unguided, guided), 50k samples
    softplus_beta: float                          # ReLU -> Softplus(beta)
    joint_temperature: float                      # tau_j
    marginal_temperature: float                   # tau_m
    sampler_settings: dict = field(default_factory=dict)
    num_classes: int = 1000
    vae_source: str | None = None                 # DiT only: the decoder
    settings_note: str = "the paper's settings"
    network_kwargs: dict = field(default_factory=dict)  # passed to the network loader (architecture flags)
    guided: bool = True                           # False: the unguided baseline of the row
    quantize: str = "round"                       # uint8 conversion: EDM's "round" or ADM's "floor"

    def overridable(self) -> tuple[str, ...]:
        return tuple(self.sampler_settings) + ("softplus_beta", "joint_temperature", "marginal_temperature",
                                               "guidance")

    def with_overrides(self, **overrides) -> PaperPreset:
        unknown = sorted(set(overrides) - set(self.overridable()))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a setting of preset {self.name!r}; "
                             f"settings: {', '.join(self.overridable())}")
        guided = overrides.pop("guidance", True)
        guidance = {k: overrides.pop(k) for k in ("softplus_beta", "joint_temperature", "marginal_temperature")
                    if k in overrides}
        preset = replace(self, sampler_settings={**self.sampler_settings, **overrides}, guided=bool(guided),
                         **guidance)
        beta = preset.softplus_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta) or beta <= 0:
            raise ValueError(f"softplus_beta: must be > 0 (inf keeps ReLU), got {beta!r}")
        check_finite_number("joint_temperature", preset.joint_temperature, minimum=0)
        check_finite_number("marginal_temperature", preset.marginal_temperature, minimum=0)
        return preset

    def _require(self, what: str, path, expected: str, source: str) -> str:
        if path is None:
            raise CheckpointError(f"preset {self.name!r} needs --{what} PATH: the file {expected} from {source}")
        if not os.path.isfile(path) and not os.path.isdir(path):
            raise CheckpointError(f"--{what}: no such file: {path} (preset {self.name!r} expects {expected} "
                                  f"from {source})")
        return str(path)

    def build(self, *, device: torch.device | str = "cpu", network: str | os.PathLike | None = None,
              classifier: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
              **overrides) -> Job:
        """The job with the user's local checkpoint files; refuses missing files with a message
        naming the expected file and where to get it."""
        from .models.checkpoint import sha256_file
        from .models.classifiers import load_classifier

        preset = self.with_overrides(**overrides)
        device = torch.device(device)
        network = self._require("network", network, self.network_file, self.network_source)
        if preset.guided:
            classifier = self._require("classifier", classifier, self.classifier_file, TORCHVISION_SOURCE)
        if self.sampler == "dit":
            vae = self._require("vae", vae, "sd-vae-ft-ema", VAE_SOURCE)
        guidance = None
        settings = dict(preset.sampler_settings)
        if preset.guided:
            guidance = ClassifierGuidance(load_classifier(self.classifier_arch, classifier).to(device),
                                          softplus_beta=preset.softplus_beta,
                                          joint_temperature=preset.joint_temperature,
                                          marginal_temperature=preset.marginal_temperature,
                                          input_transform="identity")  # as the authors: [-1, 1] at the model's size
        else:  # the guidance strengths mean nothing without guidance
            for key in ("max_guidance", "add_factor", "classifier_scale", "gamma_factor", "guidance_scale"):
                settings.pop(key, None)
        latent_shape = None
        decoder = None
        if self.sampler == "edm":
            from .models.edm_pickle import load_edm_network

            net = load_edm_network(network, device=device, **self.network_kwargs)
        elif self.sampler == "ddpm":
            from .models.adm_unet import load_adm_model

            # guided-diffusion's fp16 torso only on CUDA (CPU fp16 convolutions are slow); the
            # precision policy decides the rest.
            flags = {"use_fp16": device.type == "cuda", **self.network_kwargs}
            net = load_adm_model(network, image_size=self.image_shape[-1], **flags).to(device).eval()
        else:
            from .models.dit import load_dit
            from .samplers.dit import VAEDecoder

            loaded = load_dit(network, image_size=self.image_shape[-1], vae=vae, **self.network_kwargs)
            net = loaded.dit.to(device).eval()
            decoder = VAEDecoder(loaded.vae.to(device).eval())
            settings["decoder"] = decoder
            latent_shape = (4, self.image_shape[1] // 8, self.image_shape[2] // 8)
        config = {"preset": preset.json_settings(),
                  "network_sha256": sha256_file(network) if os.path.isfile(network) else None,
                  "classifier_sha256": sha256_file(classifier) if preset.guided else None}
        return Job(sampler=self.sampler, net=net, guidance=guidance, sampler_kwargs=settings,
                   image_shape=self.image_shape, num_classes=self.num_classes, device=device, config=config,
                   latent_shape=latent_shape, decoder=decoder, quantize=self.quantize)

    def json_settings(self) -> dict:
        settings = asdict(self)
        settings.pop("network_kwargs")
        settings["sampler_settings"] = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
                                        for k, v in self.sampler_settings.items()}
        return settings


def _edm(name, steps, max_guidance, unguided, guided, **extra):
    return PaperPreset(
        name, f"EDM ImageNet-64 Heun, {steps} steps{' (SDE)' if extra else ''}, guided by ResNet-101",
        sampler="edm", network_file="edm-imagenet-64x64-cond-adm.pkl", network_source=EDM_PICKLE_SOURCE,
        classifier_arch="resnet101", classifier_file="resnet101-cd907fc2.pth", image_shape=(3, 64, 64),
        paper_fid=(unguided, guided), softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0,
        sampler_settings=dict(num_steps=steps, max_guidance=max_guidance, add_factor=0.3, **extra))


def _ddpm(name, arch, file, guided):
    return PaperPreset(
        name, f"ADM ImageNet-128 DDPM, 250 respaced steps, guided by {arch}",
        sampler="ddpm", network_file="128x128_diffusion.pt", network_source=ADM_SOURCE, classifier_arch=arch,
        classifier_file=file, image_shape=(3, 128, 128), paper_fid=(5.91, guided), softplus_beta=3.0,
        joint_temperature=1.0, marginal_temperature=0.5,
        sampler_settings=dict(timestep_respacing="250", classifier_scale=1.0, gamma_factor=0.3), quantize="floor")


PAPER_PRESETS = (
    _edm("edm64-10", 10, 0.004, 3.64, 3.38),
    _edm("edm64-18", 18, 0.004, 2.54, 2.35),
    _edm("edm64-36", 36, 0.0018, 2.35, 2.22),
    _edm("edm64-sde256", 256, 0.001, 1.41, 1.33, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),
    _ddpm("ddpm128-r101", "resnet101", "resnet101-cd907fc2.pth", 2.19),
    _ddpm("ddpm128-r50", "resnet50", "resnet50-11ad3fa6.pth", 2.36),
    PaperPreset(
        "dit256", "DiT-XL/2 256 with CFG 1.5 on 3 of 4 latent channels, guided by ResNet-101 through the VAE decoder",
        sampler="dit", network_file="DiT-XL-2-256x256.pt", network_source=DIT_SOURCE, classifier_arch="resnet101",
        classifier_file="resnet101-cd907fc2.pth", image_shape=(3, 256, 256), paper_fid=(2.27, 2.12),
        softplus_beta=3.0, joint_temperature=1.0, marginal_temperature=0.5, vae_source=VAE_SOURCE,
        sampler_settings=dict(timestep_respacing="250", cfg_scale=1.5, cfg_channels=3, guidance_scale=0.1,
                              gamma_factor=0.3),
        settings_note="CFG settings are DiT's; beta, temperatures and gamma are our defaults (the paper gives none)"),
)

for _preset in PAPER_PRESETS:
    register_preset(_preset)
