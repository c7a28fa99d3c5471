"""Few-step multistep ODE solvers for EDM-family denoisers (SPEC §10), guided the EluCD way.

Below about 10 network evaluations Heun spends half its calls on corrections. A linear multistep
solver makes one denoiser call per step (N calls for N steps, against Heun's 2N - 1) and reuses
the previous steps' calls to reach a higher order. Two solvers, in EDM's sigma parametrisation
(D the denoiser, d_i = (x_i - D_i) / sigma_i, steps sigma_0 > ... > sigma_{N-1} > sigma_N = 0):

- iPNDM (improved PNDM, Zhang & Chen 2023; the solver of GITS, zju-pi/diff-sampler):

      x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d',   d' = d_i                                        order 1
                                                        (3 d_i - d_{i-1}) / 2                         order 2
                                                        (23 d_i - 16 d_{i-1} + 5 d_{i-2}) / 12        order 3
                                                        (55 d_i - 59 d_{i-1} + 37 d_{i-2} - 9 d_{i-3}) / 24

  order min(max_order, i + 1): a lower-order start, the full order from step 3 on, the last step
  (to sigma = 0) included.

- DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's `sample_dpmpp_2m`), with lambda = -log sigma,
  h_i = lambda_{i+1} - lambda_i, r_i = h_{i-1} / h_i:

      D'      = (1 + 1 / (2 r_i)) D_i - 1 / (2 r_i) D_{i-1}      (D' = D_i at step 0 and to sigma = 0)
      x_{i+1} = (sigma_{i+1} / sigma_i) x_i + (1 - sigma_{i+1} / sigma_i) D'

  its coefficients computed as k-diffusion computes them, through lambda
  (sigma_{i+1} / sigma_i = exp(-lambda_{i+1}) / exp(-lambda_i), 1 - sigma_{i+1} / sigma_i =
  -expm1(-h_i)), so an unguided seed gives k-diffusion's image bit for bit. max_order 1 gives
  DPM-Solver++(1) (DDIM).

Guidance (Algorithm 2, SPEC §4): before step i's denoiser call the state is displaced,
x_hat_i = x_i + dx_i with dx_i = g / rms(g) * rms(x_i) * w_i and g the classifier gradient at the
normalised x_i, the same w_i as Heun's (i and N of the steps run); the step then runs from x_hat_i
with D_i = D(x_hat_i, sigma_i). The history holds what the solver evaluated: D_i (DPM-Solver++)
or d_i = (x_hat_i - D_i) / sigma_i (iPNDM) at the displaced states. Why: a multistep solver
extrapolates the denoiser along the path it actually followed, and that path runs through the
displaced states (the guidance is a perturbation of the state, as in Heun, whose d_cur is also
taken at x_hat); the value at the undisplaced x_i would cost a second call per step, the very
call a multistep solver exists to save. It is also what k-diffusion's `sample_dpmpp_2m` does with
`integrations.kdiffusion.GuidedDenoiser` (its docstring: "the history at the displaced points").

No churn: these integrate the probability-flow ODE, so the settings refuse S_churn > 0 and the
samplers draw no noise after the latents.

Every per-step value is a 0-d tensor and the history a fixed-shape stack (missing entries zero,
with zero coefficients until it fills), so one compiled or CUDA-graph step serves every step of a
run; only the `guided` and `latent` flags select code. Zero coefficients change no bit: 0 * h
adds an exact zero (tests compare with k-diffusion and diff-sampler's formulas bit for bit).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..guidance.update import edm_classifier_gradient
from .step_plans import NO_EXTRA

# The solvers of EDM-family samplers' `solver` setting, and each multistep solver's highest order.
SOLVERS = ("heun", "ipndm", "dpmpp_2m")
MULTISTEP_ORDERS = {"ipndm": 4, "dpmpp_2m": 2}
MAX_ORDER = max(MULTISTEP_ORDERS.values())

# iPNDM's Adams-Bashforth weights of d_i, d_{i-1}, d_{i-2}, d_{i-3} and their divisor, per order.
# The signs alternate: the step evaluates c0 d_i - c1 d_{i-1} + c2 d_{i-2} - c3 d_{i-3}, in
# diff-sampler's operation order, so its images are reproduced bit for bit.
IPNDM_WEIGHTS = {1: (1.0, 0.0, 0.0, 0.0, 1.0), 2: (3.0, 1.0, 0.0, 0.0, 2.0),
                 3: (23.0, 16.0, 5.0, 0.0, 12.0), 4: (55.0, 59.0, 37.0, 9.0, 24.0)}


def solver_order(solver: str, max_order: int) -> int:
    """The highest order `solver` reaches under the cap `max_order`."""
    return min(max_order, MULTISTEP_ORDERS[solver])


def history_length(solver: str, max_order: int) -> int:
    """How many past values the solver's history stack holds (at least 1: a fixed shape)."""
    return max(solver_order(solver, max_order) - 1, 1)


