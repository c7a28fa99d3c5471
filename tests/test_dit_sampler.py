import math

import pytest
import torch
from torch import nn

import baseline
from elucd_fast.guidance import ClassifierGuidance, GuidanceInterval, calibrated_objective
from elucd_fast.models.adm_unet import timestep_embedding
from elucd_fast.models.dit import DiT, TimestepEmbedder
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.guidance.latent import LatentGuidance, VAEDecoder, decode_latents
from elucd_fast.samplers.dit import dit_gamma, dit_sampler
from elucd_fast.schedules.gaussian_diffusion import GaussianDiffusion
from test_edm_sampler import count_syncs_after_first_step
from tiny_models import TinyClassifier, rel_err

SEEDS = [3, 14, 15, 92]
NUM_CLASSES = 10
STEPS = "8"


class TimestepEmbedderAnyDtype(TimestepEmbedder):
    """The frequency features in the MLP's dtype, so the DiT can run in float64."""

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class DenoisingDiT(DiT):
    """A tiny random DiT turned into a passable denoiser: for data ~ N(0, I) the best noise
    prediction is sqrt(1 - abar_t) * z_t; the random transformer adds a class-dependent
    perturbation, so CFG and guidance have something to act on."""

    def __init__(self, learn_sigma=True, seed=0):
        torch.manual_seed(seed)
        super().__init__(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                         num_classes=NUM_CLASSES, learn_sigma=learn_sigma)
        self.t_embedder.__class__ = TimestepEmbedderAnyDtype
        abar = GaussianDiffusion.create(1000, "linear").alphas_cumprod
        self.register_buffer("sqrt_one_minus_abar", torch.tensor((1 - abar) ** 0.5), persistent=False)
        self.eval().requires_grad_(False)

    def forward(self, x, t, y):
        out = super().forward(x, t, y)
        eps = self.sqrt_one_minus_abar.to(x.dtype)[t].view(-1, 1, 1, 1) * x + 0.3 * out[:, :4]
        return torch.cat([eps, torch.tanh(out[:, 4:])], dim=1)


def tiny_vae(seed=0):
    """diffusers AutoencoderKL, 2x upsampling: latents (B, 4, h, w) -> images (B, 3, 2h, 2w)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16,
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval().requires_grad_(False)


class Counting(nn.Module):
    """Counts calls of a module."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


class CountingGuidance(ClassifierGuidance):
    calls = 0

    def forward(self, x, labels, weight=None):
        self.calls += 1
        return super().forward(x, labels, weight)


def cheap_decoder(seed=1):
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())
    return decoder.eval().requires_grad_(False)


def _inputs(seeds=SEEDS, dtype=torch.float32):
    rnd = StackedRandomGenerator("cpu", seeds)
    return rnd.randn([len(seeds), 4, 8, 8]).to(dtype), rnd.randint(NUM_CLASSES, size=[len(seeds)])


def _rms(v):
    return v.pow(2).mean(dim=(1, 2, 3)).sqrt()


