"""ADM ancestral (DDPM) and DDIM sampling with calibrated classifier guidance (paper
Algorithm 1, SPEC §3).

Per step t = T-1 ... 0 of the respaced chain, with the model's mean mu, variance Sigma (per
element) and clipped prediction x0:

    g       = grad_{x0} J(x0)                      # the classifier sees x0, not x_t
    vmax    = max over steps so far of Sigma[:, 0, 0, 0]        # per sample
    a_t     = max(sin(pi t / T) * vmax * gamma, 0)              # the sine-added variance
    mu'     = mu + s * (Sigma + a_t) * g
    x_{t-1} = mu' + 1[t > 0] * exp(0.5 log Sigma) * z

DDIM applies the same g in score form: eps' = eps - sqrt(1 - abar_t) * s * g.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..checks import (NonFiniteTracker, check_bool, check_choice, check_latents, check_number, check_state_dtype,
                      class_ids)
from ..guidance.schedules import GuidanceInterval, guided_steps, sine_factor
from ..guidance.update import ddpm_guided_mean
from ..numerics import rms
from ..schedules.gaussian_diffusion import (BETA_SCHEDULES, ancestral_step, ddim_step, eps_from_x0,
                                            model_log_variance, posterior_mean, predict_x0)
from .step_plans import NO_EXTRA, step_network_kwargs
from .settings import RespacedChain, SamplerSettings, resolve_settings, setting, with_settings_signature

GUIDANCE_INPUTS = ("x0", "xt")
MODEL_MEAN_TYPES = ("eps", "x0")


@dataclass(frozen=True)
class DDPMSettings(RespacedChain, SamplerSettings):
    """ADM's sampler settings (openai/guided-diffusion) plus EluCD's guidance (SPEC §3). The
    defaults are ADM's ImageNet-128 chain with 250 respaced steps."""

    name: ClassVar[str] = "ddpm"

    num_timesteps: int = setting(1000, "Steps T of the diffusion the model was trained with")
    beta_schedule: str = setting("linear", "ADM's beta schedule: linear (ADM 128/256/512, DiT) or cosine (ADM 64)",
                                 choices=BETA_SCHEDULES)
    timestep_respacing: str | tuple[int, ...] | None = setting(
        "250", "Respaced chain: '250', '10,15,20' (per equal section), 'ddim25' (even stride) [None: all T]")
    timesteps: tuple[int, ...] | None = setting(
        None, "Explicit timesteps: distinct integers of 0..T-1, any order, run descending; they replace "
              "timestep_respacing [None: the respacing]")
    learn_sigma: bool = setting(True, "The model outputs variance values (ADM's learned range)")
    model_mean_type: str = setting("eps", "What the model predicts: eps or x0", choices=MODEL_MEAN_TYPES)
    clip_denoised: bool = setting(True, "Clamp x0 to [-1, 1]")
    classifier_scale: float = setting(1.0, "Guidance scale s in mu + s (Sigma + a_t) g (the paper: 1)",
                                      unit="multiples of the variance", guidance=True)
    gamma_factor: float = setting(0.0, "Sine-added variance gamma of a_t (the paper: 0.3; ancestral only)",
                                  unit="fraction of the running max variance", guidance=True)
    guidance_input: str = setting("x0", "What the classifier sees: x0 (the paper) or xt", guidance=True,
                                 choices=GUIDANCE_INPUTS)
    guidance_interval: GuidanceInterval | None = setting(None, "Which steps are guided, START:STOP:EVERY (step 0: the first, noisiest) [None: every step]",
                                                         guidance=True)
    use_ddim: bool = setting(False, "DDIM steps instead of ancestral sampling")
    eta: float = setting(0.0, "DDIM stochasticity")

    def __post_init__(self):
        self._check_chain()
        check_bool("learn_sigma", self.learn_sigma)
        check_choice("model_mean_type", self.model_mean_type, MODEL_MEAN_TYPES)
        check_bool("clip_denoised", self.clip_denoised)
        check_number("classifier_scale", self.classifier_scale)
        check_number("gamma_factor", self.gamma_factor, minimum=0)
        check_choice("guidance_input", self.guidance_input, GUIDANCE_INPUTS)
        self._check_guidance_interval()
        check_bool("use_ddim", self.use_ddim)
        check_number("eta", self.eta, minimum=0)
        if self.use_ddim and self.gamma_factor != 0:
            raise ValueError("gamma_factor: the sine-added variance is defined for ancestral sampling only; "
                             "use gamma_factor=0 with use_ddim")


