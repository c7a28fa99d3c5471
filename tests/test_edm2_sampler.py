"""The EDM2 sampler (`samplers.edm2`) on tiny random EDM2 networks: EDM2's sampler written out in
float64 from its published formulas (generate_images.py's `edm_sampler`: EDM's Heun schedule in
the state dtype, the guided denoiser D_g + w (D_net - D_g), noise only on churned steps), with
Algorithm 2's classifier term on pixels or through a decoder on latents; determinism per seed,
call counts, no host syncs, refused settings."""
import math

import pytest
import torch
from torch import nn

import baseline
from elucd_fast.guidance import ClassifierGuidance, GuidanceInterval
from elucd_fast.models.edm2_encoders import StabilityVAEEncoder, StandardRGBEncoder
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.runs.generation import quantize_round
from elucd_fast.samplers import SAMPLERS, EDM2Settings
from elucd_fast.samplers.edm2 import decode_edm2_latents, edm2_sampler
from test_edm2_networks import tiny_network
from test_edm_sampler import count_syncs_after_first_step
from tiny_models import TinyClassifier, rel_err

SEEDS = [3, 14, 15, 92, 65]
NUM_CLASSES = 10
CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
STEPS = 8


def _networks(channels=3, guide=None, dtype=torch.float32):
    """The main network and a guide: "uncond" (CFG, EDM2's guid rows) or "autog" (a smaller
    conditional network, its autog rows)."""
    net = tiny_network(channels, NUM_CLASSES).to(dtype)
    gnet = None
    if guide == "uncond":
        gnet = tiny_network(channels, 0, seed=5).to(dtype)
    elif guide == "autog":
        gnet = tiny_network(channels, NUM_CLASSES, seed=7, model_channels=8).to(dtype)
    return net, gnet


def _inputs(seeds=SEEDS, channels=3):
    rnd = StackedRandomGenerator("cpu", seeds)
    return rnd.randn([len(seeds), channels, 16, 16]), rnd.randint(NUM_CLASSES, size=[len(seeds)]), rnd


def cheap_decoder(seed=1, dtype=torch.float32):
    """Latents (B, 4, h, w) -> images (B, 3, 2h, 2w) in [-1, 1]."""
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())
    return decoder.to(dtype).eval().requires_grad_(False)


