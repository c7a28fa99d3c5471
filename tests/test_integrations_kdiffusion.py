"""GuidedDenoiser and the k-diffusion adapters: driven by k-diffusion-protocol loops written here
(no k-diffusion needed), and by k-diffusion's own samplers where it is installed."""
import pytest
import torch

from elucd_fast.guidance import ClassifierGuidance, GuidanceInterval, calibrated_objective
from elucd_fast.integrations.kdiffusion import (GuidedDenoiser, as_kdiffusion_denoiser, edm_guidance_displacement,
                                                from_kdiffusion)
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.guidance.schedules import edm_guidance_weights
from elucd_fast.samplers.edm import edm_sampler
from tiny_models import TinyClassifier, TinyEDMNet, TinyEpsModel, rel_err

SEEDS = [3, 14, 15, 92]
NUM_STEPS = 6


@torch.no_grad()
def euler_loop(model, x, sigmas, extra_args=None, callback=None):
    """k-diffusion's `sample_euler` (ODE): one denoiser call per step, then the step report."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def heun_loop(model, x, sigmas, extra_args=None, callback=None):
    """k-diffusion's `sample_heun` (ODE): the report comes between the two calls of a step."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1] * s_in, **(extra_args or {}))) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def _setup(dtype=torch.float32, beta=5.0):
    net = TinyEDMNet(compute_dtype=dtype)
    rnd = StackedRandomGenerator("cpu", SEEDS)
    noise = rnd.randn([len(SEEDS), 3, 8, 8], dtype=dtype)
    labels = rnd.randint(10, size=[len(SEEDS)])
    guidance = ClassifierGuidance(TinyClassifier().to(dtype), softplus_beta=beta, marginal_temperature=0.0)
    return net, noise, labels, guidance


def _objective(guidance, x, labels):
    with torch.no_grad():
        return calibrated_objective(guidance.logits(x.to(guidance.input_dtype)), labels,
                                    guidance.joint_temperature, guidance.marginal_temperature)


def test_heun_loop_equals_edm_sampler_float64():
    net, noise, labels, guidance = _setup(torch.float64)
    kwargs = dict(max_guidance=0.05, add_factor=0.3)
    expected_j = []
    ref = edm_sampler(net, noise, labels, num_steps=NUM_STEPS, guidance=guidance, dtype=torch.float64,
                      callback=lambda info: expected_j.append(info["J"]), **kwargs)
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS)
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, **kwargs)
    got_j = []
    out = guided.sample(heun_loop, noise * sigmas[0], extra_args={"class_labels": labels},
                        callback=lambda info: got_j.append(info["J"]), stages=2)
    assert rel_err(out, ref) <= 1e-12
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(got_j, expected_j))


def test_one_euler_step_by_hand():
    net, noise, labels, guidance = _setup()
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS).float()
    w0 = edm_guidance_weights(NUM_STEPS, 0.02, 0.3)[0]
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, max_guidance=0.02, add_factor=0.3)
    x0 = noise * sigmas[0]
    states = []
    guided.sample(euler_loop, x0, extra_args={"class_labels": labels}, callback=lambda info: states.append(info["x"]),
                  stages=1)

    # Algorithm 2 by hand, with autograd through the smoothed classifier.
    r = x0.square().flatten(1).mean(1).sqrt()
    xc = (x0 / r.clamp_min(1).reshape(-1, 1, 1, 1)).requires_grad_(True)
    with torch.enable_grad():
        objective = calibrated_objective(guidance.logits(xc), labels, 1.0, 0.0)
        (g,) = torch.autograd.grad(objective.sum(), xc)
    dx = g / g.square().flatten(1).mean(1).sqrt().reshape(-1, 1, 1, 1) * (r * w0).reshape(-1, 1, 1, 1)
    x_hat = x0 + dx
    d = (x_hat - net(x_hat, sigmas[0].expand(len(SEEDS)), torch.nn.functional.one_hot(labels, 10).float())) / sigmas[0]
    expected = x_hat + (sigmas[1] - sigmas[0]) * d
    # states[1] is the state the sampler reports at step 1: x after step 0.
    assert rel_err(states[1], expected) <= 1e-5


