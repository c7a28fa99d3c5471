"""DiT latent sampling with classifier-free guidance and off-the-shelf classifier guidance
(paper Algorithm 3, SPEC §5).

Per step t = T-1 ... 0 of the respaced chain, DiT predicts eps_c (class y) and eps_u (the "no
class" label) in one doubled batch, as the DiT repository's `forward_with_cfg` does; the learned
variance comes from the conditional half. With CFG scale s and the pixel-space objective J:

    z0      = (z_t - sqrt(1 - abar_t) * eps_c) / sqrt(abar_t)
    g       = grad_{z0} J(Dec(z0 / 0.18215))          # rule 1: the decoder is part of the classifier
    gn      = g * rms(eps_c - eps_u) / rms(g)          # rule 2: as large as the CFG difference
    gamma_t = guidance_scale * (1 + gamma_factor * sin(pi t / T))
    eps'    = eps_u + s * ((eps_c - eps_u) - gamma_t * gn)

and eps' takes the place of eps in ADM's ancestral (learned-range variance) or DDIM step. With
`cfg_channels=3` the combination covers the first 3 of the 4 latent channels and the last one
keeps eps_c, exactly as DiT's released sampler (reference FID 2.27) does; the classifier term is
confined to the same channels, with rms taken over them.

gamma_t is our definition: the paper names a "sine-added" schedule and gives no formula for DiT.
Because gn is already scaled to the CFG difference, which carries each step's natural size, the
base of the schedule is a constant ratio (guidance_scale) and the sine term of SPEC §3-4 adds a
bump over the first half to the middle of the chain, where the paper finds off-the-shelf
classifiers well calibrated (its motivation for the sine schedule). The
defaults guidance_scale=0.1 and gamma_factor=0.3 are ours, not the paper's (its DiT settings
did not survive); 0.3 is the paper's sine factor for DDPM and EDM.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..checks import NonFiniteTracker, check_bool, check_int, check_latents, check_number, check_state_dtype, class_ids
from ..guidance.latent import SD_LATENT_SCALE, Decoder, LatentGuidance, module_dtype
from ..guidance.schedules import GuidanceInterval, sine_factor
from ..guidance.update import dit_guided_difference
from ..schedules.gaussian_diffusion import (BETA_SCHEDULES, ancestral_step, ddim_step, model_log_variance,
                                            posterior_mean, predict_x0)
from .step_plans import NO_EXTRA, step_network_kwargs
from .settings import RespacedChain, SamplerSettings, resolve_settings, setting, with_settings_signature


@dataclass(frozen=True)
class DiTSettings(RespacedChain, SamplerSettings):
    """DiT's sampler settings (facebookresearch/DiT `sample.py`: 250 respaced steps, CFG 1.5 on 3 of
    4 latent channels) plus EluCD's latent guidance (SPEC §5; its strengths are our defaults)."""

    name: ClassVar[str] = "dit"

    cfg_scale: float = setting(1.5, "Classifier-free guidance scale s (1 without guidance: the conditional half only)")
    cfg_channels: int | None = setting(3, "CFG (and the classifier term) on the first k latent channels, as DiT's "
                                          "forward_with_cfg (3) [None: all]")
    guidance_scale: float = setting(0.1, "gamma_t's base: the classifier term's size (ours, untuned)",
                                    unit="multiples of rms(eps_c - eps_u)", guidance=True)
    gamma_factor: float = setting(0.3, "Sine-added fraction of gamma_t (ours; the paper's 0.3 for DDPM/EDM)",
                                  unit="fraction of guidance_scale", guidance=True)
    num_timesteps: int = setting(1000, "Steps T of the diffusion the model was trained with")
    beta_schedule: str = setting("linear", "ADM's beta schedule: linear (ADM 128/256/512, DiT) or cosine (ADM 64)",
                                 choices=BETA_SCHEDULES)
    timestep_respacing: str | tuple[int, ...] | None = setting(
        "250", "Respaced chain: '250', '10,15,20' (per equal section), 'ddim25' (even stride) [None: all T]")
    timesteps: tuple[int, ...] | None = setting(
        None, "Explicit timesteps: distinct integers of 0..T-1, any order, run descending; they replace "
              "timestep_respacing [None: the respacing]")
    use_ddim: bool = setting(False, "DDIM steps instead of ancestral sampling")
    eta: float = setting(0.0, "DDIM stochasticity")
    latent_scale: float = setting(SD_LATENT_SCALE, "Latents are divided by it before decoding")
    guidance_interval: GuidanceInterval | None = setting(None, "Which steps are guided, START:STOP:EVERY (step 0: the first, noisiest) [None: every step]",
                                                         guidance=True)
    decoder_checkpointing: bool = setting(False, "Recompute the decoder's activations in the backward pass "
                                                 "(less memory, one more decoder forward)", guidance=True)

    def __post_init__(self):
        check_number("cfg_scale", self.cfg_scale, minimum=0)
        if self.cfg_channels is not None:
            check_int("cfg_channels", self.cfg_channels, minimum=1)
        check_number("guidance_scale", self.guidance_scale, minimum=0)
        check_number("gamma_factor", self.gamma_factor, minimum=0)
        check_bool("use_ddim", self.use_ddim)
        check_number("eta", self.eta, minimum=0)
        check_number("latent_scale", self.latent_scale, minimum=0, strict_minimum=True)
        self._check_guidance_interval()
        check_bool("decoder_checkpointing", self.decoder_checkpointing)
        self._check_chain()

    def gamma(self, step: int, num_steps: int) -> float:
        """gamma_t for respaced step t (T-1 ... 0) of T."""
        return dit_gamma(step, num_steps, self.guidance_scale, self.gamma_factor)


