"""The digits benchmark's presets (`elucd_fast.digits`): an EDM denoiser and an off-the-shelf
ResNet trained on scikit-learn's 8x8 digits, guided as the paper guides ImageNet; and an
EDM2-style row (`DigitsEDM2Preset`): a magnitude-preserving EDM2 network sampled with EDM2's
sampler, with classifier guidance, autoguidance by a smaller, shorter-trained version of itself,
or both.

Their guidance defaults are OUR choice for digits, tuned on this benchmark (see
`DigitsPreset`, `DigitsEDM2Preset`), not the paper's ImageNet values.
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
from ..samplers import DDPMSettings, EDM2Settings, EDMSettings, SamplerSettings
from ..schedules.schedule_file import apply_schedule, read_schedule
from .registry import apply_overrides, preset_json, register_preset

# The DDPM path's chain: ADM's linear 1000-step betas, respaced; the EDM denoiser seen as an
# eps-model has no learned variance.
DIGITS_SETTINGS: dict[str, SamplerSettings] = {
    "edm": EDMSettings(num_steps=18, max_guidance=0.02, add_factor=0.3),
    "ddpm": DDPMSettings(num_timesteps=1000, beta_schedule="linear", timestep_respacing="50", learn_sigma=False,
                         clip_denoised=True, classifier_scale=0.3, gamma_factor=0.3, guidance_input="x0"),
}


# Schedules found by `elucd-fast search` for the digits presets, shipped with the package.
SHIPPED_SCHEDULES = Path(__file__).with_name("schedules")


def shipped_schedule_settings(settings: SamplerSettings, name: str) -> SamplerSettings:
    """`settings` running the shipped schedule file `SHIPPED_SCHEDULES/NAME.json` (its steps,
    solver and guidance settings), checked as `generate --schedule` checks a file."""
    return apply_schedule(settings, read_schedule(SHIPPED_SCHEDULES / f"{name}.json"))


# Our digits guidance defaults (the paper's EDM-64 values are beta 5, tau_m 0).
DIGITS_GUIDANCE_SETTINGS = GuidanceSettings(softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0)


class DigitsBenchmark:
    """What every digits preset shares: the image shape, the classes, and scoring by the bundled
    evaluation network."""

    # The shipped files whose sha256 a job records in its configuration.
    weight_files: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        from ..digits.data import IMAGE_SHAPE

        return IMAGE_SHAPE

    @property
    def num_classes(self) -> int:
        from ..digits.data import NUM_CLASSES

        return NUM_CLASSES

    def weights_sha256(self, weights_dir: str | os.PathLike | None = None) -> dict[str, str]:
        """sha256 of each of `weight_files` as the manifest records them."""
        from ..digits.load import read_manifest

        files = read_manifest(weights_dir)["files"]
        return {key: files[key]["sha256"] for key in self.weight_files if key in files}

    def job(self, net: torch.nn.Module, *, device: torch.device, weights_dir: str | os.PathLike | None,
            guide_net: torch.nn.Module | None = None) -> Job:
        """The job of this (configured) preset around `net`: the shipped classifier (or that of
        `weights_dir`) as guidance where `guidance` is on, the weights' sha256 in its config."""
        from ..digits.data import IMAGE_SHAPE, NUM_CLASSES
        from ..digits.load import load_classifier

        guidance = None
        if self.guidance:
            guidance = ClassifierGuidance.from_settings(load_classifier(weights_dir, device=device),
                                                        self.guidance_settings)
        config = {"preset": self.json(), "weights_sha256": self.weights_sha256(weights_dir)}
        return Job(net=net, guide_net=guide_net, guidance=guidance, settings=self.settings, image_shape=IMAGE_SHAPE,
                   num_classes=NUM_CLASSES, device=device, config=config)

    def score_samples(self, samples_path: str | os.PathLike, outdir: str | os.PathLike) -> dict:
        """Scores a run's merged samples with the bundled evaluation network and draws the class
        grid into `outdir` (grid.png); returns the metrics."""
        from ..digits import report

        report.write_class_grid(samples_path, Path(outdir) / "grid.png")
        return report.score_samples(samples_path, prc=True)

    def scorer(self, *, prc: bool = False):
        """An in-memory scorer of sample sets: `(images uint8 (N, 8, 8, 1), labels (N,)) -> metrics`
        (class_accuracy, fd_digits, and with `prc` precision/recall); see `digits.report.DigitsScorer`."""
        from ..digits.report import DigitsScorer

        return DigitsScorer(prc=prc)


@dataclass(frozen=True)
class DigitsPreset(DigitsBenchmark):
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
    guidance_settings: GuidanceSettings = DIGITS_GUIDANCE_SETTINGS
    settings: SamplerSettings = DIGITS_SETTINGS["edm"]

    weight_files = ("classifier", "evaluator", "denoiser", "reference")

    def __post_init__(self):
        check_number("cfg_scale", self.cfg_scale)
        check_choice("sampler", self.settings.name, tuple(DIGITS_SETTINGS))

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
        from ..digits.load import load_denoiser
        from ..models.denoiser import DenoiserEpsModel

        preset = self.configure(**overrides)
        device = torch.device(device)
        denoiser = load_denoiser(weights_dir, device=device)
        net = denoiser if preset.cfg_scale == 1 else ClassifierFreeGuidance(denoiser, preset.cfg_scale)
        if isinstance(preset.settings, DDPMSettings):
            net = DenoiserEpsModel(net)
        return preset.job(net, device=device, weights_dir=weights_dir)


