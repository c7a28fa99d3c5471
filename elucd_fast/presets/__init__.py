"""Named configurations: each builds a `Job` (networks + guidance + sampler settings).

    job = build_job("digits")                               # guided EDM on the embedded digits
    job = build_job("digits", max_guidance=0.1, num_steps=12)
    list_presets()                                          # -> ["ddpm128-r101", "digits", ...]

`registry` holds the registry and the override rules; `digits` the embedded benchmark's presets,
`paper` the paper's table rows (both register themselves on import).
"""
from . import digits, paper  # noqa: F401  (registration)
from .digits import DIGITS_SETTINGS, DigitsPreset
from .paper import PAPER_PRESETS, PaperPreset
from .registry import PRESETS, Preset, apply_overrides, build_job, get_preset, list_presets, register_preset

__all__ = ["DIGITS_SETTINGS", "DigitsPreset", "PAPER_PRESETS", "PRESETS", "PaperPreset", "Preset",
           "apply_overrides", "build_job", "get_preset", "list_presets", "register_preset"]
