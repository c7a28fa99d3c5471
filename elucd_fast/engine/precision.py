"""Precision policy: which dtype each network computes in, and the memory layout.

The sampler state and every reduction/norm of the guidance stay float32 (float64 in `fp64`);
only the networks' arithmetic changes. `fp64` is the authors' setting (float64 state, float32
networks) for reproduction.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("fp64", "fp32", "bf16", "fp16", "auto")

# `auto` picks bf16 only once the digits benchmark has shown bf16 quality equal to fp32
# (bench/RESULTS.md, "Precision"); until then it stays fp32.
BF16_VALIDATED = False


@dataclass(frozen=True)
class PrecisionPolicy:
    """A resolved precision choice.

    Attributes:
        name: "fp64", "fp32", "bf16" or "fp16".
        network_dtype: autocast dtype for the networks, None for full float32.
        state_dtype: the sampler state dtype (float64 for fp64, else float32).
        channels_last: convolutional networks use the channels-last layout.
        allow_tf32: TF32 matmuls/convolutions on CUDA (float32 policies on sm80+).
        reason: why this was chosen, for the run's log.
    """

    name: str
    network_dtype: torch.dtype | None
    state_dtype: torch.dtype
    channels_last: bool
    allow_tf32: bool
    reason: str


def hardware_bf16(device: torch.device | str) -> bool:
    """Whether the device runs bf16 matrix work natively (AMX/AVX512-BF16 CPUs, sm80+ GPUs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu") -> PrecisionPolicy:
    """The policy for `precision` (one of PRECISIONS) on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if precision == "auto":
        if BF16_VALIDATED and hardware_bf16(device):
            return _policy("bf16", device, "auto: bf16 hardware present and bf16 validated on the digits benchmark")
        if cuda and not hardware_bf16(device):
            return _policy("fp32", device, "auto: GPU without bf16; fp16 is opt-in (--precision fp16)")
        return _policy("fp32", device, "auto: fp32 (bf16 not yet validated as equal quality on the digits benchmark)")
    if precision == "bf16" and not hardware_bf16(device):
        raise ValueError(f"precision: bf16 needs AMX/AVX512-BF16 (CPU) or sm80+ (GPU); {device} has neither")
    if precision == "fp16" and not cuda:
        raise ValueError("precision: fp16 networks are supported on CUDA only (CPU fp16 convolutions are slow); use bf16")
    return _policy(precision, device, f"requested {precision}")


def _policy(name: str, device: torch.device, reason: str) -> PrecisionPolicy:
    network_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
    return PrecisionPolicy(
        name=name,
        network_dtype=network_dtype,
        state_dtype=torch.float64 if name == "fp64" else torch.float32,
        channels_last=network_dtype is not None or device.type == "cuda",
        allow_tf32=device.type == "cuda" and name == "fp32",
        reason=reason,
    )


class AutocastModule(nn.Module):
    """Runs `module` under autocast to `dtype` (channels-last inputs when asked) and returns
    float32 outputs; every other attribute (sigma_min, round_sigma, label_dim, ...) is the
    wrapped module's, so it keeps the interface of what it wraps."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None, device_type: str, channels_last: bool):
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.device_type = device_type
        self.channels_last = channels_last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def forward(self, *args, **kwargs):
        if self.channels_last:
            args = tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.ndim == 4
                         else a for a in args)
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.module(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def apply_precision(module: nn.Module, policy: PrecisionPolicy, device: torch.device | str) -> nn.Module:
    """`module` made to compute under `policy`: channels-last layout for convolutional
    networks, autocast to the policy's network dtype. Float32 parameters are kept (autocast
    casts per op), so the same weights serve every policy."""
    device = torch.device(device)
    has_conv = any(isinstance(m, nn.Conv2d) for m in module.modules())
    channels_last = policy.channels_last and has_conv
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if policy.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if policy.network_dtype is None and not channels_last:
        return module
    backbone = getattr(module, "model", None)
    if isinstance(backbone, nn.Module) and hasattr(module, "round_sigma"):
        # An EDM-style preconditioner: only its backbone changes precision, so c_skip/c_out
        # arithmetic stays float32 (as EDM's own fp16 mode does). A shallow copy with its own
        # module table leaves the caller's network untouched.
        wrapped = copy.copy(module)
        wrapped._modules = dict(module._modules)
        wrapped.model = AutocastModule(backbone, policy.network_dtype, device.type, channels_last)
        if hasattr(wrapped, "use_fp16"):
            # The policy, not the checkpoint's own fp16 flag, now decides the backbone's dtype
            # (its float32 output would otherwise fail EDM's output-dtype check on CUDA).
            wrapped.use_fp16 = False
        return wrapped
    return AutocastModule(module, policy.network_dtype, device.type, channels_last)
