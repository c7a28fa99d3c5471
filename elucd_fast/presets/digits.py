"""The digits benchmark's presets (`elucd_fast.digits`): an EDM denoiser and an off-the-shelf
ResNet trained on scikit-learn's 8x8 digits, guided as the paper guides ImageNet.

Their guidance defaults are OUR choice for digits, tuned on this benchmark (see
`DigitsPreset`), not the paper's ImageNet values.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import check_choice, check_number
from ..guidance.classifier import ClassifierGuidance
from ..guidance.settings import GuidanceSettings
from ..job import Job
from ..samplers import DDPMSettings, EDMSettings, SamplerSettings
from .registry import apply_overrides, preset_json, register_preset

# The DDPM path's chain: ADM's linear 1000-step betas, respaced; the EDM denoiser seen as an
# eps-model has no learned variance.
DIGITS_SETTINGS: dict[str, SamplerSettings] = {
    "edm": EDMSettings(num_steps=18, max_guidance=0.02, add_factor=0.3),
    "ddpm": DDPMSettings(num_timesteps=1000, beta_schedule="linear", timestep_respacing="50", learn_sigma=False,
                         clip_denoised=True, classifier_scale=0.3, gamma_factor=0.3, guidance_input="x0"),
}


@dataclass(frozen=True)
class DigitsPreset:
    """A digits benchmark configuration (images (1, 8, 8), 10 classes).

    How the digits defaults were chosen (ours, not the paper's; class accuracy by the evaluation
    network / FD of its features, seeds 0-999, shipped weights; FD seed noise ~2.5-4.5):
    EDM, 18 steps, conditional: unguided 0.978 / 16.2; wmax 0.01: 0.984 / 16.6; 0.02: 0.988 / 19.0;
    0.03: 0.991 / 23.0 (beta 5, tau_m 0; beta 3 or tau_m 0.5 changed little). wmax 0.02 raises
    accuracy at an FD cost within the seed noise. DDPM, 50 steps, conditional (500 seeds):
    unguided 0.970 / 13.1; s 0.1: 0.982 / 12.1; s 0.3: 0.992 / 11.9; s 1: 1.000 / 23.8. CFG scale
    1.2: 0.990 / 16.3; 1.5: 0.998 / 18.1 (2,000 seeds).
    """

    name: str
    description: str
    guidance: bool = True                # classifier guidance on or off
    cfg_scale: float = 1.0               # D_u + s (D_c - D_u): 1 the conditional denoiser (the
                                         # paper's setting), 0 the unconditional one, > 1 CFG
    # Ours for digits; the paper's EDM-64 values are beta 5, tau_m 0.
    guidance_settings: GuidanceSettings = GuidanceSettings(softplus_beta=5.0, joint_temperature=1.0,
                                                           marginal_temperature=0.0)
    settings: SamplerSettings = DIGITS_SETTINGS["edm"]

    def __post_init__(self):
        check_number("cfg_scale", self.cfg_scale)
        check_choice("sampler", self.settings.name, tuple(DIGITS_SETTINGS))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        from ..digits.data import IMAGE_SHAPE

        return IMAGE_SHAPE

    @property
    def num_classes(self) -> int:
        from ..digits.data import NUM_CLASSES

        return NUM_CLASSES

    def configure(self, **overrides) -> DigitsPreset:
        """A checked copy with `overrides` (see `presets.registry`); `sampler` ("edm" or "ddpm")
        switches to that sampler's digits defaults before the other overrides apply."""
        preset = self
        if "sampler" in overrides:
            sampler = check_choice("sampler", overrides.pop("sampler"), tuple(DIGITS_SETTINGS))
            if sampler != self.settings.name:
                preset = dataclasses.replace(self, settings=DIGITS_SETTINGS[sampler])
        return apply_overrides(preset, overrides, own_fields=("cfg_scale",))

    def json(self) -> dict:
        return {**preset_json(self), "cfg_scale": self.cfg_scale}

    def build(self, *, device: torch.device | str = "cpu", weights_dir: str | os.PathLike | None = None,
              **overrides) -> Job:
        """The job of this preset with `overrides` applied; the shipped weights (or those of
        `weights_dir`) are verified against their manifest and loaded to `device`."""
        from ..digits.cfg import ClassifierFreeGuidance
        from ..digits.data import IMAGE_SHAPE, NUM_CLASSES
        from ..digits.load import load_classifier, load_denoiser, read_manifest
        from ..models.denoiser import DenoiserEpsModel

        preset = self.configure(**overrides)
        device = torch.device(device)
        denoiser = load_denoiser(weights_dir, device=device)
        guidance = None
        if preset.guidance:
            guidance = ClassifierGuidance.from_settings(load_classifier(weights_dir, device=device),
                                                        preset.guidance_settings)
        net = denoiser if preset.cfg_scale == 1 else ClassifierFreeGuidance(denoiser, preset.cfg_scale)
        if isinstance(preset.settings, DDPMSettings):
            net = DenoiserEpsModel(net)
        manifest = read_manifest(weights_dir)
        config = {"preset": preset.json(),
                  "weights_sha256": {key: entry["sha256"] for key, entry in manifest["files"].items()}}
        return Job(net=net, guidance=guidance, settings=preset.settings, image_shape=IMAGE_SHAPE,
                   num_classes=NUM_CLASSES, device=device, config=config)

    def score_samples(self, samples_path: str | os.PathLike, outdir: str | os.PathLike) -> dict:
        """Scores a run's merged samples with the bundled evaluation network and draws the class
        grid into `outdir` (grid.png); returns the metrics."""
        from ..digits import report

        report.write_class_grid(samples_path, Path(outdir) / "grid.png")
        return report.score_samples(samples_path, prc=True)


for _preset in (
    DigitsPreset("digits", "Guided EDM Heun on the embedded 8x8 digits: conditional denoiser + off-the-shelf ResNet"),
    DigitsPreset("digits-unguided", "EDM Heun on the embedded digits, conditional denoiser alone", guidance=False),
    DigitsPreset("digits-cfg", "EDM Heun on the embedded digits with classifier-free guidance (label-dropout "
                 "denoiser)", guidance=False, cfg_scale=1.5),
    DigitsPreset("digits-ddpm", "Guided DDPM ancestral sampling on the embedded digits (the paper's ablation path): "
                 "the EDM denoiser seen as an eps-model, classifier on x0, paper's beta 3, tau_m = tau_j / 2, "
                 "gamma 0.3", guidance_settings=GuidanceSettings(3.0, 1.0, 0.5), settings=DIGITS_SETTINGS["ddpm"]),
    DigitsPreset("digits-ddpm-uncond", "Guided DDPM on the denoiser's unconditional mode (cfg_scale 0): the class "
                 "comes from the off-the-shelf classifier alone; the paper's s = 1, beta 3, tau_m = tau_j / 2, "
                 "gamma 0.3. The ablation's base", cfg_scale=0.0, guidance_settings=GuidanceSettings(3.0, 1.0, 0.5),
                 settings=DIGITS_SETTINGS["ddpm"].with_changes(classifier_scale=1.0)),
):
    register_preset(_preset)
