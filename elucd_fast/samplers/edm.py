"""EDM Heun sampling with calibrated classifier guidance (paper Algorithm 2, SPEC §4).

For each step i = 0 ... N-1:

    t_hat = sigma_i * (1 + gamma_i)
    z     ~ N(0, S_noise^2 I)
    r     = rms(x_i);  xc = x_i / r if r > 1 else x_i
    g     = grad_{xc} J(xc)
    dx    = g / rms(g) * r * w_i
    x_hat = x_i + sqrt(t_hat^2 - sigma_i^2) * z + dx
    d_cur = (x_hat - D(x_hat, t_hat)) / t_hat;  x_{i+1} = x_hat + (sigma_{i+1} - t_hat) * d_cur
    Heun correction with D(x_{i+1}, sigma_{i+1}) for i < N - 1 (unguided)

With `guidance=None` this is exactly EDM's `edm_sampler` (same schedule, same noise calls).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ..guidance.schedules import GuidanceInterval, check_finite_number, edm_guidance_weights
from ..kernels.guidance_update import classifier_input_reference, guidance_update_reference
from ._checks import check_latents, check_state_dtype, class_ids, guided_steps, rms


def edm_sigma_steps(net, num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM's time steps sigma_0 > ... > sigma_{N-1} > sigma_N = 0, float64, rounded by the
    network, on the network's sigma device (the host for EDM networks)."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.as_tensor(net.round_sigma(t_steps))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def _check_arguments(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, max_guidance, add_factor):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps: must be an integer >= 2, got {num_steps!r}")
    check_finite_number("sigma_min", sigma_min, minimum=0)
    check_finite_number("sigma_max", sigma_max, minimum=0)
    if not sigma_min > 0 or not sigma_max > sigma_min:
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    check_finite_number("rho", rho)
    if rho <= 0:
        raise ValueError(f"rho: must be > 0, got {rho}")
    check_finite_number("S_churn", S_churn, minimum=0)
    check_finite_number("S_noise", S_noise, minimum=0)
    for name, value in (("S_min", S_min), ("S_max", S_max)):
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name}: must be a number, got {value!r}")
    check_finite_number("max_guidance", max_guidance, minimum=0)
    check_finite_number("add_factor", add_factor)


@torch.no_grad()
def edm_sampler(
    net,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    guidance: Callable | None = None,
    max_guidance: float = 0.001,
    add_factor: float = 0.0,
    guidance_interval: GuidanceInterval | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    step_runner: Callable[[Callable], Callable] | None = None,
    ops: StepOps | None = None,
) -> torch.Tensor:
    """Guided EDM sampling (ODE with S_churn = 0, churn SDE otherwise).

    Args:
        net: EDM network interface: `net(x, sigma, class_labels)` -> denoised, with
            `sigma_min`, `sigma_max`, `round_sigma`, `label_dim`.
        latents: (B, C, H, W) standard normal noise; scaled by sigma_0 here, as EDM does.
        class_labels: (B,) integer ids or (B, label_dim) one-hot; the network gets one-hot,
            the guidance gets ids. Required when guided.
        randn_like: noise source, called once per step with a tensor of the state dtype (pass a
            per-seed generator's `randn_like` for batch-independent images).
        num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise: EDM's settings.
        guidance: `ClassifierGuidance` (or any callable (x, labels) -> (grad, J)); None samples
            unguided.
        max_guidance: wmax of the schedule w_i; add_factor: the sine-added fraction ("add").
        guidance_interval: which steps are guided (default all).
        dtype: sampler state dtype, float32 (default) or float64 (the authors' setting).
        callback: called after each step with a dict: x (the new state), i, sigma (sigma_i),
            sigma_hat, denoised, guidance_norm (B,) or None, J (B,) or None.
        step_runner: maps `edm_step` to the function that runs it (the engine's compiled or
            CUDA-graph versions); default: `edm_step` itself, eagerly.
        ops: the step's elementwise pieces (`engine.fused_ops` gives C++/Triton versions);
            default: plain PyTorch.
    Returns:
        (B, C, H, W) samples in the state dtype (images in about [-1, 1]).
    """
    check_latents("latents", latents)
    dtype = check_state_dtype(dtype)
    _check_arguments(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, max_guidance, add_factor)
    batch = latents.shape[0]
    label_dim = getattr(net, "label_dim", 0) or 0
    ids = class_ids(class_labels, batch, label_dim)
    net_labels = None
    if label_dim:
        if ids is None:
            raise ValueError(f"class_labels: the network is class-conditional (label_dim {label_dim}); pass labels")
        net_labels = torch.nn.functional.one_hot(ids.long(), label_dim).to(device=latents.device, dtype=torch.float32)
    guided = guided_steps(guidance, ids, latents.shape[1:], latents.device, num_steps, guidance_interval)
    weights = edm_guidance_weights(num_steps, max_guidance, add_factor)

    # The whole time schedule (including churned t_hat) is known before the loop: compute it
    # here so no step reads a device value on the host.
    t_steps = edm_sigma_steps(net, num_steps, sigma_min, sigma_max, rho)
    t_host = t_steps.cpu().tolist()
    gammas = [min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t <= S_max else 0 for t in t_host[:-1]]
    t_hats = [torch.as_tensor(net.round_sigma(t_steps[i] + gammas[i] * t_steps[i])) for i in range(num_steps)]
    t_steps = t_steps.to(latents.device)
    t_hats = [t.to(latents.device) for t in t_hats]

    step = step_runner(edm_step) if step_runner is not None else edm_step
    weights = [torch.tensor(w, dtype=dtype, device=latents.device) for w in weights]
    x_next = latents.to(dtype) * t_steps[0]
    for i in range(num_steps):
        x_cur = x_next
        z = randn_like(x_cur)
        x_next, denoised, g, objective = step(
            net, guidance, x_cur, z, t_steps[i], t_hats[i], t_steps[i + 1], weights[i], S_noise, net_labels, ids,
            guided=guided[i], heun=i < num_steps - 1, **({"ops": ops} if ops is not None else {}))
        if callback is not None:
            callback({"x": x_next, "i": i, "sigma": t_steps[i], "sigma_hat": t_hats[i], "denoised": denoised,
                      "guidance_norm": None if g is None else rms(g), "J": objective})
    return x_next


class StepOps(NamedTuple):
    """The two elementwise pieces of a guided EDM step, swappable for fused kernels:
    `classifier_input(x) -> (xc, r)` and `guidance_update(x, g, z, noise_scale, w) -> x_hat`."""

    classifier_input: Callable
    guidance_update: Callable


PLAIN_OPS = StepOps(classifier_input_reference, guidance_update_reference)


def edm_step(net, guidance, x_cur: torch.Tensor, z: torch.Tensor, t_cur: torch.Tensor, t_hat: torch.Tensor,
             t_next: torch.Tensor, weight: torch.Tensor, S_noise: float, net_labels: torch.Tensor | None,
             ids: torch.Tensor | None, *, guided: bool, heun: bool, ops: StepOps = PLAIN_OPS):
    """One step of Algorithm 2: x_i (B, C, H, W) and its noise z -> x_{i+1}.

    All per-step values are 0-d tensors (so a compiled step is reused across steps); only the
    two flags select code. `ops` supplies the classifier-input normalisation and the guided
    update (plain PyTorch by default; the engine may pass fused kernels computing the same).
    Returns (x_next, denoised, g (the classifier gradient) or None, J or None).
    """
    noise_scale = (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise
    g = objective = None
    if guided:
        # xc = x_i / rms(x_i) where rms > 1; x_hat = x_i + noise_scale z + g / rms(g) rms(x_i) w_i
        # (rms(g) clamped: an all-zero g gives a guidance term of exactly 0, never NaN).
        xc, _ = ops.classifier_input(x_cur)
        g, objective = guidance(xc, ids)
        x_hat = ops.guidance_update(x_cur, g.to(x_cur.dtype), z, noise_scale, weight.expand(x_cur.shape[0]))
    else:
        x_hat = x_cur + noise_scale * z

    denoised = net(x_hat, t_hat, net_labels).to(x_cur.dtype)
    d_cur = (x_hat - denoised) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if heun:
        denoised = net(x_next, t_next, net_labels).to(x_cur.dtype)
        d_prime = (x_next - denoised) / t_next
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, denoised, g, objective
