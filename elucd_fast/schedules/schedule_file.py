"""Schedule files: a searched (or hand-written) step sequence with what it was found for, as JSON.

    {
      "format": "elucd-fast-schedule", "version": 1,
      "sampler": "edm",                          # edm, edm2 (noise levels) or ddpm, dit (timesteps)
      "steps": [80.0, 9.7, 0.47, 0.002],         # EDM/EDM2: strictly decreasing levels > 0, the
                                                 # final 0 implied; DDPM/DiT: distinct timesteps,
                                                 # descending
      "network_evaluations": 7,                  # denoiser calls per image those steps cost
      "solver": null,                            # the sampler's solver field, where it has one
      "preset": "digits",                        # what it was searched for (informative)
      "model_sha256": "...", "classifier_sha256": "...",   # likewise: a mismatch is a note
      "guidance": {"max_guidance": 0.02},        # guidance settings searched with the steps
      "scoring": {"metric": "fd_digits", "seeds": "0-999"},  # how it was scored
      "scores": {"fd_digits": 17.0},
      "block_plans": {                           # optional: a block plan per step (models.block_plan)
        "network": "3f0c...",                    # plan_fingerprint of the network's block names
        "blocks": 12,                            # its number of blocks
        "plans": [{"skip": [], "store": 3, "reuse": null}, {"skip": [5], "store": null, "reuse": 3}, ...]
      }
    }

Reading validates the whole file before anything else happens (a regular file of at most
`MAX_SCHEDULE_BYTES`, plain JSON without NaN or infinities, known keys of the right types, steps
that a sampler can run, one block plan per step that reuses only what an earlier step stored);
the file is data only, nothing in it is executed. `apply_schedule` checks it against the settings
it is applied to (the sampler, the chain's T, the number of network evaluations);
`schedule_block_plans` checks its plans against the network they are to run on.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_write
from ..checks import check_sigmas, check_timesteps
from ..guidance.schedules import GuidanceInterval
from ..models.block_plan import BlockPlan, check_plan, plan_fingerprint

if TYPE_CHECKING:  # the settings are used through their methods only
    from ..samplers.settings import SamplerSettings

FORMAT = "elucd-fast-schedule"
VERSION = 1
MAX_SCHEDULE_BYTES = 1 << 20

# The sampler a schedule is for -> the kind of its steps.
STEP_KINDS = {"edm": "sigmas", "edm2": "sigmas", "ddpm": "timesteps", "dit": "timesteps"}
# Guidance settings a schedule may carry (each must also be a field of its sampler's settings).
GUIDANCE_KEYS = ("max_guidance", "add_factor", "guidance_interval", "classifier_scale", "gamma_factor",
                 "guidance_scale", "guide_weight", "cfg_scale")
REQUIRED_KEYS = ("format", "version", "sampler", "steps", "network_evaluations")
OPTIONAL_KEYS = ("solver", "preset", "model_sha256", "classifier_sha256", "guidance", "scoring", "scores",
                 "block_plans")


class ScheduleError(ValueError):
    """A schedule file that cannot be used: the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class ScheduleFile:
    """A schedule file's content (see the module docstring); `steps` floats for EDM/EDM2, ints
    for DDPM/DiT. Constructing one checks it as `read_schedule` does."""

    sampler: str
    steps: tuple
    network_evaluations: int
    solver: str | None = None
    preset: str | None = None
    model_sha256: str | None = None
    classifier_sha256: str | None = None
    guidance: dict = field(default_factory=dict)
    scoring: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    block_plans: dict | None = None
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self):
        try:
            _check_fields(self)
        except ValueError as err:
            raise ScheduleError(f"schedule: {err}") from None

    def json(self) -> dict:
        """The file's JSON object."""
        return {"format": self.format, "version": self.version, "sampler": self.sampler, "steps": list(self.steps),
                "network_evaluations": self.network_evaluations, "solver": self.solver, "preset": self.preset,
                "model_sha256": self.model_sha256, "classifier_sha256": self.classifier_sha256,
                "guidance": dict(self.guidance), "scoring": dict(self.scoring), "scores": dict(self.scores),
                **({"block_plans": self.block_plans} if self.block_plans is not None else {})}

    def plans(self) -> tuple[BlockPlan, ...] | None:
        """The block plan of each step, or None when the schedule has none."""
        if self.block_plans is None:
            return None
        return tuple(BlockPlan.from_json(plan) for plan in self.block_plans["plans"])

    @classmethod
    def from_json(cls, data) -> ScheduleFile:
        """From the file's JSON object; unknown or missing keys and wrong types are refused."""
        if not isinstance(data, dict):
            raise ScheduleError(f"schedule: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise ScheduleError(f"schedule: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                                f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ScheduleError(f"schedule: missing key(s) {', '.join(map(repr, missing))}")
        values = dict(data)
        if isinstance(values["steps"], list):
            values["steps"] = tuple(values["steps"])
        for key in ("guidance", "scoring", "scores"):
            if values.get(key) is None:
                values.pop(key, None)
        return cls(**values)


def read_schedule(path: str | os.PathLike) -> ScheduleFile:
    """The schedule file at `path`, validated whole; ScheduleError (a ValueError) names the file
    and the defect: not a regular file, too large, not JSON, NaN/infinity, unknown keys, wrong
    types, a sampler it cannot be for, steps not decreasing, duplicated or out of range."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as err:
        raise ScheduleError(f"{path}: cannot read the schedule file ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ScheduleError(f"{path}: not a regular file (a schedule file is a JSON file)")
    if info.st_size > MAX_SCHEDULE_BYTES:
        raise ScheduleError(f"{path}: {info.st_size} bytes; a schedule file has at most {MAX_SCHEDULE_BYTES}")
    with open(path, "rb") as f:
        raw = f.read(MAX_SCHEDULE_BYTES + 1)
    if len(raw) > MAX_SCHEDULE_BYTES:
        raise ScheduleError(f"{path}: more than {MAX_SCHEDULE_BYTES} bytes; a schedule file has at most that")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ScheduleError(f"{path}: not UTF-8 text (a schedule file is JSON)") from None
    except json.JSONDecodeError as err:
        raise ScheduleError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise ScheduleError(f"{path}: brackets nested deeper than a JSON reader follows; not a schedule file") from None
    except ValueError as err:
        raise ScheduleError(f"{path}: {err}") from None
    try:
        return ScheduleFile.from_json(data)
    except ScheduleError as err:
        raise ScheduleError(f"{path}: {str(err).removeprefix('schedule: ')}") from None


def write_schedule(path: str | os.PathLike, schedule: ScheduleFile) -> None:
    """Writes `schedule` to `path` atomically (the old file, or all of the new one)."""
    if not isinstance(schedule, ScheduleFile):
        raise TypeError(f"schedule: expected a ScheduleFile, got {type(schedule).__name__}")
    text = json.dumps(schedule.json(), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def schedule_from_settings(settings: SamplerSettings, *, net=None, guidance_keys=(), **info) -> ScheduleFile:
    """The schedule file of what `settings` run: their step sequence (as `net` rounds it), its
    network evaluations, their solver where they have one, and the guidance fields named in
    `guidance_keys`; `info` fills the other keys (preset, model_sha256, scoring, scores, ...)."""
    guidance = {key: _json_value(getattr(settings, key)) for key in guidance_keys}
    return ScheduleFile(sampler=settings.name, steps=tuple(settings.step_sequence(net)),
                        network_evaluations=settings.network_evaluations,
                        solver=getattr(settings, "solver", None), guidance=guidance, **info)


def apply_schedule(settings: SamplerSettings, schedule: ScheduleFile) -> SamplerSettings:
    """`settings` running the schedule: its steps, its solver and its guidance fields applied and
    checked; refused (ScheduleError) for another sampler, for steps outside the settings' chain,
    or when the steps do not cost the schedule's network evaluations."""
    if schedule.sampler != settings.name:
        raise ScheduleError(f"schedule: made for the {schedule.sampler} sampler; these settings are for the "
                            f"{settings.name} sampler")
    changes = {key: _settings_value(key, value) for key, value in schedule.guidance.items()}
    unknown = sorted(set(changes) - set(settings.field_names()))
    if unknown:
        raise ScheduleError(f"schedule: guidance key(s) {', '.join(unknown)} are not settings of the "
                            f"{settings.name} sampler")
    if schedule.solver is not None:
        if "solver" not in settings.field_names():
            raise ScheduleError(f"schedule: solver {schedule.solver!r}, but the {settings.name} sampler has no "
                                f"solver setting")
        changes["solver"] = schedule.solver
    try:
        applied = settings.with_changes(**changes).with_steps(schedule.steps) if changes else \
            settings.with_steps(schedule.steps)
    except ValueError as err:
        raise ScheduleError(f"schedule: {err}") from None
    if applied.network_evaluations != schedule.network_evaluations:
        raise ScheduleError(f"schedule: network_evaluations is {schedule.network_evaluations}, but its "
                            f"{len(schedule.steps)} steps cost {applied.network_evaluations} with the "
                            f"{settings.name} sampler" + (f" ({applied.solver})" if hasattr(applied, "solver") else ""))
    return applied


def block_plans_json(net, plans) -> dict:
    """The schedule's "block_plans" value for `plans` (one BlockPlan per step) on `net` (a network
    with `block_names()`)."""
    names = net.block_names()
    return {"network": plan_fingerprint(names), "blocks": len(names), "plans": [plan.to_json() for plan in plans]}


def schedule_block_plans(schedule: ScheduleFile, net) -> tuple[BlockPlan, ...] | None:
    """The schedule's block plans checked against `net`, the network they are to run on: refused
    (ScheduleError) when they were searched for another network (other block names) or when `net`
    takes no plans. None when the schedule has none."""
    if schedule.block_plans is None:
        return None
    if not callable(getattr(net, "block_names", None)):
        raise ScheduleError(f"schedule: it has block plans, but this network ({type(net).__name__}) takes none")
    names = net.block_names()
    recorded = schedule.block_plans
    if recorded["network"] != plan_fingerprint(names) or recorded["blocks"] != len(names):
        raise ScheduleError(f"schedule: its block plans are for another network ({recorded['blocks']} blocks, "
                            f"fingerprint {recorded['network']}); this one has {len(names)} blocks, fingerprint "
                            f"{plan_fingerprint(names)}. Search plans for this network, or drop \"block_plans\"")
    plans = schedule.plans()
    for i, plan in enumerate(plans):
        try:
            check_plan(plan, names, net.cache_points, type(net).__name__)
        except ValueError as err:
            raise ScheduleError(f"schedule: block_plans.plans[{i}]: {err}") from None
    return plans


def schedule_sha256(schedule: ScheduleFile) -> str:
    """sha256 of the schedule's canonical JSON (sorted keys, no whitespace): the same for equal
    content however the file was laid out."""
    canonical = json.dumps(schedule.json(), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def schedule_record(schedule: ScheduleFile) -> dict:
    """What a run records of the schedule it ran (`run.json`'s config "schedule"): its content
    and `schedule_sha256`; a resumed run with another schedule is refused like other settings."""
    return {"sha256": schedule_sha256(schedule), "content": schedule.json()}


def checkpoint_sha256(config: Mapping) -> dict[str, str | None]:
    """{"model_sha256", "classifier_sha256"} of a job's config (`Job.config`): the checkpoint
    presets' network_sha256 / classifier_sha256, or the digits presets' shipped weights."""
    weights = config.get("weights_sha256") or {}
    model = config.get("network_sha256") or weights.get("denoiser") or weights.get("edm2_denoiser")
    classifier = config.get("classifier_sha256") or weights.get("classifier")
    return {"model_sha256": model, "classifier_sha256": classifier}


def schedule_note(schedule: ScheduleFile, config: Mapping) -> str | None:
    """One line when the schedule was made for another model or classifier than the job's
    (`Job.config`): the schedule still runs, the line says so. None when they agree or the
    schedule records none."""
    job = checkpoint_sha256(config)
    differ = [what for what in ("model", "classifier")
              if getattr(schedule, f"{what}_sha256") and job[f"{what}_sha256"]
              and getattr(schedule, f"{what}_sha256") != job[f"{what}_sha256"]]
    if not differ:
        return None
    shown = ", ".join(f"{what} sha256 {getattr(schedule, f'{what}_sha256')[:12]}... (this job's "
                      f"{job[f'{what}_sha256'][:12]}...)" for what in differ)
    return (f"schedule: made for another {' and '.join(differ)} ({shown}"
            f"{', preset ' + repr(schedule.preset) if schedule.preset else ''}); running its steps anyway")


def _check_fields(schedule: ScheduleFile) -> None:
    if schedule.format != FORMAT:
        raise ValueError(f"format: expected {FORMAT!r}, got {schedule.format!r}")
    if isinstance(schedule.version, bool) or schedule.version != VERSION:
        raise ValueError(f"version: this engine reads version {VERSION}, got {schedule.version!r}")
    if schedule.sampler not in STEP_KINDS:
        raise ValueError(f"sampler: expected one of {', '.join(STEP_KINDS)}, got {schedule.sampler!r}")
    if STEP_KINDS[schedule.sampler] == "sigmas":
        object.__setattr__(schedule, "steps", check_sigmas("steps", schedule.steps))
    else:
        object.__setattr__(schedule, "steps", check_timesteps("steps", schedule.steps, descending=True))
    evaluations = schedule.network_evaluations
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
        raise ValueError(f"network_evaluations: must be an integer >= 1, got {evaluations!r}")
    for key in ("solver", "preset", "model_sha256", "classifier_sha256"):
        value = getattr(schedule, key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key}: must be a string or null, got {value!r}")
    for key in ("model_sha256", "classifier_sha256"):
        value = getattr(schedule, key)
        if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise ValueError(f"{key}: must be 64 lowercase hex digits or null, got {value!r}")
    for key in ("guidance", "scoring", "scores"):
        value = getattr(schedule, key)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{key}: must be a JSON object, got {value!r}")
        _check_finite(key, value)
    if schedule.block_plans is not None:
        _check_block_plans(schedule.block_plans, len(schedule.steps))
    unknown = sorted(set(schedule.guidance) - set(GUIDANCE_KEYS))
    if unknown:
        raise ValueError(f"guidance: unknown key(s) {', '.join(map(repr, unknown))}; a schedule may carry "
                         f"{', '.join(GUIDANCE_KEYS)}")
    for key, value in schedule.guidance.items():
        if key == "guidance_interval":
            _settings_value(key, value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"guidance.{key}: must be a number, got {value!r}")


def _check_block_plans(value, num_steps: int) -> None:
    if not isinstance(value, dict) or set(value) != {"network", "blocks", "plans"}:
        raise ValueError(f"block_plans: expected an object with keys network, blocks, plans; got {value!r}")
    network, blocks, plans = value["network"], value["blocks"], value["plans"]
    if not isinstance(network, str) or len(network) != 16 or any(c not in "0123456789abcdef" for c in network):
        raise ValueError(f"block_plans.network: must be 16 lowercase hex digits, got {network!r}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"block_plans.blocks: must be an integer >= 1, got {blocks!r}")
    if not isinstance(plans, list) or len(plans) != num_steps:
        raise ValueError(f"block_plans.plans: must be a list of one plan per step ({num_steps}), got "
                         f"{len(plans) if isinstance(plans, list) else repr(plans)}")
    stored = set()
    for i, item in enumerate(plans):
        try:
            plan = BlockPlan.from_json(item)
        except ValueError as err:
            raise ValueError(f"block_plans.plans[{i}]: {err}") from None
        if any(not 0 <= block < blocks for block in plan.skip):
            raise ValueError(f"block_plans.plans[{i}]: skips {sorted(plan.skip)}, outside the network's ids "
                             f"0..{blocks - 1}")
        if plan.reuse is not None and plan.reuse not in stored:
            raise ValueError(f"block_plans.plans[{i}]: reuses cache point {plan.reuse}, which no earlier step stores")
        if plan.store is not None:
            stored.add(plan.store)


def _check_finite(name: str, value) -> None:
    """No NaN or infinity anywhere in `value` (a JSON value)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(f"{name}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(f"{name}[{i}]", item)


def _settings_value(key: str, value):
    """A schedule's guidance value as the settings field takes it."""
    if key != "guidance_interval" or value is None:
        return value
    if isinstance(value, str):
        return GuidanceInterval.parse(value)
    if not isinstance(value, dict) or set(value) - {"start", "stop", "every"}:
        raise ValueError(f"guidance.guidance_interval: expected {{\"start\", \"stop\", \"every\"}} or "
                         f"\"START:STOP:EVERY\", got {value!r}")
    return GuidanceInterval(**value)


def _json_value(value):
    return value.json() if isinstance(value, GuidanceInterval) else value


def _refuse_constant(name: str):
    raise ValueError(f"{name} in the file; a schedule file holds finite numbers only")


__all__ = ["FORMAT", "GUIDANCE_KEYS", "MAX_SCHEDULE_BYTES", "STEP_KINDS", "ScheduleError", "ScheduleFile", "VERSION",
           "apply_schedule", "block_plans_json", "checkpoint_sha256", "read_schedule", "schedule_block_plans", "schedule_from_settings", "schedule_note",
           "schedule_record", "schedule_sha256", "write_schedule"]
