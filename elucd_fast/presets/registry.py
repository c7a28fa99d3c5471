"""The preset registry, and how a preset's settings take overrides.

A preset is a frozen dataclass holding a `GuidanceSettings` and a sampler settings object
(`EDMSettings`, `DDPMSettings`, `DiTSettings`) plus what it needs to build its networks:

    preset = get_preset("digits").configure(max_guidance=0.1, num_steps=12)   # checked, nothing loaded
    job = preset.build(device="cpu")                                         # networks loaded
    job = build_job("digits", max_guidance=0.1)                              # both at once

Every override is a field of one of those settings objects (the command line's flags are those
fields), "guidance" (on or off), "num_steps" (the sampler's step count, whatever field holds it),
or a field of the preset itself; anything else, or a guidance strength given to an unguided
preset, is refused naming what the preset reads.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

import torch

from ..checks import check_bool
from ..guidance.settings import GuidanceSettings
from ..job import Job
from ..samplers import SAMPLERS
from ..samplers.settings import SamplerSettings
from ..schedules.schedule_file import ScheduleError, ScheduleFile, apply_schedule

GUIDANCE_FIELDS = tuple(f.name for f in dataclasses.fields(GuidanceSettings))


class Preset(Protocol):
    """What every preset offers."""

    name: str
    description: str
    guidance: bool
    guidance_settings: GuidanceSettings
    settings: SamplerSettings
    image_shape: tuple[int, int, int]   # (C, H, W) of the images it writes
    num_classes: int | None             # classes labels are drawn from

    def configure(self, **overrides) -> Preset:
        """A checked copy with `overrides` applied; reads no file."""

    def build(self, *, device: torch.device | str = "cpu", **overrides) -> Job:
        """The job, networks loaded on `device`."""


def apply_overrides(preset, overrides: Mapping, own_fields: tuple[str, ...] = ()):
    """`preset` (a frozen dataclass with `guidance`, `guidance_settings`, `settings`) with
    `overrides` applied to the right settings object, each checked where its rules live."""
    overrides = dict(overrides)
    allowed = ("guidance", "num_steps", *own_fields, *GUIDANCE_FIELDS, *preset.settings.field_names())
    unknown = sorted(set(overrides) - set(allowed))
    other_samplers = sorted(set(unknown) & {name for cls in SAMPLERS for name in cls.field_names()})
    if other_samplers:
        raise ValueError(f"{', '.join(other_samplers)}: not a setting of preset {preset.name!r}, not used by its "
                         f"{preset.settings.name} sampler; its settings: {', '.join(dict.fromkeys(allowed))}")
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting of preset {preset.name!r}; its settings: "
                         f"{', '.join(dict.fromkeys(allowed))}")
    changes = {key: overrides.pop(key) for key in ("guidance", *own_fields) if key in overrides}
    if "guidance" in changes:
        check_bool("guidance", changes["guidance"])
    guided = changes.get("guidance", preset.guidance)
    guidance_changes = {key: overrides.pop(key) for key in GUIDANCE_FIELDS if key in overrides}
    num_steps = overrides.pop("num_steps", None) if "num_steps" not in preset.settings.field_names() else None
    if num_steps is not None and "timestep_respacing" in overrides:
        raise ValueError("num_steps, timestep_respacing: both set the respaced steps; give one")
    if "timesteps" in overrides and (num_steps is not None or "timestep_respacing" in overrides):
        raise ValueError(f"timesteps, {'num_steps' if num_steps is not None else 'timestep_respacing'}: both set "
                         "the steps (explicit timesteps take precedence); give one")
    if not guided:
        unused = sorted(set(guidance_changes) | (set(overrides) & set(preset.settings.guidance_fields())))
        if unused:
            raise ValueError(f"{', '.join(unused)}: not used by an unguided job (preset {preset.name!r} without "
                             "guidance); drop them or turn guidance on")
    settings = preset.settings.with_changes(**overrides) if overrides else preset.settings
    if num_steps is not None:
        settings = settings.with_num_steps(num_steps)
    guidance_settings = preset.guidance_settings
    if guidance_changes:
        guidance_settings = dataclasses.replace(guidance_settings, **guidance_changes)
    return dataclasses.replace(preset, **changes, guidance_settings=guidance_settings, settings=settings)


def preset_with_schedule(preset, schedule: ScheduleFile):
    """`preset` (configured) running a schedule file's steps, solver and guidance settings
    (`schedules.schedule_file.apply_schedule`): refused for another sampler, for steps its chain
    cannot take, for a network-evaluation count its steps do not cost, or for classifier
    guidance settings when the preset is unguided. A guidance key that is the preset's own field
    (the digits presets' cfg_scale) is set on the preset."""
    own = {key: value for key, value in schedule.guidance.items()
           if key not in preset.settings.field_names() and key in {f.name for f in dataclasses.fields(preset)}}
    if own:
        preset = preset.configure(**own)
        schedule = dataclasses.replace(schedule, guidance={k: v for k, v in schedule.guidance.items() if k not in own})
    unguided = sorted(set(schedule.guidance) & set(preset.settings.guidance_fields())) if not preset.guidance else []
    if unguided:
        raise ScheduleError(f"schedule: sets {', '.join(unguided)}, which an unguided job does not use (preset "
                            f"{preset.name!r} without guidance); turn guidance on, or drop them from the file")
    return dataclasses.replace(preset, settings=apply_schedule(preset.settings, schedule))


def preset_json(preset) -> dict:
    """What of a configured preset determines its images, as JSON."""
    out = {"preset": preset.name, "guidance": preset.guidance}
    if preset.guidance:
        out["guidance_settings"] = preset.guidance_settings.json()
    out["settings"] = preset.settings.json(guided=preset.guidance)
    return out


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Adds `preset` under its name (names are unique)."""
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


def list_presets() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset registered as `name`."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; choose one of {', '.join(list_presets())}")
    return PRESETS[name]


def build_job(name: str = "digits", *, device: torch.device | str = "cpu", **overrides) -> Job:
    """The job of preset `name` on `device` with `overrides` (settings and checkpoint files)."""
    return get_preset(name).build(device=device, **overrides)
