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

from collections.abc import Callable

import torch

from ..guidance.schedules import GuidanceInterval, check_finite_number, ddpm_sine_add, sine_factor
from ._checks import check_latents, check_state_dtype, class_ids, guided_steps, per_sample, rms
from .gaussian_diffusion import GaussianDiffusion

GUIDANCE_INPUTS = ("x0", "xt")
MODEL_MEAN_TYPES = ("eps", "x0")


@torch.no_grad()
def ddpm_sampler(
    model,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    num_timesteps: int = 1000,
    beta_schedule: str = "linear",
    timestep_respacing: str | list[int] | None = "250",
    learn_sigma: bool = True,
    model_mean_type: str = "eps",
    clip_denoised: bool = True,
    guidance: Callable | None = None,
    classifier_scale: float = 1.0,
    gamma_factor: float = 0.0,
    guidance_input: str = "x0",
    guidance_interval: GuidanceInterval | None = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    use_ddim: bool = False,
    eta: float = 0.0,
    model_class_conditional: bool | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    step_runner: Callable[[Callable], Callable] | None = None,
) -> torch.Tensor:
    """Guided ADM sampling.

    Args:
        model: `model(x, t, y)` -> eps (B, C, H, W), or eps and variance values stacked on
            channels (B, 2C, H, W) with `learn_sigma`; t are the ORIGINAL integer timesteps (B,).
        noise: (B, C, H, W) the starting x_T (standard normal).
        class_labels: (B,) ids or (B, K) one-hot; the model gets ids as `y` when it is class
            conditional; the guidance gets them as targets.
        num_timesteps, beta_schedule, timestep_respacing: the diffusion ("250", "ddim25", ...).
        learn_sigma: ADM's learned-range variance; otherwise ADM's fixed-large variance.
        model_mean_type: "eps" (predicts noise) or "x0" (predicts the clean image).
        clip_denoised: clamp x0 to [-1, 1].
        guidance: `ClassifierGuidance` (or callable (x, labels) -> (grad, J)); None: unguided.
        classifier_scale: s. gamma_factor: gamma of the sine-added variance (ancestral only).
        guidance_input: "x0" (the paper) or "xt" (the classifier sees the noisy state).
        guidance_interval: which steps are guided; step i counts from 0 at t = T-1.
        randn_like: noise source, called once per step (as ADM does).
        use_ddim, eta: DDIM sampling with stochasticity eta.
        model_class_conditional: pass labels to the model; default: when the model has a
            non-None `num_classes`, or has no such attribute and labels are given.
        dtype: sampler state dtype, float32 (default) or float64.
        callback: called after each step with a dict: x, i, t, denoised (x0), guidance_norm, J.
        step_runner: maps `ddpm_step` to the function that runs it (compiled, CUDA graph);
            default: `ddpm_step` itself, eagerly.
    Returns:
        (B, C, H, W) samples in the state dtype, in [-1, 1] up to the last step's noise.
    """
    check_latents("noise", noise)
    dtype = check_state_dtype(dtype)
    check_finite_number("classifier_scale", classifier_scale)
    check_finite_number("gamma_factor", gamma_factor, minimum=0)
    check_finite_number("eta", eta, minimum=0)
    if guidance_input not in GUIDANCE_INPUTS:
        raise ValueError(f"guidance_input: expected one of {GUIDANCE_INPUTS}, got {guidance_input!r}")
    if model_mean_type not in MODEL_MEAN_TYPES:
        raise ValueError(f"model_mean_type: expected one of {MODEL_MEAN_TYPES}, got {model_mean_type!r}")
    if use_ddim and gamma_factor != 0:
        raise ValueError("gamma_factor: the sine-added variance is defined for ancestral sampling only; "
                         "use gamma_factor=0 with use_ddim")
    diffusion = GaussianDiffusion.create(num_timesteps, beta_schedule, timestep_respacing)
    batch = noise.shape[0]
    ids = class_ids(class_labels, batch, None)
    if model_class_conditional is None:
        model_class_conditional = getattr(model, "num_classes", None) is not None if hasattr(model, "num_classes") \
            else ids is not None
    if model_class_conditional and ids is None:
        raise ValueError("class_labels: the model is class-conditional; pass labels")
    model_labels = ids if model_class_conditional else None
    num_steps = diffusion.num_steps
    guided = guided_steps(guidance, ids, noise.shape[1:], noise.device, num_steps, guidance_interval)

    device = noise.device
    step = step_runner(ddpm_step) if step_runner is not None else ddpm_step
    settings = dict(learn_sigma=learn_sigma, model_mean_type=model_mean_type, clip_denoised=clip_denoised,
                    use_ddim=use_ddim, guidance_input=guidance_input, classifier_scale=classifier_scale,
                    gamma_factor=gamma_factor, eta=eta)
    vmax = torch.zeros(batch, dtype=dtype, device=device)
    x = noise.to(dtype)
    for i, t in enumerate(range(num_steps - 1, -1, -1)):
        coefficients = diffusion.step_coefficients(t, dtype, device)
        coefficients["sine"] = torch.tensor(sine_factor(t, num_steps), dtype=dtype, device=device)
        t_model = torch.full((batch,), int(diffusion.timestep_map[t]), dtype=torch.long, device=device)
        z = randn_like(x)
        x, vmax, x0, guidance_norm, objective = step(
            model, guidance, x, z, vmax, coefficients, t_model, model_labels, ids,
            guided=guided[i], last=t == 0, **settings)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0, "guidance_norm": guidance_norm, "J": objective})
    return x