class Counting(nn.Module):
    """Counts calls of a module (network or decoder) and keeps its interface."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0
        self.label_dim = getattr(module, "label_dim", None)

    def forward(self, *args):
        self.calls += 1
        return self.module(*args)


# ---------------------------------------------------------------------------------------------
# The reference: EDM2's sampler and the classifier term written out, float64, per-sample loops.

def reference_sample(net, gnet, latents, ids, seeds, *, num_steps, guide_weight=1.0, sigma_min=0.002, sigma_max=80.0,
                     rho=7.0, S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0, classifier=None, decoder=None,
                     max_guidance=0.0, add_factor=0.0, tau_j=1.0, tau_m=0.0):
    """EDM2's `edm_sampler` from its formulas (float64 Python time steps, the guided denoiser
    written as D_g + w (D_net - D_g), a noise draw only where S_churn > 0 and S_min <= t <= S_max)
    plus Algorithm 2's dx_i = g / rms(g) rms(x_i) w_i before the Euler step; g on the
    normalised x_i (pixels) or, with a decoder, at the last denoised estimate through it."""
    rnd = StackedRandomGenerator("cpu", seeds)
    one_hot = torch.eye(NUM_CLASSES, dtype=torch.float64)[ids]

    def denoise(x, t):
        t = torch.tensor(t, dtype=torch.float64)  # a Python float would reach the network as float32
        d_net = net(x, t, one_hot).to(torch.float64)
        if guide_weight == 1:
            return d_net
        d_guide = gnet(x, t, one_hot if gnet.label_dim else None).to(torch.float64)
        return d_guide + guide_weight * (d_net - d_guide)

    def gradient(images_of, x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = classifier(images_of(x))
            objective = tau_j * logits[torch.arange(len(ids)), ids] - torch.logsumexp(tau_m * logits, dim=1)
            (g,) = torch.autograd.grad(objective.sum(), x)
        return g

    n = num_steps
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t_steps = [(top + i / (n - 1) * (bottom - top)) ** rho for i in range(n)] + [0.0]
    x = latents.to(torch.float64) * t_steps[0]
    x0 = denoise(x, t_steps[0]) if decoder is not None else None
    for i in range(n):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / n, math.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * rnd.randn_like(x)
        else:
            t_hat, x_hat = t_cur, x.clone()
        if classifier is not None:
            weight = (max(max_guidance * (n + 1 - i) / (n + 1), 1e-5)
                      + math.sin(math.pi * i / n) * max_guidance * add_factor)
            if decoder is not None:
                g = gradient(decoder, x0)
            else:
                xc = x.clone()
                for b in range(len(x)):
                    r = x[b].pow(2).mean().sqrt()
                    if r > 1:
                        xc[b] = x[b] / r
                g = gradient(lambda v: v, xc)
            for b in range(len(x)):
                x_hat[b] = x_hat[b] + g[b] / g[b].pow(2).mean().sqrt() * x[b].pow(2).mean().sqrt() * weight
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < n - 1:
            x0 = denoise(x_next, t_next)
            d_prime = (x_next - x0) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


@pytest.mark.parametrize("churn", [None, CHURN, dict(S_churn=100)], ids=["ode", "churn-window", "churn-capped"])
@pytest.mark.parametrize("guide,w", [(None, 1.0), ("uncond", 1.4), ("autog", 2.05)], ids=["none", "cfg", "autog"])
def test_float64_equals_edm2_reference(guide, w, churn):
    net, gnet = _networks(guide=guide, dtype=torch.float64)
    latents, labels, _ = _inputs()
    kwargs = dict(num_steps=STEPS, guide_weight=w, **(churn or {}))
    ours = edm2_sampler(net, latents, labels, gnet=gnet, dtype=torch.float64,
                        randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kwargs)
    ref = reference_sample(net, gnet, latents, labels, SEEDS, **kwargs)
    err = rel_err(ours, ref)
    print(f"edm2 float64 guide={guide} churn={churn}: relative error {err:.3e} (bitwise {torch.equal(ours, ref)})")
    # Bitwise without a guide; the guide's torch.lerp rounds differently from D_g + w (D - D_g).
    assert torch.equal(ours, ref) if guide is None else err <= 1e-14, err


@pytest.mark.parametrize("space", ["pixels", "latents"])
@pytest.mark.parametrize("churn", [None, CHURN], ids=["ode", "churn"])
def test_float64_guided_equals_reference(space, churn):
    channels = 3 if space == "pixels" else 4
    net, gnet = _networks(channels, guide="autog", dtype=torch.float64)
    latents, labels, _ = _inputs(channels=channels)
    classifier = TinyClassifier().double()
    decoder = cheap_decoder(dtype=torch.float64) if space == "latents" else None
    guide = ClassifierGuidance(classifier, softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0)
    kwargs = dict(num_steps=STEPS, guide_weight=2.0, max_guidance=0.05, add_factor=0.3, **(churn or {}))
    ours = edm2_sampler(net, latents, labels, gnet=gnet, guidance=guide, decoder=decoder, dtype=torch.float64,
                        randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kwargs)
    ref = reference_sample(net, gnet, latents, labels, SEEDS, classifier=baseline.smooth_relu(classifier, 5.0),
                           decoder=decoder, **kwargs)
    err = rel_err(ours, ref)
    print(f"edm2 float64 classifier-guided {space} churn={bool(churn)}: relative error {err:.3e}")
    assert err <= 1e-12, err
    unguided = edm2_sampler(net, latents, labels, gnet=gnet, dtype=torch.float64,
                            randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like,
                            **{k: v for k, v in kwargs.items() if k not in ("max_guidance", "add_factor")})
    assert rel_err(unguided, ref) > 1e-3  # the classifier term really moved the samples


def test_time_steps_are_edm2s_in_the_state_dtype():
    settings = EDM2Settings()
    t32 = settings.time_steps(torch.float32)
    assert t32.dtype == torch.float32 and t32.shape == (33,) and float(t32[-1]) == 0
    # Computed in float32, as EDM2 does (sigma_0 = 79.99998...), not rounded from float64 as EDM does.
    assert float(t32[0]) == pytest.approx(80, rel=1e-6) and float(t32[31]) == pytest.approx(0.002, rel=1e-6)
    n, top, bottom = 32, 80 ** (1 / 7), 0.002 ** (1 / 7)
    idx = torch.arange(n, dtype=torch.float32)
    assert torch.equal(t32[:-1], (top + idx / (n - 1) * (bottom - top)) ** 7.0)
    churned, t_hats = EDM2Settings(num_steps=10, **CHURN).churn(EDM2Settings(num_steps=10).time_steps())
    sigmas = EDM2Settings(num_steps=10).time_steps().tolist()
    assert churned == [0.05 <= s <= 50 for s in sigmas[:-1]]
    assert all(float(t) == pytest.approx(s * (1 + min(40 / 10, math.sqrt(2) - 1)) if c else s)
               for t, s, c in zip(t_hats, sigmas, churned))


def test_noise_is_drawn_on_churned_steps_only():
    net, _ = _networks()
    latents, labels, _ = _inputs()
    draws = []

    def randn_like(x):
        draws.append(x.dtype)
        return torch.randn_like(x)

    edm2_sampler(net, latents, labels, num_steps=STEPS, randn_like=randn_like)
    assert draws == []
    edm2_sampler(net, latents, labels, num_steps=STEPS, randn_like=randn_like,
                 guidance=ClassifierGuidance(TinyClassifier()), max_guidance=0.01)
    assert draws == []  # guidance draws no noise either
    churned, _ = EDM2Settings(num_steps=STEPS, **CHURN).churn(EDM2Settings(num_steps=STEPS).time_steps())
    edm2_sampler(net, latents, labels, num_steps=STEPS, randn_like=randn_like, **CHURN)
    assert 0 < len(draws) == sum(churned) < STEPS and set(draws) == {torch.float32}


def test_guide_network_calls():
    net, gnet = _networks(guide="uncond")
    net, gnet = Counting(net), Counting(gnet)
    latents, labels, _ = _inputs()
    plain = edm2_sampler(net, latents, labels, gnet=gnet, num_steps=STEPS)  # w = 1: EDM2 never calls the guide
    assert (net.calls, gnet.calls) == (2 * STEPS - 1, 0)
    assert torch.equal(plain, edm2_sampler(net.module, latents, labels, num_steps=STEPS))
    net.calls = 0
    guided = edm2_sampler(net, latents, labels, gnet=gnet, num_steps=STEPS, guide_weight=1.4)
    assert (net.calls, gnet.calls) == (2 * STEPS - 1, 2 * STEPS - 1)
    assert rel_err(guided, plain) > 1e-3
    with pytest.raises(ValueError, match="gnet: guide_weight 1.4 needs a guide network"):
        edm2_sampler(net, latents, labels, num_steps=STEPS, guide_weight=1.4)
    # w = 0 is the guide alone.
    alone = edm2_sampler(net, latents, labels, gnet=gnet, num_steps=STEPS, guide_weight=0.0)
    uncond = edm2_sampler(gnet.module, latents, None, num_steps=STEPS)
    assert rel_err(alone, uncond) < 1e-6


def test_unconditional_network_takes_labels_for_the_classifier_only():
    net = tiny_network(3, 0)
    latents, labels, rnd = _inputs()
    plain = edm2_sampler(net, latents, num_steps=STEPS)
    assert torch.equal(plain, edm2_sampler(net, latents, labels, num_steps=STEPS))  # labels ignored by the network
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=5.0, marginal_temperature=0.0)
    guided = edm2_sampler(net, latents, labels, num_steps=STEPS, guidance=guide, max_guidance=0.05)
    assert rel_err(guided, plain) > 1e-3
    with pytest.raises(ValueError, match="class_labels: guidance needs target labels"):
        edm2_sampler(net, latents, num_steps=STEPS, guidance=guide)
    with pytest.raises(ValueError, match=r"class_labels: the network is class-conditional \(label_dim 10\)"):
        edm2_sampler(tiny_network(3, NUM_CLASSES), latents, num_steps=STEPS)


def _final_objective(guide, images, labels):
    return guide(images, labels)[1]


def test_guidance_raises_the_objective_for_every_seed():
    seeds = list(range(8))
    net, gnet = _networks(guide="autog")
    latents, labels, _ = _inputs(seeds)
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=5.0, marginal_temperature=0.0)
    kwargs = dict(num_steps=STEPS, gnet=gnet, guide_weight=2.0)
    plain = edm2_sampler(net, latents, labels, **kwargs)
    guided = edm2_sampler(net, latents, labels, guidance=guide, max_guidance=0.02, add_factor=0.3, **kwargs)
    gain = _final_objective(guide, guided, labels) - _final_objective(guide, plain, labels)
    print(f"pixel J gain per seed {gain.tolist()}")
    assert bool((gain > 0).all()), gain


def test_latent_guidance_raises_the_objective_for_every_seed():
    seeds = list(range(8))
    net, _ = _networks(channels=4)
    decoder = cheap_decoder()
    latents, labels, _ = _inputs(seeds, channels=4)
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=5.0, marginal_temperature=0.0)
    plain = edm2_sampler(net, latents, labels, num_steps=STEPS)
    guided = edm2_sampler(net, latents, labels, num_steps=STEPS, guidance=guide, decoder=decoder, max_guidance=0.05,
                          add_factor=0.3)
    assert guided.shape == (8, 4, 16, 16)
    images = [decode_edm2_latents(decoder, x) for x in (plain, guided)]
    assert images[0].shape == (8, 3, 32, 32)
    gain = _final_objective(guide, images[1], labels) - _final_objective(guide, images[0], labels)
    print(f"latent J gain per seed {gain.tolist()}")
    assert bool((gain > 0).all()), gain


def test_per_sample_determinism_across_batches():
    """A seed gives the same sample whatever the batch size and its position in the batch."""
    net, gnet = _networks(guide="uncond")
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=5.0)

    def run(seeds):
        latents, labels, rnd = _inputs(seeds)
        return edm2_sampler(net, latents, labels, gnet=gnet, guide_weight=1.4, randn_like=rnd.randn_like,
                            num_steps=6, guidance=guide, max_guidance=0.05, **CHURN)

    full, alone, shuffled = run([7, 8, 9, 10, 11]), run([9]), run([11, 9, 7])
    for got, expect in ((alone[0], full[2]), (shuffled[0], full[4]), (shuffled[1], full[2]), (shuffled[2], full[0])):
        assert rel_err(got, expect) < 1e-5
    assert torch.equal(quantize_round(alone[:1]), quantize_round(full[2:3]))


def test_interval_and_call_counts_in_latent_space():
    net = Counting(tiny_network(4, NUM_CLASSES))
    decoder, cheap = Counting(cheap_decoder()), Counting(cheap_decoder(seed=2))
    calls = []

    class CountingGuidance(ClassifierGuidance):
        def forward(self, x, labels, weight=None):
            calls.append(tuple(x.shape))
            return super().forward(x, labels, weight)

    guide = CountingGuidance(TinyClassifier(), softplus_beta=5.0)
    latents, labels, _ = _inputs(channels=4)
    edm2_sampler(net, latents, labels, num_steps=10, guidance=guide, decoder=decoder, max_guidance=0.02,
                 guidance_interval=GuidanceInterval(2, 9, 3))
    assert len(calls) == 3 and set(calls) == {(5, 3, 32, 32)}  # steps 2, 5, 8; the classifier sees images
    assert decoder.calls == 1 + 3  # a shape probe before sampling, then the guided steps only
    assert net.calls == 2 * 10 - 1  # step 0 unguided: no extra denoiser call
    calls.clear()
    net.calls = decoder.calls = 0
    edm2_sampler(net, latents, labels, num_steps=10, guidance=guide, decoder=decoder, guidance_decoder=cheap,
                 decoder_checkpointing=True, max_guidance=0.02)
    # Guided from step 0: one denoiser call for x0 before the loop; the cheap decoder serves the
    # gradient (a forward and, with checkpointing, its recomputation per step), the decoder nothing.
    assert (len(calls), net.calls, decoder.calls, cheap.calls) == (10, 2 * 10, 0, 1 + 2 * 10)


def test_pixel_space_classifier_sees_the_normalised_state():
    net = Counting(tiny_network(3, NUM_CLASSES))
    seen = []

    class Recording(ClassifierGuidance):
        def forward(self, x, labels, weight=None):
            seen.append(x.pow(2).flatten(1).mean(1).sqrt())
            return super().forward(x, labels, weight)

    latents, labels, _ = _inputs()
    edm2_sampler(net, latents, labels, num_steps=STEPS, guidance=Recording(TinyClassifier()), max_guidance=0.01)
    assert len(seen) == STEPS and net.calls == 2 * STEPS - 1  # no extra denoiser call in pixel space
    assert all(bool((r <= 1 + 1e-5).all()) for r in seen)


@pytest.mark.slow
def test_real_encoder_through_a_tiny_vae():
    """img512's path: the EDM2 encoder's differentiable decode feeds the classifier, its uint8
    decode makes the images; EDM's rounding of `decode_edm2_latents` gives back those bytes."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=32,
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval().requires_grad_(False)
    encoder = StabilityVAEEncoder.from_statistics(batch_size=2, vae=vae)
    net, gnet = _networks(channels=4, guide="uncond")
    latents, labels, rnd = _inputs(channels=4)
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=5.0)
    out = edm2_sampler(net, latents, labels, gnet=gnet, guide_weight=1.4, guidance=guide, decoder=encoder,
                       num_steps=4, max_guidance=0.02, randn_like=rnd.randn_like)
    images = decode_edm2_latents(encoder, out)
    assert images.shape == (5, 3, 32, 32) and float(images.abs().max()) <= 1
    assert torch.equal(quantize_round(images), encoder.decode(out))
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(quantize_round(decode_edm2_latents(StandardRGBEncoder(), pixels)),
                       StandardRGBEncoder().decode(pixels))
    assert decode_edm2_latents(None, pixels) is pixels