def model_is_class_conditional(model, labels_given: bool) -> bool:
    """The DDPM sampler's rule for passing labels to the model: a model with a `num_classes`
    attribute is conditional when it is not None; otherwise when labels are given."""
    if hasattr(model, "num_classes"):
        return getattr(model, "num_classes") is not None
    return labels_given


@torch.no_grad()
@with_settings_signature(DDPMSettings)
def ddpm_sampler(
    model,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    guidance: Callable | None = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    model_class_conditional: bool | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    step_runner: Callable[[Callable], Callable] | None = None,
    ops: StepOps | None = None,
    block_plans: Sequence | None = None,
    settings: DDPMSettings | None = None,
    **kwargs,
) -> torch.Tensor:
    """Guided ADM sampling.

    Args:
        model: `model(x, t, y)` -> eps (B, C, H, W), or eps and variance values stacked on
            channels (B, 2C, H, W) with `learn_sigma`; t are the ORIGINAL integer timesteps (B,).
        noise: (B, C, H, W) the starting x_T (standard normal).
        class_labels: (B,) ids or (B, K) one-hot; the model gets ids as `y` when it is class
            conditional; the guidance gets them as targets.
        guidance: `ClassifierGuidance` (or callable (x, labels) -> (grad, J)); None: unguided.
        randn_like: noise source, called once per step (as ADM does).
        model_class_conditional: pass labels to the model; default `model_is_class_conditional`.
        dtype: sampler state dtype, float32 (default) or float64.
        callback: called after each step with a dict: x, i, t, denoised (x0), guidance_norm, J.
        step_runner: maps `ddpm_step` to the function that runs it (compiled, CUDA graph);
            default: `ddpm_step` itself, eagerly.
        ops: the step's guided-mean update (the engine's fused version); default: plain PyTorch.
        block_plans: one block plan per step (`models.block_plan`), passed unread to the network
            call of that step as `block_plan=`, with `block_cache=` a dict this run owns; None (or a
            None entry) calls the network plainly.
        settings: a `DDPMSettings`; the keyword arguments (num_timesteps, beta_schedule,
            timestep_respacing, timesteps (explicit), learn_sigma, model_mean_type, clip_denoised, classifier_scale,
            gamma_factor, guidance_input, guidance_interval, use_ddim, eta) build one, or change
            the given one.
    Returns:
        (B, C, H, W) samples in the state dtype, in [-1, 1] up to the last step's noise.
    """
    settings = resolve_settings(DDPMSettings, settings, kwargs)
    check_latents("noise", noise)
    dtype = check_state_dtype(dtype)
    diffusion = settings.diffusion
    batch = noise.shape[0]
    ids = class_ids(class_labels, batch, None)
    if model_class_conditional is None:
        model_class_conditional = model_is_class_conditional(model, ids is not None)
    if model_class_conditional and ids is None:
        raise ValueError("class_labels: the model is class-conditional; pass labels")
    model_labels = ids if model_class_conditional else None
    num_steps = diffusion.num_steps
    guided = guided_steps(guidance, ids, noise.shape[1:], noise.device, num_steps, settings.guidance_interval)

    device = noise.device
    step = step_runner(ddpm_step) if step_runner is not None else ddpm_step
    flags = dict(learn_sigma=settings.learn_sigma, model_mean_type=settings.model_mean_type,
                 clip_denoised=settings.clip_denoised, use_ddim=settings.use_ddim,
                 guidance_input=settings.guidance_input, classifier_scale=settings.classifier_scale,
                 gamma_factor=settings.gamma_factor, eta=settings.eta, **({"ops": ops} if ops is not None else {}))
    net_extras = step_network_kwargs(block_plans, num_steps)
    vmax = torch.zeros(batch, dtype=dtype, device=device)
    x = noise.to(dtype)
    non_finite = NonFiniteTracker(device)
    for i, t in enumerate(range(num_steps - 1, -1, -1)):
        coefficients = diffusion.step_coefficients(t, dtype, device)
        coefficients["sine"] = torch.tensor(sine_factor(t, num_steps), dtype=dtype, device=device)
        t_model = torch.full((batch,), int(diffusion.timestep_map[t]), dtype=torch.long, device=device)
        z = randn_like(x)
        x, vmax, x0, guidance_norm, objective = step(
            model, guidance, x, z, vmax, coefficients, t_model, model_labels, ids,
            guided=guided[i], last=t == 0, net_extra=net_extras[i], **flags)
        non_finite.update(i, x)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0, "guidance_norm": guidance_norm, "J": objective})
    non_finite.check(x, num_steps, "check the model and, when guided, the classifier's logits and "
                     "classifier_scale / gamma_factor")
    return x