def dit_gamma(step: int, num_steps: int, guidance_scale: float, gamma_factor: float) -> float:
    """gamma_t = guidance_scale * (1 + gamma_factor * sin(pi t / T)) for respaced step t
    (T-1 ... 0) of T: the ratio of the classifier term to the CFG difference (our definition)."""
    return guidance_scale * (1 + gamma_factor * sine_factor(step, num_steps))


@torch.no_grad()
@with_settings_signature(DiTSettings)
def dit_sampler(
    dit,
    latents: torch.Tensor,
    class_labels: torch.Tensor,
    *,
    decoder: Decoder | None = None,
    guidance: Callable | None = None,
    guidance_labels: torch.Tensor | None = None,
    guidance_decoder: Decoder | None = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    null_label: int | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    step_runner: Callable[[Callable], Callable] | None = None,
    ops: StepOps | None = None,
    block_plans: Sequence | None = None,
    settings: DiTSettings | None = None,
    **kwargs,
) -> torch.Tensor:
    """Guided DiT sampling with classifier-free guidance (Algorithm 3).

    Args:
        dit: `dit(z, t, y)` -> (N, 2C, h, w) eps and learned-range variance values (or (N, C, h, w)
            eps, then ADM's fixed-large variance); t are the ORIGINAL integer timesteps (N,), y
            class ids (N,) where `null_label` means "no class". `elucd_fast.models.dit.DiT`.
        latents: (B, C, h, w) the starting z_T (standard normal), C = 4 for the SD VAE.
        class_labels: (B,) ids or (B, K) one-hot: DiT's classes, and the guidance targets unless
            `guidance_labels` is given.
        decoder: scaled-down latents -> images in [-1, 1] (`VAEDecoder(vae)`); needed for
            guidance unless `guidance_decoder` is given. The final latents are not decoded here:
            use `decode_latents(decoder, latents)`.
        guidance: pixel-space `ClassifierGuidance`/`CLIPGuidance` (or callable (x, labels) ->
            (grad, J)); None: CFG only.
        guidance_labels: (B,) targets of the guidance when they differ from DiT's classes (e.g.
            zeros, the target prompt of a `CLIPGuidance`).
        guidance_decoder: a cheaper decoder (any module mapping latents to images, e.g. a small
            distilled autoencoder) used for the gradient only, in place of `decoder`.
        randn_like: noise source, called once per step with a (B, C, h, w) tensor of the state
            dtype, so a per-seed generator makes every sample independent of its batch.
        null_label: the "no class" id; default `dit.num_classes` (DiT's convention).
        dtype: sampler state dtype, float32 (default) or float64; DiT gets its own parameter dtype.
        callback: called after each step with a dict: x, i, t, denoised (the guided z0),
            guidance_norm (rms of g over the guided channels, (B,)), J ((B,)); the last two are
            None on unguided steps.
        step_runner: maps `dit_step` to the function that runs it (compiled, CUDA graph);
            default: `dit_step` itself, eagerly.
        ops: the step's rule-2 update (the engine's fused version); default: plain PyTorch.
        block_plans: one block plan per step (`models.block_plan`), passed unread to the network
            call of that step as `block_plan=`, with `block_cache=` a dict this run owns; None (or a
            None entry) calls the network plainly.
        settings: a `DiTSettings`; the keyword arguments (cfg_scale, cfg_channels, guidance_scale,
            gamma_factor, num_timesteps, beta_schedule, timestep_respacing, timesteps, use_ddim, eta,
            latent_scale, guidance_interval, decoder_checkpointing) build one, or change it.
    Returns:
        (B, C, h, w) final latents in the state dtype (scaled, as DiT samples them).
    """
    settings = resolve_settings(DiTSettings, settings, kwargs)
    check_latents("latents", latents)
    dtype = check_state_dtype(dtype)
    batch, channels = latents.shape[:2]
    cfg_channels = channels if settings.cfg_channels is None else settings.cfg_channels
    if cfg_channels > channels:
        raise ValueError(f"cfg_channels: must be an integer in 1..{channels} or None, got {cfg_channels!r}")
    num_classes = getattr(dit, "num_classes", None)
    if null_label is None:
        if num_classes is None:
            raise ValueError("null_label: the model has no num_classes attribute; pass the 'no class' id")
        null_label = num_classes
    check_int("null_label", null_label, minimum=0)
    ids = class_ids(class_labels, batch, num_classes)
    if ids is None:
        raise ValueError("class_labels: DiT is class-conditional; pass labels")
    diffusion = settings.diffusion
    num_steps = diffusion.num_steps
    device = latents.device

    guided_steps = [False] * num_steps
    latent_guidance = target_ids = None
    if guidance is not None:
        gradient_decoder = guidance_decoder if guidance_decoder is not None else decoder
        if gradient_decoder is None:
            raise ValueError("decoder: latent guidance needs a decoder (or a guidance_decoder)")
        target_ids = ids if guidance_labels is None else class_ids(guidance_labels, batch, None)
        latent_guidance = LatentGuidance(guidance, gradient_decoder, latent_scale=settings.latent_scale,
                                         checkpointing=settings.decoder_checkpointing)
        latent_guidance.check_input(tuple(latents.shape[1:]), target_ids, device)
        guided_steps = (settings.guidance_interval or GuidanceInterval()).steps(num_steps)

    # Both halves of DiT's doubled batch are needed whenever eps_u enters eps'.
    paired = guidance is not None or settings.cfg_scale != 1
    model_labels = torch.cat([ids, torch.full_like(ids, null_label)]) if paired else ids
    step = step_runner(dit_step) if step_runner is not None else dit_step
    flags = dict(paired=paired, cfg_channels=cfg_channels, cfg_scale=settings.cfg_scale, use_ddim=settings.use_ddim,
                 eta=settings.eta, model_dtype=module_dtype(dit, dtype), **({"ops": ops} if ops is not None else {}))
    net_extras = step_network_kwargs(block_plans, num_steps)
    x = latents.to(dtype)
    non_finite = NonFiniteTracker(device)
    for i, t in enumerate(range(num_steps - 1, -1, -1)):
        coefficients = diffusion.step_coefficients(t, dtype, device)
        coefficients["gamma"] = torch.tensor(settings.gamma(t, num_steps), dtype=dtype, device=device)
        t_model = torch.full((len(model_labels),), int(diffusion.timestep_map[t]), dtype=torch.long, device=device)
        z = randn_like(x)
        x, x0, guidance_norm, objective = step(dit, latent_guidance, x, z, coefficients, t_model, model_labels,
                                               target_ids, guided=guided_steps[i], last=t == 0,
                                               net_extra=net_extras[i], **flags)
        non_finite.update(i, x)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0, "guidance_norm": guidance_norm, "J": objective})
    non_finite.check(x, num_steps, "check DiT, the decoder and, when guided, the classifier's logits and "
                     "cfg_scale / guidance_scale")
    return x