def multistep_coefficients(solver: str, sigmas: torch.Tensor, max_order: int) -> torch.Tensor:
    """Every step's coefficients, (N, K) in sigmas' dtype and device, computed before the loop.

    Args:
        solver: "ipndm" or "dpmpp_2m".
        sigmas: (N + 1,) sigma_0 > ... > sigma_{N-1} > sigma_N = 0.
        max_order: the order cap.
    Returns:
        iPNDM (K = 6): sigma_{i+1} - sigma_i, c0, c1, c2, c3, divisor (IPNDM_WEIGHTS of order
        min(max_order, i + 1), c_j = 0 beyond it). DPM-Solver++ (K = 4): sigma_{i+1} / sigma_i
        and -expm1(-h_i) as k-diffusion computes them, the weights 1 + 1 / (2 r_i) and 1 / (2 r_i)
        of D_i and D_{i-1} (1 and 0 at order 1: step 0, the step to sigma = 0, max_order 1).
    """
    num_steps = sigmas.shape[0] - 1
    order_cap = solver_order(solver, max_order)
    rows = []
    if solver == "ipndm":
        for i in range(num_steps):
            weights = torch.tensor(IPNDM_WEIGHTS[min(order_cap, i + 1)], dtype=sigmas.dtype, device=sigmas.device)
            rows.append(torch.cat([(sigmas[i + 1] - sigmas[i]).reshape(1), weights]))
        return torch.stack(rows)
    if solver != "dpmpp_2m":
        raise ValueError(f"solver: expected one of {', '.join(map(repr, MULTISTEP_ORDERS))}, got {solver!r}")
    lambdas = sigmas.log().neg()  # lambda = -log sigma (inf at sigma = 0)
    one, zero = torch.ones_like(sigmas[0]), torch.zeros_like(sigmas[0])
    for i in range(num_steps):
        h = lambdas[i + 1] - lambdas[i]
        ratio = lambdas[i + 1].neg().exp() / lambdas[i].neg().exp()  # sigma_{i+1} / sigma_i, as k-diffusion
        data_weight = (-h).expm1()  # the step subtracts it: -expm1(-h) = 1 - sigma_{i+1} / sigma_i
        if i == 0 or i == num_steps - 1 or order_cap == 1:
            current, previous = one, zero
        else:
            r = (lambdas[i] - lambdas[i - 1]) / h
            current, previous = 1 + 1 / (2 * r), 1 / (2 * r)
        rows.append(torch.stack([ratio, data_weight, current, previous]))
    return torch.stack(rows)


def multistep_start(solver: str, max_order: int, sigmas: torch.Tensor, latents: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """What a multistep run needs before its loop: every step's coefficients (N, K), computed from
    `sigmas` (N + 1,) where they are and moved to the latents' device, and the empty history
    (M, B, C, H, W) in the state dtype."""
    coefficients = multistep_coefficients(solver, sigmas, max_order).to(latents.device)
    history = latents.new_zeros((history_length(solver, max_order), *latents.shape), dtype=dtype)
    return coefficients, history


def push_history(history: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The history stack (M, B, ...) with `value` (B, ...) as its newest entry and the oldest
    dropped: a new tensor, so the stack never aliases a step's input buffers."""
    return torch.cat([value[None], history[:-1]])


def multistep_step(denoise: Callable, guidance, x_cur: torch.Tensor, x0: torch.Tensor | None, t_cur: torch.Tensor,
                   coefficients: torch.Tensor, history: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor | None,
                   *, solver: str, guided: bool, ops, latent: bool = False, net_extra: Mapping = NO_EXTRA):
    """One multistep step: x_i (B, C, H, W) -> x_{i+1}, one call of `denoise`.

    Args:
        denoise: D(x, sigma, **net_extra) -> denoised (x's shape, cast to x's dtype by the caller's D);
            `net_extra` (a block plan and the run's cache) goes to it unread.
        guidance: the classifier guidance (x, labels) -> (g, J); used on guided steps.
        x_cur: the state x_i. x0: the image the classifier sees on guided latent steps (EDM2's
            latent guidance; None elsewhere).
        t_cur: sigma_i (0-d). coefficients: (K,) this step's row of `multistep_coefficients`.
        history: (M, B, C, H, W) past values, newest first (d for iPNDM, D for DPM-Solver++).
        weight: w_i (0-d).
        ids: (B,) the classifier's target labels.
        solver: "ipndm" or "dpmpp_2m". guided: displace x_i first. latent: g is taken at `x0`.
        ops: `samplers.edm.StepOps` (classifier input and guided update; fused by the engine).
    Returns:
        (x_next, denoised D_i, the new history (M, B, C, H, W), g or None, J or None).
    """
    g = objective = None
    x_hat = x_cur
    if guided:
        g, objective = edm_classifier_gradient(guidance, x_cur, ids, ops.classifier_input, x0 if latent else None)
        # x_hat = x_i + dx_i: no churn, so the update's noise term is an exact zero.
        x_hat = ops.guidance_update(x_cur, g.to(x_cur.dtype), torch.zeros_like(x_cur), torch.zeros_like(t_cur),
                                    weight.expand(x_cur.shape[0]))
    denoised = denoise(x_hat, t_cur, **net_extra)
    if solver == "ipndm":
        step, c0, c1, c2, c3, divisor = coefficients.unbind()
        d_cur = (x_hat - denoised) / t_cur
        d_prime = c0 * d_cur - c1 * history[0]
        if history.shape[0] > 1:
            d_prime = d_prime + c2 * history[1]
        if history.shape[0] > 2:
            d_prime = d_prime - c3 * history[2]
        x_next = x_hat + step * d_prime / divisor
        return x_next, denoised, push_history(history, d_cur), g, objective
    ratio, data_weight, current, previous = coefficients.unbind()
    denoised_prime = current * denoised - previous * history[0]
    x_next = ratio * x_hat - data_weight * denoised_prime
    return x_next, denoised, push_history(history, denoised), g, objective


__all__ = ["MAX_ORDER", "MULTISTEP_ORDERS", "SOLVERS", "history_length", "multistep_coefficients", "multistep_start",
           "multistep_step", "push_history", "solver_order"]
