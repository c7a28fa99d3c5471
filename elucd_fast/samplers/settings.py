"""What every sampler's settings dataclass shares: field metadata (help text, unit, whether the
field is a guidance strength), JSON form, and checked replacement.

A settings object is frozen and validated in its `__post_init__`, the one place its rules live;
presets, the command line and the engine replace its fields (`with_changes`) and so re-run the
same checks.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

from ..checks import check_choice, check_int, check_number, check_sigmas, check_timesteps, json_number
from ..guidance.schedules import GuidanceInterval, edm_guidance_weights
from ..schedules.families import edm_rho_sigmas
from ..schedules.gaussian_diffusion import BETA_SCHEDULES, GaussianDiffusion
from .multistep import MAX_ORDER, SOLVERS


def setting(default: Any, help: str, *, unit: str | None = None, guidance: bool = False,
            choices: tuple[str, ...] | None = None) -> Any:
    """A settings field: `help` says what it is, `unit` its unit, `guidance` marks a strength
    that only matters when the sampler is guided, `choices` the allowed strings (checked in the
    class's `__post_init__` and offered by the command line)."""
    return dataclasses.field(default=default, metadata={"help": help, "unit": unit, "guidance": guidance,
                                                        "choices": choices})


class SamplerSettings:
    """Base of EDMSettings, DDPMSettings, DiTSettings (each a frozen dataclass)."""

    name: ClassVar[str]  # the sampler's name in configs and messages: "edm", "ddpm", "dit"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def guidance_fields(cls) -> tuple[str, ...]:
        """Fields that mean nothing without guidance."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("guidance"))

    def _check_guidance_interval(self) -> None:
        if self.guidance_interval is not None and not isinstance(self.guidance_interval, GuidanceInterval):
            raise ValueError(f"guidance_interval: expected a GuidanceInterval or None, got {self.guidance_interval!r}")

    def with_changes(self, **changes) -> SamplerSettings:
        """A checked copy with `changes`; refuses names that are not fields, naming the fields."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a setting of the {self.name} sampler; its settings: "
                             f"{', '.join(self.field_names())}")
        return dataclasses.replace(self, **self._step_changes(dict(changes)))

    def _step_changes(self, changes: dict) -> dict:
        """`changes` made consistent with the explicit step sequence (see the subclasses)."""
        return changes

    @property
    def num_steps(self) -> int:
        raise NotImplementedError

    def with_num_steps(self, num_steps: int) -> SamplerSettings:
        """A copy that takes `num_steps` steps of the settings' own step family (dropping an
        explicit sequence)."""
        raise NotImplementedError

    def with_steps(self, steps) -> SamplerSettings:
        """A checked copy that runs the explicit step sequence `steps`: noise levels (floats,
        strictly decreasing, the final 0 implied) for EDM and EDM2, timesteps (distinct ints of
        0..T-1, any order, run descending) for DDPM and DiT."""
        raise NotImplementedError

    def step_sequence(self, net=None) -> tuple:
        """The step sequence that will run: the explicit one, or the one the family fields give
        (noise levels for EDM and EDM2, with `net` as the network rounds and clamps them;
        original timesteps, descending, for DDPM and DiT)."""
        raise NotImplementedError

    @property
    def network_evaluations(self) -> int:
        """Denoiser calls per image: one per step (DDPM, DDIM, DiT; a guided denoiser, CFG in one
        batch or EDM2's guide lerp, counts as one call; the classifier not at all)."""
        return self.num_steps

    def json(self, *, guided: bool = True) -> dict:
        """The settings as JSON values (infinities as "inf", intervals as dicts); without guidance
        the guidance strengths are left out (they change no image)."""
        out = {"sampler": self.name}
        for f in dataclasses.fields(self):
            if not guided and f.metadata.get("guidance"):
                continue
            out[f.name] = _json_value(getattr(self, f.name))
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> SamplerSettings:
        """The inverse of `json` (the "sampler" key is checked and dropped)."""
        data = dict(data)
        if data.pop("sampler", cls.name) != cls.name:
            raise ValueError(f"settings: not {cls.name} settings: {data}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if isinstance(value, dict) and f.name == "guidance_interval":
                    value = GuidanceInterval(**value)
                elif value in ("inf", "-inf"):
                    value = float(value)
                elif isinstance(value, list):
                    value = tuple(value)
                values[f.name] = value
        return cls(**values)


class HeunSchedule:
    """What the settings of EDM's and EDM2's Heun samplers share: the time steps (num_steps,
    sigma_min, sigma_max, rho), the churn (S_churn, S_min, S_max, S_noise) and Algorithm 2's
    guidance schedule (max_guidance, add_factor, guidance_interval), with their rules; and the
    ODE solver (solver, max_order): Heun, or a multistep solver (`samplers.multistep`)."""

    def _check_heun(self) -> None:
        if self.sigmas is not None:
            sigmas = check_sigmas("sigmas", self.sigmas)
            object.__setattr__(self, "sigmas", sigmas)
            # The number of steps follows the explicit levels; a different count given with them
            # (not the class default) is a contradiction.
            if self.num_steps != len(sigmas):
                if self.num_steps != type(self).__dataclass_fields__["num_steps"].default:
                    raise ValueError(f"num_steps, sigmas: {len(sigmas)} explicit noise levels run {len(sigmas)} "
                                     f"steps, not num_steps={self.num_steps!r}; give one of the two")
                object.__setattr__(self, "num_steps", len(sigmas))
        check_int("num_steps", self.num_steps, minimum=1 if self.sigmas is not None else 2)
        check_number("sigma_min", self.sigma_min, minimum=0, strict_minimum=True)
        check_number("sigma_max", self.sigma_max, minimum=0, strict_minimum=True)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")
        check_number("rho", self.rho, minimum=0, strict_minimum=True)
        check_number("S_churn", self.S_churn, minimum=0)
        check_number("S_min", self.S_min, finite=False)
        check_number("S_max", self.S_max, finite=False)
        check_number("S_noise", self.S_noise, minimum=0)
        check_number("max_guidance", self.max_guidance, minimum=0)
        check_number("add_factor", self.add_factor)
        self._check_guidance_interval()
        check_choice("solver", self.solver, SOLVERS)
        check_int("max_order", self.max_order, minimum=1, maximum=MAX_ORDER)
        if self.solver == "heun" and self.max_order != MAX_ORDER:
            raise ValueError(f"max_order: only the multistep solvers (ipndm, dpmpp_2m) have an order cap; got "
                             f"max_order {self.max_order} with solver heun (leave it at {MAX_ORDER}, or pick a solver)")
        if self.solver != "heun" and self.S_churn != 0:
            raise ValueError(f"S_churn: the multistep solver {self.solver} integrates the ODE and takes no churn; got "
                             f"S_churn {self.S_churn} (use S_churn 0, or solver heun for EDM's churned SDE)")

    def _step_changes(self, changes: dict) -> dict:
        # New sigmas set the step count; a new count alone cannot keep the old explicit levels.
        if changes.get("sigmas") is not None and "num_steps" not in changes:
            changes["num_steps"] = len(check_sigmas("sigmas", changes["sigmas"]))
        elif "num_steps" in changes and "sigmas" not in changes and self.sigmas is not None \
                and changes["num_steps"] != len(self.sigmas):
            raise ValueError(f"num_steps: these settings run {len(self.sigmas)} explicit noise levels (sigmas); "
                             f"give new sigmas, or sigmas=None for {changes['num_steps']!r} steps of the rho family")
        return changes

    def with_num_steps(self, num_steps: int):
        return self.with_changes(num_steps=num_steps, sigmas=None)

    def with_steps(self, steps):
        return self.with_changes(sigmas=check_sigmas("sigmas", steps))

    def family_sigmas(self) -> tuple[float, ...]:
        """The rho family's N levels from the settings' own sigma_min, sigma_max (float64,
        neither clamped nor rounded by a network)."""
        return edm_rho_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    @property
    def network_evaluations(self) -> int:
        """Denoiser calls per image: Heun 2N - 1 (no correction after the last step), the
        multistep solvers N."""
        return 2 * self.num_steps - 1 if self.solver == "heun" else self.num_steps

    def guidance_weights(self) -> list[float]:
        """w_i, i = 0 ... N-1 (SPEC §4), over the N steps actually run."""
        return edm_guidance_weights(self.num_steps, self.max_guidance, self.add_factor)


class RespacedChain:
    """What the settings of samplers over ADM's Gaussian diffusion (DDPM, DiT) share: the chain
    their `num_timesteps`, `beta_schedule` and `timestep_respacing` fields define."""

    def _check_chain(self) -> None:
        check_int("num_timesteps", self.num_timesteps, minimum=2)
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.timesteps is not None:
            # Stored descending, the order they run in, whatever order they were given in.
            object.__setattr__(self, "timesteps", check_timesteps("timesteps", self.timesteps, self.num_timesteps))
        self.diffusion  # builds the chain: checks the respacing

    def _step_changes(self, changes: dict) -> dict:
        # Explicit timesteps take precedence over the respacing: a new respacing alone would be
        # silently unused.
        if "timestep_respacing" in changes and "timesteps" not in changes and self.timesteps is not None:
            raise ValueError("timestep_respacing: these settings run explicit timesteps, which take precedence; "
                             "give timesteps=None with it")
        return changes

    @functools.cached_property
    def diffusion(self) -> GaussianDiffusion:
        """The respaced chain: the explicit `timesteps` where given, else `timestep_respacing`."""
        return GaussianDiffusion.create(self.num_timesteps, self.beta_schedule, self.timestep_respacing,
                                        timesteps=self.timesteps)

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_steps

    def with_num_steps(self, num_steps: int):
        """A copy with `num_steps` evenly spread respaced steps (ADM's respacing "N")."""
        check_int("num_steps", num_steps, minimum=2, maximum=self.num_timesteps)
        return self.with_changes(timestep_respacing=str(num_steps), timesteps=None)

    def with_steps(self, steps):
        return self.with_changes(timesteps=check_timesteps("timesteps", steps, self.num_timesteps))

    def step_sequence(self, net=None) -> tuple[int, ...]:
        return tuple(int(t) for t in self.diffusion.timestep_map[::-1])


def _json_value(value: Any) -> Any:
    if isinstance(value, GuidanceInterval):
        return value.json()
    if isinstance(value, tuple):
        return list(value)
    return json_number(value)


def resolve_settings(settings_cls: type, settings: SamplerSettings | None, kwargs: Mapping) -> SamplerSettings:
    """A sampler function's settings: `settings` (default: the class's defaults) with the
    keyword arguments applied, validated once."""
    if settings is None:
        return settings_cls(**kwargs)
    if not isinstance(settings, settings_cls):
        raise TypeError(f"settings: expected {settings_cls.__name__}, got {type(settings).__name__}")
    return settings.with_changes(**kwargs) if kwargs else settings


def with_settings_signature(settings_cls: type):
    """Decorates a sampler function taking `settings=None, **kwargs` so that its signature (help,
    inspect) lists the settings' fields as keyword arguments with their defaults: the function
    keeps the keyword signature of the original sampler, while the defaults live in one place."""
    import inspect

    def decorate(function):
        signature = inspect.signature(function)
        parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = next(i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.KEYWORD_ONLY)
        fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                  for f in dataclasses.fields(settings_cls)]
        function.__signature__ = signature.replace(parameters=parameters[:at] + fields + parameters[at:])
        return function

    return decorate