def test_guidance_raises_objective_per_seed():
    net, noise, labels, guidance = _setup()
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS).float()
    extra = {"class_labels": labels}
    plain = euler_loop(denoiser, noise * sigmas[0], sigmas, extra)
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, max_guidance=0.05)
    out = guided.sample(euler_loop, noise * sigmas[0], extra_args=extra, stages=1)
    assert torch.isfinite(out).all()
    gain = _objective(guidance, out, labels) - _objective(guidance, plain, labels)
    assert (gain > 0).all(), gain


def test_guidance_interval_skips_steps_exactly():
    net, noise, labels, guidance = _setup()
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS).float()
    extra = {"class_labels": labels}
    plain, late = [], []
    euler_loop(denoiser, noise * sigmas[0], sigmas, extra, callback=lambda info: plain.append(info["x"]))
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, max_guidance=0.05,
                            guidance_interval=GuidanceInterval(start=3))
    guided.sample(euler_loop, noise * sigmas[0], extra_args=extra,
                  callback=lambda info: late.append((info["x"], info["J"])), stages=1)
    for i in range(4):  # the states before guided step 3 runs
        assert torch.equal(late[i][0], plain[i])
    assert late[2][1] is None and late[3][1] is not None
    assert not torch.equal(late[4][0], plain[4])


def test_reused_wrapper_gives_the_same_run():
    net, noise, labels, guidance = _setup()
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS).float()
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, max_guidance=0.05, stages=2)
    extra = {"class_labels": labels}
    with torch.no_grad():
        first = heun_loop(guided, noise * sigmas[0], sigmas, extra)  # no callback needed
        second = heun_loop(guided, noise * sigmas[0], sigmas, extra, callback=guided.callback)
    assert torch.equal(first, second)


def test_wrong_stage_count_is_caught_by_the_step_report():
    net, noise, labels, guidance = _setup()
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS).float()
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, stages=1)
    with pytest.raises(RuntimeError, match="stages"):
        heun_loop(guided, noise * sigmas[0], sigmas, {"class_labels": labels}, callback=guided.callback)
    with pytest.raises(ValueError, match="calls per step"):
        guided.sample(heun_loop, noise * sigmas[0])
    with pytest.raises(ValueError, match="stages"):
        GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, stages=0)


def test_schedule_and_label_checks():
    net, noise, labels, guidance = _setup()
    denoiser = as_kdiffusion_denoiser(net)
    with pytest.raises(ValueError, match="end in 0"):
        GuidedDenoiser(denoiser, guidance, torch.tensor([80.0, 1.0, 0.5]), class_labels=labels)
    with pytest.raises(ValueError, match="end in 0"):
        GuidedDenoiser(denoiser, guidance, torch.tensor([80.0, 80.0, 0.0]), class_labels=labels)
    sigmas = denoiser.get_sigmas(NUM_STEPS).float()
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels[:2])
    with pytest.raises(ValueError, match="2 labels for a batch of 4"):
        guided.sample(euler_loop, noise * sigmas[0], extra_args={"class_labels": labels}, stages=1)


def test_zero_gradient_gives_zero_displacement():
    x = torch.randn(2, 3, 4, 4)
    zero = lambda xc, ids: (torch.zeros_like(xc), torch.zeros(len(xc)))  # noqa: E731
    dx, norm, _ = edm_guidance_displacement(zero, x, torch.zeros(2, dtype=torch.long), torch.tensor(0.01))
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(norm, torch.zeros(2))


def test_from_kdiffusion_round_trip_under_edm_sampler():
    net, noise, labels, guidance = _setup()
    wrapped = from_kdiffusion(as_kdiffusion_denoiser(net), label_dim=10)
    kwargs = dict(num_steps=NUM_STEPS, guidance=guidance, max_guidance=0.02)
    assert torch.equal(edm_sampler(wrapped, noise, labels, **kwargs), edm_sampler(net, noise, labels, **kwargs))
    with pytest.raises(ValueError, match="valid noise range"):
        from_kdiffusion(lambda x, sigma: x)


# --- k-diffusion's own samplers -------------------------------------------------------------

def _kdiffusion():
    return pytest.importorskip("k_diffusion")


