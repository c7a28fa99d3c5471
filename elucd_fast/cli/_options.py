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


def json_text(value) -> str:
    """`value` as indented JSON with sorted keys. NaN and infinities end the command (exit status
    2): JSON has none, and a reader would choke on Python's `NaN`."""
    from . import CommandError

    try:
        return json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as err:
        raise CommandError(f"a result holds NaN or an infinity, which JSON cannot hold ({err}); nothing was "
                           "written") from err


def write_json(path: Path, value) -> None:
    """`value` as indented JSON (`json_text`), written atomically."""
    text = json_text(value)
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


class _ListType(click.ParamType):
    """A comma-separated list ("80,20,5,1,0.2" or "999,749,499,249") as a tuple of `item`; its
    rules (order, range, distinctness) are the settings field's, checked where it is set."""

    def __init__(self, item: type):
        self.item = item
        self.name = f"{item.__name__.upper()},{item.__name__.upper()},..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.item(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected comma-separated {'integers' if self.item is int else 'numbers'}, got {value!r}",
                      param, ctx)


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
    if annotation.startswith("tuple["):
        return _OptionalType(_ListType(int if annotation.startswith("tuple[int") else float))
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


def schedule_options(command):
    """--schedule FILE: a schedule file's steps (and solver and guidance settings) for the preset;
    --step-family NAME: N steps of a named analytic family."""
    from ..schedules.families import STEP_FAMILIES

    command = click.option(
        "--step-family", type=click.Choice(list(STEP_FAMILIES)), default=None,
        help="Run --steps N (default: the preset's count) steps of this family: "
             + "; ".join(f"{name}: {family.description}" for name, family in STEP_FAMILIES.items())
             + ". Recorded as explicit steps.")(command)
    return click.option("--schedule", "schedule_path", type=click.Path(path_type=Path), default=None,
                        help="Schedule file (JSON: the sampler, its steps, guidance settings; `elucd-fast search` "
                             "writes them): run its steps instead of the preset's. Checked before anything loads; "
                             "flags that set the same settings are refused.")(command)


# Settings a schedule file decides: the flags that set them conflict with --schedule.
_SCHEDULE_STEP_FIELDS = ("num_steps", "sigmas", "timesteps", "timestep_respacing", "sigma_min", "sigma_max", "rho")


def configure_preset(preset: str, overrides: dict, schedule_path: Path | None, step_family: str | None = None):
    """The configured preset (flags applied, then the schedule file's or the step family's
    steps) and the schedule (None without one); every input error is a usage error (exit status
    2), nothing loaded."""
    from ..presets import get_preset, preset_with_schedule
    from ..schedules.schedule_file import read_schedule

    if step_family is not None:
        if schedule_path is not None:
            raise click.UsageError("--step-family, --schedule: both set the steps; give one")
        return _configure_family(preset, overrides, step_family), None
    if schedule_path is None:
        return usage_errors(lambda: get_preset(preset).configure(**overrides)), None
    schedule = usage_errors(lambda: _prefixed("--schedule", lambda: read_schedule(schedule_path)))
    decided = set(_SCHEDULE_STEP_FIELDS) | set(schedule.guidance) | ({"solver"} if schedule.solver else set())
    conflicts = sorted(set(overrides) & decided)
    if conflicts:
        raise click.UsageError(f"{', '.join(flag_name(c) for c in conflicts)}: set by --schedule {schedule_path}; "
                               f"give one or the other")
    configured = usage_errors(lambda: get_preset(preset).configure(**overrides))
    configured = usage_errors(lambda: _prefixed(f"--schedule {schedule_path}",
                                                lambda: preset_with_schedule(configured, schedule)))
    return configured, schedule


def _configure_family(preset: str, overrides: dict, step_family: str):
    """The preset with N steps of `step_family` (N: --steps, else the preset's own count)."""
    from ..presets import get_preset
    from ..schedules.families import family_steps

    explicit = sorted({"sigmas", "timesteps", "timestep_respacing"} & set(overrides))
    if explicit:
        raise click.UsageError(f"--step-family, {', '.join(flag_name(c) for c in explicit)}: both set the steps; "
                               "give one")
    overrides = dict(overrides)
    num_steps = overrides.pop("num_steps", None)
    configured = usage_errors(lambda: get_preset(preset).configure(**overrides))
    n = configured.settings.num_steps if num_steps is None else num_steps
    steps = usage_errors(lambda: family_steps(configured.settings, step_family, n))
    return dataclasses.replace(configured, settings=usage_errors(lambda: configured.settings.with_steps(steps)))


def with_schedule(job, schedule):
    """`job` with the schedule it runs recorded in its config (so in run.json, and a resume
    with another schedule is refused), its block plans (checked against the job's network:
    plans searched for another network are refused), and the one-line note when the schedule
    was made for another model or classifier; unchanged without a schedule."""
    from ..schedules.schedule_file import schedule_block_plans, schedule_note, schedule_record

    if schedule is None:
        return job
    note = schedule_note(schedule, job.config)
    return dataclasses.replace(job, config={**job.config, "schedule": schedule_record(schedule)},
                               notes=job.notes + ((note,) if note else ()),
                               block_plans=schedule_block_plans(schedule, job.net))


def _prefixed(what: str, call):
    """`call()`, its ValueError message prefixed with `what` (the flag, and the file where the
    message does not name it)."""
    try:
        return call()
    except ValueError as err:
        raise ValueError(f"{what}: {str(err).removeprefix('schedule: ')}") from err


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