def ddpm_step(model, guidance, x: torch.Tensor, z: torch.Tensor, vmax: torch.Tensor, c: dict[str, torch.Tensor],
              t_model: torch.Tensor, model_labels: torch.Tensor | None, ids: torch.Tensor | None, *,
              guided: bool, last: bool, learn_sigma: bool, model_mean_type: str, clip_denoised: bool,
              use_ddim: bool, guidance_input: str, classifier_scale: float, gamma_factor: float, eta: float):
    """One step of Algorithm 1 (or DDIM): x_t (B, C, H, W) and its noise z -> x_{t-1}.

    `c` holds the schedule values at t as 0-d tensors; `vmax` (B,) is the running max of
    Sigma[:, 0, 0, 0]. Returns (x_prev, vmax, x0, guidance_norm or None, J or None).
    """
    channels = x.shape[1]
    out = model(x, t_model, model_labels).to(x.dtype)
    if learn_sigma:
        if out.shape[1] != 2 * channels:
            raise ValueError(f"model: with learn_sigma the output needs {2 * channels} channels, got {out.shape[1]}")
        out, var_values = out.split(channels, dim=1)
    if model_mean_type == "eps":
        x0 = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * out
    else:
        x0 = out
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    guidance_norm = objective = g = None
    if guided:
        g, objective = guidance(x0 if guidance_input == "x0" else x, ids)
        g = g.to(x.dtype)
        guidance_norm = rms(g)
    if use_ddim:
        eps = (c["sqrt_recip_alphas_cumprod"] * x - x0) / c["sqrt_recipm1_alphas_cumprod"]
        if guided:
            eps = eps - (1 - c["alphas_cumprod"]).sqrt() * classifier_scale * g
            x0 = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps
        abar, abar_prev = c["alphas_cumprod"], c["alphas_cumprod_prev"]
        sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        x_prev = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).sqrt() * eps
        if not last:
            x_prev = x_prev + sigma * z
        return x_prev, vmax, x0, guidance_norm, objective
    if learn_sigma:
        frac = (var_values + 1) / 2
        log_variance = frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance_clipped"]
    else:
        log_variance = c["fixed_large_log_variance"].expand_as(x)
    variance = log_variance.exp()
    mean = c["posterior_mean_coef1"] * x0 + c["posterior_mean_coef2"] * x
    vmax = torch.maximum(vmax, variance[:, 0, 0, 0])
    if guided:
        a_t = ddpm_sine_add(c["sine"], vmax, gamma_factor)
        mean = mean + classifier_scale * (variance + per_sample(a_t, variance)) * g
    x_prev = mean if last else mean + (0.5 * log_variance).exp() * z
    return x_prev, vmax, x0, guidance_norm, objective
