"""diffusers integration: EluCD guidance for diffusers' DiT and UNet pipelines, run by our own
samplers (no second copy of a sampling loop).

A diffusers pipeline is a network, a scheduler and a loop. Here the network becomes ADM's
eps-model interface `model(x, t, y)` (`DiffusersEpsModel`), the scheduler's chain becomes the
arguments of our `GaussianDiffusion` (`scheduler_chain`), and `ddpm_sampler` (SPEC §3) or
`dit_sampler` (SPEC §5) runs the loop. Only chains that map exactly are accepted:

- schedulers: `DDPMScheduler` (ancestral) and `DDIMScheduler` (DDIM with eta);
- betas equal to ADM's "linear" or "cosine" (diffusers' "squaredcos_cap_v2") schedule, to the
  float32 rounding of diffusers' own betas; no thresholding, no zero-SNR rescaling;
- the inference timesteps equal one of ADM's respacings (all steps, "ddimN" — diffusers'
  "leading" spacing with steps_offset 0 when N divides T — or "N", its "linspace" spacing),
  with each step's previous timestep as diffusers takes it, and DDIM's final alpha one;
- variance types fixed_small(_log), fixed_large and learned_range; predictions epsilon,
  sample and v_prediction (turned into eps by exact algebra); clipping off, or to [-1, 1].
Anything else is refused with the reason, never approximated.

With clipping, DDIM here is ADM's: eps is recomputed from the clipped x0, which is diffusers'
`use_clipped_model_output=True`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..guidance.schedules import GuidanceInterval
from ..samplers.ddpm import ddpm_sampler
from ..guidance.latent import VAEDecoder, decode_latents
from ..samplers.dit import dit_sampler
from ..schedules.gaussian_diffusion import BETA_SCHEDULES, GaussianDiffusion

VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  "learned_range": "learned_range"}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# diffusers keeps betas in float32; ADM's are float64.
BETA_RTOL = 1e-5


@dataclass(frozen=True)
class SchedulerChain:
    """A diffusers DDPM/DDIM scheduler's chain in our sampler's terms.

    num_timesteps, beta_schedule, timestep_respacing: the `GaussianDiffusion` arguments.
    use_ddim: DDIM (deterministic up to eta) instead of ancestral steps.
    clip_denoised: x0 clamped to [-1, 1].
    variance: "fixed_small", "fixed_large" or "learned_range" (ancestral); None for DDIM.
    prediction_type: what the network predicts ("epsilon", "sample", "v_prediction").
    """

    num_timesteps: int
    beta_schedule: str
    timestep_respacing: str | None
    use_ddim: bool
    clip_denoised: bool
    variance: str | None
    prediction_type: str

    @property
    def learn_sigma(self) -> bool:
        """Whether the eps-model output carries ADM variance values (fixed_small is expressed as
        the learned range's lower end, -1)."""
        return self.variance in ("fixed_small", "learned_range")

    def diffusion(self) -> GaussianDiffusion:
        """The un-respaced chain (the network's own timesteps)."""
        return GaussianDiffusion.create(self.num_timesteps, self.beta_schedule, None)

    def sampler_kwargs(self) -> dict[str, object]:
        """The chain as keyword arguments of `ddpm_sampler` / `dit_sampler`."""
        return dict(num_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                    timestep_respacing=self.timestep_respacing, use_ddim=self.use_ddim)


def _refuse(what: str, why: str) -> ValueError:
    return ValueError(f"scheduler: {what} has no exact equivalent in ADM's chain ({why}); "
                      "use a DDPMScheduler/DDIMScheduler with linear or squaredcos_cap_v2 betas and "
                      "'leading' (steps_offset 0) or 'linspace' spacing")


def scheduler_chain(scheduler, num_inference_steps: int, *, allow_clipping: bool = True) -> SchedulerChain:
    """Maps a diffusers `DDPMScheduler` or `DDIMScheduler` to our chain, after calling its
    `set_timesteps(num_inference_steps)` (as a pipeline would). Raises ValueError naming the
    setting when the chain has no exact equivalent (see the module docstring).

    `allow_clipping=False` refuses clip_sample (latent chains are never clipped)."""
    kind = type(scheduler).__name__
    if kind not in ("DDPMScheduler", "DDIMScheduler"):
        raise ValueError(f"scheduler: {kind} is not supported; use DDPMScheduler or DDIMScheduler "
                         "(or the k-diffusion integration for Karras-style samplers)")
    config = scheduler.config
    num_timesteps = int(config.num_train_timesteps)
    if config.get("thresholding", False):
        raise _refuse("thresholding=True", "ADM clips x0 to [-1, 1] or not at all")
    if config.get("rescale_betas_zero_snr", False):
        raise _refuse("rescale_betas_zero_snr=True", "ADM's schedules keep a nonzero final SNR")
    clip = bool(config.get("clip_sample", False))
    if clip and not allow_clipping:
        raise _refuse("clip_sample=True", "latents are not clipped; set clip_sample=False")
    if clip and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise _refuse(f"clip_sample_range={config.clip_sample_range}", "ADM clips to [-1, 1]")
    if config.prediction_type not in PREDICTION_TYPES:
        raise _refuse(f"prediction_type={config.prediction_type!r}", f"expected one of {PREDICTION_TYPES}")
    betas = scheduler.betas.detach().to("cpu", torch.float64).numpy()
    # The betas decide, whatever the config calls them (trained_betas may equal ADM's too).
    beta_schedule = next((name for name in BETA_SCHEDULES if np.allclose(
        betas, GaussianDiffusion.create(num_timesteps, name, None).betas, rtol=BETA_RTOL, atol=0)), None)
    if beta_schedule is None:
        raise _refuse(f"beta_schedule={config.beta_schedule!r} (beta_start={config.beta_start}, "
                      f"beta_end={config.beta_end})",
                      "the betas differ from ADM's linear (scaled to 1000/T) and cosine schedules")
    use_ddim = kind == "DDIMScheduler"
    if use_ddim:
        variance = None
    else:
        variance = VARIANCE_TYPES.get(config.variance_type)
        if variance is None:
            raise _refuse(f"variance_type={config.variance_type!r}",
                          "supported: fixed_small, fixed_small_log, fixed_large, learned_range")

    scheduler.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    kept = sorted(timesteps)
    if use_ddim:
        stride = num_timesteps // scheduler.num_inference_steps
        previous = {t: t - stride for t in timesteps}
        final_one = bool(config.get("set_alpha_to_one", True))
    else:
        previous = {t: (timesteps[k + 1] if k + 1 < len(timesteps) else -1) for k, t in enumerate(timesteps)}
        final_one = True
    # diffusers steps from t to previous[t]; ADM's respaced chain from each kept timestep to the
    # one below it, and from the lowest to alpha-bar 1.
    consistent = final_one and previous[kept[0]] < 0 and all(previous[b] == a for a, b in zip(kept, kept[1:]))
    respacing = None
    if consistent:
        n = len(kept)
        for candidate in (None, f"ddim{n}", str(n)):
            try:
                chain = GaussianDiffusion.create(num_timesteps, beta_schedule, candidate)
            except ValueError:
                continue
            if [int(t) for t in chain.timestep_map] == kept:
                respacing = candidate if candidate is not None else ""
                break
    if respacing is None:
        raise _refuse(f"{kind} with timestep_spacing={config.get('timestep_spacing')!r}, "
                      f"steps_offset={config.get('steps_offset', 0)}, set_alpha_to_one={config.get('set_alpha_to_one')} "
                      f"at {num_inference_steps} steps (timesteps {timesteps[:3]} ... {timesteps[-3:]})",
                      "its timesteps or step targets are not one of ADM's respacings")
    return SchedulerChain(num_timesteps=num_timesteps, beta_schedule=beta_schedule, timestep_respacing=respacing or None,
                          use_ddim=use_ddim, clip_denoised=clip, variance=variance,
                          prediction_type=config.prediction_type)


class DiffusersEpsModel(nn.Module):
    """A diffusers network (`UNet2DModel`, `DiTTransformer2DModel`, anything called as
    `model(x, t, class_labels=y).sample`) as ADM's eps-model `model(x, t, y)`.

    Args:
        model: the diffusers network; its output is the chain's prediction type on the first C
            channels, optionally followed by C learned-range variance values (DiT).
        chain: the scheduler's chain (`scheduler_chain`), which says how to read the output.
        class_conditional: whether the network takes class ids; default: DiT always, a UNet when
            it has a class embedding. `num_classes` is the id count when known (DiT: the "no
            class" id is `num_classes`).

    forward(x (B, C, H, W), t (B,) original integer timesteps, y (B,) ids or None) returns eps
    (B, C, H, W), with C variance values appended when `chain.learn_sigma`: the network's own for
    learned_range, -1 (the posterior variance) for fixed_small.
    """

    def __init__(self, model: nn.Module, chain: SchedulerChain, *, class_conditional: bool | None = None):
        super().__init__()
        self.model = model
        self.chain = chain
        config = model.config
        self.channels = int(config.in_channels)
        out_channels = config.get("out_channels") or self.channels
        if out_channels not in (self.channels, 2 * self.channels):
            raise ValueError(f"model: expected {self.channels} or {2 * self.channels} output channels, got {out_channels}")
        if chain.variance == "learned_range" and out_channels != 2 * self.channels:
            raise ValueError("model: variance_type learned_range needs a network with variance channels "
                             f"({2 * self.channels} outputs); this one has {out_channels}")
        if "num_embeds_ada_norm" in config:  # DiT: class ids, "no class" = num_classes
            self.num_classes = int(config.num_embeds_ada_norm)
            conditional = True
        else:
            if config.get("class_embed_type") == "identity" or config.get("class_embed_type") == "projection":
                raise ValueError(f"model: class_embed_type={config.class_embed_type!r} takes class vectors, not ids")
            self.num_classes = config.get("num_class_embeds")
            conditional = getattr(model, "class_embedding", None) is not None
        self.class_conditional = conditional if class_conditional is None else class_conditional
        alphas_cumprod = torch.from_numpy(chain.diffusion().alphas_cumprod)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        kwargs = {"class_labels": y} if self.class_conditional else {}
        out = self.model(x.to(dtype), t, **kwargs).sample.to(x.dtype)
        prediction, variance_values = out[:, :self.channels], out[:, self.channels:]
        if self.chain.prediction_type != "epsilon":
            abar = self.alphas_cumprod.to(x.device)[t].to(x.dtype).reshape(-1, 1, 1, 1)
            if self.chain.prediction_type == "sample":
                prediction = (x - abar.sqrt() * prediction) / (1 - abar).sqrt()
            else:  # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  eps = sqrt(abar) v + sqrt(1 - abar) x_t
                prediction = abar.sqrt() * prediction + (1 - abar).sqrt() * x
        if self.chain.variance == "learned_range":
            return torch.cat([prediction, variance_values], dim=1)
        if self.chain.variance == "fixed_small":
            return torch.cat([prediction, torch.full_like(prediction, -1.0)], dim=1)
        return prediction


def _noise_source(generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """randn_like drawing from a diffusers-style generator (one, a list of one per sample, or
    None for the global one) as diffusers' `randn_tensor` does."""
    from diffusers.utils.torch_utils import randn_tensor

    return lambda x: randn_tensor(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)


def _pipeline_output(pipe, images: torch.Tensor, output_type: str, return_dict: bool):
    """images (B, C, H, W) in [0, 1] formatted as diffusers pipelines do."""
    from diffusers import ImagePipelineOutput

    if output_type not in ("pt", "np", "pil"):
        raise ValueError(f"output_type: expected 'pt', 'np' or 'pil', got {output_type!r}")
    if output_type != "pt":
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            images = pipe.numpy_to_pil(images)
    return ImagePipelineOutput(images=images) if return_dict else (images,)


def _execution_device(pipe) -> torch.device:
    # Pipelines with model offloading run on `_execution_device`, not `device`.
    return getattr(pipe, "_execution_device", None) or pipe.device


def guided_dit_pipeline(
    pipe,
    class_labels: Sequence[int] | torch.Tensor,
    *,
    guidance: Callable | None = None,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 50,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    classifier_scale: float = 0.1,
    gamma_factor: float = 0.3,
    cfg_channels: int | None = None,
    eta: float = 0.0,
    guidance_interval: GuidanceInterval | None = None,
    decoder_checkpointing: bool = False,
    guidance_decoder: Callable | None = None,
    output_type: str = "pil",
    return_dict: bool = True,
    callback: Callable[[dict], None] | None = None,
):
    """diffusers' `DiTPipeline.__call__` with calibrated classifier guidance through the VAE
    decoder (Algorithm 3, SPEC §5), run by `dit_sampler`.

    Args:
        pipe: a `DiTPipeline` (transformer, vae, scheduler: DDIM or DDPM, mapped exactly).
        class_labels: B class ids.
        guidance: pixel-space `ClassifierGuidance` (or callable (x, labels) -> (grad, J)); None
            gives the pipeline's own CFG sampling.
        guidance_scale: the CFG scale, as diffusers names it; CFG runs when it is > 1.
        num_inference_steps, generator, latents, output_type, return_dict: as diffusers'.
        classifier_scale, gamma_factor: gamma_t = classifier_scale * (1 + gamma_factor *
            sin(pi t / T)) in units of the CFG difference (`dit_sampler`'s guidance_scale).
        cfg_channels: CFG and classifier term on the first channels only; None (all channels)
            is what `DiTPipeline` does, 3 what DiT's paper sampler does.
        eta: DDIM's stochasticity (DDIM schedulers only).
        guidance_interval, decoder_checkpointing, guidance_decoder: as `dit_sampler`.
        callback: `dit_sampler`'s per-step callback.
    Returns:
        `ImagePipelineOutput` (or a tuple) with images in [0, 1].
    """
    transformer, vae = pipe.transformer, pipe.vae
    chain = scheduler_chain(pipe.scheduler, num_inference_steps, allow_clipping=False)
    if not chain.use_ddim and eta:
        raise ValueError("eta: only DDIM schedulers take eta")
    device = _execution_device(pipe)
    ids = torch.as_tensor(class_labels, device=device).reshape(-1).long()
    size, channels = transformer.config.sample_size, transformer.config.in_channels
    if latents is None:
        latents = _noise_source(generator)(torch.empty((len(ids), channels, size, size), device=device,
                                                       dtype=transformer.dtype))
    model = DiffusersEpsModel(transformer, chain)
    decoder = VAEDecoder(vae)
    latent_scale = float(vae.config.scaling_factor)
    samples = dit_sampler(
        model, latents.to(device), ids, decoder=decoder, guidance=guidance,
        cfg_scale=guidance_scale if guidance_scale > 1 else 1.0, cfg_channels=cfg_channels,
        guidance_scale=classifier_scale, gamma_factor=gamma_factor, eta=eta, latent_scale=latent_scale,
        guidance_interval=guidance_interval, decoder_checkpointing=decoder_checkpointing,
        guidance_decoder=guidance_decoder, randn_like=_noise_source(generator), null_label=model.num_classes,
        callback=callback, **chain.sampler_kwargs())
    images = decode_latents(decoder, samples, latent_scale=latent_scale) / 2 + 0.5
    return _pipeline_output(pipe, images, output_type, return_dict)


def guided_ddpm_pipeline(
    pipe,
    *,
    guidance: Callable | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    batch_size: int | None = None,
    num_inference_steps: int = 1000,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    classifier_scale: float = 1.0,
    gamma_factor: float = 0.0,
    guidance_input: str = "x0",
    eta: float = 0.0,
    guidance_interval: GuidanceInterval | None = None,
    output_type: str = "pil",
    return_dict: bool = True,
    callback: Callable[[dict], None] | None = None,
):
    """diffusers' `DDPMPipeline`/`DDIMPipeline` (a `UNet2DModel`, conditional or not, and a
    DDPM or DDIM scheduler) with calibrated classifier guidance (Algorithm 1, SPEC §3), run by
    `ddpm_sampler`: x0 as the classifier input, mean shift s * (Sigma + a_t) * g with the
    sine-added variance a_t; DDIM in score form.

    Args:
        pipe: anything with `unet` and `scheduler` (a DDPMPipeline, a DDIMPipeline).
        guidance: `ClassifierGuidance` (or callable); None samples as the pipeline does.
        class_labels: B ids: the guidance targets, and the UNet's classes when it is
            class-conditional.
        batch_size: number of images when there are no labels (default 1).
        num_inference_steps, generator, output_type, return_dict: as diffusers'; the noise
            sequence equals the pipeline's for the same generator.
        noise: the starting x_T (B, C, H, W) instead of drawing it.
        classifier_scale: s; gamma_factor: gamma of the sine-added variance (ancestral only).
        guidance_input: "x0" (the paper) or "xt".
        eta: DDIM's stochasticity (DDIM schedulers only).
        guidance_interval, callback: as `ddpm_sampler`.
    Returns:
        `ImagePipelineOutput` (or a tuple) with images in [0, 1].
    """
    unet = pipe.unet
    chain = scheduler_chain(pipe.scheduler, num_inference_steps)
    if not chain.use_ddim and eta:
        raise ValueError("eta: only DDIM schedulers take eta")
    device = _execution_device(pipe)
    ids = None if class_labels is None else torch.as_tensor(class_labels, device=device).reshape(-1).long()
    model = DiffusersEpsModel(unet, chain)
    if model.class_conditional and ids is None:
        raise ValueError("class_labels: the UNet is class-conditional; pass labels")
    if noise is None:
        batch = len(ids) if ids is not None else (batch_size or 1)
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        noise = _noise_source(generator)(torch.empty((batch, unet.config.in_channels, *size), device=device,
                                                     dtype=unet.dtype))
    samples = ddpm_sampler(
        model, noise.to(device), ids, learn_sigma=chain.learn_sigma, clip_denoised=chain.clip_denoised,
        guidance=guidance, classifier_scale=classifier_scale, gamma_factor=gamma_factor,
        guidance_input=guidance_input, guidance_interval=guidance_interval, randn_like=_noise_source(generator),
        eta=eta, model_class_conditional=model.class_conditional, callback=callback, **chain.sampler_kwargs())
    images = (samples / 2 + 0.5).clamp(0, 1)
    return _pipeline_output(pipe, images, output_type, return_dict)


__all__ = ["SchedulerChain", "scheduler_chain", "DiffusersEpsModel", "guided_dit_pipeline", "guided_ddpm_pipeline"]