def reference_sample(dit, latents, labels, noise, *, cfg_scale, cfg_channels, steps, use_ddim=False, eta=0.0,
                     decoder=None, classifier=None, guidance_scale=0.0, gamma_factor=0.0, tau_j=1.0, tau_m=1.0):
    """DiT's sampling loop written out: the doubled batch through DiT's own `forward_with_cfg`
    (unguided) or the guided combination by hand, then ADM's p_sample / DDIM step."""
    diffusion = GaussianDiffusion.create(1000, "linear", steps)
    num_steps, (batch, channels) = diffusion.num_steps, latents.shape[:2]
    null = torch.full_like(labels, NUM_CLASSES)
    x = latents.clone()
    for t in reversed(range(num_steps)):
        timesteps = torch.full((2 * batch,), int(diffusion.timestep_map[t]))
        abar, abar_prev, beta = diffusion.alphas_cumprod[t], diffusion.alphas_cumprod_prev[t], diffusion.betas[t]
        if classifier is None:
            out = DiT.forward_with_cfg(dit, torch.cat([x, x]), timesteps, torch.cat([labels, null]), cfg_scale,
                                       guided_channels=cfg_channels)[:batch]
            eps = out[:, :channels]
        else:
            out = dit(torch.cat([x, x]), timesteps, torch.cat([labels, null]))
            eps_c, eps_u = out[:batch, :channels], out[batch:, :channels]
            out = out[:batch]
            z0 = ((x - (1 - abar) ** 0.5 * eps_c) / abar ** 0.5).requires_grad_(True)
            with torch.enable_grad():
                logits = classifier(decoder(z0 / 0.18215))
                objective = tau_j * logits.gather(1, labels[:, None])[:, 0] - torch.logsumexp(tau_m * logits, dim=1)
                (g,) = torch.autograd.grad(objective.sum(), z0)
            k = cfg_channels
            d, g = eps_c[:, :k] - eps_u[:, :k], g[:, :k]
            gn = g * (_rms(d) / _rms(g)).view(-1, 1, 1, 1)
            gamma = guidance_scale * (1 + gamma_factor * math.sin(math.pi * t / num_steps))
            eps = torch.cat([eps_u[:, :k] + cfg_scale * (d - gamma * gn), eps_c[:, k:]], dim=1)
        x0 = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        z = noise(x)
        if use_ddim:
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
            x = abar_prev ** 0.5 * x0 + (1 - abar_prev - sigma ** 2) ** 0.5 * eps + (sigma * z if t > 0 else 0)
            continue
        mean = (beta * abar_prev ** 0.5 * x0 + (1 - abar_prev) * (1 - beta) ** 0.5 * x) / (1 - abar)
        posterior = diffusion.betas * (1 - diffusion.alphas_cumprod_prev) / (1 - diffusion.alphas_cumprod)
        log_posterior = math.log(posterior[1] if t == 0 else posterior[t])
        if out.shape[1] == 2 * channels:
            frac = (out[:, channels:] + 1) / 2
            log_variance = frac * math.log(beta) + (1 - frac) * log_posterior
        else:
            log_variance = torch.full_like(x, log_posterior if t == 0 else math.log(beta))
        x = mean + torch.exp(0.5 * log_variance) * z if t > 0 else mean
    return x


@pytest.mark.parametrize("cfg_channels", [3, None], ids=["3of4", "all"])
@pytest.mark.parametrize("mode", ["ancestral", "ddim-eta", "fixed-variance"])
@pytest.mark.parametrize("guided", [False, True], ids=["cfg", "guided"])
def test_float64_equals_reference(cfg_channels, mode, guided):
    dit = DenoisingDiT(learn_sigma=mode != "fixed-variance").double()
    latents, labels = _inputs(dtype=torch.float64)
    use_ddim, eta = mode == "ddim-eta", 0.5 if mode == "ddim-eta" else 0.0
    kwargs = dict(cfg_scale=1.5, steps=STEPS, use_ddim=use_ddim, eta=eta)
    guide_kwargs = {}
    if guided:
        vae, classifier = tiny_vae().double(), TinyClassifier().double()
        guide_kwargs = dict(guidance_scale=0.7, gamma_factor=0.3)
        ref_guidance = dict(decoder=lambda z: vae.decode(z).sample, classifier=baseline.smooth_relu(classifier, 3.0),
                            tau_j=1.0, tau_m=0.5)
        ours_guidance = dict(decoder=VAEDecoder(vae), guidance=ClassifierGuidance(
            classifier, softplus_beta=3.0, joint_temperature=1.0, marginal_temperature=0.5))
    ours = dit_sampler(dit, latents, labels, cfg_channels=cfg_channels, timestep_respacing=STEPS, use_ddim=use_ddim,
                       eta=eta, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, dtype=torch.float64,
                       **(ours_guidance if guided else {}), **guide_kwargs)
    ref = reference_sample(dit, latents, labels, StackedRandomGenerator("cpu", SEEDS).randn_like,
                           cfg_channels=cfg_channels or 4, **kwargs, **(ref_guidance if guided else {}),
                           **guide_kwargs)
    err = rel_err(ours, ref)
    assert err <= 1e-10, err
    if guided:  # the guidance really moved the samples
        plain = dit_sampler(dit, latents, labels, cfg_channels=cfg_channels, timestep_respacing=STEPS,
                            use_ddim=use_ddim, eta=eta, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like,
                            dtype=torch.float64)
        assert rel_err(plain, ref) > 1e-3