class StepOps(NamedTuple):
    """Rule 2's update of a DiT step, swappable for a fused kernel:
    `guided_difference(difference, g, gamma) -> (difference', rms(g))`."""

    guided_difference: Callable


PLAIN_OPS = StepOps(dit_guided_difference)


def dit_step(dit, latent_guidance: LatentGuidance | None, x: torch.Tensor, z: torch.Tensor,
             c: dict[str, torch.Tensor], t_model: torch.Tensor, model_labels: torch.Tensor,
             target_ids: torch.Tensor | None, *, guided: bool, last: bool, paired: bool, cfg_channels: int,
             cfg_scale: float, use_ddim: bool, eta: float, model_dtype: torch.dtype, ops: StepOps = PLAIN_OPS,
             net_extra: Mapping = NO_EXTRA):
    """One step of Algorithm 3 (ancestral, or DDIM): z_t (B, C, h, w) and its noise z -> z_{t-1}.

    `c` holds the schedule values at t and gamma_t as 0-d tensors; `model_labels` are the class
    ids, followed by the "no class" ids when `paired`; `ops` supplies rule 2's update (plain
    PyTorch by default; the engine may pass a fused kernel computing the same). Returns (z_prev, z0 from the guided eps,
    guidance_norm or None, J or None).
    """
    batch, channels = x.shape[:2]
    k = cfg_channels
    model_in = torch.cat([x, x]) if paired else x
    out = dit(model_in.to(model_dtype), t_model, model_labels, **net_extra).to(x.dtype)  # (N, 2C or C, h, w)
    if out.shape[1] not in (channels, 2 * channels):
        raise ValueError(f"dit: expected {channels} or {2 * channels} output channels, got {out.shape[1]}")
    eps_both = out[:, :channels]
    eps_c, eps_u = eps_both.chunk(2) if paired else (eps_both, eps_both)
    difference = eps_c[:, :k] - eps_u[:, :k]
    guidance_norm = objective = None
    if guided:
        g, objective = latent_guidance(predict_x0(c, x, eps_c), target_ids)
        difference, guidance_norm = ops.guided_difference(difference, g[:, :k], c["gamma"])
    # DiT's channels beyond cfg_channels keep the conditional prediction.
    eps = torch.cat([eps_u[:, :k] + cfg_scale * difference, eps_c[:, k:]], dim=1)
    x0 = predict_x0(c, x, eps)
    if use_ddim:
        return ddim_step(c, x0, eps, z, eta, last=last), x0, guidance_norm, objective
    # The variance comes from the conditional half, as DiT's sampler keeps it.
    var_values = out[:batch, channels:] if out.shape[1] == 2 * channels else None
    log_variance = model_log_variance(c, x, var_values)
    return ancestral_step(posterior_mean(c, x0, x), log_variance, z, last=last), x0, guidance_norm, objective


__all__ = ["DiTSettings", "PLAIN_OPS", "StepOps", "dit_gamma", "dit_sampler", "dit_step"]
