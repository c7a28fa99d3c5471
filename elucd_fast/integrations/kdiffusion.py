"""k-diffusion integration: EluCD guidance inside any k-diffusion sampler, and adapters between
k-diffusion denoisers and the EDM network interface.

k-diffusion's protocol is a denoiser `D(x, sigma, **extra) -> denoised` called by samplers that
own the state x. Algorithm 2 (SPEC §4) moves the state itself: before the ODE step from sigma_i
to sigma_{i+1} it displaces x_i by

    dx_i = g / rms(g) * rms(x_i) * w_i,   g = grad J(x_i / max(rms(x_i), 1)),

and integrates from x_hat = x_i + dx_i. A wrapper cannot move the sampler's state, but it can
make every stage of the sampler's step see the displaced trajectory. `GuidedDenoiser` treats the
displacement as a constant extra velocity dx_i / (sigma_{i+1} - sigma_hat) over the step (the
step that reaches sigma_{i+1} from sigma_hat, the sampler's possibly churned sigma_i) and, at a
stage at sigma' of that step, evaluates the denoiser where the displaced trajectory is:

    rho = (sigma_{i+1} - sigma') / (sigma_{i+1} - sigma_hat)   # share of dx not yet integrated
    D'(x, sigma') = D(x + rho * dx_i, sigma') - dx_i * sigma_{i+1} / (sigma_{i+1} - sigma_hat)

so the sampler's derivative (x - D') / sigma' is the unguided derivative at the displaced point
plus dx_i / (sigma_{i+1} - sigma_hat). For every explicit Runge-Kutta method in sigma whose
stage weights are consistent (sum_k a_jk = c_j, sum_j b_j = 1), the stage points then equal the
displaced method's stage points and the step ends at exactly `x_hat + step of the same method
from x_hat`: Euler and Heun reproduce Algorithm 2 (`sample_heun` equals `edm_sampler`, the Heun
correction unguided as in the paper), and DPM-Solver-2 gets the same splitting. The same
algebra holds for k-diffusion's exponential integrators (`sample_dpmpp_2s_ancestral` with
eta=0; the first-order DPM-Solver++ step), whose steps are affine in x and D with the same
end-point coefficients.

DPM-Solver++(2M) extrapolates the returned estimates across steps, (1 + a_i) D'_i - a_i D'_{i-1}
with a_i = h_i / (2 h_{i-1}), h_i = log(sigma_i / sigma_{i+1}); a plain shift would enter the next
step's extrapolation too, and since dx scales with sigma it would even reverse the guidance. The
wrapper therefore returns D'_i = D - S'_i with S'_i = (S_i + a_i S'_{i-1}) / (1 + a_i), S_i the
shift above, so the extrapolated estimate carries exactly S_i: the step again equals the same
sampler's step from the displaced state, with the history at the displaced points. Other
multistep samplers (lms, DPM-Solver++ 2M/3M SDE) extrapolate with other weights and are refused.

Approximate by design: ancestral samplers take their deterministic part to sigma_down below
sigma_{i+1}, which scales that step's displacement by (sigma_hat - sigma_down) /
(sigma_hat - sigma_{i+1}), and DPM-Solver++ SDE mixes its two stages with noise in between.
With churn the classifier sees the churned state (k-diffusion adds the churn before calling the
denoiser), EDM's x_i before it.

Step bookkeeping without host syncs: which call starts a step cannot be read from the call
itself. Heun's correction call (x + d * dt, sigma_{i+1}) is exactly Euler's first call of step
i + 1, and k-diffusion reports step i (its callback) before the correction. So the wrapper counts
calls on the host: a sampler makes `stages` denoiser calls per step and one at the last step
(sigma_{N} = 0), true of every fixed-step k-diffusion sampler (`KDIFFUSION_SAMPLERS`). No sigma is
read back from the device. Passing `callback=guided.callback` (as `sample` does) checks the
count against the sampler's own step index and adds the guidance report to its dict.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..checks import class_ids
from ..guidance.schedules import GuidanceInterval
from ..guidance.update import edm_classifier_input, edm_displacement
from ..numerics import per_sample, rms
from ..samplers.edm import EDMSettings
from ..schedules.edm import edm_sigma_steps

# k-diffusion's fixed-step samplers this wrapper guides: (denoiser calls per step, all but the
# last step, which makes one; the extrapolation over past estimates it compensates, if any).
KDIFFUSION_SAMPLERS: dict[str, tuple[int, str | None]] = {
    "sample_euler": (1, None), "sample_euler_ancestral": (1, None), "sample_heun": (2, None),
    "sample_dpm_2": (2, None), "sample_dpm_2_ancestral": (2, None), "sample_dpmpp_2s_ancestral": (2, None),
    "sample_dpmpp_sde": (2, None), "sample_dpmpp_2m": (1, "dpmpp_2m")}
MULTISTEP = (None, "dpmpp_2m")
# Samplers refused, and why (adaptive ones, sample_dpm_fast and sample_dpm_adaptive, have no
# fixed schedule at all).
UNSUPPORTED = {name: "extrapolates over past estimates with weights the wrapper does not compensate"
               for name in ("sample_lms", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde")}


def edm_guidance_displacement(guidance: Callable, x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2's guidance displacement of the state x (B, C, H, W) at one step:

        r = rms(x);  g = grad J(x / r if r > 1 else x);  dx = g / rms(g) * r * weight

    Returns (dx in x's dtype, rms(g) (B,), J (B,)). `weight` is a 0-d tensor (w_i).
    """
    xc, _ = edm_classifier_input(x)
    g, objective = guidance(xc, ids)
    g = g.to(x.dtype)
    return edm_displacement(x, g, weight).to(x.dtype), rms(g), objective