def _first_step_only_equals_displaced_start(sampler, stages=None, **kwargs):
    """The formulation's claim, over a whole run: with only step 0 guided, the guided run equals
    the same unguided sampler started from x0 + dx0 (Algorithm 2's splitting), history included."""
    net, noise, labels, guidance = _setup(torch.float64)
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS)
    extra = {"class_labels": labels}
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, max_guidance=0.05,
                            guidance_interval=GuidanceInterval(stop=1))
    x0 = noise * sigmas[0]
    out = guided.sample(sampler, x0, extra_args=extra, stages=stages, **kwargs)
    weight = torch.tensor(edm_guidance_weights(NUM_STEPS, 0.05)[0], dtype=torch.float64)
    dx, _, _ = edm_guidance_displacement(guidance, x0, labels, weight)
    return rel_err(out, sampler(denoiser, x0 + dx, sigmas, extra_args=extra, **kwargs))


@pytest.mark.parametrize("loop,stages", [(euler_loop, 1), (heun_loop, 2)], ids=["euler", "heun"])
def test_guided_step_equals_displaced_start(loop, stages):
    assert _first_step_only_equals_displaced_start(loop, stages) <= 1e-12


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2", "sample_dpmpp_2s_ancestral",
                                  "sample_dpmpp_2m"])
def test_kdiffusion_guided_step_equals_displaced_start(name):
    K = _kdiffusion()
    kwargs = dict(disable=True, **({"eta": 0.0} if "ancestral" in name else {}))
    assert _first_step_only_equals_displaced_start(getattr(K.sampling, name), **kwargs) <= 1e-12


def test_kdiffusion_refuses_uncompensated_multistep_samplers():
    K = _kdiffusion()
    net, noise, labels, guidance = _setup()
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS).float()
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels)
    with pytest.raises(ValueError, match="extrapolates"):
        guided.sample(K.sampling.sample_lms, noise * sigmas[0])


def test_kdiffusion_heun_equals_edm_sampler_float64():
    K = _kdiffusion()
    net, noise, labels, guidance = _setup(torch.float64)
    ref = edm_sampler(net, noise, labels, num_steps=NUM_STEPS, guidance=guidance, max_guidance=0.05, add_factor=0.3,
                      dtype=torch.float64)
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = denoiser.get_sigmas(NUM_STEPS)
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, max_guidance=0.05, add_factor=0.3)
    out = guided.sample(K.sampling.sample_heun, noise * sigmas[0], extra_args={"class_labels": labels}, disable=True)
    assert rel_err(out, ref) <= 1e-12


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral"])
def test_kdiffusion_samplers_raise_objective(name):
    K = _kdiffusion()
    net, noise, labels, guidance = _setup()
    denoiser = as_kdiffusion_denoiser(net)
    sigmas = K.sampling.get_sigmas_karras(NUM_STEPS, 0.002, 80.0)
    sampler = getattr(K.sampling, name)
    extra = {"class_labels": labels}
    torch.manual_seed(0)  # the ancestral sampler's noise, the same in both runs
    plain = sampler(denoiser, noise * sigmas[0], sigmas, extra_args=extra, disable=True)
    guided = GuidedDenoiser(denoiser, guidance, sigmas, class_labels=labels, max_guidance=0.05)
    torch.manual_seed(0)
    out = guided.sample(sampler, noise * sigmas[0], extra_args=extra, disable=True)
    gain = _objective(guidance, out, labels) - _objective(guidance, plain, labels)
    assert torch.isfinite(out).all() and (gain > 0).all(), gain


def test_kdiffusion_discrete_eps_denoiser_under_edm_sampler():
    K = _kdiffusion()
    from elucd_fast.models.denoiser import EpsModelDenoiser
    from elucd_fast.schedules.gaussian_diffusion import GaussianDiffusion

    eps_model = TinyEpsModel(learn_sigma=True)
    diffusion = GaussianDiffusion.create(1000, "linear", None)
    wrapped = K.external.OpenAIDenoiser(eps_model, diffusion, quantize=True)
    net = from_kdiffusion(wrapped, label_dim=10, label_kwarg="y", img_resolution=8)
    ours = EpsModelDenoiser(eps_model, diffusion=diffusion, img_resolution=8, label_dim=10)
    # k-diffusion keeps the noise levels in float32.
    assert net.sigma_min == pytest.approx(ours.sigma_min, rel=1e-3)
    _, noise, labels, guidance = _setup()
    kwargs = dict(num_steps=NUM_STEPS, sigma_max=80, guidance=guidance, max_guidance=0.02)
    a = edm_sampler(net, noise, labels, **kwargs)
    b = edm_sampler(ours, noise, labels, **kwargs)
    assert torch.isfinite(a).all() and rel_err(a, b) <= 1e-4