def test_three_of_four_channels_leaves_the_last_one_conditional():
    """With cfg_channels=3 the 4th channel follows eps_c whatever the CFG scale."""
    dit = DenoisingDiT().double()
    latents, labels = _inputs(dtype=torch.float64)
    runs = []
    for scale in (2.0, 4.0):
        first = []
        dit_sampler(dit, latents, labels, cfg_scale=scale, timestep_respacing="3", dtype=torch.float64,
                    randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like,
                    callback=lambda state: first.append(state["x"]) if state["i"] == 0 else None)
        runs.append(first[0])
    assert torch.equal(runs[0][:, 3], runs[1][:, 3])
    assert rel_err(runs[0][:, :3], runs[1][:, :3]) > 1e-3


def test_latent_gradient_equals_finite_differences():
    """grad_{z0} J(Dec(z0 / 0.18215)) against central differences, in float64."""
    decoder = VAEDecoder(tiny_vae().double())
    guide = ClassifierGuidance(TinyClassifier().double(), softplus_beta=3.0, marginal_temperature=0.5)
    z0 = 0.2 * torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 7])
    latent = LatentGuidance(guide, decoder)
    grad, objective = latent(z0, labels)

    def J(z):
        return calibrated_objective(guide.classifier(decoder(z / 0.18215)), labels, 1.0, 0.5)

    assert torch.allclose(objective, J(z0), rtol=1e-12)
    h = 1e-6
    numeric = torch.zeros_like(z0)
    for index in range(z0[0].numel()):
        step = torch.zeros_like(z0).flatten(1)
        step[:, index] = h
        step = step.view_as(z0)
        numeric.flatten(1)[:, index] = (J(z0 + step) - J(z0 - step)) / (2 * h)
    assert rel_err(grad, numeric) < 1e-6, rel_err(grad, numeric)
    checkpointed, _ = LatentGuidance(guide, decoder, checkpointing=True)(z0, labels)
    assert rel_err(checkpointed, grad) < 1e-12
    # A VAE checkpointing its own blocks runs on the checkpointing (eager autograd) path only.
    blockwise = tiny_vae().double()
    blockwise.enable_gradient_checkpointing()
    assert rel_err(LatentGuidance(guide, VAEDecoder(blockwise), checkpointing=True)(z0, labels)[0], grad) < 1e-12
    with pytest.raises(RuntimeError, match="decoder_checkpointing=True"):
        LatentGuidance(guide, VAEDecoder(blockwise))(z0, labels)


def test_guidance_raises_the_objective():
    """J of the decoded final samples, with vs without guidance, paired per seed."""
    seeds = list(range(8))
    dit, decoder = DenoisingDiT(), VAEDecoder(tiny_vae())
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.5)
    latents, labels = _inputs(seeds)

    def final_objective(**kwargs):
        out = dit_sampler(dit, latents, labels, decoder=decoder, timestep_respacing="20",
                          randn_like=StackedRandomGenerator("cpu", seeds).randn_like, **kwargs)
        return guide(decode_latents(decoder, out), labels)[1]

    plain = final_objective()
    guided = final_objective(guidance=guide, guidance_scale=1.0)
    gain = guided - plain
    # Per-seed noise: how much J moves between two unguided chains of other seeds.
    other = dit_sampler(dit, _inputs([s + 100 for s in seeds])[0], labels, timestep_respacing="20",
                        randn_like=StackedRandomGenerator("cpu", [s + 100 for s in seeds]).randn_like)
    noise = (guide(decode_latents(decoder, other), labels)[1] - plain).abs().mean()
    print(f"J gain per seed {gain.tolist()}, seed-to-seed |dJ| {float(noise):.3f}")
    assert bool((gain > 0).all())
    assert float(gain.mean()) > float(noise)