@pytest.mark.parametrize("space", ["pixels", "latents"])
def test_no_host_sync_inside_the_loop(space):
    channels = 3 if space == "pixels" else 4
    net, gnet = _networks(channels, guide="uncond")
    latents, labels, rnd = _inputs(channels=channels)
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=5.0, marginal_temperature=0.0)
    decoder = cheap_decoder() if space == "latents" else None
    syncs = count_syncs_after_first_step(lambda cb: edm2_sampler(
        net, latents, labels, gnet=gnet, guide_weight=1.4, guidance=guide, decoder=decoder, num_steps=5,
        add_factor=0.3, randn_like=rnd.randn_like, callback=cb, **CHURN))
    assert syncs == []


def test_callback_and_step_runner():
    net, gnet = _networks(guide="autog")
    latents, labels, _ = _inputs()
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=5.0)
    seen, states = [], []

    def runner(step):
        def run(*args, **flags):
            seen.append(tuple(sorted((k, v) for k, v in flags.items())))
            # every per-step value is a 0-d tensor: t_cur, t_hat, t_next, w_i
            assert all(isinstance(a, torch.Tensor) and a.ndim == 0 for a in args[6:10])
            return step(*args, **flags)
        return run

    kwargs = dict(gnet=gnet, guide_weight=2.0, guidance=guide, num_steps=6, max_guidance=0.02,
                  guidance_interval=GuidanceInterval(every=2), **CHURN)
    ours = edm2_sampler(net, latents, labels, step_runner=runner, callback=states.append,
                        randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kwargs)
    eager = edm2_sampler(net, latents, labels, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kwargs)
    assert torch.equal(ours, eager)
    assert len(seen) == 6 and all(hash(flags) is not None for flags in seen)
    assert [dict(flags)["guided"] for flags in seen] == [True, False, True, False, True, False]
    assert [s["i"] for s in states] == list(range(6)) and torch.equal(states[-1]["x"], ours)
    assert states[0]["J"].shape == (5,) and states[0]["guidance_norm"].shape == (5,) and states[1]["J"] is None
    assert float(states[0]["sigma"]) == pytest.approx(80, rel=1e-6)
    assert all(s["denoised"].shape == ours.shape for s in states)


