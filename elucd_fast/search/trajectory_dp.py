"""Stage 1 of the step search: trajectory matching by dynamic programming (after GITS, Chen et al.
ICML 2024, and Optimal Stepsize for Diffusion Sampling), cheap and data-free.

A pilot of K seeds is sampled with a fine teacher schedule of G steps (the sampler itself, its
guidance included; an ADM chain with DDIM eta 0, so that the teacher is a deterministic path).
With node g the teacher's state x_g at noise level sigma_g (g = 0 ... G-1) and node G the finished
sample (sigma = 0), the cost of jumping from node a to node b > a is how far one first-order
step lands from the teacher:

    x_hat_b = x_a + (sigma_b - sigma_a) (x_a - D(x_a, sigma_a)) / sigma_a     (Euler = DDIM)
    c(a, b) = mean over pilots of rms(x_hat_b - x_b) / sqrt(1 + sigma_b^2)

in EDM's variance-exploding scale (an ADM state x_t is x_t / sqrt(abar_t) there), the error
measured in the variance-preserving scale (x / sqrt(1 + sigma^2), the scale an ADM network sees):
in the VE scale an error at sigma 10 would count a hundred times one at sigma 0.1, though the ODE
shrinks it by about that much on the way to the image, and the DP would then spend every step near
sigma = 0 (it did: 80, 0.0037, 0.002 for three Heun steps on digits). D is evaluated
once per node, so the whole cost matrix costs G denoiser calls per pilot beyond the teacher. The
DP then picks the N-step path from node 0 to node G with the least total cost; its first N nodes
are the N steps (the final 0, or ADM's last step to x_0, is implied).

The local step is unguided: the teacher's states carry the guidance's displacement, which every
path pays alike in total, so the DP chooses where to spend the steps, not how much to guide. The
exact objective (stage 2, `evolution.py`) corrects what this proxy misses.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..checks import check_int
from ..rng import StackedRandomGenerator
from ..runs.generation import draw_latents_and_labels
from ..samplers.ddpm import DDPMSettings
from ..samplers.edm import EDMSettings
from ..samplers.edm2 import EDM2Settings


def best_path(cost: np.ndarray, num_edges: int) -> tuple[int, ...]:
    """The least-cost path 0 = p_0 < p_1 < ... < p_E = M - 1 through a cost matrix (M, M), with
    exactly E = `num_edges` edges, `cost[a, b]` the cost of the edge a -> b (only a < b is read).
    Ties go to the smaller node at the latest position. Returns the E + 1 nodes."""
    cost = np.asarray(cost, dtype=np.float64)
    size = len(cost)
    if cost.shape != (size, size):
        raise ValueError(f"cost: expected a square matrix, got {cost.shape}")
    check_int("num_edges", num_edges, minimum=1, maximum=size - 1)
    # total[k, j]: least cost from node 0 to node j in k edges; parent[k, j]: the node before j.
    total = np.full((num_edges + 1, size), math.inf)
    parent = np.zeros((num_edges + 1, size), dtype=np.int64)
    total[0, 0] = 0.0
    upper = np.triu(np.ones((size, size), dtype=bool), k=1)
    edge = np.where(upper, cost, math.inf)
    for k in range(1, num_edges + 1):
        # via[a, b] = total[k - 1, a] + cost[a, b]
        via = total[k - 1][:, None] + edge
        parent[k] = np.argmin(via, axis=0)
        total[k] = via[parent[k], np.arange(size)]
    if not math.isfinite(total[num_edges, size - 1]):
        raise ValueError("cost: no finite path with that many edges")
    path = [size - 1]
    for k in range(num_edges, 0, -1):
        path.append(int(parent[k, path[-1]]))
    return tuple(reversed(path))


@torch.no_grad()
def teacher_costs(job, teacher_steps: tuple, seeds: list[int], *, batch_size: int = 256) -> np.ndarray:
    """The cost matrix (G + 1, G + 1) of `job` over the teacher's G steps `teacher_steps` (noise
    levels for EDM/EDM2, timesteps for DDPM, noisiest first) on the pilot `seeds`.

    EDM2's autoguidance is left out of the local step (D is the main network alone); DiT's latent
    chains and x0-predicting ADM models are not supported (ValueError)."""
    settings = job.settings
    if isinstance(settings, (EDMSettings, EDM2Settings)):
        teacher = settings.with_steps(teacher_steps)
        sigmas = [float(s) for s in teacher.step_sequence(job.net)] + [0.0]
        denoiser, vp_scale = job.net, None
    elif isinstance(settings, DDPMSettings):
        if settings.model_mean_type != "eps":
            raise ValueError("trajectory DP: needs an eps-predicting ADM model")
        # The teacher runs deterministically: DDIM with eta 0, guided as the sampler guides.
        teacher = settings.with_steps(teacher_steps).with_changes(use_ddim=True, eta=0.0, gamma_factor=0.0)
        denoiser, abar = _adm_denoiser(job, settings)
        steps = teacher.step_sequence()
        sigmas = [math.sqrt((1 - abar[t]) / abar[t]) for t in steps] + [0.0]
        vp_scale = [math.sqrt(abar[t]) for t in steps] + [1.0]
    else:
        raise ValueError(f"trajectory DP: the {settings.name} sampler is not supported (edm, edm2, ddpm are)")
    teacher_job = dataclasses.replace(job, settings=teacher)
    nodes = len(sigmas)
    cost = np.zeros((nodes, nodes))
    for start in range(0, len(seeds), batch_size):
        batch = seeds[start:start + batch_size]
        states, labels = _teacher_states(teacher_job, batch, sigmas[0], vp_scale)
        net_labels = _net_labels(denoiser, labels)
        for a in range(nodes - 1):
            sigma_a = torch.tensor(sigmas[a], dtype=torch.float32, device=states.device)
            d = (states[a] - denoiser(states[a], sigma_a, net_labels).to(torch.float32)) / sigma_a
            for b in range(a + 1, nodes):
                x_hat = states[a] + (sigmas[b] - sigmas[a]) * d
                cost[a, b] += float(_rms(x_hat - states[b]).sum()) / math.sqrt(1 + sigmas[b] ** 2)
    return cost / len(seeds)


def _teacher_states(job, seeds: list[int], sigma_0: float, vp_scale: list[float] | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's states at its G + 1 nodes (G + 1, B, C, H, W) float32 in the VE scale, and
    the labels (B,), for `seeds` drawn as `generate` draws them."""
    rnd = StackedRandomGenerator(job.device, seeds)
    latents, labels = draw_latents_and_labels(rnd, job.noise_shape, num_classes=job.num_classes, class_label=None,
                                              device=job.device)
    states = [latents.to(torch.float32) * (sigma_0 if vp_scale is None else 1.0)]
    job.sample(latents, labels, rnd.randn_like, callback=lambda info: states.append(info["x"].to(torch.float32)))
    stacked = torch.stack(states)
    if vp_scale is not None:
        stacked = stacked / torch.tensor(vp_scale, dtype=torch.float32, device=stacked.device).view(-1, 1, 1, 1, 1)
    return stacked, labels