def _check_schedule(sigmas: torch.Tensor) -> list[float]:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas: expected the sampler's 1-d schedule sigma_0 > ... > sigma_N = 0 (a tensor)")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    if values[-1] != 0 or any(not b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas: must decrease strictly and end in 0, as k-diffusion's get_sigmas_* return; "
                         f"got {values[:3]} ... {values[-2:]}")
    return values


class GuidedDenoiser(nn.Module):
    """Any k-diffusion denoiser with EluCD's EDM guidance (Algorithm 2) applied by the
    formulation in the module docstring, for use with k-diffusion's samplers.

    Args:
        denoiser: k-diffusion denoiser `denoiser(x, sigma, **extra) -> denoised` (B, C, H, W).
        guidance: `ClassifierGuidance` (or any callable (x, labels) -> (grad, J)).
        sigmas: (N + 1,) the schedule the sampler gets, decreasing to 0 (k-diffusion's
            `get_sigmas_karras(...)`, or `KDiffusionDenoiser.get_sigmas` for EDM's rounded one).
        class_labels: (B,) ids or (B, K) one-hot: the guidance targets. (The denoiser gets its
            own conditioning through the sampler's `extra_args`.)
        max_guidance: wmax of the schedule w_i; add_factor: its sine-added fraction (SPEC §4).
        guidance_interval: which steps are guided (default all); other steps call the
            denoiser only.
        stages: denoiser calls per step of the sampler that will call it (1: Euler, DPM-Solver++
            2M, ...; 2: Heun, DPM-2, ...); multistep: "dpmpp_2m" for DPM-Solver++(2M), else None.
            `sample` sets both from the sampler (`KDIFFUSION_SAMPLERS`).

    Calling it follows k-diffusion's protocol. A run is N steps of `stages` calls (one at the
    last step); the next call after a run starts a new one (`reset` forgets a broken-off run).
    """

    def __init__(self, denoiser: Callable, guidance: Callable, sigmas: torch.Tensor, *,
                 class_labels: torch.Tensor, max_guidance: float = 0.001, add_factor: float = 0.0,
                 guidance_interval: GuidanceInterval | None = None, stages: int = 1,
                 multistep: str | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.guidance = guidance
        sigma_values = _check_schedule(sigmas)
        self.sigmas = sigmas
        self.num_steps = len(sigma_values) - 1
        # The guidance schedule of Algorithm 2 over the sampler's steps, checked as the EDM sampler's.
        schedule = EDMSettings(num_steps=self.num_steps, max_guidance=max_guidance, add_factor=add_factor,
                               guidance_interval=guidance_interval)
        self.weights = schedule.guidance_weights()
        self.guided_steps = (guidance_interval or GuidanceInterval()).steps(self.num_steps)
        self.class_labels = class_labels
        self.stages, self.multistep = _check_structure(stages, multistep)
        self._checked_shapes: set[tuple[int, ...]] = set()
        self.reset()

    def reset(self) -> None:
        """Forget any run in progress: the next call is step 0's first."""
        self._step = 0                   # step of the next call
        self._call = 0                   # index of the next call within that step
        self._displacement = None        # (dx, sigma_hat, sigma_next, shift) of a guided step
        self._report = (None, None)      # (guidance_norm, J) of the step in progress
        self._history = None             # S'_{i-1} of DPM-Solver++(2M) compensation
        self._run = None                 # per-run device tensors

    def _start_run(self, x: torch.Tensor) -> None:
        """Once per run, before any guided work: labels, checks (host syncs allowed here) and
        the schedule as device tensors, so no step copies a host value to the device."""
        ids = class_ids(self.class_labels, x.shape[0], None)
        if ids is None:
            raise ValueError("class_labels: guidance needs target labels")
        ids = ids.to(x.device)
        shape = tuple(x.shape[1:])
        if hasattr(self.guidance, "check_input") and shape not in self._checked_shapes:
            self.guidance.check_input(shape, ids, x.device)
            self._checked_shapes.add(shape)
        self._run = dict(ids=ids, weights=torch.tensor(self.weights, dtype=x.dtype, device=x.device),
                         sigma_next=self.sigmas[1:].to(device=x.device, dtype=x.dtype),
                         history_weights=torch.tensor(self._history_weights(), dtype=x.dtype, device=x.device))

    def _history_weights(self) -> list[float]:
        """a_i of the extrapolation (1 + a_i) D_i - a_i D_{i-1}, per step; 0 where the sampler
        takes a first-order step (step 0, the last step, and every step of one-step samplers)."""
        if self.multistep is None:
            return [0.0] * self.num_steps
        sigmas = self.sigmas.detach().to("cpu", torch.float64).tolist()
        h = [math.log(sigmas[i] / sigmas[i + 1]) for i in range(self.num_steps - 1)]
        return [0.0] + [h[i] / (2 * h[i - 1]) for i in range(1, self.num_steps - 1)] + [0.0]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        """D'(x, sigma) (B, C, H, W) in x's dtype; sigma is (B,) as k-diffusion passes it."""
        sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])
        i, call = self._step, self._call
        calls_this_step = self.stages if i < self.num_steps - 1 else 1
        self._call = call + 1
        if self._call == calls_this_step:
            self._step, self._call = (i + 1) % self.num_steps, 0
        if call == 0:
            return self._first_call(i, x, sigma, extra)
        if self._displacement is None:
            return self.denoiser(x, sigma, **extra).to(x.dtype)
        dx, sigma_hat, sigma_next, shift = self._displacement
        remaining = per_sample((sigma_next - sigma) / (sigma_next - sigma_hat), x)
        return self.denoiser(x + remaining * dx, sigma, **extra).to(x.dtype) - shift

    def _first_call(self, i: int, x: torch.Tensor, sigma: torch.Tensor, extra: dict) -> torch.Tensor:
        if i == 0:
            self._start_run(x)
            self._history = None
        run = self._run
        self._displacement, self._report = None, (None, None)
        dx = shift = None
        if self.guided_steps[i]:
            dx, guidance_norm, objective = edm_guidance_displacement(self.guidance, x, run["ids"], run["weights"][i])
            self._report = (guidance_norm, objective)
            sigma_next = run["sigma_next"][i]
            # sigma_{i+1} / (sigma_{i+1} - sigma_hat) per sample: 0 at the last step, where the
            # sampler's step lands on D' itself.
            shift = dx * per_sample(sigma_next / (sigma_next - sigma), x)
            self._displacement = (dx, sigma, sigma_next, shift)
        if self.multistep is not None and self._history is not None:
            # S'_i = (S_i + a_i S'_{i-1}) / (1 + a_i): the extrapolated estimate carries S_i only.
            a = run["history_weights"][i]
            shift = (a * self._history if shift is None else shift + a * self._history) / (1 + a)
        if self.multistep is not None:
            self._history = shift
        denoised = self.denoiser(x if dx is None else x + dx, sigma, **extra).to(x.dtype)
        return denoised if shift is None else denoised - shift

    def callback(self, info: dict) -> dict:
        """The sampler's per-step callback (optional): checks that k-diffusion's step info['i']
        is the step the call count is in, and adds 'guidance_norm' and 'J' ((B,), None on
        unguided steps) to `info`, which it returns."""
        i = info["i"]
        # k-diffusion reports step i right after its first call: the count is then at call 1
        # of step i, or already at step i + 1 when the step has a single call.
        at = (self._step - 1) % self.num_steps if self._call == 0 else self._step
        if i != at:
            raise RuntimeError(f"GuidedDenoiser: the sampler reported step {i} but the call count is in step {at}: "
                               f"its sigmas must be the {self.num_steps + 1} given to the wrapper and stages "
                               f"({self.stages}) its calls per step")
        info["guidance_norm"], info["J"] = self._report
        return info

    def sample(self, sampler: Callable, x: torch.Tensor, *, extra_args: dict | None = None,
               callback: Callable[[dict], None] | None = None, stages: int | None = None,
               multistep: str | None = None, **kwargs) -> torch.Tensor:
        """Runs a k-diffusion sampler (`sample_euler`, `sample_heun`, `sample_dpmpp_2m`, ...)
        with this denoiser and its schedule: `sampler(self, x, self.sigmas, extra_args=...,
        callback=..., **kwargs)`. x (B, C, H, W) is the starting state (noise * sigmas[0]);
        `callback` gets k-diffusion's dict plus 'guidance_norm' and 'J'. `stages` and
        `multistep` default to the sampler's entry in `KDIFFUSION_SAMPLERS` (give `stages` for
        other one-step samplers)."""
        name = getattr(sampler, "__name__", type(sampler).__name__)
        if name in UNSUPPORTED:
            raise ValueError(f"sampler: {name} {UNSUPPORTED[name]}; use sample_euler, sample_heun, sample_dpm_2, "
                             "sample_dpmpp_2s_ancestral or sample_dpmpp_2m")
        if stages is None:
            if name not in KDIFFUSION_SAMPLERS:
                raise ValueError(f"stages: {name} is not a known fixed-step k-diffusion sampler; "
                                 "pass its number of denoiser calls per step")
            stages, multistep = KDIFFUSION_SAMPLERS[name]
        self.stages, self.multistep = _check_structure(stages, multistep)
        self.reset()

        def report(info: dict) -> None:
            self.callback(info)
            if callback is not None:
                callback(info)

        return sampler(self, x, self.sigmas.to(x.device), extra_args=extra_args, callback=report, **kwargs)


