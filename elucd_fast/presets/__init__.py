"""Named configurations: each builds a `Job` (networks + guidance + sampler settings).

    job = build_job("digits")                               # guided EDM on the embedded digits
    job = build_job("digits", max_guidance=0.1, num_steps=12)
    list_presets()                                          # -> ["adm256", "ddpm128-r101", "digits", ...]

`registry` holds the registry and the override rules; `digits` the embedded benchmark's presets;
`checkpoint` the presets over public checkpoint files, whose rows are the paper's (`paper`) and
the rest of the public zoo (`zoo`); `edm2` EDM2's published rows with and without classifier
guidance. The row modules register themselves on import.
"""
from . import digits, edm2, paper, zoo  # noqa: F401  (registration)
from .checkpoint import CheckpointPreset
from .digits import DIGITS_SETTINGS, DigitsEDM2Preset, DigitsPreset
from .edm2 import EDM2_PRESETS, EDM2Preset
from .paper import PAPER_PRESETS
from .registry import (PRESETS, Preset, apply_overrides, build_job, get_preset, list_presets, preset_with_schedule,
                       register_preset)
from .zoo import ZOO_PRESETS

__all__ = ["CheckpointPreset", "DIGITS_SETTINGS", "DigitsEDM2Preset", "DigitsPreset", "EDM2_PRESETS", "EDM2Preset",
           "PAPER_PRESETS", "PRESETS", "Preset", "ZOO_PRESETS", "apply_overrides", "build_job", "get_preset",
           "list_presets", "preset_with_schedule", "register_preset"]