def test_interval_skips_decoder_and_classifier():
    dit = DenoisingDiT()
    decoder = Counting(VAEDecoder(tiny_vae()))
    guide = CountingGuidance(TinyClassifier(), softplus_beta=3.0)
    latents, labels = _inputs()
    dit_sampler(dit, latents, labels, decoder=decoder, guidance=guide, timestep_respacing="10",
                guidance_interval=GuidanceInterval(2, 9, 3))
    assert guide.calls == 3  # steps 2, 5, 8
    assert decoder.calls == 1 + 3  # one shape probe before sampling, then the guided steps only
    guide.calls = decoder.calls = 0
    dit_sampler(dit, latents, labels, decoder=decoder, guidance=guide, timestep_respacing="10",
                guidance_interval=GuidanceInterval(every=2))
    assert (guide.calls, decoder.calls) == (5, 1 + 5)


def test_cheap_decoder_is_used_for_the_gradient_only():
    dit = DenoisingDiT()
    real, cheap = Counting(VAEDecoder(tiny_vae())), Counting(cheap_decoder())
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    latents, labels = _inputs()
    out = dit_sampler(dit, latents, labels, decoder=real, guidance_decoder=cheap, guidance=guide,
                      timestep_respacing="6", decoder_checkpointing=True,
                      randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like)
    # One shape probe, then per step a forward and, with checkpointing, its recomputation.
    assert (real.calls, cheap.calls) == (0, 1 + 2 * 6)
    images = decode_latents(real, out)
    assert real.calls == 1 and images.shape == (4, 3, 16, 16) and float(images.abs().max()) <= 1
    plain = dit_sampler(dit, latents, labels, timestep_respacing="6",
                        randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like)
    assert rel_err(out, plain) > 1e-4


def test_zero_classifier_gradient_gives_plain_cfg():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(NUM_CLASSES))

        def forward(self, x):
            return self.bias.expand(x.shape[0], NUM_CLASSES) + 0 * x.flatten(1)[:, :1]

    dit, decoder = DenoisingDiT(), VAEDecoder(tiny_vae())
    latents, labels = _inputs()
    norms = []
    guided = dit_sampler(dit, latents, labels, decoder=decoder, guidance=ClassifierGuidance(Constant()),
                         guidance_scale=5.0, timestep_respacing="5",
                         callback=lambda state: norms.append(state["guidance_norm"]),
                         randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like)
    plain = dit_sampler(dit, latents, labels, timestep_respacing="5",
                        randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like)
    assert torch.isfinite(guided).all() and torch.equal(guided, plain)
    assert all(bool((n == 0).all()) for n in norms)


def test_no_host_sync_inside_the_loop():
    dit, decoder = DenoisingDiT(), VAEDecoder(tiny_vae())
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.0)
    latents, labels = _inputs()
    syncs = count_syncs_after_first_step(lambda cb: dit_sampler(
        dit, latents, labels, decoder=decoder, guidance=guide, timestep_respacing="4", callback=cb))
    assert syncs == []


def test_per_sample_determinism_across_batches():
    dit, decoder = DenoisingDiT(), VAEDecoder(tiny_vae())
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)

    def run(seeds):
        latents, labels = _inputs(seeds)
        return dit_sampler(dit, latents, labels, decoder=decoder, guidance=guide, timestep_respacing="4",
                           randn_like=StackedRandomGenerator("cpu", seeds).randn_like)

    full, alone = run([7, 8, 9]), run([9])
    assert rel_err(alone[0], full[2]) < 1e-5


def test_gamma_schedule():
    assert dit_gamma(0, 10, 0.2, 0.3) == pytest.approx(0.2)
    assert dit_gamma(5, 10, 0.2, 0.3) == pytest.approx(0.2 * 1.3)
    assert dit_gamma(9, 10, 0.2, 0.0) == pytest.approx(0.2)


