"""Explicit step sequences in every sampler (`sigmas` for EDM/EDM2, `timesteps` for DDPM/DiT):
equal to the default path bit for bit where they equal its schedule, equal to the plain float64
loops where they do not, guidance schedules following the steps actually run, the settings'
rules, and the network evaluations they cost."""
import math

import pytest
import torch

import baseline
from elucd_fast.guidance import ClassifierGuidance, GuidanceInterval
from elucd_fast.guidance.schedules import edm_guidance_weights, sine_factor
from elucd_fast.guidance.update import ddpm_guided_mean, dit_guided_difference, edm_classifier_input, edm_guidance_update
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers import DDPMSettings, DiTSettings, EDM2Settings, EDMSettings
from elucd_fast.samplers import ddpm, dit, edm
from elucd_fast.samplers.ddpm import ddpm_sampler
from elucd_fast.samplers.dit import dit_gamma, dit_sampler
from elucd_fast.samplers.edm import edm_sampler
from elucd_fast.samplers.edm2 import edm2_sampler
from test_dit_sampler import DenoisingDiT, cheap_decoder
from test_edm2_sampler import _networks
from test_edm_sampler import count_syncs_after_first_step
from tiny_models import TinyClassifier, TinyEDMNet, TinyEpsModel, rel_err

SEEDS = [3, 14, 15, 92]


def _noise(shape, num_classes=10):
    rnd = StackedRandomGenerator("cpu", SEEDS)
    return rnd.randn([len(SEEDS), *shape]), rnd.randint(num_classes, size=[len(SEEDS)])


def _randn_like():
    return StackedRandomGenerator("cpu", SEEDS).randn_like


def _run(sampler: str, settings, dtype=torch.float32, guided=True, **runtime):
    """One sampler call on tiny networks, guided by a tiny classifier."""
    guide = ClassifierGuidance(TinyClassifier().to(dtype), softplus_beta=3.0) if guided else None
    if sampler == "edm":
        latents, labels = _noise((3, 8, 8))
        return edm_sampler(TinyEDMNet(compute_dtype=dtype), latents, labels, guidance=guide, dtype=dtype,
                           randn_like=_randn_like(), settings=settings, **runtime)
    if sampler == "edm2":
        net, gnet = _networks(guide="autog")
        latents, labels = _noise((3, 16, 16))
        return edm2_sampler(net, latents, labels, gnet=gnet, guidance=guide, dtype=dtype, randn_like=_randn_like(),
                            settings=settings, **runtime)
    if sampler == "ddpm":
        latents, labels = _noise((3, 8, 8))
        return ddpm_sampler(TinyEpsModel().to(dtype), latents, labels, guidance=guide, dtype=dtype,
                            randn_like=_randn_like(), settings=settings, **runtime)
    latents, labels = _noise((4, 8, 8))
    return dit_sampler(DenoisingDiT().to(dtype), latents, labels, guidance=guide, guidance_decoder=cheap_decoder(),
                       dtype=dtype, randn_like=_randn_like(), settings=settings, **runtime)