def _check_structure(stages: int, multistep: str | None) -> tuple[int, str | None]:
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages: must be an integer >= 1 (denoiser calls per step), got {stages!r}")
    if multistep not in MULTISTEP:
        raise ValueError(f"multistep: expected one of {MULTISTEP}, got {multistep!r}")
    if multistep is not None and stages != 1:
        raise ValueError(f"stages: {multistep} makes one denoiser call per step, got stages={stages}")
    return stages, multistep


def _one_hot(labels: torch.Tensor | None, label_dim: int) -> torch.Tensor | None:
    """(B,) ids or (B, K) one-hot -> (B, label_dim) float32 one-hot, None stays None."""
    if labels is None or labels.ndim == 2:
        return labels
    return nn.functional.one_hot(labels.long(), label_dim).to(torch.float32)


class KDiffusionDenoiser(nn.Module):
    """An EDM-interface network (`net(x, sigma, class_labels)`, ours or EDM's) as a k-diffusion
    denoiser `forward(x, sigma, class_labels=None)`; labels may be ids (B,) or one-hot (B, K).

    `get_sigmas` gives EDM's own rounded schedule, so k-diffusion's `sample_heun` with it runs
    Algorithm 2's time steps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.label_dim = getattr(net, "label_dim", 0) or 0
        self.sigma_min, self.sigma_max = float(net.sigma_min), float(net.sigma_max)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised (B, C, H, W) in x's dtype for x (B, C, H, W) at sigma (scalar or (B,))."""
        labels = _one_hot(class_labels, self.label_dim) if self.label_dim else None
        return self.net(x, sigma, labels).to(x.dtype)

    def get_sigmas(self, num_steps: int = 18, *, sigma_min: float = 0.002, sigma_max: float = 80,
                   rho: float = 7) -> torch.Tensor:
        """(num_steps + 1,) float64 EDM schedule rounded by the network, ending in 0 (host)."""
        return edm_sigma_steps(self.net, num_steps, sigma_min, sigma_max, rho)