def test_clip_style_labels_and_cfg_only_skip_the_unconditional_pass():
    calls = []

    class Recording(DenoisingDiT):
        def forward(self, x, t, y):
            calls.append(y.clone())
            return super().forward(x, t, y)

    dit = Recording()
    latents, labels = _inputs()
    dit_sampler(dit, latents, labels, cfg_scale=1.0, timestep_respacing="2")
    assert all(torch.equal(y, labels) for y in calls)
    calls.clear()
    guide = CountingGuidance(TinyClassifier(num_classes=3), softplus_beta=3.0)
    dit_sampler(dit, latents, labels, cfg_scale=1.0, decoder=cheap_decoder(), guidance=guide,
                guidance_labels=torch.zeros(4, dtype=torch.long), timestep_respacing="2")
    assert all(torch.equal(y, torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])) for y in calls)
    assert guide.calls == 2


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(cfg_channels=0), ValueError, "cfg_channels"),
    (dict(cfg_channels=5), ValueError, "cfg_channels"),
    (dict(cfg_channels=True), ValueError, "cfg_channels"),
    (dict(cfg_scale=-1.0), ValueError, "cfg_scale"),
    (dict(cfg_scale=math.nan), ValueError, "cfg_scale"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale"),
    (dict(gamma_factor=-0.1), ValueError, "gamma_factor"),
    (dict(null_label=-1), ValueError, "null_label"),
    (dict(dtype=torch.float16), TypeError, "dtype"),
    (dict(num_timesteps=1), ValueError, "num_timesteps"),
    (dict(guidance=ClassifierGuidance(TinyClassifier())), ValueError, "decoder"),
    (dict(guidance=ClassifierGuidance(TinyClassifier()), decoder=cheap_decoder(), guidance_labels=torch.tensor([0, 1])),
     ValueError, "labels for a batch"),
    (dict(guidance=ClassifierGuidance(TinyClassifier(channels=1)), decoder=cheap_decoder()), ValueError,
     "cannot take images of shape"),
])
def test_bad_arguments(kwargs, error, match):
    latents, labels = _inputs()
    with pytest.raises(error, match=match):
        dit_sampler(DenoisingDiT(), latents, labels, timestep_respacing="2", **kwargs)


def test_bad_labels_and_latents():
    dit = DenoisingDiT()
    latents, labels = _inputs()
    with pytest.raises(ValueError, match="pass labels"):
        dit_sampler(dit, latents, None)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        dit_sampler(dit, latents, labels + 10)
    with pytest.raises(TypeError, match="latents"):
        dit_sampler(dit, latents.long(), labels)
    with pytest.raises(ValueError, match="null_label"):
        dit_sampler(lambda x, t, y: x, latents, labels)
    with pytest.raises(ValueError, match="output channels"):
        dit_sampler(lambda x, t, y: x[:, :2], latents, labels, null_label=10, timestep_respacing="2")


def test_step_runner_runs_every_step_with_hashable_flags():
    dit, decoder = DenoisingDiT(), VAEDecoder(tiny_vae())
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    latents, labels = _inputs()
    seen = []

    def runner(step):
        def run(*args, **flags):
            seen.append(tuple(sorted(flags.items())))
            return step(*args, **flags)
        return run

    kwargs = dict(decoder=decoder, guidance=guide, timestep_respacing="4", guidance_interval=GuidanceInterval(every=2))
    ours = dit_sampler(dit, latents, labels, step_runner=runner,
                       randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kwargs)
    eager = dit_sampler(dit, latents, labels, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kwargs)
    assert torch.equal(ours, eager)
    assert len(seen) == 4 and len(set(seen)) == 3  # guided, unguided, unguided last step
    assert all(hash(flags) is not None for flags in seen)


def test_compiled_step_equals_eager():
    from elucd_fast.engine import CompiledStepRunner

    dit, decoder = DenoisingDiT(), VAEDecoder(tiny_vae())
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    latents, labels = _inputs()
    kwargs = dict(decoder=decoder, guidance=guide, timestep_respacing="3")
    runner = CompiledStepRunner(backend="aot_eager")
    compiled = dit_sampler(dit, latents, labels, step_runner=runner,
                           randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kwargs)
    eager = dit_sampler(dit, latents, labels, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kwargs)
    assert rel_err(compiled, eager) < 1e-5
