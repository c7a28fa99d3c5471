import math

import numpy as np
import pytest
import torch

import baseline
from elucd_fast.guidance import ClassifierGuidance, calibrated_objective
from elucd_fast.models.denoiser import EpsModelDenoiser
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers.ddpm import ddpm_sampler
from elucd_fast.samplers.edm import edm_sampler
from elucd_fast.schedules.gaussian_diffusion import GaussianDiffusion, named_beta_schedule, space_timesteps
from test_edm_sampler import count_syncs_after_first_step
from tiny_models import TinyClassifier, TinyEpsModel, rel_err

SEEDS = [1, 2, 3, 4]
SMALL = dict(num_timesteps=100, timestep_respacing="12")


def _inputs(seeds=SEEDS):
    rnd = StackedRandomGenerator("cpu", seeds)
    return rnd.randn([len(seeds), 3, 8, 8]), rnd.randint(10, size=[len(seeds)])


def test_space_timesteps_matches_adm():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(100, "10") == list(range(0, 100, 11))
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999 and steps[:4] == [0, 4, 8, 12]
    assert space_timesteps(300, "10,15,20") == sorted(set(space_timesteps(300, "10,15,20")))
    with pytest.raises(ValueError, match="timestep_respacing"):
        space_timesteps(100, "200")
    with pytest.raises(ValueError, match="timestep_respacing"):
        space_timesteps(100, "ddim200")


def test_respaced_chain_keeps_alpha_bar():
    full = GaussianDiffusion.create(1000, "linear", None)
    spaced = GaussianDiffusion.create(1000, "linear", "ddim25")
    assert np.allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    cosine = named_beta_schedule("cosine", 1000)
    assert cosine.max() <= 0.999 and np.all(np.diff(np.cumprod(1 - cosine)) < 0)
    with pytest.raises(ValueError, match="beta_schedule"):
        named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="at least 2 steps"):
        GaussianDiffusion.create(100, "linear", "1")


@pytest.mark.parametrize("mode", ["ancestral", "ancestral-xt", "ddim", "ddim-eta"])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_float64_equals_baseline(mode, guided):
    model = TinyEpsModel().double()
    noise, labels = _inputs()
    classifier = TinyClassifier().double()
    use_ddim = mode.startswith("ddim")
    common = dict(classifier_scale=2.0, guidance_input="xt" if mode == "ancestral-xt" else "x0",
                  use_ddim=use_ddim, eta=0.5 if mode == "ddim-eta" else 0.0,
                  gamma_factor=0.0 if use_ddim else 0.3, **SMALL)
    guide = ClassifierGuidance(classifier, softplus_beta=3.0, marginal_temperature=0.5) if guided else None
    ours = ddpm_sampler(model, noise, labels, guidance=guide, dtype=torch.float64,
                        randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **common)
    ref = baseline.ddpm_sample(model, noise, labels, baseline.smooth_relu(classifier, 3.0) if guided else None,
                               randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like,
                               joint_temperature=1.0, marginal_temperature=0.5, **common)
    err = rel_err(ours, ref)
    print(f"ddpm float64 {mode} guided={guided}: relative error {err:.3e}")
    assert err <= 1e-10, err


def test_fixed_variance_equals_baseline():
    model = TinyEpsModel(learn_sigma=False).double()
    noise, labels = _inputs()
    guide = ClassifierGuidance(TinyClassifier().double(), softplus_beta=3.0, marginal_temperature=0.5)
    kw = dict(learn_sigma=False, gamma_factor=0.3, **SMALL)
    ours = ddpm_sampler(model, noise, labels, guidance=guide, dtype=torch.float64,
                        randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kw)
    ref = baseline.ddpm_sample(model, noise, labels, baseline.smooth_relu(TinyClassifier().double(), 3.0),
                               randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kw)
    assert rel_err(ours, ref) <= 1e-10


