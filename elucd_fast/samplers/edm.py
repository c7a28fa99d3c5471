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
`solver="ipndm"` or `"dpmpp_2m"` replaces the Heun step by a multistep one (`samplers.multistep`:
one denoiser call per step, the same displacement before it, no churn and so no noise drawn).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..checks import NonFiniteTracker, check_latents, check_state_dtype, class_ids
from ..guidance.schedules import GuidanceInterval, guided_steps
from ..guidance.update import edm_classifier_gradient, edm_classifier_input, edm_guidance_update
from ..numerics import rms
from ..schedules.edm import edm_churn, edm_sigma_steps
from .multistep import SOLVERS, multistep_start, multistep_step
from .step_plans import NO_EXTRA, step_network_kwargs
from .settings import HeunSchedule, SamplerSettings, resolve_settings, setting, with_settings_signature


@dataclass(frozen=True)
class EDMSettings(HeunSchedule, SamplerSettings):
    """EDM's sampler settings (Karras et al. 2022, Algorithm 2 there) plus EluCD's guidance
    schedule (SPEC §4). The defaults are EDM's own and the paper's unguided ones."""

    name: ClassVar[str] = "edm"

    num_steps: int = setting(18, "Steps N (Heun: 2N - 1 denoiser calls; ipndm, dpmpp_2m: N)")
    sigma_min: float = setting(0.002, "Lowest noise level (clamped to the network's)")
    sigma_max: float = setting(80.0, "Highest noise level (clamped to the network's)")
    rho: float = setting(7.0, "Time-step exponent of EDM's schedule")
    sigmas: tuple[float, ...] | None = setting(
        None, "Explicit noise levels, strictly decreasing, the final 0 implied, within the network's range "
              "(rounded by it); they set the steps N and replace sigma_min/sigma_max/rho [None: the rho family]")
    solver: str = setting("heun", "ODE solver: heun (EDM's Heun), or the multistep ipndm or dpmpp_2m (one "
                                  "denoiser call per step; no churn)", choices=SOLVERS)
    max_order: int = setting(4, "Order cap of the multistep solvers (ipndm reaches 4, dpmpp_2m 2)")
    S_churn: float = setting(0.0, "EDM stochasticity: total churn (0: the ODE)")
    S_min: float = setting(0.0, "Churn only where sigma >= S_min")
    S_max: float = setting(math.inf, "Churn only where sigma <= S_max")
    S_noise: float = setting(1.0, "Noise inflation of the churn")
    max_guidance: float = setting(0.001, "wmax of the guidance weights w_i (the paper: 0.004 at 10/18 steps)",
                                  unit="multiples of rms(x_i) per step", guidance=True)
    add_factor: float = setting(0.0, "Sine-added fraction of w_i (the paper: 0.3)", unit="fraction of wmax",
                                guidance=True)
    guidance_interval: GuidanceInterval | None = setting(None, "Which steps are guided, START:STOP:EVERY (step 0: the first, noisiest) [None: every step]",
                                                         guidance=True)

    def __post_init__(self):
        self._check_heun()

    def time_steps(self, net) -> torch.Tensor:
        """sigma_0 > ... > sigma_{N-1} > sigma_N = 0 (N + 1,) float64, rounded by `net`: the
        explicit `sigmas` (refused outside the network's range), else EDM's rho family."""
        return edm_sigma_steps(net, self.num_steps, self.sigma_min, self.sigma_max, self.rho, self.sigmas)

    def step_sequence(self, net=None) -> tuple[float, ...]:
        if net is not None:
            return tuple(self.time_steps(net)[:-1].tolist())
        return self.sigmas if self.sigmas is not None else self.family_sigmas()


