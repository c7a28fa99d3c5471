"""The plain baseline: the guided samplers written straight from SPEC.md the way the paper's
authors ran them: float64 sampler state, per-sample Python loops where their code has them (each
`if` on a tensor waits on the device), the exp/log form of the objective, the classifier in its
own dtype (float32 for theirs) on NCHW input, noise drawn every step.

The EDM sampler follows the structure and operations of the authors' `edm_sampler` (EluCD's
`EDM/generate.py`, which `bench/authors.py` runs beside it): batched rms norms of the state and
of the gradient, per-sample loops for the normalised classifier input and for the scaled
guidance term, the gradient kept in the classifier's dtype and added to the float64 state with
the noise in one expression.

It is the oracle the tests compare the engine with, and the speed baseline of the benchmarks.
It shares nothing with the engine's sampling code; only the ADM beta/respacing arrays are
taken from the engine (they are checked against ADM separately).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from elucd_fast.schedules.gaussian_diffusion import GaussianDiffusion


def smooth_relu(classifier: nn.Module, beta: float) -> nn.Module:
    """A frozen copy of the classifier with each nn.ReLU module replaced by Softplus(beta)."""
    model = copy.deepcopy(classifier).eval().requires_grad_(False)
    if math.isinf(beta):
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=beta))
    return model


def guidance_gradient(classifier: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                      joint_temperature: float, marginal_temperature: float) -> torch.Tensor:
    """grad_x of log(exp(tau_j l_y) / sum_k exp(tau_m l_k)), summed over the batch, in the
    classifier's dtype."""
    dtype = next(classifier.parameters()).dtype
    with torch.enable_grad():
        x_in = x.detach().to(dtype).requires_grad_(True)
        logits = classifier(x_in)
        selected = logits[torch.arange(len(labels)), labels]
        objective = torch.log(torch.exp(joint_temperature * selected)
                              / torch.exp(marginal_temperature * logits).sum(dim=1))
        (grad,) = torch.autograd.grad(objective.sum(), x_in)
    return grad


def edm_guidance_term(classifier: nn.Module, x: torch.Tensor, labels: torch.Tensor, weight: float,
                      joint_temperature: float, marginal_temperature: float) -> torch.Tensor:
    """Algorithm 2's dx_i = g / rms(g) * rms(x_i) * w_i with g the gradient at the normalised
    x_i (x_i / rms(x_i) where rms(x_i) > 1), per sample; in the classifier's dtype."""
    norms = x.pow(2).mean((1, 2, 3)).sqrt()  # (B,)
    x_in = torch.zeros_like(x)
    for b in range(x.shape[0]):
        x_in[b] = x[b] / norms[b] if norms[b] > 1 else x[b]
    grad = guidance_gradient(classifier, x_in, labels, joint_temperature, marginal_temperature)
    grad_norms = grad.pow(2).mean((1, 2, 3)).sqrt()
    for b in range(x.shape[0]):
        grad[b] = grad[b] / grad_norms[b] * norms[b] * weight
    return grad


def edm_time_steps(net, num_steps, sigma_min, sigma_max, rho, device="cpu"):
    """EDM's schedule: sigma_0 > ... > sigma_{N-1} (rounded by the network), then 0; float64."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    steps = torch.arange(num_steps, dtype=torch.float64, device=device)
    t_steps = (sigma_max ** (1 / rho) + steps / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])


def edm_guidance_weight(i, num_steps, max_guidance, add_factor):
    """Algorithm 2's w_i."""
    return max(max_guidance * (num_steps + 1 - i) / (num_steps + 1), 1e-5) \
        + math.sin(math.pi * i / num_steps) * max_guidance * add_factor


def edm_sample(net, latents, labels, classifier=None, *, randn_like=torch.randn_like, num_steps=18,
               sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1,
               max_guidance=0.001, add_factor=0.0, joint_temperature=1.0, marginal_temperature=0.0, sigmas=None):
    """Algorithm 2 of the paper. `labels` are integer ids (B,); `classifier` already smoothed.
    `sigmas`: explicit noise levels (the final 0 implied) in place of the rho schedule."""
    one_hot = torch.eye(net.label_dim, device=latents.device)[labels] if net.label_dim else None
    if sigmas is not None:
        num_steps = len(sigmas)
        t_steps = torch.tensor(sigmas, dtype=torch.float64, device=latents.device)
        t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    else:
        t_steps = edm_time_steps(net, num_steps, sigma_min, sigma_max, rho, latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        noise = randn_like(x_cur)
        guidance = 0
        if classifier is not None:
            weight = edm_guidance_weight(i, num_steps, max_guidance, add_factor)
            guidance = edm_guidance_term(classifier, x_cur, labels, weight, joint_temperature, marginal_temperature)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * noise + guidance
        denoised = net(x_hat, t_hat, one_hot).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, one_hot).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# iPNDM's Adams-Bashforth weights of d_i, d_{i-1}, ..., by order (SPEC §10).