# EDM2's sampler on digits as EDM2 samples ImageNet: its 32 Heun steps of EDM's schedule (rho 7,
# sigma 0.002-80, the ODE).
DIGITS_EDM2_SETTINGS = EDM2Settings(num_steps=32)


@dataclass(frozen=True)
class DigitsEDM2Preset(DigitsBenchmark):
    """The digits benchmark's EDM2-style row (images (1, 8, 8), 10 classes): the shipped EDM2
    network (`EDM2Precond`, `digits.networks.EDM2_DENOISER_KWARGS`) sampled with EDM2's sampler
    (`samplers.edm2`), guided by the off-the-shelf ResNet (`guidance`: Algorithm 2's term on the
    normalised state), by the shipped autoguidance guide (`settings.guide_weight` w != 1:
    D = D_guide + w (D_net - D_guide), the guide the same network at half width trained a quarter
    as long), or both. `configure(**overrides)` takes the fields of its `guidance_settings` and
    `settings`, `guidance` and `num_steps`.

    How the defaults were chosen (ours, on this benchmark; class accuracy / FD, seeds 0-999,
    shipped weights, FD seed noise ~2.5-4.5): the network alone 0.979 / 16.2. Classifier term
    (beta 5, tau_m 0, add 0.3) wmax 0.005: 0.984 / 15.8; 0.01: 0.989 / 17.1; 0.02: 0.996 / 24.0;
    0.03: 0.996 / 34.7; 0.05: 0.986 / 66.3. Autoguidance w 1.25: 0.985 / 15.1; 1.5: 0.986 / 14.3;
    2: 0.988 / 14.5; 2.5: 0.984 / 15.9; 3: 0.981 / 17.7. Both, w 1.5 with wmax 0.005: 0.995 / 14.5;
    0.0075: 0.995 / 15.3; 0.01: 0.996 / 16.3; 0.02: 0.999 / 23.2 (w 2 with 0.01: 0.996 / 16.6).
    So: wmax 0.01 alone (accuracy up, FD within the seed noise), w 1.5 alone (FD down), and w 1.5
    with wmax 0.005 together (the autoguided network needs less of the classifier term).
    """

    name: str
    description: str
    guidance: bool = False
    guidance_settings: GuidanceSettings = DIGITS_GUIDANCE_SETTINGS
    settings: EDM2Settings = DIGITS_EDM2_SETTINGS

    weight_files = ("classifier", "evaluator", "edm2_denoiser", "edm2_guide", "reference")

    def configure(self, **overrides) -> DigitsEDM2Preset:
        """A checked copy with `overrides` (see `presets.registry`)."""
        return apply_overrides(self, overrides)

    def json(self) -> dict:
        return preset_json(self)

    def build(self, *, device: torch.device | str = "cpu", weights_dir: str | os.PathLike | None = None,
              **overrides) -> Job:
        """The job of this preset with `overrides` applied; the shipped weights (or those of
        `weights_dir`) are verified against their manifest and loaded to `device`: the guide
        network only where guide_weight != 1, the classifier only where guided."""
        from ..digits.load import load_edm2_denoiser, load_edm2_guide

        preset = self.configure(**overrides)
        device = torch.device(device)
        net = load_edm2_denoiser(weights_dir, device=device)
        guide_net = load_edm2_guide(weights_dir, device=device) if preset.settings.uses_guide_network else None
        return preset.job(net, device=device, weights_dir=weights_dir, guide_net=guide_net)


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
    DigitsPreset("digits-fast", "Guided EDM on the embedded digits at 5 network evaluations: the iPNDM solver on the "
                 "steps `elucd-fast search --nfe 5 --solver ipndm` found (presets/schedules/digits-fast.json)",
                 settings=shipped_schedule_settings(DIGITS_SETTINGS["edm"], "digits-fast")),
    DigitsPreset("digits-fast3", "Guided EDM on the embedded digits at 3 network evaluations: the iPNDM solver on the "
                 "steps `elucd-fast search --nfe 3 --solver ipndm` found (presets/schedules/digits-fast3.json)",
                 settings=shipped_schedule_settings(DIGITS_SETTINGS["edm"], "digits-fast3")),
    DigitsEDM2Preset("digits-edm2", "EDM2 sampler on the embedded digits: the EDM2-style (magnitude-preserving) "
                     "conditional denoiser alone"),
    DigitsEDM2Preset("digits-edm2-cls", "EDM2 sampler on the embedded digits, classifier guidance alone: the "
                     "EDM2-style denoiser + off-the-shelf ResNet", guidance=True,
                     settings=DIGITS_EDM2_SETTINGS.with_changes(max_guidance=0.01, add_factor=0.3)),
    DigitsEDM2Preset("digits-edm2-autog", "EDM2 sampler on the embedded digits, autoguidance alone: the EDM2-style "
                     "denoiser guided by its half-width, shorter-trained guide",
                     settings=DIGITS_EDM2_SETTINGS.with_changes(guide_weight=1.5)),
    DigitsEDM2Preset("digits-edm2-autog-cls", "EDM2 sampler on the embedded digits, autoguidance and classifier "
                     "guidance together", guidance=True,
                     settings=DIGITS_EDM2_SETTINGS.with_changes(guide_weight=1.5, max_guidance=0.005, add_factor=0.3)),
):
    register_preset(_preset)
