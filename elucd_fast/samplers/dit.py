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

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..guidance.schedules import GuidanceInterval, check_finite_number, sine_factor
from ._checks import check_latents, check_state_dtype, class_ids, per_sample, rms
from .gaussian_diffusion import GaussianDiffusion

# Stable Diffusion's latent scale: latents are VAE posterior samples times this factor.
SD_LATENT_SCALE = 0.18215

Decoder = Callable[[torch.Tensor], torch.Tensor]


class VAEDecoder(nn.Module):
    """A diffusers `AutoencoderKL` as a decoder: unscaled latents (B, 4, h, w) -> images
    (B, 3, 8h, 8w) in about [-1, 1]. The input is cast to the VAE's dtype."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).sample


@torch.no_grad()
def decode_latents(decoder: Decoder, latents: torch.Tensor, *, latent_scale: float = SD_LATENT_SCALE) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], in the latents' dtype, from scaled latents (B, 4, h, w)."""
    return decoder(latents / latent_scale).clamp(-1, 1).to(latents.dtype)


class LatentGuidance(nn.Module):
    """A pixel-space guidance seen from latent space (paper 5.3, rule 1): the decoder is the first
    layer of the classifier, so

        grad_{z0} J(Dec(z0 / latent_scale)) = (dDec / dz0)^T grad_x J(x),  x = Dec(z0 / latent_scale)

    computed as one vector-Jacobian product through the decoder; nothing flows into the
    diffusion network.

    Args:
        guidance: pixel-space guidance, `guidance(x, labels) -> (grad_x J, J)` (a
            `ClassifierGuidance` or `CLIPGuidance`).
        decoder: scaled-down latents -> images in [-1, 1]; the real VAE or a cheaper stand-in.
        latent_scale: latents are divided by it before decoding.
        checkpointing: gradient checkpointing of the decoder (`torch.utils.checkpoint`): its
            activations are recomputed in the backward pass instead of being kept through the
            classifier's forward and backward (one more decoder forward). This path runs eager
            autograd, as does a decoder with its own block checkpointing (diffusers'
            `vae.enable_gradient_checkpointing()`, which needs it); the default path uses
            `torch.func.vjp`, which also runs under torch.compile and CUDA-graph capture but
            refuses checkpointing's saved-tensor hooks.

    Calling it with z0 (B, C, h, w) and labels returns (grad, J): grad_{z0} J in z0's shape and
    dtype, and J (B,) as the pixel-space guidance returns it.
    """

    def __init__(self, guidance: Callable, decoder: Decoder, *, latent_scale: float = SD_LATENT_SCALE,
                 checkpointing: bool = False):
        super().__init__()
        self.guidance = guidance
        self.decoder = decoder
        self.latent_scale = check_finite_number("latent_scale", latent_scale)
        if self.latent_scale <= 0:
            raise ValueError(f"latent_scale: must be > 0, got {latent_scale!r}")
        self.checkpointing = bool(checkpointing)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) of scaled latents z (B, C, h, w)."""
        return self.decoder(z / self.latent_scale)

    def check_input(self, latent_shape: tuple[int, ...], labels: torch.Tensor, device: torch.device | str) -> None:
        """Runs once before sampling: decodes one zero latent of `latent_shape` (C, h, w) to learn
        the image shape, then lets the pixel-space guidance check images of that shape and the
        labels."""
        with torch.no_grad():
            images = self.decode(torch.zeros((1, *latent_shape), device=device,
                                             dtype=_input_dtype(self.decoder, torch.float32)))
        if images.ndim != 4:
            raise ValueError(f"decoder: expected images (B, C, H, W), got shape {tuple(images.shape)}")
        if hasattr(self.guidance, "check_input"):
            self.guidance.check_input(tuple(images.shape[1:]), labels, device)

    def forward(self, z0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_in = z0.detach().to(_input_dtype(self.decoder, z0.dtype))
        if self.checkpointing:
            with torch.enable_grad():
                z_in.requires_grad_(True)
                images = checkpoint(self.decode, z_in, use_reentrant=False)
                # The guidance gets a detached copy: its own backward must not run into the decoder.
                image_grad, objective = self.guidance(images.detach(), labels)
                (grad,) = torch.autograd.grad(images, z_in, grad_outputs=image_grad.to(images.dtype))
        else:
            try:
                images, pullback = torch.func.vjp(self.decode, z_in)
            except RuntimeError as err:
                if "saved tensor hooks" not in str(err):
                    raise
                raise RuntimeError("decoder: it checkpoints its own blocks, which torch.func.vjp cannot run; "
                                   "use decoder_checkpointing=True (LatentGuidance(checkpointing=True))") from err
            image_grad, objective = self.guidance(images, labels)
            (grad,) = pullback(image_grad.to(images.dtype))
        return grad.to(z0.dtype), objective


def dit_gamma(step: int, num_steps: int, guidance_scale: float, gamma_factor: float) -> float:
    """gamma_t = guidance_scale * (1 + gamma_factor * sin(pi t / T)) for respaced step t
    (T-1 ... 0) of T: the ratio of the classifier term to the CFG difference (our definition)."""
    return guidance_scale * (1 + gamma_factor * sine_factor(step, num_steps))


def _input_dtype(module, default: torch.dtype) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (DiT may run in bf16 or fp16 while
    the sampler state stays float32); `default` for parameterless callables."""
    parameters = getattr(module, "parameters", None)
    for p in parameters() if callable(parameters) else ():
        if p.is_floating_point():
            return p.dtype
    return default