DEFAULTS = {
    "edm": EDMSettings(num_steps=5, max_guidance=0.05, add_factor=0.3, S_churn=10, S_min=0.05, S_max=50),
    "edm2": EDM2Settings(num_steps=4, guide_weight=1.7, max_guidance=0.05, add_factor=0.3),
    "ddpm": DDPMSettings(num_timesteps=100, timestep_respacing="9", classifier_scale=2.0, gamma_factor=0.3),
    "ddim": DDPMSettings(num_timesteps=100, timestep_respacing="ddim10", use_ddim=True, eta=0.5),
    "dit": DiTSettings(timestep_respacing="6", guidance_scale=0.5, gamma_factor=0.3),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_the_default_schedule_given_explicitly_is_the_default_path_bit_for_bit(name):
    settings = DEFAULTS[name]
    sampler = "ddpm" if name == "ddim" else name
    net = TinyEDMNet() if name == "edm" else None
    explicit = settings.with_steps(settings.step_sequence(net))
    assert explicit != settings and explicit.num_steps == settings.num_steps
    assert explicit.network_evaluations == settings.network_evaluations
    assert torch.equal(_run(sampler, explicit), _run(sampler, settings))


@pytest.mark.parametrize("churn", [False, True], ids=["ode", "churn"])
def test_edm_explicit_sigmas_float64_equal_the_plain_loop(churn):
    sigmas = (61.0, 12.5, 3.3, 0.91, 0.2, 0.0045)  # no family's: uneven on purpose
    kwargs = dict(max_guidance=0.05, add_factor=0.3, **(dict(S_churn=20, S_min=0.05, S_max=50) if churn else {}))
    net = TinyEDMNet(compute_dtype=torch.float64)
    latents, labels = _noise((3, 8, 8))
    classifier = TinyClassifier().double()
    ours = edm_sampler(net, latents, labels, guidance=ClassifierGuidance(classifier, softplus_beta=5.0, marginal_temperature=0.0), sigmas=sigmas,
                       dtype=torch.float64, randn_like=_randn_like(), **kwargs)
    ref = baseline.edm_sample(net, latents, labels, baseline.smooth_relu(classifier, 5.0), randn_like=_randn_like(),
                              sigmas=sigmas, **kwargs)
    err = rel_err(ours, ref)
    print(f"edm explicit sigmas float64 churn={churn}: relative error {err:.3e}")
    assert err <= 1e-10, err
    # They are not the rho family's levels: the run differs from 6 rho steps.
    rho = edm_sampler(net, latents, labels, guidance=ClassifierGuidance(classifier, softplus_beta=5.0, marginal_temperature=0.0), num_steps=6,
                      dtype=torch.float64, randn_like=_randn_like(), **kwargs)
    assert rel_err(rho, ref) > 1e-3


@pytest.mark.parametrize("use_ddim", [False, True], ids=["ancestral", "ddim"])
def test_ddpm_explicit_timesteps_float64_equal_the_plain_loop(use_ddim):
    timesteps = (13, 99, 2, 71, 40)  # any order: run descending
    kwargs = dict(num_timesteps=100, classifier_scale=2.0, use_ddim=use_ddim, gamma_factor=0.0 if use_ddim else 0.3)
    model, classifier = TinyEpsModel().double(), TinyClassifier().double()
    latents, labels = _noise((3, 8, 8))
    ours = ddpm_sampler(model, latents, labels, guidance=ClassifierGuidance(classifier, softplus_beta=3.0,
                                                                            marginal_temperature=0.5),
                        timesteps=timesteps, dtype=torch.float64, randn_like=_randn_like(), **kwargs)
    ref = baseline.ddpm_sample(model, latents, labels, baseline.smooth_relu(classifier, 3.0), randn_like=_randn_like(),
                               timesteps=timesteps, **kwargs)
    err = rel_err(ours, ref)
    print(f"ddpm explicit timesteps float64 ddim={use_ddim}: relative error {err:.3e}")
    assert err <= 1e-10, err


def test_edm_weights_follow_the_steps_run():
    seen = []

    def recording_update(x, g, z, noise_scale, weight):
        seen.append(float(weight[0]))
        return edm_guidance_update(x, g, z, noise_scale, weight)

    settings = EDMSettings(sigmas=(40.0, 4.0, 0.4), max_guidance=0.05, add_factor=0.3)
    _run("edm", settings, dtype=torch.float64, ops=edm.StepOps(edm_classifier_input, recording_update))
    assert seen == pytest.approx(edm_guidance_weights(3, 0.05, 0.3), rel=1e-12)  # N = 3, the steps run


def test_ddpm_sine_term_model_timesteps_and_interval_follow_the_steps_run():
    sines, model_t = [], []

    def recording_mean(mean, variance, g, vmax, sine, scale, gamma):
        sines.append(float(sine))
        return ddpm_guided_mean(mean, variance, g, vmax, sine, scale, gamma)

    class Recording(TinyEpsModel):
        def forward(self, x, t, y=None):
            model_t.append(int(t[0]))
            return super().forward(x, t, y)

    timesteps = (90, 50, 49, 3)
    settings = DDPMSettings(num_timesteps=100, timesteps=timesteps, gamma_factor=0.3,
                            guidance_interval=GuidanceInterval(0, 3))
    latents, labels = _noise((3, 8, 8))
    ddpm_sampler(Recording(), latents, labels, guidance=ClassifierGuidance(TinyClassifier()), settings=settings,
                 ops=ddpm.StepOps(recording_mean))
    assert model_t == list(timesteps)  # the model sees the original timesteps, descending
    # SPEC §3: sin(pi t / T) over the chain run (t its step index, T its length), as on a respaced
    # chain; the interval counts the steps run (0, 1, 2 guided of 4).
    assert sines == pytest.approx([sine_factor(t, 4) for t in (3, 2, 1)])


def test_dit_gamma_follows_the_steps_run():
    gammas = []

    def recording_difference(difference, g, gamma):
        gammas.append(float(gamma))
        return dit_guided_difference(difference, g, gamma)

    settings = DiTSettings(timesteps=(999, 600, 20), guidance_scale=0.5, gamma_factor=0.3)
    _run("dit", settings, ops=dit.StepOps(recording_difference))
    assert gammas == pytest.approx([dit_gamma(t, 3, 0.5, 0.3) for t in (2, 1, 0)], rel=1e-6)


@pytest.mark.parametrize("name", ["edm", "edm2", "ddpm", "dit"])
def test_network_evaluations_are_the_denoiser_calls(name):
    calls = []
    settings = {"edm": EDMSettings(sigmas=(50.0, 5.0, 0.5, 0.05)), "edm2": EDM2Settings(sigmas=(50.0, 5.0, 0.5)),
                "ddpm": DDPMSettings(num_timesteps=100, timesteps=(99, 50, 10)),
                "dit": DiTSettings(timesteps=(999, 500, 100, 0))}[name]

    def count(module, args, output):
        calls.append(1)

    if name == "edm":
        net = TinyEDMNet()
        net.register_forward_hook(count)
        latents, labels = _noise((3, 8, 8))
        edm_sampler(net, latents, labels, settings=settings)
    elif name == "edm2":
        net, _ = _networks()
        net.register_forward_hook(count)
        latents, labels = _noise((3, 16, 16))
        edm2_sampler(net, latents, labels, settings=settings)
    elif name == "ddpm":
        model = TinyEpsModel()
        model.register_forward_hook(count)
        latents, labels = _noise((3, 8, 8))
        ddpm_sampler(model, latents, labels, settings=settings)
    else:
        model = DenoisingDiT()
        model.register_forward_hook(count)
        latents, labels = _noise((4, 8, 8))
        dit_sampler(model, latents, labels, settings=settings)
    assert len(calls) == settings.network_evaluations
    assert settings.network_evaluations == (2 * settings.num_steps - 1 if name.startswith("edm") else settings.num_steps)


def test_edm_levels_outside_the_networks_range_are_refused_when_sampling_starts():
    latents, labels = _noise((3, 8, 8))
    with pytest.raises(ValueError, match=r"sigmas: 100 outside the network's noise range \[0.002, 80\]"):
        edm_sampler(TinyEDMNet(), latents, labels, sigmas=(100.0, 1.0))
    # The range's own ends, however computed, are inside.
    out = edm_sampler(TinyEDMNet(), latents, labels, sigmas=((80 ** (1 / 7)) ** 7, 0.002))
    assert torch.isfinite(out).all()


def test_explicit_steps_keep_zero_host_syncs_per_step():
    latents, labels = _noise((3, 8, 8))
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    syncs = count_syncs_after_first_step(lambda callback: edm_sampler(
        TinyEDMNet(), latents, labels, guidance=guide, sigmas=(50.0, 7.0, 1.0, 0.1), callback=callback))
    assert syncs == []


def test_settings_rules_for_explicit_steps():
    edm_explicit = EDMSettings(sigmas=[50, 5.0, 0.5])
    assert edm_explicit.sigmas == (50.0, 5.0, 0.5) and edm_explicit.num_steps == 3
    assert edm_explicit.step_sequence() == (50.0, 5.0, 0.5)
    with pytest.raises(ValueError, match="num_steps: these settings run 3 explicit noise levels"):
        edm_explicit.with_changes(num_steps=7)
    assert edm_explicit.with_num_steps(7) == EDMSettings(num_steps=7)  # back to the rho family
    assert edm_explicit.with_changes(sigmas=(9.0, 1.0)).num_steps == 2
    assert EDMSettings(num_steps=4, sigmas=(3.0, 2.0, 1.0, 0.5)).num_steps == 4
    assert EDMSettings(sigmas=(3.0,)).network_evaluations == 1  # one Euler step to 0
    ddpm_explicit = DDPMSettings(timesteps=[5, 999, 300])
    assert ddpm_explicit.timesteps == (999, 300, 5) and ddpm_explicit.step_sequence() == (999, 300, 5)
    assert ddpm_explicit.num_steps == 3 and list(ddpm_explicit.diffusion.timestep_map) == [5, 300, 999]
    with pytest.raises(ValueError, match="timestep_respacing: these settings run explicit timesteps"):
        ddpm_explicit.with_changes(timestep_respacing="50")
    assert ddpm_explicit.with_num_steps(50) == DDPMSettings(timestep_respacing="50")
    with pytest.raises(ValueError, match=r"timesteps\[0\]: must be an integer in \[0, 99\], got 999"):
        ddpm_explicit.with_changes(num_timesteps=100)
    with pytest.raises(ValueError, match="sigmas: must be strictly decreasing"):
        EDM2Settings().with_steps((1.0, 1.0))
    with pytest.raises(ValueError, match="timesteps: must be distinct"):
        DiTSettings().with_steps((4, 4, 3))


@pytest.mark.parametrize("settings", [EDMSettings(sigmas=(61.0, 1.5, 0.01)), EDM2Settings(sigmas=(20.0, 0.1)),
                                      DDPMSettings(timesteps=(999, 10)), DiTSettings(timesteps=(7, 900, 3))])
def test_explicit_steps_round_trip_through_json(settings):
    import json

    data = json.loads(json.dumps(settings.json(), allow_nan=False))
    assert type(settings).from_json(data) == settings
    assert math.isclose(type(settings).from_json(data).step_sequence()[0], settings.step_sequence()[0])
