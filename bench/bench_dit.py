"""Cost of DiT latent guidance: a guided step vs a CFG-only step, against the FLOP model.

Run: python -m pytest -q bench/bench_dit.py --benchmark-only -s

A guided step adds to DiT's doubled (CFG) forward the decoder's forward and input-gradient
backward and the classifier's forward and backward, so the FLOP model of the step-cost ratio is

    guided / CFG-only = (F_dit2 + F_dec_fb + F_cls_fb) / F_dit2

(F_dit2: DiT on the doubled batch, per image; F_*_fb: forward + input gradient, per image), with
(F_dec_fb + F_cls_fb) / k for guidance on every k-th step and a cheap decoder's F_dec_fb for the
gradient-only decoder. `test_step_cost` measures it on a small-but-not-tiny CPU setup;
`test_flop_model_paper_checkpoints` evaluates the model for the paper's networks on the meta
device (no weights, no compute).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torchvision
from torch import nn

from elucd_fast.guidance import ClassifierGuidance, GuidanceInterval
from elucd_fast.models.dit import SD_VAE_CONFIG, DiT_models
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.guidance.latent import VAEDecoder
from elucd_fast.samplers.dit import dit_sampler
from timing import count_flops

BATCH, STEPS, ROUNDS = 2, 5, 3
# DiT-S/2 on 16x16 latents (128 x 128 images); an SD-layout VAE with a quarter of the channels;
# ResNet-18 at 128 x 128; and a 4-conv upsampler standing in for a distilled cheap decoder.
SMALL_VAE = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


pytestmark = pytest.mark.usefixtures("one_thread")

def cheap_decoder() -> nn.Module:
    """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w): three 2x upsamplings between convolutions."""
    return nn.Sequential(
        nn.Conv2d(4, 64, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(64, 32, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(32, 16, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(16, 3, 3, padding=1), nn.Tanh()).eval().requires_grad_(False)


def forward_backward_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of module(x) plus the gradient with respect to x (parameters frozen). Uses
    `.backward()`: the flop counter's module hooks refuse `autograd.grad` on some models."""
    def run():
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = module(x_in)
            out.sum().backward()

    return count_flops(run)


def flop_model(dit_doubled: int, decoder_fb: int, classifier_fb: int, cheap_fb: int) -> dict[str, float]:
    """Predicted step-cost ratios to a CFG-only step."""
    return {"full": (dit_doubled + decoder_fb + classifier_fb) / dit_doubled,
            "every2": (dit_doubled + (decoder_fb + classifier_fb) / 2) / dit_doubled,
            "cheap": (dit_doubled + cheap_fb + classifier_fb) / dit_doubled}


def mean_step_seconds(run) -> float:
    """Mean seconds per step after the first (which also carries the one-off checks)."""
    stamps = []
    run(lambda state: stamps.append(time.perf_counter()))
    return statistics.mean(b - a for a, b in zip(stamps, stamps[1:]))


