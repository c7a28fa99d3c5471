"""The settings dataclasses: every rule of every field, checked in one place with a message that
names the field and what is allowed; replacement, JSON round trips, and the samplers' keyword
signatures built from them."""
import dataclasses
import inspect
import math

import pytest

from elucd_fast import DDPMSettings, DiTSettings, EDM2Settings, EDMSettings, GuidanceInterval, GuidanceSettings
from elucd_fast import ddpm_sampler, dit_sampler, edm_sampler

NAN, INF = float("nan"), float("inf")

# (settings class, field changes, pattern the message must contain: the field and what is allowed)
BAD = [
    (EDMSettings, {"num_steps": 1}, r"num_steps: must be an integer >= 2, got 1"),
    (EDMSettings, {"num_steps": 2.5}, r"num_steps: must be an integer >= 2"),
    (EDMSettings, {"num_steps": True}, r"num_steps: must be an integer"),
    (EDMSettings, {"sigma_min": 0.0}, r"sigma_min: must be > 0"),
    (EDMSettings, {"sigma_min": NAN}, r"sigma_min: must be a finite number"),
    (EDMSettings, {"sigma_max": INF}, r"sigma_max: must be a finite number"),
    (EDMSettings, {"sigma_min": 5.0, "sigma_max": 1.0}, r"sigma_min, sigma_max: need 0 < sigma_min < sigma_max"),
    (EDMSettings, {"rho": 0}, r"rho: must be > 0"),
    (EDMSettings, {"rho": "7"}, r"rho: must be a finite number"),
    (EDMSettings, {"sigmas": (80.0, 1.0, 5.0)}, r"sigmas: must be strictly decreasing .* entry 2 \(5.0\)"),
    (EDMSettings, {"sigmas": (80.0, NAN)}, r"sigmas\[1\]: must be a finite number"),
    (EDMSettings, {"sigmas": (80.0, 0.0)}, r"sigmas\[1\]: must be > 0"),
    (EDMSettings, {"sigmas": ()}, r"sigmas: expected a non-empty list of noise levels"),
    (EDMSettings, {"sigmas": "80,1"}, r"sigmas: expected a non-empty list of noise levels"),
    (EDMSettings, {"sigmas": (80.0, 1.0), "num_steps": 5}, r"num_steps, sigmas: 2 explicit noise levels run 2 steps"),
    (EDMSettings, {"S_churn": -1}, r"S_churn: must be >= 0"),
    (EDMSettings, {"S_churn": INF}, r"S_churn: must be a finite number"),
    (EDMSettings, {"S_min": NAN}, r"S_min: must be a number"),
    (EDMSettings, {"S_max": NAN}, r"S_max: must be a number"),
    (EDMSettings, {"S_noise": -0.5}, r"S_noise: must be >= 0"),
    (EDMSettings, {"max_guidance": -1.0}, r"max_guidance: must be >= 0"),
    (EDMSettings, {"max_guidance": 1e400}, r"max_guidance: must be a finite number"),
    (EDMSettings, {"add_factor": NAN}, r"add_factor: must be a finite number"),
    (EDMSettings, {"guidance_interval": "0:4"}, r"guidance_interval: expected a GuidanceInterval or None"),
    (EDMSettings, {"solver": "euler"}, r"solver: expected one of 'heun', 'ipndm', 'dpmpp_2m', got 'euler'"),
    (EDMSettings, {"solver": "ipndm", "S_churn": 40}, r"S_churn: the multistep solver ipndm .* takes no churn"),
    (EDMSettings, {"solver": "ipndm", "max_order": 5}, r"max_order: must be an integer in \[1, 4\], got 5"),
    (EDMSettings, {"max_order": 3}, r"max_order: only the multistep solvers"),
    (DDPMSettings, {"num_timesteps": 1}, r"num_timesteps: must be an integer >= 2"),
    (DDPMSettings, {"beta_schedule": "quadratic"}, r"beta_schedule: expected one of 'linear', 'cosine'"),
    (DDPMSettings, {"timestep_respacing": "ddim999"}, r"timestep_respacing: cannot take exactly 999"),
    (DDPMSettings, {"timestep_respacing": "fast"}, r"timestep_respacing: expected e.g. '250'"),
    (DDPMSettings, {"timestep_respacing": "1"}, r"timestep_respacing: a chain needs at least 2 steps"),
    (DDPMSettings, {"timesteps": (999, 500, 500)}, r"timesteps: must be distinct, 500 repeated"),
    (DDPMSettings, {"timesteps": (1000, 500)}, r"timesteps\[0\]: must be an integer in \[0, 999\], got 1000"),
    (DDPMSettings, {"timesteps": (999, -1)}, r"timesteps\[1\]: must be an integer in \[0, 999\]"),
    (DDPMSettings, {"timesteps": (999, 2.5)}, r"timesteps\[1\]: must be an integer"),
    (DDPMSettings, {"timesteps": (999,)}, r"timesteps: expected a list of at least 2 distinct integer timesteps"),
    (DDPMSettings, {"learn_sigma": 1}, r"learn_sigma: must be True or False"),
    (DDPMSettings, {"model_mean_type": "v"}, r"model_mean_type: expected one of 'eps', 'x0'"),
    (DDPMSettings, {"clip_denoised": "yes"}, r"clip_denoised: must be True or False"),
    (DDPMSettings, {"classifier_scale": INF}, r"classifier_scale: must be a finite number"),
    (DDPMSettings, {"gamma_factor": -0.1}, r"gamma_factor: must be >= 0"),
    (DDPMSettings, {"guidance_input": "x1"}, r"guidance_input: expected one of 'x0', 'xt'"),
    (DDPMSettings, {"guidance_interval": 3}, r"guidance_interval: expected a GuidanceInterval or None"),
    (DDPMSettings, {"use_ddim": "true"}, r"use_ddim: must be True or False"),
    (DDPMSettings, {"eta": -1}, r"eta: must be >= 0"),
    (DDPMSettings, {"use_ddim": True, "gamma_factor": 0.3}, r"gamma_factor: .* ancestral sampling only"),
    (DiTSettings, {"cfg_scale": -1}, r"cfg_scale: must be >= 0"),
    (DiTSettings, {"cfg_scale": INF}, r"cfg_scale: must be a finite number"),
    (DiTSettings, {"cfg_channels": 0}, r"cfg_channels: must be an integer >= 1"),
    (DiTSettings, {"cfg_channels": 2.0}, r"cfg_channels: must be an integer"),
    (DiTSettings, {"guidance_scale": -0.1}, r"guidance_scale: must be >= 0"),
    (DiTSettings, {"gamma_factor": NAN}, r"gamma_factor: must be a finite number"),
    (DiTSettings, {"num_timesteps": 0}, r"num_timesteps: must be an integer >= 2"),
    (DiTSettings, {"beta_schedule": "sigmoid"}, r"beta_schedule: expected one of"),
    (DiTSettings, {"timestep_respacing": "0"}, r"timestep_respacing: cannot take 0 steps"),
    (DiTSettings, {"timesteps": (5, 5)}, r"timesteps: must be distinct, 5 repeated"),
    (DiTSettings, {"use_ddim": None}, r"use_ddim: must be True or False"),
    (DiTSettings, {"eta": INF}, r"eta: must be a finite number"),
    (DiTSettings, {"latent_scale": 0}, r"latent_scale: must be > 0"),
    (DiTSettings, {"guidance_interval": (0, 2)}, r"guidance_interval: expected a GuidanceInterval or None"),
    (DiTSettings, {"decoder_checkpointing": 0}, r"decoder_checkpointing: must be True or False"),
    (EDM2Settings, {"num_steps": 0}, r"num_steps: must be an integer >= 2"),
    (EDM2Settings, {"sigma_min": -1.0}, r"sigma_min: must be > 0"),
    (EDM2Settings, {"sigma_max": NAN}, r"sigma_max: must be a finite number"),
    (EDM2Settings, {"rho": -7}, r"rho: must be > 0"),
    (EDM2Settings, {"sigmas": (1.0, 2.0)}, r"sigmas: must be strictly decreasing"),
    (EDM2Settings, {"sigmas": (1.0, INF)}, r"sigmas\[1\]: must be a finite number"),
    (EDM2Settings, {"solver": "dpm"}, r"solver: expected one of 'heun', 'ipndm', 'dpmpp_2m', got 'dpm'"),
    (EDM2Settings, {"solver": "dpmpp_2m", "S_churn": 1}, r"S_churn: the multistep solver dpmpp_2m .* no churn"),
    (EDM2Settings, {"solver": "dpmpp_2m", "max_order": 0}, r"max_order: must be an integer in \[1, 4\], got 0"),
    (EDM2Settings, {"max_order": 1}, r"max_order: only the multistep solvers"),
    (EDM2Settings, {"guide_weight": INF}, r"guide_weight: must be a finite number"),
    (EDM2Settings, {"S_churn": -0.5}, r"S_churn: must be >= 0"),
    (EDM2Settings, {"S_min": "0"}, r"S_min: must be a number"),
    (EDM2Settings, {"S_max": NAN}, r"S_max: must be a number"),
    (EDM2Settings, {"S_noise": NAN}, r"S_noise: must be a finite number"),
    (EDM2Settings, {"max_guidance": -0.001}, r"max_guidance: must be >= 0"),
    (EDM2Settings, {"add_factor": INF}, r"add_factor: must be a finite number"),
    (EDM2Settings, {"guidance_interval": "::2"}, r"guidance_interval: expected a GuidanceInterval or None"),
    (EDM2Settings, {"decoder_checkpointing": "no"}, r"decoder_checkpointing: must be True or False"),
    (GuidanceSettings, {"softplus_beta": 0}, r"softplus_beta: must be > 0"),
    (GuidanceSettings, {"softplus_beta": NAN}, r"softplus_beta: must be a number"),
    (GuidanceSettings, {"softplus_beta": "5"}, r"softplus_beta: must be a number"),
    (GuidanceSettings, {"joint_temperature": -1}, r"joint_temperature: must be >= 0"),
    (GuidanceSettings, {"marginal_temperature": INF}, r"marginal_temperature: must be a finite number"),
    (GuidanceSettings, {"joint_temperature": 0, "marginal_temperature": 0}, r"both 0 make the guidance identically zero"),
]