@pytest.mark.slow
def test_compiled_step_equals_eager():
    from elucd_fast.engine import CompiledStepRunner

    net, gnet = _networks(guide="uncond")
    latents, labels, _ = _inputs()
    kwargs = dict(gnet=gnet, guide_weight=1.4, guidance=ClassifierGuidance(TinyClassifier(), softplus_beta=5.0),
                  num_steps=3, max_guidance=0.02)
    runner = CompiledStepRunner(backend="aot_eager")
    compiled = edm2_sampler(net, latents, labels, step_runner=runner, **kwargs)
    eager = edm2_sampler(net, latents, labels, **kwargs)
    assert rel_err(compiled, eager) < 1e-5 and runner.graphs == 2  # Heun steps and the last step


def test_fused_ops_are_used_on_guided_steps():
    from elucd_fast.samplers.edm import PLAIN_OPS, StepOps

    used = []

    def classifier_input(x):
        used.append("input")
        return PLAIN_OPS.classifier_input(x)

    def guidance_update(*args):
        used.append("update")
        return PLAIN_OPS.guidance_update(*args)

    net, _ = _networks()
    latents, labels, _ = _inputs()
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=5.0)
    ours = edm2_sampler(net, latents, labels, guidance=guide, num_steps=4, max_guidance=0.02,
                        ops=StepOps(classifier_input, guidance_update))
    assert used == ["input", "update"] * 4
    assert torch.equal(ours, edm2_sampler(net, latents, labels, guidance=guide, num_steps=4, max_guidance=0.02))