def test_step_cost(benchmark):
    torch.manual_seed(0)
    dit = DiT_models["DiT-S/2"](input_size=16).eval().requires_grad_(False)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**SMALL_VAE).eval().requires_grad_(False)
    decoder, cheap = VAEDecoder(vae), cheap_decoder()
    classifier = torchvision.models.resnet18().eval()
    guide = ClassifierGuidance(classifier, softplus_beta=3.0, joint_temperature=1.0, marginal_temperature=0.5)
    seeds = list(range(BATCH))
    rnd = StackedRandomGenerator("cpu", seeds)
    latents, labels = rnd.randn([BATCH, 4, 16, 16]), rnd.randint(1000, size=[BATCH])

    def sampler(**kwargs):
        return lambda callback: dit_sampler(dit, latents, labels, decoder=decoder, timestep_respacing=str(STEPS),
                                            randn_like=StackedRandomGenerator("cpu", seeds).randn_like,
                                            callback=callback, **kwargs)

    variants = {
        "cfg": sampler(),
        "full": sampler(guidance=guide),
        # Guided at steps 0, 2, 4: two of the four timed steps.
        "every2": sampler(guidance=guide, guidance_interval=GuidanceInterval(every=2)),
        "cheap": sampler(guidance=guide, guidance_decoder=cheap),
        "full_checkpointed": sampler(guidance=guide, decoder_checkpointing=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):  # interleaved: machine noise hits every variant alike
        for name, run in variants.items():
            times[name].append(mean_step_seconds(run))
    step = {name: statistics.median(values) for name, values in times.items()}

    z = torch.cat([latents, latents])
    t, y = torch.zeros(2 * BATCH, dtype=torch.long), torch.cat([labels, torch.full_like(labels, 1000)])
    with torch.no_grad():
        images = decoder(latents)
        dit_doubled = count_flops(lambda: dit(z, t, y)) / BATCH
    decoder_fb = forward_backward_flops(decoder, latents) / BATCH
    cheap_fb = forward_backward_flops(cheap, latents) / BATCH
    classifier_fb = forward_backward_flops(guide.classifier, images) / BATCH
    predicted = flop_model(dit_doubled, decoder_fb, classifier_fb, cheap_fb)
    measured = {name: step[name] / step["cfg"] for name in step}
    info = {f"{name}_step_s": step[name] for name in step}
    info.update({f"{name}_over_cfg": measured[name] for name in measured})
    info.update({f"{name}_flop_model": predicted[name] for name in predicted})
    info.update(dit_doubled_gflops=dit_doubled / 1e9, decoder_fwd_bwd_gflops=decoder_fb / 1e9,
                cheap_fwd_bwd_gflops=cheap_fb / 1e9, classifier_fwd_bwd_gflops=classifier_fb / 1e9)
    benchmark.extra_info.update(info)
    print(f"\n[DiT-S/2 16x16 latents, small VAE 128px, ResNet-18, batch {BATCH}, 1 thread] per image per step: "
          f"DiT x2 {dit_doubled / 1e9:.2f} GF, decoder fwd+bwd {decoder_fb / 1e9:.2f} GF, "
          f"cheap decoder fwd+bwd {cheap_fb / 1e9:.3f} GF, classifier fwd+bwd {classifier_fb / 1e9:.2f} GF")
    for name in step:
        model = f"(FLOP model {predicted[name]:.2f})" if name in predicted else ""
        print(f"  {name:18s} {step[name] * 1e3:8.1f} ms/step  x{measured[name]:.2f} of CFG-only {model}")
    benchmark.pedantic(variants["full"], args=(None,), rounds=1, iterations=1)


def test_flop_model_paper_checkpoints(benchmark):
    """The FLOP model for DiT-XL/2 at 256 x 256 (32 x 32 latents), the sd-vae-ft-ema decoder and
    ResNet-101 at 256 x 256, counted on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        dit = DiT_models["DiT-XL/2"](input_size=32).requires_grad_(False)
        vae = AutoencoderKL(**SD_VAE_CONFIG).requires_grad_(False)
        classifier = torchvision.models.resnet101().requires_grad_(False)
        z = torch.empty(2, 4, 32, 32)
        timesteps = labels = torch.zeros(2, dtype=torch.long)
        dit_doubled = count_flops(lambda: dit(z, timesteps, labels))
        decoder_fb = forward_backward_flops(VAEDecoder(vae), z[:1])
        classifier_fb = forward_backward_flops(classifier, torch.empty(1, 3, 256, 256))
    predicted = flop_model(dit_doubled, decoder_fb, classifier_fb, cheap_fb=0)
    info = dict(dit_xl2_doubled_gflops=dit_doubled / 1e9, sd_vae_decoder_fwd_bwd_gflops=decoder_fb / 1e9,
                resnet101_fwd_bwd_gflops=classifier_fb / 1e9, full_flop_model=predicted["full"],
                every2_flop_model=predicted["every2"], classifier_only_flop_model=predicted["cheap"])
    benchmark.extra_info.update(info)
    print(f"\n[paper networks, per image per step] DiT-XL/2 x2 {dit_doubled / 1e9:.0f} GF, sd-vae decoder fwd+bwd "
          f"{decoder_fb / 1e9:.0f} GF, ResNet-101 fwd+bwd {classifier_fb / 1e9:.1f} GF -> guided/CFG-only: "
          f"every step x{predicted['full']:.2f}, every 2nd x{predicted['every2']:.2f}, "
          f"decoder-free limit x{predicted['cheap']:.2f}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
