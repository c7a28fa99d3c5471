"""Presets: the registry, the digits presets' jobs, and how overrides map onto them."""
import json
import math

import pytest
import torch

from elucd_fast.digits.cfg import ClassifierFreeGuidance
from elucd_fast.guidance.classifier import ClassifierGuidance
from elucd_fast.models.denoiser import DenoiserEpsModel
from elucd_fast.presets import DigitsPreset, build_job, get_preset, list_presets, register_preset
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers import EDMSettings


def test_registry_lists_the_digits_presets():
    assert {"digits", "digits-unguided", "digits-cfg", "digits-ddpm", "digits-ddpm-uncond"} <= set(list_presets())
    assert list_presets() == sorted(list_presets())
    with pytest.raises(ValueError, match="already registered"):
        register_preset(DigitsPreset("digits", "again"))
    with pytest.raises(ValueError, match="unknown name"):
        get_preset("no-such-preset")


def test_digits_jobs():
    guided = build_job("digits")
    assert guided.sampler == "edm" and isinstance(guided.guidance, ClassifierGuidance)
    assert guided.image_shape == (1, 8, 8) and guided.num_classes == 10
    assert guided.settings == EDMSettings(num_steps=18, max_guidance=0.02, add_factor=0.3)
    json.dumps(guided.config, allow_nan=False)
    assert build_job("digits-unguided").guidance is None
    unguided_settings = build_job("digits-unguided").config["preset"]["settings"]
    assert unguided_settings["num_steps"] == guided.settings.num_steps
    assert not {"max_guidance", "add_factor"} & set(unguided_settings)
    cfg = build_job("digits-cfg")
    assert cfg.guidance is None and isinstance(cfg.net, ClassifierFreeGuidance)
    ddpm = build_job("digits-ddpm")
    assert ddpm.sampler == "ddpm" and isinstance(ddpm.net, DenoiserEpsModel)
    assert ddpm.settings.learn_sigma is False and ddpm.settings.guidance_input == "x0"


def test_overrides_map_onto_guidance_and_sampler():
    job = build_job("digits", softplus_beta=3.0, joint_temperature=2.0, marginal_temperature=0.5, max_guidance=0.2,
                    add_factor=0.0, num_steps=7)
    assert (job.guidance.softplus_beta, job.guidance.joint_temperature, job.guidance.marginal_temperature) == (3, 2, 0.5)
    assert job.settings == EDMSettings(num_steps=7, max_guidance=0.2, add_factor=0.0)
    assert job.config["preset"]["guidance_settings"]["softplus_beta"] == 3.0
    relu = build_job("digits", softplus_beta=math.inf)
    assert relu.config["preset"]["guidance_settings"]["softplus_beta"] == "inf"
    ddpm = build_job("digits-ddpm", num_steps=10, classifier_scale=2.0, gamma_factor=0.0, guidance_input="xt")
    assert ddpm.settings.timestep_respacing == "10"
    assert (ddpm.settings.classifier_scale, ddpm.settings.gamma_factor) == (2.0, 0.0)
    assert build_job("digits", guidance=False).guidance is None
    assert build_job("digits-cfg", cfg_scale=3.0).net.cfg_scale == 3.0
    unconditional = build_job("digits", cfg_scale=0.0)
    assert unconditional.net.cfg_scale == 0.0 and unconditional.guidance is not None
    assert isinstance(build_job("digits-ddpm", cfg_scale=0.0).net.denoiser, ClassifierFreeGuidance)


@pytest.mark.parametrize("preset, overrides, message", [
    ("digits", {"temperature": 1.0}, "not a setting"),
    ("digits", {"network": "edm.pkl"}, "not a setting"),
    ("digits-unguided", {"softplus_beta": 3.0}, "not used by"),
    ("digits", {"classifier_scale": 2.0}, "not used by"),
    ("digits", {"num_steps": 1}, "num_steps"),
    ("digits", {"softplus_beta": 0.0}, "softplus_beta"),
    ("digits", {"joint_temperature": 0.0, "marginal_temperature": 0.0}, "identically zero"),
    ("digits", {"max_guidance": float("nan")}, "max_guidance"),
    ("digits", {"guidance": "yes"}, "guidance"),
    ("digits", {"sampler": "heun"}, "sampler"),
    ("digits", {"cfg_scale": float("inf")}, "cfg_scale"),
    ("digits-ddpm", {"guidance_input": "x1"}, "guidance_input"),
    ("digits-ddpm", {"num_steps": 2000}, "2000"),
])
def test_bad_overrides_are_refused(preset, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_job(preset, **overrides)


@pytest.mark.parametrize("name", ["digits", "digits-unguided", "digits-cfg", "digits-ddpm", "digits-ddpm-uncond"])
def test_every_digits_preset_samples_finite_batch_independent_images(name):
    job = build_job(name, num_steps=4)
    rnd = StackedRandomGenerator("cpu", [0, 1, 2])
    latents, labels = rnd.randn([3, 1, 8, 8]), rnd.randint(10, size=[3])
    images = job.sample(latents, labels, rnd.randn_like)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    alone = StackedRandomGenerator("cpu", [2])
    single = job.sample(alone.randn([1, 1, 8, 8]), alone.randint(10, size=[1]), alone.randn_like)
    torch.testing.assert_close(single[0], images[2], rtol=1e-4, atol=1e-5)