@torch.no_grad()
@with_settings_signature(EDMSettings)
def edm_sampler(
    net,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    guidance: Callable | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    step_runner: Callable[[Callable], Callable] | None = None,
    ops: StepOps | None = None,
    block_plans: Sequence | None = None,
    settings: EDMSettings | None = None,
    **kwargs,
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
        guidance: `ClassifierGuidance` (or any callable (x, labels) -> (grad, J)); None samples
            unguided.
        dtype: sampler state dtype, float32 (default) or float64 (the authors' setting).
        callback: called after each step with a dict: x (the new state), i, sigma (sigma_i),
            sigma_hat, denoised, guidance_norm (B,) or None, J (B,) or None.
        step_runner: maps the step function (`edm_step`, or `multistep.multistep_step` with a
            multistep solver) to the function that runs it (the engine's compiled or
            CUDA-graph versions); default: `edm_step` itself, eagerly.
        ops: the step's elementwise pieces (`engine.fused_ops` gives C++/Triton versions);
            default: plain PyTorch.
        block_plans: one block plan per step (`models.block_plan`), passed unread to every
            network call of that step as `block_plan=`, with `block_cache=` a dict this run owns;
            None (or a None entry) calls the network plainly.
        settings: an `EDMSettings`; the keyword arguments (num_steps, sigma_min, sigma_max, rho,
            sigmas (explicit noise levels), S_churn, S_min, S_max, S_noise: EDM's; solver, max_order:
            the ODE solver; max_guidance, add_factor, guidance_interval: the guidance schedule) build
            one, or change the given one.
    Returns:
        (B, C, H, W) samples in the state dtype (images in about [-1, 1]).
    """
    settings = resolve_settings(EDMSettings, settings, kwargs)
    check_latents("latents", latents)
    dtype = check_state_dtype(dtype)
    num_steps = settings.num_steps
    batch = latents.shape[0]
    label_dim = getattr(net, "label_dim", 0) or 0
    ids = class_ids(class_labels, batch, label_dim)
    net_labels = None
    if label_dim:
        if ids is None:
            raise ValueError(f"class_labels: the network is class-conditional (label_dim {label_dim}); pass labels")
        net_labels = torch.nn.functional.one_hot(ids.long(), label_dim).to(device=latents.device, dtype=torch.float32)
    guided = guided_steps(guidance, ids, latents.shape[1:], latents.device, num_steps, settings.guidance_interval)

    # The whole time schedule (including churned t_hat) is known before the loop: compute it
    # here so no step reads a device value on the host.
    t_steps = settings.time_steps(net)
    t_hats = [t.to(latents.device) for t in edm_churn(net, t_steps, settings.S_churn, settings.S_min, settings.S_max)]

    multistep = settings.solver != "heun"
    if multistep:  # coefficients from the host's float64 time steps, whatever the device
        coefficients, history = multistep_start(settings.solver, settings.max_order, t_steps, latents, dtype)
        denoise = edm_denoiser(net, net_labels)
    t_steps = t_steps.to(latents.device)

    net_extras = step_network_kwargs(block_plans, num_steps)
    step = multistep_step if multistep else edm_step
    step = step_runner(step) if step_runner is not None else step
    weights = [torch.tensor(w, dtype=dtype, device=latents.device) for w in settings.guidance_weights()]
    x_next = latents.to(dtype) * t_steps[0]
    non_finite = NonFiniteTracker(latents.device)
    for i in range(num_steps):
        x_cur = x_next
        if multistep:
            x_next, denoised, history, g, objective = step(
                denoise, guidance, x_cur, None, t_steps[i], coefficients[i], history, weights[i],
                ids, solver=settings.solver, guided=guided[i], ops=ops or PLAIN_OPS, net_extra=net_extras[i])
        else:
            z = randn_like(x_cur)
            x_next, denoised, g, objective = step(
                net, guidance, x_cur, z, t_steps[i], t_hats[i], t_steps[i + 1], weights[i], settings.S_noise,
                net_labels, ids, guided=guided[i], heun=i < num_steps - 1, net_extra=net_extras[i],
                **({"ops": ops} if ops is not None else {}))
        non_finite.update(i, x_next)
        if callback is not None:
            callback({"x": x_next, "i": i, "sigma": t_steps[i], "sigma_hat": t_hats[i], "denoised": denoised,
                      "guidance_norm": None if g is None else rms(g), "J": objective})
    non_finite.check(x_next, num_steps, "check the network and, when guided, the classifier's logits and "
                     "max_guidance / add_factor")
    return x_next


class StepOps(NamedTuple):
    """The two elementwise pieces of a guided EDM step, swappable for fused kernels:
    `classifier_input(x) -> (xc, r)` and `guidance_update(x, g, z, noise_scale, w) -> x_hat`."""

    classifier_input: Callable
    guidance_update: Callable


PLAIN_OPS = StepOps(edm_classifier_input, edm_guidance_update)


def edm_denoiser(net, net_labels: torch.Tensor | None) -> Callable:
    """EDM's denoiser D(x, sigma, **net_extra) = net(x, sigma, labels, **net_extra) in x's dtype,
    for the multistep step (made once per run, so a compiled or captured step sees the same
    function every step)."""
    return lambda x, sigma, **net_extra: net(x, sigma, net_labels, **net_extra).to(x.dtype)


def edm_step(net, guidance, x_cur: torch.Tensor, z: torch.Tensor, t_cur: torch.Tensor, t_hat: torch.Tensor,
             t_next: torch.Tensor, weight: torch.Tensor, S_noise: float, net_labels: torch.Tensor | None,
             ids: torch.Tensor | None, *, guided: bool, heun: bool, ops: StepOps = PLAIN_OPS,
             net_extra: Mapping = NO_EXTRA):
    """One step of Algorithm 2: x_i (B, C, H, W) and its noise z -> x_{i+1}.

    All per-step values are 0-d tensors (so a compiled step is reused across steps); only the
    two flags select code. `ops` supplies the classifier-input normalisation and the guided
    update (plain PyTorch by default; the engine may pass fused kernels computing the same).
    `net_extra` goes to both network calls unread (a block plan and the run's cache).
    Returns (x_next, denoised, g (the classifier gradient) or None, J or None).
    """
    noise_scale = (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise
    g = objective = None
    if guided:
        # xc = x_i / rms(x_i) where rms > 1; x_hat = x_i + noise_scale z + g / rms(g) rms(x_i) w_i
        # (rms(g) clamped: an all-zero g gives a guidance term of exactly 0, never NaN).
        g, objective = edm_classifier_gradient(guidance, x_cur, ids, ops.classifier_input)
        x_hat = ops.guidance_update(x_cur, g.to(x_cur.dtype), z, noise_scale, weight.expand(x_cur.shape[0]))
    else:
        x_hat = x_cur + noise_scale * z

    denoised = net(x_hat, t_hat, net_labels, **net_extra).to(x_cur.dtype)
    d_cur = (x_hat - denoised) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if heun:
        denoised = net(x_next, t_next, net_labels, **net_extra).to(x_cur.dtype)
        d_prime = (x_next - denoised) / t_next
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, denoised, g, objective