class StepOps(NamedTuple):
    """The guided-mean update of a DDPM step, swappable for a fused kernel:
    `guided_mean(mean, variance, g, vmax, sine, classifier_scale, gamma_factor) -> mean'`."""

    guided_mean: Callable


PLAIN_OPS = StepOps(ddpm_guided_mean)


def ddpm_step(model, guidance, x: torch.Tensor, z: torch.Tensor, vmax: torch.Tensor, c: dict[str, torch.Tensor],
              t_model: torch.Tensor, model_labels: torch.Tensor | None, ids: torch.Tensor | None, *,
              guided: bool, last: bool, learn_sigma: bool, model_mean_type: str, clip_denoised: bool,
              use_ddim: bool, guidance_input: str, classifier_scale: float, gamma_factor: float, eta: float,
              ops: StepOps = PLAIN_OPS, net_extra: Mapping = NO_EXTRA):
    """One step of Algorithm 1 (or DDIM): x_t (B, C, H, W) and its noise z -> x_{t-1}.

    `c` holds the schedule values at t as 0-d tensors; `vmax` (B,) is the running max of
    Sigma[:, 0, 0, 0]. `ops` supplies the guided-mean update (plain PyTorch by default; the
    engine may pass a fused kernel computing the same); `net_extra` goes to the model call unread.
    Returns (x_prev, vmax, x0, guidance_norm or None, J or None).
    """
    channels = x.shape[1]
    out = model(x, t_model, model_labels, **net_extra).to(x.dtype)
    var_values = None
    if learn_sigma:
        if out.shape[1] != 2 * channels:
            raise ValueError(f"model: with learn_sigma the output needs {2 * channels} channels, got {out.shape[1]}")
        out, var_values = out.split(channels, dim=1)
    x0 = predict_x0(c, x, out) if model_mean_type == "eps" else out
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    guidance_norm = objective = g = None
    if guided:
        g, objective = guidance(x0 if guidance_input == "x0" else x, ids)
        g = g.to(x.dtype)
        guidance_norm = rms(g)
    if use_ddim:
        eps = eps_from_x0(c, x, x0)
        if guided:
            eps = eps - (1 - c["alphas_cumprod"]).sqrt() * classifier_scale * g
            x0 = predict_x0(c, x, eps)
        return ddim_step(c, x0, eps, z, eta, last=last), vmax, x0, guidance_norm, objective
    log_variance = model_log_variance(c, x, var_values)
    variance = log_variance.exp()
    mean = posterior_mean(c, x0, x)
    vmax = torch.maximum(vmax, variance[:, 0, 0, 0])
    if guided:
        mean = ops.guided_mean(mean, variance, g, vmax, c["sine"], classifier_scale, gamma_factor)
    return ancestral_step(mean, log_variance, z, last=last), vmax, x0, guidance_norm, objective
