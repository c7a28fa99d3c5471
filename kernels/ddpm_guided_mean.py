"""Algorithm 1's guided mean in one pass (SPEC §3).

Per sample b of the batch, with the sample's elements as one row:

    a_b    = max(sin(pi t / T) * gamma * vmax_b, 0)          # the sine-added variance (Eq. 5)
    mean'_b = mean_b + s * (Sigma_b + a_b) * g_b

`vmax` (B,) is each sample's running maximum of Sigma[b, 0, 0, 0] including this step, and
sin(pi t / T) is a 0-d tensor (it changes every step: read on the device, no recompilation);
s and gamma are fixed for a run and compile in as constants.

Why fuse. As PyTorch ops (`guidance.update.ddpm_guided_mean`) the update is a handful of tiny
per-sample ops for a_t and four full passes (Sigma + a, s * that, times g, mean + that), each
writing an intermediate that the next reads back: 10 tensor reads and writes per element.
Fused it reads mean, Sigma and g once and writes the result once: 16 bytes per float32 element
instead of 40, one launch instead of about eight. Each program handles BLOCK consecutive
elements of the flattened batch and finds each element's sample by an integer division (its
a_b is one cached load per sample).

Arithmetic runs in float32 (float64 for float64 states); the output has mean's dtype.
"""
from __future__ import annotations

import torch

from elucd_fast.kernels import OP_NAMESPACE, device_scalar, triton_compute_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # the launcher below needs triton; importing this module does not
    triton = None

__all__ = ["ddpm_guided_mean"]

BLOCK = 1024  # elements per program


if triton is not None:

    @triton.jit
    def _ddpm_guided_mean_kernel(mean_ptr, variance_ptr, g_ptr, vmax_ptr, sine_ptr, out_ptr, n_elements, row_length,
                                 CLASSIFIER_SCALE: tl.constexpr, GAMMA_FACTOR: tl.constexpr, BLOCK: tl.constexpr,
                                 COMPUTE: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        row = offsets // row_length
        sine = tl.load(sine_ptr).to(COMPUTE)
        vmax = tl.load(vmax_ptr + row, mask=mask, other=0.0).to(COMPUTE)
        # The reference's order: (sine * gamma) * vmax, clamped at 0 (NaN kept, as torch.clamp_min).
        sine_add = tl.maximum((sine * GAMMA_FACTOR) * vmax, 0.0, propagate_nan=tl.PropagateNan.ALL)
        mean = tl.load(mean_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        variance = tl.load(variance_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        out = mean + (CLASSIFIER_SCALE * (variance + sine_add)) * g
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    @torch.library.custom_op(f"{OP_NAMESPACE}::ddpm_guided_mean", mutates_args=())
    def _ddpm_guided_mean_op(mean: torch.Tensor, variance: torch.Tensor, g: torch.Tensor, vmax: torch.Tensor,
                             sine: torch.Tensor, classifier_scale: float, gamma_factor: float) -> torch.Tensor:
        out = torch.empty_like(mean, memory_format=torch.contiguous_format)
        if mean.numel():
            _ddpm_guided_mean_kernel[(triton.cdiv(mean.numel(), BLOCK),)](
                mean.contiguous(), variance.contiguous(), g.contiguous(), vmax.contiguous(), sine, out, mean.numel(),
                mean.numel() // mean.shape[0], CLASSIFIER_SCALE=classifier_scale, GAMMA_FACTOR=gamma_factor,
                BLOCK=BLOCK, COMPUTE=triton_compute_dtype(mean.dtype))
        return out

    @_ddpm_guided_mean_op.register_fake
    def _(mean, variance, g, vmax, sine, classifier_scale, gamma_factor):
        return torch.empty_like(mean, memory_format=torch.contiguous_format)


def ddpm_guided_mean(mean: torch.Tensor, variance: torch.Tensor, g: torch.Tensor, vmax: torch.Tensor,
                     sine: float | torch.Tensor, classifier_scale: float, gamma_factor: float) -> torch.Tensor:
    """Triton ddpm_guided_mean; same contract as `elucd_fast.guidance.update.ddpm_guided_mean`,
    except that `classifier_scale` and `gamma_factor` are Python floats (the sampler's settings,
    constant over a run), not tensors."""
    if variance.shape != mean.shape or g.shape != mean.shape:
        raise ValueError(f"ddpm_guided_mean: mean {tuple(mean.shape)}, variance {tuple(variance.shape)}, "
                         f"g {tuple(g.shape)} must match")
    if vmax.shape != mean.shape[:1]:
        raise ValueError(f"ddpm_guided_mean: vmax must be (B,) = {tuple(mean.shape[:1])}, got {tuple(vmax.shape)}")
    if isinstance(classifier_scale, torch.Tensor) or isinstance(gamma_factor, torch.Tensor):
        raise TypeError("ddpm_guided_mean: classifier_scale and gamma_factor must be floats (compile-time constants)")
    return _ddpm_guided_mean_op(mean, variance, g, vmax, device_scalar(sine, mean), float(classifier_scale),
                                float(gamma_factor))