IPNDM_WEIGHTS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def multistep_sample(denoiser, latents, sigmas, labels=None, classifier=None, *, solver, max_order=4,
                     max_guidance=0.001, add_factor=0.0, joint_temperature=1.0, marginal_temperature=0.0):
    """iPNDM or DPM-Solver++(2M) in EDM's sigma parametrisation (SPEC §10) over `sigmas` (python
    floats, decreasing, ending in 0), float64, with Algorithm 2's displacement of the state before
    each step's denoiser call; the history holds the values at the displaced states.
    `denoiser(x, sigma)` is D (float64 out); `classifier` already smoothed."""
    num_steps = len(sigmas) - 1
    x = latents.to(torch.float64) * sigmas[0]
    history = []  # d (iPNDM) or D (DPM-Solver++), newest first
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if classifier is not None:
            weight = edm_guidance_weight(i, num_steps, max_guidance, add_factor)
            x = x + edm_guidance_term(classifier, x, labels, weight, joint_temperature, marginal_temperature)
        # sigma as a float64 tensor: a network's as_tensor would make a Python float float32.
        denoised = denoiser(x, torch.tensor(sigma, dtype=torch.float64, device=x.device)).to(torch.float64)
        if solver == "ipndm":
            d = (x - denoised) / sigma
            weights = IPNDM_WEIGHTS[min(max_order, i + 1)]
            d_prime = sum(w * value for w, value in zip(weights, [d] + history))
            x = x + (sigma_next - sigma) * d_prime
            history = [d] + history[:2]
        else:
            if i == 0 or sigma_next == 0 or max_order == 1:
                denoised_prime = denoised
            else:
                h = math.log(sigma / sigma_next)
                r = math.log(sigmas[i - 1] / sigma) / h
                denoised_prime = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * history[0]
            x = sigma_next / sigma * x + (1 - sigma_next / sigma) * denoised_prime
            history = [denoised]
    return x


def ddpm_sample(model, noise, labels, classifier=None, *, num_timesteps=1000, beta_schedule="linear",
                timestep_respacing="250", learn_sigma=True, classifier_scale=1.0, gamma_factor=0.0,
                guidance_input="x0", randn_like=torch.randn_like, use_ddim=False, eta=0.0,
                joint_temperature=1.0, marginal_temperature=0.5, timesteps=None):
    """Algorithm 1 of the paper (and DDIM in score form), float64 state. `model(x, t, y)`.
    `timesteps`: explicit original timesteps in place of the respacing."""
    chain = GaussianDiffusion.create(num_timesteps, beta_schedule, timestep_respacing, timesteps=timesteps)
    betas = chain.betas
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    T = len(betas)
    x = noise.to(torch.float64)
    channels = x.shape[1]
    max_var = [None] * x.shape[0]
    for t in reversed(range(T)):
        t_model = torch.full((x.shape[0],), int(chain.timestep_map[t]), dtype=torch.long, device=x.device)
        out = model(x, t_model, labels).to(torch.float64)
        if learn_sigma:
            eps, v = out[:, :channels], out[:, channels:]
            frac = (v + 1) / 2
            log_var = frac * math.log(betas[t]) + (1 - frac) * post_log_var[t]
        else:
            eps = out
            log_var = torch.full_like(x, math.log(post_var[1] if t == 0 else betas[t]))
        x0 = (x / math.sqrt(abar[t]) - math.sqrt(1 / abar[t] - 1) * eps).clamp(-1, 1)
        noise_t = randn_like(x)
        if use_ddim:
            eps = (x / math.sqrt(abar[t]) - x0) / math.sqrt(1 / abar[t] - 1)
            if classifier is not None:
                grad = guidance_gradient(classifier, x0 if guidance_input == "x0" else x, labels,
                                         joint_temperature, marginal_temperature).to(x.dtype)
                eps = eps - math.sqrt(1 - abar[t]) * classifier_scale * grad
                x0 = x / math.sqrt(abar[t]) - math.sqrt(1 / abar[t] - 1) * eps
            sigma = eta * math.sqrt((1 - abar_prev[t]) / (1 - abar[t])) * math.sqrt(1 - abar[t] / abar_prev[t])
            x = x0 * math.sqrt(abar_prev[t]) + math.sqrt(1 - abar_prev[t] - sigma ** 2) * eps \
                + (sigma * noise_t if t > 0 else 0)
            continue
        var = torch.exp(log_var)
        mean = (betas[t] * math.sqrt(abar_prev[t]) / (1 - abar[t])) * x0 \
            + ((1 - abar_prev[t]) * math.sqrt(1 - betas[t]) / (1 - abar[t])) * x
        if classifier is not None:
            grad = guidance_gradient(classifier, x0 if guidance_input == "x0" else x, labels,
                                     joint_temperature, marginal_temperature).to(x.dtype)
            for b in range(x.shape[0]):
                v0 = var[b, 0, 0, 0]
                max_var[b] = v0 if max_var[b] is None else torch.maximum(max_var[b], v0)
                add = max(math.sin(math.pi * t / T) * max_var[b] * gamma_factor, 0)
                mean[b] = mean[b] + classifier_scale * (var[b] + add) * grad[b]
        x = mean + (torch.exp(0.5 * log_var) * noise_t if t > 0 else 0)
    return x