def as_kdiffusion_denoiser(net: nn.Module) -> KDiffusionDenoiser:
    """An EDM-interface network as a k-diffusion denoiser (see `KDiffusionDenoiser`)."""
    return KDiffusionDenoiser(net)


class KDiffusionNetwork(nn.Module):
    """A k-diffusion denoiser `model(x, sigma, **extra)` (e.g. `external.DiscreteEpsDDPMDenoiser`,
    `CompVisDenoiser`, `VDenoiser`) as an EDM-interface network, so `edm_sampler` can drive it.

    Args:
        model: the k-diffusion denoiser.
        label_dim: number of classes (0: unconditional).
        label_kwarg: the keyword the model takes labels by ("class_labels", "y", "cond", ...).
        one_hot_labels: pass one-hot rows (B, label_dim) instead of ids (B,).
        sigma_min, sigma_max: the valid noise range; default the model's own attributes.
        img_channels, img_resolution: image shape (C, H = W), for callers that read them.
        extra_args: further keywords passed on every call (e.g. fixed conditioning).

    `round_sigma` snaps to the model's discrete noise levels when it quantizes (a
    `DiscreteSchedule` with quantize=True), as EDM's iDDPMPrecond does; otherwise any sigma in
    range is valid and it returns sigma unchanged.
    """

    def __init__(self, model: nn.Module, *, label_dim: int = 0, label_kwarg: str = "class_labels",
                 one_hot_labels: bool = False, sigma_min: float | None = None, sigma_max: float | None = None,
                 img_channels: int = 3, img_resolution: int | None = None, extra_args: dict | None = None):
        super().__init__()
        self.model = model
        self.label_dim, self.label_kwarg, self.one_hot_labels = label_dim, label_kwarg, one_hot_labels
        if sigma_min is None or sigma_max is None:
            if not (hasattr(model, "sigma_min") and hasattr(model, "sigma_max")):
                raise ValueError("sigma_min, sigma_max: the model has no sigma_min/sigma_max; pass its valid noise range")
        self.sigma_min = float(model.sigma_min if sigma_min is None else sigma_min)
        self.sigma_max = float(model.sigma_max if sigma_max is None else sigma_max)
        self.img_channels, self.img_resolution = img_channels, img_resolution
        self.extra_args = dict(extra_args or {})
        levels = getattr(model, "sigmas", None) if getattr(model, "quantize", False) else None
        self._levels = None if levels is None else levels.detach().to("cpu", torch.float64)

    def round_sigma(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        if self._levels is None:
            return sigma
        index = (sigma.to(torch.float64).log().reshape(-1, 1) - self._levels.log()).abs().argmin(dim=1)
        return self._levels[index].reshape(sigma.shape).to(sigma.dtype)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised (B, C, H, W) for x (B, C, H, W) at sigma (scalar or (B,)); labels one-hot or ids."""
        sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])
        kwargs = dict(self.extra_args)
        if self.label_dim and class_labels is not None:
            kwargs[self.label_kwarg] = (_one_hot(class_labels, self.label_dim) if self.one_hot_labels
                                        else class_labels.argmax(dim=1) if class_labels.ndim == 2 else class_labels)
        return self.model(x, sigma, **kwargs).to(x.dtype)


def from_kdiffusion(model: nn.Module, **kwargs) -> KDiffusionNetwork:
    """A k-diffusion denoiser as an EDM-interface network (see `KDiffusionNetwork` for kwargs)."""
    return KDiffusionNetwork(model, **kwargs)


__all__ = ["KDIFFUSION_SAMPLERS", "GuidedDenoiser", "KDiffusionDenoiser", "KDiffusionNetwork", "as_kdiffusion_denoiser",
           "edm_guidance_displacement", "from_kdiffusion"]
