"""EDM2 sampling (Karras et al. 2024, NVlabs/edm2 `generate_images.py`) with EluCD's calibrated
classifier guidance on top (SPEC §9; beyond the paper).

EDM2's sampler is EDM's Heun schedule with a guided denoiser: with the main network D_net, a
guide network D_g and EDM2's guide weight w,

    D(x, t) = D_g(x, t) + w (D_net(x, t) - D_g(x, t))        # torch.lerp; w = 1: D_net, no guide call

where D_g is an unconditional network (classifier-free guidance, EDM2's "guid" rows) or a
smaller, less-trained one (autoguidance, its "autog" rows). Per step i = 0 ... N-1:

    churn_i = S_churn > 0 and S_min <= sigma_i <= S_max
    t_hat   = sigma_i (1 + min(S_churn / N, sqrt(2) - 1))  if churn_i else sigma_i
    z       ~ N(0, I), drawn ONLY where churn_i              # EDM's sampler draws every step
    x_hat   = x_i + sqrt(t_hat^2 - sigma_i^2) S_noise z + dx_i        (dx_i: the classifier term)
    d_cur   = (x_hat - D(x_hat, t_hat)) / t_hat;   x_{i+1} = x_hat + (sigma_{i+1} - t_hat) d_cur
    i < N - 1: d' = (x_{i+1} - D(x_{i+1}, sigma_{i+1})) / sigma_{i+1};
               x_{i+1} = x_hat + (sigma_{i+1} - t_hat) (d_cur + d') / 2

The time steps are computed as EDM2 computes them: in the state dtype, on the latents' device,
neither clamped to the network's range nor rounded by it (EDM2's networks take any sigma), so a
seed gives EDM2's image bit for bit. With no classifier (`guidance=None`) this is exactly EDM2's
`edm_sampler`.

The classifier term dx_i is Algorithm 2's (SPEC §4), with its weights w_i:

    dx_i = g / rms(g) * rms(x_i) * w_i,
    w_i  = max(wmax (N + 1 - i) / (N + 1), 1e-5) + sin(pi i / N) wmax add

and the gradient g taken where the state's kind asks (our choices, SPEC §9 leaves them open):

- pixels (ImageNet-64, no decoder given): g = grad_xc J(xc) on the normalised state
  xc = x_i / rms(x_i) where rms(x_i) > 1, exactly as Algorithm 2 (and `samplers.edm`) do.
- latents (ImageNet-512, a `decoder` given): the classifier sees the decoded image of the
  current denoised latent (SPEC §5 rule 1): g = grad_{x0} J(Dec(x0)), one vector-Jacobian
  product through the decoder (`guidance.latent.LatentGuidance`, latent_scale 1: EDM2's encoder
  undoes its own whitening). x0 is the guided denoiser's latest estimate at sigma_i: the Heun
  correction of step i - 1 evaluates D at sigma_i (at the Euler point of x_i), so the guidance
  costs no extra network call; before a guided step 0 the sampler evaluates D(x_0, sigma_0). g is a
  direction in latent space; the step then moves x_i by Algorithm 2's dx_i, whose size is set
  by rms(x_i) and w_i alone, so the same wmax means the same per-step displacement, in units
  of the state, in pixels and in latents. A fresh D(x_i, sigma_i) per step would cost one more
  evaluation of each network per guided step (half as much again as Heun's two) for an x0 that
  differs from the reused one only by the Heun correction's move from the Euler point to x_i.
  With a multistep solver (`solver` ipndm or dpmpp_2m, `samplers.multistep`) the latest
  estimate is the previous step's D(x_hat_{i-1}, sigma_{i-1}), one step older: a multistep
  solver makes one call per step, and a fresh one at x_i would double its cost.

`solver` ipndm or dpmpp_2m replaces the Heun step by a multistep one whose D is the guided
denoiser above, with the same classifier term before each call; the settings refuse churn with
them, so no noise is drawn after the latents (EDM2 draws none without churn either).

The defaults of the classifier term are those of `EDMSettings`; the EDM2 presets' values are
ours and untuned (`presets.edm2`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_bool, check_latents, check_number, check_state_dtype, class_ids
from ..guidance.latent import Decoder, LatentGuidance
from ..guidance.schedules import GuidanceInterval, guided_steps
from ..guidance.update import edm_classifier_gradient
from ..numerics import rms
from ..schedules.families import edm_rho_tensor
from .edm import PLAIN_OPS, StepOps
from .multistep import SOLVERS, multistep_start, multistep_step
from .step_plans import NO_EXTRA, step_network_kwargs
from .settings import HeunSchedule, SamplerSettings, resolve_settings, setting, with_settings_signature


@dataclass(frozen=True)
class EDM2Settings(HeunSchedule, SamplerSettings):
    """EDM2's sampler settings (`generate_images.py`: 32 Heun steps, EDM's schedule, guide
    weight 1) plus EluCD's classifier term (SPEC §4, §9)."""

    name: ClassVar[str] = "edm2"

    num_steps: int = setting(32, "Steps N (Heun: 2N - 1 calls of the network, and of the guide network; ipndm, "
                                 "dpmpp_2m: N)")
    sigma_min: float = setting(0.002, "Lowest noise level (EDM2: not clamped or rounded by the network)")
    sigma_max: float = setting(80.0, "Highest noise level")
    rho: float = setting(7.0, "Time-step exponent of EDM's schedule")
    sigmas: tuple[float, ...] | None = setting(
        None, "Explicit noise levels, strictly decreasing, the final 0 implied (EDM2: used as given, in the "
              "state dtype); they set the steps N and replace sigma_min/sigma_max/rho [None: the rho family]")
    solver: str = setting("heun", "ODE solver: heun (EDM's Heun), or the multistep ipndm or dpmpp_2m (one "
                                  "denoiser call per step; no churn)", choices=SOLVERS)
    max_order: int = setting(4, "Order cap of the multistep solvers (ipndm reaches 4, dpmpp_2m 2)")
    guide_weight: float = setting(1.0, "EDM2's guidance w: D = D_guide + w (D_net - D_guide); 1: the network "
                                       "alone, no guide network (EDM2's --guidance; not the classifier's)")
    S_churn: float = setting(0.0, "EDM stochasticity: total churn (0: the ODE)")
    S_min: float = setting(0.0, "Churn only where sigma >= S_min")
    S_max: float = setting(math.inf, "Churn only where sigma <= S_max")
    S_noise: float = setting(1.0, "Noise inflation of the churn")
    max_guidance: float = setting(0.001, "wmax of the classifier term's weights w_i (ours for EDM2, untuned)",
                                  unit="multiples of rms(x_i) per step", guidance=True)
    add_factor: float = setting(0.0, "Sine-added fraction of w_i (the paper: 0.3)",
                                unit="fraction of wmax", guidance=True)
    guidance_interval: GuidanceInterval | None = setting(None, "Which steps are guided, START:STOP:EVERY (step 0: the first, noisiest) [None: every step]",
                                                         guidance=True)
    decoder_checkpointing: bool = setting(False, "Recompute the decoder's activations in the backward pass "
                                                 "(less memory, one more decoder forward)", guidance=True)

    def __post_init__(self):
        self._check_heun()
        check_number("guide_weight", self.guide_weight)
        check_bool("decoder_checkpointing", self.decoder_checkpointing)

    @property
    def uses_guide_network(self) -> bool:
        """Whether the guide network is evaluated (w != 1)."""
        return self.guide_weight != 1

    def time_steps(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """sigma_0 > ... > sigma_{N-1} > sigma_N = 0 (N + 1,) in `dtype` on `device`, neither
        rounded nor clamped: the explicit `sigmas`, else the rho family computed as EDM2
        computes it (in `dtype`)."""
        if self.sigmas is not None:
            t_steps = torch.tensor(self.sigmas, dtype=dtype, device=device)
        else:
            t_steps = edm_rho_tensor(self.num_steps, self.sigma_min, self.sigma_max, self.rho, dtype=dtype,
                                     device=device)
        return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    def step_sequence(self, net=None, dtype: torch.dtype = torch.float32) -> tuple[float, ...]:
        """The explicit levels, else the rho family's as a `dtype` state computes them (EDM2's
        networks take any sigma: `net` changes nothing)."""
        if self.sigmas is not None:
            return self.sigmas
        return tuple(self.time_steps(dtype)[:-1].tolist())

    def churn(self, t_steps: torch.Tensor) -> tuple[list[bool], list[torch.Tensor]]:
        """For the time steps of `time_steps`: which steps churn (a host list, read once before the
        loop) and t_hat_i (0-d tensors in t_steps' dtype and device), with EDM2's arithmetic."""
        n = self.num_steps
        if self.S_churn == 0:
            return [False] * n, [t_steps[i] for i in range(n)]
        gamma = min(self.S_churn / n, math.sqrt(2) - 1)
        # Compared in the state dtype, as EDM2 compares its tensor time steps with S_min, S_max.
        churned = ((t_steps[:-1] >= self.S_min) & (t_steps[:-1] <= self.S_max)).tolist()
        return churned, [t_steps[i] + gamma * t_steps[i] if churned[i] else t_steps[i] for i in range(n)]



@torch.no_grad()
@with_settings_signature(EDM2Settings)
def edm2_sampler(
    net,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    gnet=None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    guidance: Callable | None = None,
    decoder: Decoder | None = None,
    guidance_decoder: Decoder | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    step_runner: Callable[[Callable], Callable] | None = None,
    ops: StepOps | None = None,
    block_plans: Sequence | None = None,
    settings: EDM2Settings | None = None,
    **kwargs,
) -> torch.Tensor:
    """EDM2 sampling (ODE with S_churn = 0, churn SDE otherwise), optionally guided by a guide
    network (w = guide_weight) and by a classifier.

    Args:
        net: EDM2 network interface: `net(x, sigma, class_labels)` -> denoised (x's shape), with
            `label_dim` (0: unconditional); `models.EDM2Precond`.
        latents: (B, C, H, W) standard normal noise; scaled by sigma_0 here, as EDM2 does. C = 3
            pixels (ImageNet-64) or 4 whitened SD-VAE latents (ImageNet-512).
        class_labels: (B,) integer ids or (B, label_dim) one-hot: the network's classes (one-hot
            float32, as EDM2 passes them) and the classifier's targets. Required when the network
            is conditional or the sampling is classifier-guided (an unconditional network with
            a classifier: the labels are the classifier's only).
        gnet: the guide network (same interface; conditional or not as its `label_dim` says);
            required when guide_weight != 1, never called when it is 1.
        randn_like: noise source, called with a tensor of the state dtype on churned steps only,
            as EDM2 does (pass a per-seed generator's `randn_like` for batch-independent images).
        guidance: pixel-space `ClassifierGuidance` (or callable (x, labels) -> (grad, J)); None:
            EDM2's sampler unchanged.
        decoder: latents -> images in [-1, 1], differentiable (an EDM2 `StabilityVAEEncoder`
            with its VAE): the state is a latent and the classifier sees Dec(x0) (see the module
            docstring). None: the state is pixels. The final latents are not decoded here:
            use `decode_edm2_latents(decoder, latents)`.
        guidance_decoder: a cheaper decoder used for the gradient only, in place of `decoder`
            (also makes the state a latent).
        dtype: sampler state dtype, float32 (default, EDM2's) or float64.
        callback: called after each step with a dict: x (the new state), i, sigma (sigma_i),
            sigma_hat, denoised (the last guided-denoiser estimate), guidance_norm (B,) or None,
            J (B,) or None.
        step_runner: maps the step function (`edm2_step`, or `multistep.multistep_step` with a
            multistep solver) to the function that runs it (compiled, CUDA graph);
            default: `edm2_step` itself, eagerly.
        ops: the step's elementwise pieces (`samplers.edm.StepOps`: classifier input and guided
            update, fused versions from `engine.fused_ops`); default: plain PyTorch.
        block_plans: one block plan per step (`models.block_plan`) for `net` (not the guide
            network, whose blocks are others), passed unread to its calls of that step as
            `block_plan=`, with `block_cache=` a dict this run owns; None calls it plainly.
        settings: an `EDM2Settings`; the keyword arguments (num_steps, sigma_min, sigma_max,
            rho, sigmas (explicit noise levels), guide_weight, S_churn, S_min, S_max, S_noise: EDM2's;
            solver, max_order: the ODE solver; max_guidance, add_factor, guidance_interval,
            decoder_checkpointing: the classifier term's) build one, or change the given one.
    Returns:
        (B, C, H, W) final latents in the state dtype (pixels in about [-1, 1] for ImageNet-64).
    """
    settings = resolve_settings(EDM2Settings, settings, kwargs)
    check_latents("latents", latents)
    dtype = check_state_dtype(dtype)
    num_steps = settings.num_steps
    batch = latents.shape[0]
    device = latents.device
    label_dim = getattr(net, "label_dim", 0) or 0
    ids = class_ids(class_labels, batch, label_dim or None)
    net_labels = _one_hot(ids, label_dim, device, "the network")

    if settings.uses_guide_network:
        if gnet is None:
            raise ValueError(f"gnet: guide_weight {settings.guide_weight:g} needs a guide network "
                             "(guide_weight 1 samples without one)")
        guide_dim = getattr(gnet, "label_dim", 0) or 0
        gnet_labels = net_labels if guide_dim == label_dim else _one_hot(ids, guide_dim, device, "the guide network")
    else:
        gnet = gnet_labels = None  # EDM2 never calls the guide at w = 1

    latent = guidance is not None and (decoder is not None or guidance_decoder is not None)
    step_guidance = guidance
    if latent:
        step_guidance = LatentGuidance(guidance, guidance_decoder if guidance_decoder is not None else decoder,
                                       latent_scale=1.0, checkpointing=settings.decoder_checkpointing)
    guided = guided_steps(step_guidance, ids, latents.shape[1:], device, num_steps, settings.guidance_interval)

    # The whole time schedule (which steps churn, t_hat) is known before the loop: no step reads
    # a device value on the host.
    t_steps = settings.time_steps(dtype, device)
    churned, t_hats = settings.churn(t_steps)

    multistep = settings.solver != "heun"
    if multistep:
        coefficients, history = multistep_start(settings.solver, settings.max_order, t_steps, latents, dtype)

        def denoise(x, sigma, **net_extra):  # EDM2's guided denoiser: the D the solver integrates
            return edm2_denoise(net, gnet, x, sigma, settings.guide_weight, net_labels, gnet_labels, net_extra)

    step = multistep_step if multistep else edm2_step
    step = step_runner(step) if step_runner is not None else step
    weights = [torch.tensor(w, dtype=dtype, device=device) for w in settings.guidance_weights()]
    flags = {"latent": latent, **({"ops": ops} if ops is not None else {})}
    net_extras = step_network_kwargs(block_plans, num_steps)
    x_next = latents.to(dtype) * t_steps[0]
    # Latent guidance reads the denoiser's latest x0 estimate; step 0 has none yet.
    denoised = None
    if latent and guided[0]:
        denoised = edm2_denoise(net, gnet, x_next, t_steps[0], settings.guide_weight, net_labels, gnet_labels,
                                net_extras[0])
    for i in range(num_steps):
        x_cur = x_next
        x0 = denoised if latent and guided[i] else None
        if multistep:  # no churn (the settings refuse it): no noise drawn, as EDM2 draws none without churn
            x_next, denoised, history, g, objective = step(
                denoise, step_guidance, x_cur, x0, t_steps[i], coefficients[i], history, weights[i], ids,
                solver=settings.solver, guided=guided[i], latent=latent, ops=ops or PLAIN_OPS, net_extra=net_extras[i])
        else:
            z = randn_like(x_cur) if churned[i] else None
            x_next, denoised, g, objective = step(
                net, gnet, step_guidance, x_cur, z, x0, t_steps[i], t_hats[i], t_steps[i + 1], weights[i],
                settings.guide_weight, settings.S_noise, net_labels, gnet_labels, ids,
                churn=churned[i], guided=guided[i], heun=i < num_steps - 1, net_extra=net_extras[i], **flags)
        if callback is not None:
            callback({"x": x_next, "i": i, "sigma": t_steps[i], "sigma_hat": t_hats[i], "denoised": denoised,
                      "guidance_norm": None if g is None else rms(g), "J": objective})
    return x_next


def edm2_denoise(net, gnet, x: torch.Tensor, sigma: torch.Tensor, guide_weight: float,
                 net_labels: torch.Tensor | None, gnet_labels: torch.Tensor | None,
                 net_extra: Mapping = NO_EXTRA) -> torch.Tensor:
    """EDM2's guided denoiser D_g + w (D_net - D_g) = D_g.lerp(D_net, w), in x's dtype; the
    network alone when `gnet` is None. `net_extra` (a block plan and its cache) goes to `net` only."""
    denoised = net(x, sigma, net_labels, **net_extra).to(x.dtype)
    if gnet is None:
        return denoised
    return gnet(x, sigma, gnet_labels).to(x.dtype).lerp(denoised, guide_weight)


def edm2_step(net, gnet, guidance, x_cur: torch.Tensor, z: torch.Tensor | None, x0: torch.Tensor | None,
              t_cur: torch.Tensor, t_hat: torch.Tensor, t_next: torch.Tensor, weight: torch.Tensor,
              guide_weight: float, S_noise: float, net_labels: torch.Tensor | None,
              gnet_labels: torch.Tensor | None, ids: torch.Tensor | None, *, churn: bool, guided: bool,
              heun: bool, latent: bool, ops: StepOps = PLAIN_OPS, net_extra: Mapping = NO_EXTRA):
    """One EDM2 step with the classifier term: x_i (B, C, H, W) -> x_{i+1}.

    `z` is the step's noise where it churns (None elsewhere); `x0` the denoised latent the
    classifier sees on guided latent steps (None elsewhere). The time values and the weight w_i
    are 0-d tensors (a compiled step is reused across steps); only the flags select code.
    Returns (x_next, denoised (the last guided-denoiser estimate), g or None, J or None).
    """
    g = objective = None
    noise_scale = (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise if churn else None
    if guided:
        g, objective = edm_classifier_gradient(guidance, x_cur, ids, ops.classifier_input, x0 if latent else None)
        if not churn:  # x_hat = x_i + dx_i: a zero noise term adds exactly nothing
            z, noise_scale = torch.zeros_like(x_cur), torch.zeros_like(t_cur)
        x_hat = ops.guidance_update(x_cur, g.to(x_cur.dtype), z, noise_scale, weight.expand(x_cur.shape[0]))
    elif churn:
        x_hat = x_cur + noise_scale * z
    else:
        x_hat = x_cur

    denoised = edm2_denoise(net, gnet, x_hat, t_hat, guide_weight, net_labels, gnet_labels, net_extra)
    d_cur = (x_hat - denoised) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if heun:
        denoised = edm2_denoise(net, gnet, x_next, t_next, guide_weight, net_labels, gnet_labels, net_extra)
        d_prime = (x_next - denoised) / t_next
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, denoised, g, objective


@torch.no_grad()
def decode_edm2_latents(decoder, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from EDM2's final latents, on EDM2's 256 levels: an EDM2
    encoder's `decode` gives EDM2's uint8 pixels u, returned as u / 127.5 - 1, so that EDM's
    rounding (`runs.generation.quantize_round`) gives back exactly those bytes. A decoder
    without `decode`: decoder(latents) clamped to [-1, 1]. None: the latents are the images."""
    if decoder is None:
        return latents
    if hasattr(decoder, "decode"):
        return decoder.decode(latents).to(torch.float32) / 127.5 - 1
    return decoder(latents).clamp(-1, 1).to(torch.float32)


def _one_hot(ids: torch.Tensor | None, width: int, device: torch.device, what: str) -> torch.Tensor | None:
    """One-hot float32 rows (B, width) for a conditional network; None for an unconditional one."""
    if not width:
        return None
    if ids is None:
        raise ValueError(f"class_labels: {what} is class-conditional (label_dim {width}); pass labels")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
        raise ValueError(f"class_labels: ids must be in [0, {width}) for {what}, got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return torch.nn.functional.one_hot(ids.long(), width).to(device=device, dtype=torch.float32)


__all__ = ["EDM2Settings", "decode_edm2_latents", "edm2_denoise", "edm2_sampler", "edm2_step"]