@pytest.mark.parametrize("changes,match", [
    (dict(num_steps=1), r"num_steps: must be an integer in \[2, 10000\]"),
    (dict(num_steps=2.5), r"num_steps: must be an integer"),
    (dict(sigma_min=0.0), r"sigma_min: must be > 0"),
    (dict(sigma_min=5.0, sigma_max=1.0), r"sigma_min, sigma_max: need 0 < sigma_min < sigma_max"),
    (dict(rho=-1), r"rho: must be > 0"),
    (dict(guide_weight=math.nan), r"guide_weight: must be a finite number"),
    (dict(guide_weight=math.inf), r"guide_weight: must be a finite number"),
    (dict(guide_weight="1.4"), r"guide_weight: must be a finite number"),
    (dict(S_churn=-1), r"S_churn: must be >= 0"),
    (dict(S_noise=-0.1), r"S_noise: must be >= 0"),
    (dict(max_guidance=-0.001), r"max_guidance: must be >= 0"),
    (dict(add_factor=math.inf), r"add_factor: must be a finite number"),
    (dict(guidance_interval="0:4"), r"guidance_interval: expected a GuidanceInterval or None"),
    (dict(decoder_checkpointing=1), r"decoder_checkpointing: must be True or False"),
    (dict(cfg_scale=2.0), r"cfg_scale: not a setting of the edm2 sampler"),
])
def test_bad_settings_are_refused_naming_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        EDM2Settings().with_changes(**changes)
    net, _ = _networks()
    latents, labels, _ = _inputs()
    with pytest.raises((ValueError, TypeError), match=match.split(":")[0]):
        edm2_sampler(net, latents, labels, **changes)


def test_settings_are_registered_and_round_trip():
    from elucd_fast.samplers import SETTINGS_BY_NAME, sampler_for

    settings = EDM2Settings(guide_weight=2.05, guidance_interval=GuidanceInterval(1, 9, 2), **CHURN)
    assert SETTINGS_BY_NAME["edm2"] is EDM2Settings and sampler_for(settings) is edm2_sampler
    assert EDM2Settings in SAMPLERS
    assert EDM2Settings.from_json(settings.json()) == settings
    assert "max_guidance" not in settings.json(guided=False) and settings.json(guided=False)["guide_weight"] == 2.05
    assert "guide_weight" not in EDM2Settings.guidance_fields()
    assert settings.with_num_steps(12).num_steps == 12
    defaults = EDM2Settings()
    assert (defaults.num_steps, defaults.sigma_min, defaults.sigma_max, defaults.rho, defaults.guide_weight) == (
        32, 0.002, 80, 7, 1)
    assert (defaults.S_churn, defaults.S_min, defaults.S_max, defaults.S_noise) == (0, 0, math.inf, 1)
