"""Named configurations: each builds a `Job` (networks + guidance + sampler settings).

    job = build_job("digits")                               # guided EDM on the embedded digits
    job = build_job("digits", max_guidance=0.1, num_steps=12)
    list_presets()                                          # -> ["ddpm128-r101", "digits", ...]

`registry` holds the registry and the override rules; `digits` the embedded benchmark's presets,
`paper` the paper's table rows, `edm2` EDM2's published rows with and without classifier guidance
(each registers itself on import).
"""
from . import digits, edm2, paper  # noqa: F401  (registration)
from .digits import DIGITS_SETTINGS, DigitsPreset
from .edm2 import EDM2_PRESETS, EDM2Preset
from .paper import PAPER_PRESETS, PaperPreset
from .registry import PRESETS, Preset, apply_overrides, build_job, get_preset, list_presets, register_preset

__all__ = ["DIGITS_SETTINGS", "DigitsPreset", "EDM2_PRESETS", "EDM2Preset", "PAPER_PRESETS", "PRESETS", "PaperPreset", "Preset",
           "apply_overrides", "build_job", "get_preset", "list_presets", "register_preset"]
