"""Click options and helpers shared by the commands.

The sampling flags are made from the settings dataclasses (`EDMSettings`, `DDPMSettings`,
`DiTSettings`, `GuidanceSettings`): one flag per field, named after it, with its help text and
unit, so a flag equals the keyword argument it sets. Every flag defaults to "the preset's
value"; what was given is handed to the preset's `configure`, where each value is checked.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import torch

from ..checks import check_device
from ..guidance.schedules import GuidanceInterval
from ..guidance.settings import GuidanceSettings
from ..models.checkpoint import CheckpointError
from ..runs.atomic import atomic_write
from ..samplers import SAMPLERS

# Flags that are not a settings field of their own name.
_ALIASES = {"use_ddim": ("--ddim/--ancestral",), "num_steps": ("--steps", "--num-steps")}
_STEPS_HELP = ("Sampler steps: EDM/EDM2 steps N (Heun: 2N - 1 denoiser calls; ipndm, dpmpp_2m: N), or the "
               "DDPM/DiT respaced steps "
               "(sets --timestep-respacing N) [default: the preset's]")


def flag_name(field: str) -> str:
    """The `generate` flag that sets a settings field (for a boolean, its on form)."""
    if field in _ALIASES:
        return _ALIASES[field][0].split("/")[0]
    return f"--{field.replace('_', '-')}"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def usage_errors(call):
    """Runs `call()`, turning the library's input errors into click usage errors (exit status 2)."""
    try:
        return call()
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        raise click.UsageError(str(err)) from err


def write_json(path: Path, value) -> None:
    """`value` as indented JSON, written atomically."""
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


class _DeviceType(click.ParamType):
    """A device this machine has (checked before anything is loaded)."""

    name = "cpu|cuda|cuda:N"

    def convert(self, value, param, ctx):
        try:
            return str(check_device(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


DEVICE = _DeviceType()


class _IntervalType(click.ParamType):
    name = "START:STOP:EVERY"

    def convert(self, value, param, ctx):
        if isinstance(value, GuidanceInterval) or value is None:
            return value
        try:
            return GuidanceInterval.parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class _OptionalType(click.ParamType):
    """`inner`, or None spelled "none" (a settings field that may be None)."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = f"{inner.name}|none"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.lower() == "none":
            return None
        return self.inner.convert(value, param, ctx)


def _param_type(f: dataclasses.Field) -> click.ParamType | None:
    """The click type of a settings field (None for a boolean flag)."""
    annotation = str(f.type)
    choices = f.metadata.get("choices")
    if "GuidanceInterval" in annotation:
        return _IntervalType()
    if annotation == "bool":
        return None
    if choices:
        base = click.Choice(choices)
    elif annotation.startswith("int"):
        base = click.INT
    elif annotation.startswith("float"):
        base = click.FLOAT
    else:
        base = click.STRING
    return _OptionalType(base) if annotation.endswith("None") else base


def _help(fields: list[tuple[str, dataclasses.Field]]) -> str:
    """One help text for a flag several samplers share: each sampler's text, unit, default."""
    texts = {}
    for owner, f in fields:
        unit = f.metadata.get("unit")
        texts.setdefault(f.metadata.get("help", "") + (f" [unit: {unit}]" if unit else ""), []).append(owner)
    if len(texts) == 1:
        return f"{next(iter(texts))} [default: the preset's]"
    return "; ".join(f"{'/'.join(owners)}: {text}" for text, owners in texts.items()) + " [default: the preset's]"


def settings_options(command):
    """One option per field of the guidance and sampler settings classes (`--max-guidance`,
    `--S-churn`, ...), plus `--steps` (any sampler's step count), `--ddim/--ancestral`."""
    by_name: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for owner, cls in [("guidance", GuidanceSettings)] + [(c.name, c) for c in SAMPLERS]:
        for f in dataclasses.fields(cls):
            by_name.setdefault(f.name, []).append((owner, f))
    options = []
    for name, fields in by_name.items():
        f = fields[0][1]
        kind = _param_type(f)
        if name in _ALIASES:
            declarations = _ALIASES[name]
        elif kind is None:
            declarations = (f"{flag_name(name)}/--no-{flag_name(name)[2:]}",)
        else:
            declarations = (flag_name(name),)
        text = _STEPS_HELP if name == "num_steps" else _help(fields)
        options.append(click.option(*declarations, name, type=kind, default=None, help=text))
    for option in reversed(options):
        command = option(command)
    return command


def checkpoint_options(command):
    """--network / --classifier / --vae: the local checkpoint files of the paper's presets."""
    for option in reversed((
        click.option("--network", type=click.Path(path_type=Path), default=None,
                     help="Diffusion network file, for presets that take one (see `elucd-fast presets`)."),
        click.option("--classifier", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Classifier weights file, for presets that take one."),
        click.option("--vae", type=click.Path(path_type=Path), default=None,
                     help="VAE decoder (diffusers directory or .safetensors), for the DiT and EDM2-512 presets."),
        click.option("--guide-network", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="EDM2 guide network pickle (the unconditional or smaller network of guid / autog rows)."),
    )):
        command = option(command)
    return command


FILE_OPTIONS = ("network", "classifier", "vae", "guide_network")


def file_overrides(options: dict) -> dict:
    """The checkpoint paths given among a command's `options` (popped from it), as preset build
    arguments; a preset refuses the files it does not read."""
    files = {name: options.pop(name, None) for name in FILE_OPTIONS}
    return {name: path for name, path in files.items() if path is not None}


def float_list(name: str):
    """A click callback parsing "inf,8,5" into floats, naming the option on error."""
    def parse(ctx, param, value):
        try:
            return [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=name) from None
    return parse