@pytest.mark.parametrize("cls,changes,message", BAD, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in BAD])
def test_every_rule_names_the_field_and_what_is_allowed(cls, changes, message):
    with pytest.raises(ValueError, match=message):
        cls(**changes)
    # The same rule runs when a valid object is changed.
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cls(), **changes)


def test_every_field_has_a_rule_case_and_a_help_text():
    covered = {(cls, key) for cls, changes, _ in BAD for key in changes}
    for cls in (EDMSettings, DDPMSettings, DiTSettings, EDM2Settings, GuidanceSettings):
        for f in dataclasses.fields(cls):
            assert (cls, f.name) in covered, f"{cls.__name__}.{f.name} has no bad-value case"
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_guidance_interval_rules_and_parsing():
    for bad, message in ((dict(start=-1), "start: must be an integer >= 0"), (dict(start=2, stop=2), "stop: must be"),
                         (dict(every=0), "every: must be an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            GuidanceInterval(**bad)
    assert GuidanceInterval.parse("::2") == GuidanceInterval(0, None, 2)
    assert GuidanceInterval.parse("3:10") == GuidanceInterval(3, 10, 1)
    for bad in ("1:2:3:4", "a::"):
        with pytest.raises(ValueError, match="guidance_interval"):
            GuidanceInterval.parse(bad)


def test_with_changes_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"max_guidance: not a setting of the ddpm sampler; its settings: num_timesteps"):
        DDPMSettings().with_changes(max_guidance=0.1)


def test_num_steps_and_schedules():
    assert EDMSettings().with_num_steps(7).num_steps == 7
    ddpm = DDPMSettings().with_num_steps(25)
    assert ddpm.timestep_respacing == "25" and ddpm.num_steps == 25 and ddpm.diffusion.num_steps == 25
    assert DiTSettings().with_num_steps(50).num_steps == 50
    with pytest.raises(ValueError, match="num_steps: must be an integer in \\[2, 1000\\]"):
        DDPMSettings().with_num_steps(1001)
    weights = EDMSettings(num_steps=4, max_guidance=0.01, add_factor=0.3).guidance_weights()
    assert len(weights) == 4 and weights[0] == pytest.approx(0.01 * 5 / 5)


@pytest.mark.parametrize("settings", [
    EDMSettings(num_steps=5, S_churn=40, S_max=INF, guidance_interval=GuidanceInterval(1, 4, 2)),
    DDPMSettings(timestep_respacing="ddim25", use_ddim=True),
    DDPMSettings(timestep_respacing=(10, 15, 20)),
    DiTSettings(cfg_channels=None, timestep_respacing=None),
])
def test_json_round_trip(settings):
    import json

    data = json.loads(json.dumps(settings.json(), allow_nan=False))
    assert type(settings).from_json(data) == settings


def test_unguided_json_drops_the_guidance_strengths():
    data = EDMSettings().json(guided=False)
    assert "max_guidance" not in data and "add_factor" not in data and data["num_steps"] == 18


def test_guidance_settings_resolve_tau_m():
    settings = GuidanceSettings(softplus_beta=math.inf, joint_temperature=2.0)
    assert settings.marginal_temperature == 2.0 and settings.json()["softplus_beta"] == "inf"


@pytest.mark.parametrize("sampler,expected", [
    (edm_sampler, dict(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=INF,
                       S_noise=1, max_guidance=0.001, add_factor=0.0)),
    (ddpm_sampler, dict(num_timesteps=1000, beta_schedule="linear", timestep_respacing="250", learn_sigma=True,
                        clip_denoised=True, classifier_scale=1.0, gamma_factor=0.0, use_ddim=False, eta=0.0)),
    (dit_sampler, dict(cfg_scale=1.5, cfg_channels=3, guidance_scale=0.1, gamma_factor=0.3,
                       timestep_respacing="250")),
])
def test_sampler_signatures_keep_the_original_keywords(sampler, expected):
    parameters = inspect.signature(sampler).parameters
    for name, default in expected.items():
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default == default, name
    assert "settings" in parameters and "guidance" in parameters