@pytest.mark.parametrize("use_ddim", [False, True])
def test_guidance_raises_mean_objective(use_ddim):
    model = TinyEpsModel()
    classifier = TinyClassifier(seed=3)
    noise, labels = _inputs(list(range(16)))
    guide = ClassifierGuidance(classifier, softplus_beta=3.0, marginal_temperature=0.5)
    kw = dict(use_ddim=use_ddim, **SMALL)
    plain = ddpm_sampler(model, noise, labels, randn_like=StackedRandomGenerator("cpu", range(16)).randn_like, **kw)
    guided = ddpm_sampler(model, noise, labels, guidance=guide, classifier_scale=300.0,
                          randn_like=StackedRandomGenerator("cpu", range(16)).randn_like, **kw)
    with torch.no_grad():
        gain = (calibrated_objective(guide.classifier(guided), labels, 1.0, 0.5)
                - calibrated_objective(guide.classifier(plain), labels, 1.0, 0.5))
    # Paired per-seed gain, well above its standard error.
    assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain)), (float(gain.mean()), float(gain.std()))
    assert gain.mean() > 0.02, float(gain.mean())


def test_no_host_sync_inside_the_loop():
    model = TinyEpsModel()
    noise, labels = _inputs()
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.5)
    syncs = count_syncs_after_first_step(lambda cb: ddpm_sampler(
        model, noise, labels, guidance=guide, gamma_factor=0.3, callback=cb, **SMALL))
    assert syncs == []


def test_eps_model_as_edm_denoiser():
    """An ADM eps-model served through the EDM interface: D(x, sigma) = x - sigma * eps."""
    model = TinyEpsModel()
    denoiser = EpsModelDenoiser(model, img_channels=3, img_resolution=8, label_dim=10)
    x = torch.randn(2, 3, 8, 8)
    sigma = denoiser.round_sigma(torch.tensor(1.3))
    index = int((denoiser.sigmas - sigma).abs().argmin())
    y = torch.tensor([2, 7])
    expect = x - sigma.float() * model(x / math.sqrt(1 + float(sigma) ** 2), torch.full((2,), index), y)[:, :3]
    assert torch.allclose(denoiser(x, sigma, torch.nn.functional.one_hot(y, 10).float()), expect, atol=1e-6)
    out = edm_sampler(denoiser, torch.randn(2, 3, 8, 8), y, num_steps=5)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(classifier_scale=math.nan), ValueError, "classifier_scale"),
    (dict(gamma_factor=-0.1), ValueError, "gamma_factor"),
    (dict(use_ddim=True, gamma_factor=0.3), ValueError, "gamma_factor"),
    (dict(guidance_input="noise"), ValueError, "guidance_input"),
    (dict(timestep_respacing="5000"), ValueError, "timestep_respacing"),
    (dict(num_timesteps=1), ValueError, "num_timesteps"),
    (dict(dtype=torch.bfloat16), TypeError, "dtype"),
])
def test_bad_arguments(kwargs, error, match):
    noise, labels = _inputs()
    with pytest.raises(error, match=match):
        ddpm_sampler(TinyEpsModel(), noise, labels, guidance=ClassifierGuidance(TinyClassifier()),
                     **{**SMALL, **kwargs})


def test_bad_labels():
    noise, labels = _inputs()
    with pytest.raises(ValueError, match=r"class_labels: ids must be in \[0, 10\)"):
        ddpm_sampler(TinyEpsModel(), noise, labels + 10, guidance=ClassifierGuidance(TinyClassifier()), **SMALL)
    with pytest.raises(ValueError, match="class-conditional"):
        ddpm_sampler(TinyEpsModel(), noise, None, **SMALL)


def test_denoiser_as_eps_model_round_trip():
    """EDM denoiser -> eps-model -> EDM denoiser gives back D at the chain's noise levels."""
    from elucd_fast.models.denoiser import DenoiserEpsModel
    from tiny_models import TinyEDMNet

    net = TinyEDMNet(compute_dtype=torch.float64)
    eps_model = DenoiserEpsModel(net)
    back = EpsModelDenoiser(eps_model, learn_sigma=False, img_channels=3, img_resolution=8, label_dim=10)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.tensor([0, 4, 9]), 10).float()
    for sigma in (0.05, 1.0, 20.0):
        s = back.round_sigma(torch.tensor(sigma, dtype=torch.float64))
        assert rel_err(back(x, s, y).double(), net(x, s, y)) < 1e-5
    out = ddpm_sampler(eps_model, torch.randn(3, 3, 8, 8), torch.tensor([0, 4, 9]), learn_sigma=False, **SMALL)
    assert torch.isfinite(out).all()