@torch.no_grad()
def dit_sampler(
    dit,
    latents: torch.Tensor,
    class_labels: torch.Tensor,
    *,
    decoder: Decoder | None = None,
    guidance: Callable | None = None,
    guidance_labels: torch.Tensor | None = None,
    cfg_scale: float = 1.5,
    cfg_channels: int | None = 3,
    guidance_scale: float = 0.1,
    gamma_factor: float = 0.3,
    num_timesteps: int = 1000,
    beta_schedule: str = "linear",
    timestep_respacing: str | list[int] | None = "250",
    use_ddim: bool = False,
    eta: float = 0.0,
    latent_scale: float = SD_LATENT_SCALE,
    guidance_interval: GuidanceInterval | None = None,
    decoder_checkpointing: bool = False,
    guidance_decoder: Decoder | None = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    null_label: int | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    step_runner: Callable[[Callable], Callable] | None = None,
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
        cfg_scale: s. cfg_scale=1 without guidance runs the conditional half only.
        cfg_channels: CFG (and the classifier term) on the first `cfg_channels` latent channels,
            as DiT's `forward_with_cfg` (3); None: all channels.
        guidance_scale, gamma_factor: gamma_t = guidance_scale * (1 + gamma_factor * sin(pi t/T)),
            in units of the CFG difference rms(eps_c - eps_u).
        num_timesteps, beta_schedule, timestep_respacing: the diffusion (DiT: 1000, "linear", "250").
        use_ddim, eta: DDIM sampling with stochasticity eta instead of ancestral sampling.
        latent_scale: z0 / latent_scale is what the decoder gets.
        guidance_interval: which steps are guided (step i counts from 0 at t = T-1); the other
            steps run no decoder and no classifier at all (plain CFG).
        decoder_checkpointing: recompute the decoder's activations in the backward pass.
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
    Returns:
        (B, C, h, w) final latents in the state dtype (scaled, as DiT samples them).
    """
    check_latents("latents", latents)
    dtype = check_state_dtype(dtype)
    cfg_scale = check_finite_number("cfg_scale", cfg_scale, minimum=0)
    check_finite_number("guidance_scale", guidance_scale, minimum=0)
    check_finite_number("gamma_factor", gamma_factor, minimum=0)
    check_finite_number("eta", eta, minimum=0)
    batch, channels = latents.shape[:2]
    if cfg_channels is None:
        cfg_channels = channels
    if isinstance(cfg_channels, bool) or not isinstance(cfg_channels, int) or not 1 <= cfg_channels <= channels:
        raise ValueError(f"cfg_channels: must be an integer in 1..{channels} or None, got {cfg_channels!r}")
    num_classes = getattr(dit, "num_classes", None)
    if null_label is None:
        if num_classes is None:
            raise ValueError("null_label: the model has no num_classes attribute; pass the 'no class' id")
        null_label = num_classes
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise ValueError(f"null_label: must be an integer id >= 0, got {null_label!r}")
    ids = class_ids(class_labels, batch, num_classes)
    if ids is None:
        raise ValueError("class_labels: DiT is class-conditional; pass labels")
    diffusion = GaussianDiffusion.create(num_timesteps, beta_schedule, timestep_respacing)
    num_steps = diffusion.num_steps
    device = latents.device

    guided_steps = [False] * num_steps
    latent_guidance = target_ids = None
    if guidance is not None:
        gradient_decoder = guidance_decoder if guidance_decoder is not None else decoder
        if gradient_decoder is None:
            raise ValueError("decoder: latent guidance needs a decoder (or a guidance_decoder)")
        target_ids = ids if guidance_labels is None else class_ids(guidance_labels, batch, None)
        latent_guidance = LatentGuidance(guidance, gradient_decoder, latent_scale=latent_scale,
                                         checkpointing=decoder_checkpointing)
        latent_guidance.check_input(tuple(latents.shape[1:]), target_ids, device)
        guided_steps = (guidance_interval or GuidanceInterval()).steps(num_steps)

    # Both halves of DiT's doubled batch are needed whenever eps_u enters eps'.
    paired = guidance is not None or cfg_scale != 1
    model_labels = torch.cat([ids, torch.full_like(ids, null_label)]) if paired else ids
    step = step_runner(dit_step) if step_runner is not None else dit_step
    settings = dict(paired=paired, cfg_channels=cfg_channels, cfg_scale=cfg_scale, use_ddim=use_ddim, eta=eta,
                    model_dtype=_input_dtype(dit, dtype))
    x = latents.to(dtype)
    for i, t in enumerate(range(num_steps - 1, -1, -1)):
        coefficients = diffusion.step_coefficients(t, dtype, device)
        coefficients["gamma"] = torch.tensor(dit_gamma(t, num_steps, guidance_scale, gamma_factor), dtype=dtype,
                                             device=device)
        t_model = torch.full((len(model_labels),), int(diffusion.timestep_map[t]), dtype=torch.long, device=device)
        z = randn_like(x)
        x, x0, guidance_norm, objective = step(dit, latent_guidance, x, z, coefficients, t_model, model_labels,
                                               target_ids, guided=guided_steps[i], last=t == 0, **settings)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0, "guidance_norm": guidance_norm, "J": objective})
    return x


def dit_step(dit, latent_guidance: LatentGuidance | None, x: torch.Tensor, z: torch.Tensor,
             c: dict[str, torch.Tensor], t_model: torch.Tensor, model_labels: torch.Tensor,
             target_ids: torch.Tensor | None, *, guided: bool, last: bool, paired: bool, cfg_channels: int,
             cfg_scale: float, use_ddim: bool, eta: float, model_dtype: torch.dtype):
    """One step of Algorithm 3 (ancestral, or DDIM): z_t (B, C, h, w) and its noise z -> z_{t-1}.

    `c` holds the schedule values at t and gamma_t as 0-d tensors; `model_labels` are the class
    ids, followed by the "no class" ids when `paired`. Returns (z_prev, z0 from the guided eps,
    guidance_norm or None, J or None).
    """
    batch, channels = x.shape[:2]
    k = cfg_channels
    model_in = torch.cat([x, x]) if paired else x
    out = dit(model_in.to(model_dtype), t_model, model_labels).to(x.dtype)  # (N, 2C or C, h, w)
    if out.shape[1] not in (channels, 2 * channels):
        raise ValueError(f"dit: expected {channels} or {2 * channels} output channels, got {out.shape[1]}")
    eps_both = out[:, :channels]
    eps_c, eps_u = eps_both.chunk(2) if paired else (eps_both, eps_both)
    difference = eps_c[:, :k] - eps_u[:, :k]
    guidance_norm = objective = None
    if guided:
        z0 = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps_c
        g, objective = latent_guidance(z0, target_ids)
        g = g.to(x.dtype)[:, :k]
        guidance_norm = rms(g)
        # rms(g) = 0 means g = 0: clamping the divisor keeps that sample's term exactly 0.
        gn = g * per_sample(rms(difference) / guidance_norm.clamp_min(torch.finfo(x.dtype).tiny), g)
        difference = difference - c["gamma"] * gn
    # DiT's channels beyond cfg_channels keep the conditional prediction.
    eps = torch.cat([eps_u[:, :k] + cfg_scale * difference, eps_c[:, k:]], dim=1)
    x0 = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps
    if use_ddim:
        abar, abar_prev = c["alphas_cumprod"], c["alphas_cumprod_prev"]
        sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        x_prev = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).sqrt() * eps
        return (x_prev if last else x_prev + sigma * z), x0, guidance_norm, objective
    if out.shape[1] == 2 * channels:
        # The variance comes from the conditional half, as DiT's sampler keeps it.
        frac = (out[:batch, channels:] + 1) / 2
        log_variance = frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance_clipped"]
    else:
        log_variance = c["fixed_large_log_variance"].expand_as(x)
    mean = c["posterior_mean_coef1"] * x0 + c["posterior_mean_coef2"] * x
    x_prev = mean if last else mean + (0.5 * log_variance).exp() * z
    return x_prev, x0, guidance_norm, objective


__all__ = ["SD_LATENT_SCALE", "LatentGuidance", "VAEDecoder", "decode_latents", "dit_gamma", "dit_sampler", "dit_step"]