def _adm_denoiser(job, settings: DDPMSettings):
    """D(x, sigma) of the job's eps-model on its un-respaced chain, and that chain's abar (T,)."""
    from ..models.denoiser import EpsModelDenoiser
    from ..schedules.gaussian_diffusion import GaussianDiffusion

    chain = GaussianDiffusion.create(settings.num_timesteps, settings.beta_schedule, None)
    channels, height, _ = job.noise_shape
    denoiser = EpsModelDenoiser(job.net, diffusion=chain, learn_sigma=settings.learn_sigma, img_channels=channels,
                                img_resolution=height, label_dim=job.num_classes or 0).to(job.device)
    return denoiser, np.asarray(chain.alphas_cumprod, dtype=np.float64)


def _net_labels(net, labels: torch.Tensor | None) -> torch.Tensor | None:
    """One-hot labels for a class-conditional network (EDM's interface), else None."""
    label_dim = getattr(net, "label_dim", 0) or 0
    if not label_dim or labels is None:
        return None
    return torch.nn.functional.one_hot(labels.long(), label_dim).to(torch.float32)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square per sample (B,) over every other dimension, in float64."""
    return x.to(torch.float64).square().flatten(1).mean(dim=1).sqrt()


__all__ = ["best_path", "teacher_costs"]
