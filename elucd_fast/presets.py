"""Named configurations: each builds a `Job` (networks + guidance + sampler settings).

    job = build_job("digits")                               # guided EDM on the embedded digits
    job = build_job("digits", max_guidance=0.1, num_steps=12)
    list_presets()                                          # -> ["digits", "digits-cfg", ...]

A preset is a frozen dataclass with commented defaults and a `build(device=..., **overrides)`
method; `PRESETS` maps names to preset objects, so adding a configuration is adding an entry.

The digits presets run the embedded benchmark (`elucd_fast.demo`): an EDM denoiser and an
off-the-shelf ResNet trained on scikit-learn's 8x8 digits. Their guidance defaults are OUR
choice for digits, tuned on this benchmark (see `DigitsPreset`), not the paper's ImageNet values.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Protocol

import torch

from .guidance.classifier import ClassifierGuidance
from .guidance.schedules import check_finite_number
from .job import Job
from .samplers.ddpm import GUIDANCE_INPUTS
from .samplers.gaussian_diffusion import GaussianDiffusion

class Preset(Protocol):
    """What every preset offers."""

    name: str
    description: str

    def build(self, *, device: torch.device | str = "cpu", **overrides) -> Job: ...


# Which settings each part of a job reads. An override that the job would not read is refused
# rather than silently ignored.
GUIDANCE_KWARGS = ("softplus_beta", "joint_temperature", "marginal_temperature")  # -> ClassifierGuidance
EDM_GUIDANCE_KWARGS = ("max_guidance", "add_factor")                              # -> edm_sampler
DDPM_GUIDANCE_KWARGS = ("classifier_scale", "gamma_factor", "guidance_input")     # -> ddpm_sampler
DIGITS_DDPM_TIMESTEPS = 1000  # the DDPM path's chain: ADM's linear 1000-step betas, respaced


@dataclass(frozen=True)
class DigitsPreset:
    """A digits benchmark configuration (images (1, 8, 8), 10 classes).

    Overridable through `build(**overrides)`: every field below except name and description.
    `num_steps` maps onto `edm_sampler(num_steps=...)` or, for the DDPM path,
    `ddpm_sampler(timestep_respacing=str(num_steps))`; GUIDANCE_KWARGS onto `ClassifierGuidance`;
    EDM_GUIDANCE_KWARGS / DDPM_GUIDANCE_KWARGS onto the sampler's keywords of the same names;
    `cfg_scale` onto `ClassifierFreeGuidance` (the denoiser the sampler sees).

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
    sampler: str = "edm"                 # "edm": Heun ODE (paper Alg. 2); "ddpm": ancestral (Alg. 1)
    guidance: bool = True                # classifier guidance on or off
    cfg_scale: float = 1.0               # D_u + s (D_c - D_u): 1 the conditional denoiser (the
                                         # paper's setting), 0 the unconditional one, > 1 CFG
    num_steps: int = 18                  # EDM Heun steps (35 denoiser calls) / DDPM respaced steps
    # Classifier guidance (ours for digits; the paper's EDM-64 values are beta 5, tau_m 0).
    softplus_beta: float = 5.0           # ReLU -> Softplus(beta); math.inf keeps ReLU
    joint_temperature: float = 1.0       # tau_j
    marginal_temperature: float = 0.0    # tau_m; 0: pure joint guidance, as the paper's EDM setting
    max_guidance: float = 0.02           # EDM wmax (the paper: 0.004 on 64x64 ImageNet)
    add_factor: float = 0.3              # EDM sine-added fraction (the paper's 0.3)
    # DDPM path only.
    classifier_scale: float = 0.3        # s in mu + s (Sigma + a_t) g (the paper: 1 on ImageNet 128)
    gamma_factor: float = 0.3            # sine-added variance gamma (the paper's 0.3)
    guidance_input: str = "x0"           # what the classifier sees: "x0" (paper) or "xt"

    def build(self, *, device: torch.device | str = "cpu", weights_dir: str | os.PathLike | None = None,
              **overrides) -> Job:
        """The job of this preset with `overrides` applied (see the class docstring); the shipped
        weights (or those of `weights_dir`) are verified against their manifest and loaded to
        `device`. Every setting is checked here, before anything samples or writes."""
        from .demo.cfg import ClassifierFreeGuidance
        from .demo.data import IMAGE_SHAPE, NUM_CLASSES
        from .demo.load import load_classifier, load_denoiser, read_manifest
        from .models.denoiser import DenoiserEpsModel

        preset = self.with_overrides(**overrides)
        device = torch.device(device)
        denoiser = load_denoiser(weights_dir, device=device)
        guidance = None
        if preset.guidance:
            guidance = ClassifierGuidance(load_classifier(weights_dir, device=device),
                                          softplus_beta=preset.softplus_beta,
                                          joint_temperature=preset.joint_temperature,
                                          marginal_temperature=preset.marginal_temperature)
        net = denoiser if preset.cfg_scale == 1 else ClassifierFreeGuidance(denoiser, preset.cfg_scale)
        if preset.sampler == "edm":
            sampler_kwargs = {"num_steps": preset.num_steps}
            if guidance is not None:
                sampler_kwargs.update(max_guidance=preset.max_guidance, add_factor=preset.add_factor)
        else:
            net = DenoiserEpsModel(net)
            sampler_kwargs = {"num_timesteps": DIGITS_DDPM_TIMESTEPS, "beta_schedule": "linear",
                              "timestep_respacing": str(preset.num_steps), "learn_sigma": False,
                              "clip_denoised": True}
            if guidance is not None:
                sampler_kwargs.update(classifier_scale=preset.classifier_scale, gamma_factor=preset.gamma_factor,
                                      guidance_input=preset.guidance_input)
        manifest = read_manifest(weights_dir)
        config = {"preset": preset.json_settings(),
                  "weights_sha256": {key: entry["sha256"] for key, entry in manifest["files"].items()}}
        return Job(sampler=preset.sampler, net=net, guidance=guidance, sampler_kwargs=sampler_kwargs,
                   image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES, device=device, config=config)

    def used_settings(self) -> tuple[str, ...]:
        """The fields this preset's job reads (besides name, description, sampler, guidance)."""
        used = ["num_steps", "cfg_scale"]
        if self.guidance:
            used += GUIDANCE_KWARGS
            used += EDM_GUIDANCE_KWARGS if self.sampler == "edm" else DDPM_GUIDANCE_KWARGS
        return tuple(used)

    def with_overrides(self, **overrides) -> DigitsPreset:
        """A checked copy with `overrides` applied. Refuses unknown names, settings the resulting
        job would not read, and invalid values, naming each."""
        overridable = [f.name for f in fields(self) if f.name not in ("name", "description")]
        unknown = sorted(set(overrides) - set(overridable))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a setting of preset {self.name!r}; "
                             f"settings: {', '.join(overridable)}")
        preset = replace(self, **overrides)
        preset.check()
        unused = [key for key in overrides if key not in ("sampler", "guidance") and key not in preset.used_settings()]
        if unused:
            kind = "guided" if preset.guidance else "unguided"
            raise ValueError(f"{', '.join(unused)}: not used by an {kind} {preset.sampler} job "
                             f"(preset {self.name!r}); it reads {', '.join(preset.used_settings())}")
        return preset

    def check(self) -> None:
        """Raises ValueError naming the first invalid setting."""
        if self.sampler not in ("edm", "ddpm"):
            raise ValueError(f"sampler: expected 'edm' or 'ddpm', got {self.sampler!r}")
        if not isinstance(self.guidance, bool):
            raise ValueError(f"guidance: expected True or False, got {self.guidance!r}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ValueError(f"num_steps: must be an integer >= 2, got {self.num_steps!r}")
        if self.sampler == "ddpm":
            GaussianDiffusion.create(DIGITS_DDPM_TIMESTEPS, "linear", str(self.num_steps))
        beta = self.softplus_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta) or beta <= 0:
            raise ValueError(f"softplus_beta: must be > 0 (inf keeps ReLU), got {beta!r}")
        check_finite_number("joint_temperature", self.joint_temperature, minimum=0)
        check_finite_number("marginal_temperature", self.marginal_temperature, minimum=0)
        if self.joint_temperature == 0 and self.marginal_temperature == 0:
            raise ValueError("joint_temperature, marginal_temperature: both 0 make the guidance identically zero")
        check_finite_number("max_guidance", self.max_guidance, minimum=0)
        check_finite_number("add_factor", self.add_factor)
        check_finite_number("classifier_scale", self.classifier_scale)
        check_finite_number("gamma_factor", self.gamma_factor, minimum=0)
        if self.guidance_input not in GUIDANCE_INPUTS:
            raise ValueError(f"guidance_input: expected one of {GUIDANCE_INPUTS}, got {self.guidance_input!r}")
        check_finite_number("cfg_scale", self.cfg_scale)

    def json_settings(self) -> dict:
        """The settings as JSON-able values (an infinite beta as "inf")."""
        settings = asdict(self)
        if math.isinf(settings["softplus_beta"]):
            settings["softplus_beta"] = "inf"
        return settings


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Adds `preset` under its name (names are unique)."""
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


register_preset(DigitsPreset(
    "digits", "Guided EDM Heun on the embedded 8x8 digits: conditional denoiser + off-the-shelf ResNet"))
register_preset(DigitsPreset(
    "digits-unguided", "EDM Heun on the embedded digits, conditional denoiser alone", guidance=False))
register_preset(DigitsPreset(
    "digits-cfg", "EDM Heun on the embedded digits with classifier-free guidance (label-dropout denoiser)",
    guidance=False, cfg_scale=1.5))
register_preset(DigitsPreset(
    "digits-ddpm", "Guided DDPM ancestral sampling on the embedded digits (the paper's ablation path): the "
    "EDM denoiser seen as an eps-model, classifier on x0, paper's beta 3, tau_m = tau_j / 2, gamma 0.3",
    sampler="ddpm", num_steps=50, softplus_beta=3.0, marginal_temperature=0.5))
register_preset(DigitsPreset(
    "digits-ddpm-uncond", "Guided DDPM on the denoiser's unconditional mode (cfg_scale 0): the class comes from "
    "the off-the-shelf classifier alone; the paper's s = 1, beta 3, tau_m = tau_j / 2, gamma 0.3. The ablation's base",
    sampler="ddpm", num_steps=50, cfg_scale=0.0, classifier_scale=1.0, softplus_beta=3.0, marginal_temperature=0.5))


def list_presets() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset registered as `name`."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; choose one of {', '.join(list_presets())}")
    return PRESETS[name]


def build_job(name: str = "digits", *, device: torch.device | str = "cpu", **overrides) -> Job:
    """The job of preset `name` on `device` with `overrides` (see the preset's class docstring)."""
    return get_preset(name).build(device=device, **overrides)


__all__ = ["DDPM_GUIDANCE_KWARGS", "DigitsPreset", "EDM_GUIDANCE_KWARGS", "GUIDANCE_KWARGS",
           "PRESETS", "Preset", "build_job", "get_preset", "list_presets", "register_preset"]


# The paper's table rows register themselves into PRESETS.
from . import paper_presets  # noqa: E402,F401
