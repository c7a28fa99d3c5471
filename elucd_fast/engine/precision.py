"""Precision policy: which dtype each network computes in, the memory layout, and for EDM's
U-Nets the engine's equivalents of their attention and upsampling layers (`edm_layers`).

The sampler state and every reduction/norm of the guidance stay float32 (float64 in `fp64`);
only the networks' arithmetic changes. `fp64` is the authors' setting (float64 state, float32
networks, EDM's own layers) for reproduction. `auto` picks bf16 where the hardware has it, the
digits benchmark found its quality equal to fp32 and the job is large enough to gain
(`auto_precision`), fp32 otherwise.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..models.edm_networks import Conv2d
from .edm_layers import fast_edm_backbone, is_edm_backbone

PRECISIONS = ("fp64", "fp32", "bf16", "fp16", "auto")

# `auto` picks bf16 (on hardware with native bf16 matrix units) for jobs whose sampling step
# costs at least this many FLOPs per image (a guided EDM Heun step: two denoiser calls and the
# classifier's forward and input gradient). Measured (bench/RESULTS.md, "Precision"): one guided
# step, bf16 vs fp32 policy, on a 2-core AMD EPYC (Zen 4, AVX512-BF16, no AMX), one thread:
# jobs of 0.075-0.44 GFLOP per image step ran 0.87-0.98x in bf16 (slower: memory traffic and
# per-op overheads dominate small layers), jobs of 1.0-120 GFLOP 1.08-1.71x. GPUs: not measured
# (none available); the same threshold is used.
BF16_MIN_STEP_FLOPS = 0.7e9

# The digits benchmark's verdict on bf16 quality (bench/RESULTS.md, "Precision"; `elucd-fast
# generate [--precision bf16]`, seeds 0-1999): (class accuracy, FD) per precision. `auto` picks
# bf16 only while bf16 is within BF16_QUALITY_TOLERANCE of fp32: accuracy within 0.005, FD within
# its seed noise at 2,000 samples (about 3).
DIGITS_QUALITY = {"fp32": (0.988, 18.47), "bf16": (0.988, 18.47)}
BF16_QUALITY_TOLERANCE = (0.005, 3.0)


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
        fast_layers: EDM U-Nets run with the engine's equivalents of their attention and
            upsampling layers (`edm_layers`); off in fp64, the authors' setting.
    """

    name: str
    network_dtype: torch.dtype | None
    state_dtype: torch.dtype
    channels_last: bool
    allow_tf32: bool
    reason: str
    fast_layers: bool = True


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


def bf16_quality_equal(quality: dict = DIGITS_QUALITY, tolerance: tuple[float, float] = BF16_QUALITY_TOLERANCE) -> bool:
    """Whether the digits benchmark found bf16 quality equal to fp32 (within `tolerance`)."""
    (acc32, fd32), (acc16, fd16) = quality["fp32"], quality["bf16"]
    return abs(acc16 - acc32) <= tolerance[0] and abs(fd16 - fd32) <= tolerance[1]


def auto_precision(device: torch.device | str, step_flops: float | None, *, bf16_hardware: bool | None = None,
                   quality: dict = DIGITS_QUALITY) -> tuple[str, str]:
    """What `--precision auto` runs: ("bf16" or "fp32", the reason for the log).

    bf16 where all of: the device computes bf16 natively (`bf16_hardware`, default: detected),
    the digits benchmark found bf16 quality equal to fp32 (`quality`), and the job's networks
    cost at least BF16_MIN_STEP_FLOPS per image per sampling step (`step_flops`, from
    `cost.step_flops_per_image`; None: unknown). fp16 is never chosen automatically."""
    device = torch.device(device)
    hardware = hardware_bf16(device) if bf16_hardware is None else bf16_hardware
    limit = f"{BF16_MIN_STEP_FLOPS / 1e9:.1f} GFLOP per image per step"
    (acc32, fd32), (acc16, fd16) = quality["fp32"], quality["bf16"]
    digits = f"digits benchmark bf16 vs fp32: accuracy {acc16:.3f} vs {acc32:.3f}, FD {fd16:.2f} vs {fd32:.2f}"
    if not hardware:
        if device.type == "cuda":
            return "fp32", "auto: fp32 (GPU without bf16 (sm80+ has it); fp16 is opt-in: --precision fp16)"
        return "fp32", f"auto: fp32 ({device.type} without native bf16: no AMX or AVX512-BF16)"
    if not bf16_quality_equal(quality):
        return "fp32", f"auto: fp32 (bf16 quality differs from fp32: {digits})"
    if step_flops is None:
        return "fp32", f"auto: fp32 (the job's network cost is unknown; bf16 pays from {limit})"
    cost = f"{step_flops / 1e9:.3g} GFLOP per image per step"
    if step_flops < BF16_MIN_STEP_FLOPS:
        return "fp32", (f"auto: fp32 (networks too small for bf16 to gain: {cost}, below {limit}; "
                        f"quality would be equal: {digits})")
    return "bf16", f"auto: bf16 (native bf16 on {device.type}; networks {cost}, at least {limit}; {digits})"


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu", *,
                      step_flops: float | None = None) -> PrecisionPolicy:
    """The policy for `precision` (one of PRECISIONS) on `device`; `step_flops` (the job's
    FLOPs per image per sampling step) informs `auto` (see `auto_precision`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if precision == "auto":
        name, reason = auto_precision(device, step_flops)
        return _policy(name, device, reason)
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
        fast_layers=name != "fp64",
    )


class AutocastModule(nn.Module):
    """Runs `module` in `dtype` (channels-last inputs when asked) and returns float32 outputs;
    every other attribute (sigma_min, round_sigma, label_dim, ...) is the wrapped module's, so it
    keeps the interface of what it wraps.

    With `autocast` (any network) the module runs under torch.autocast. Without it the 4-D
    floating inputs (images) are cast to `dtype` and the module computes in its input's dtype,
    as EDM's U-Nets do in EDM's own fp16 mode (embeddings of noise level and class stay
    float32; every layer casts its weights to its input's dtype).
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype | None, device_type: str, channels_last: bool,
                 autocast: bool = True):
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.device_type = device_type
        self.channels_last = channels_last
        self.autocast = autocast

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def forward(self, *args, **kwargs):
        cast = self.dtype if self.dtype is not None and not self.autocast else None
        args = tuple(self._image(a, cast) for a in args)
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None and self.autocast):
            out = self.module(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    def _image(self, a, dtype: torch.dtype | None):
        if not (isinstance(a, torch.Tensor) and a.ndim == 4):
            return a
        if dtype is not None and a.is_floating_point():
            a = a.to(dtype)
        return a.contiguous(memory_format=torch.channels_last) if self.channels_last else a


def apply_precision(module: nn.Module, policy: PrecisionPolicy, device: torch.device | str) -> nn.Module:
    """`module` made to compute under `policy`; outputs are float32.

    - An EDM preconditioner (`EDMPrecond` and kin) around a U-Net of EDM's layers: the U-Net is
      replaced by the engine's copy (`edm_layers.fast_edm_backbone`: fused attention, nearest
      upsampling, convolution weights stored once in the network dtype) computing in its input's
      dtype, channels-last where the policy says; c_skip/c_out arithmetic stays float32 (as
      EDM's own fp16 mode does). The caller's network keeps its layers and weights.
    - Any other network: autocast to the policy's network dtype (float32 weights, cast per op,
      so the same weights serve every policy), channels-last where the policy says.
    Channels-last float32 policies (CUDA) lay the caller's float32 weights out channels-last in
    place: the same numbers, shared with the fast copy.
    """
    device = torch.device(device)
    has_conv = any(isinstance(m, nn.Conv2d | Conv2d) for m in module.modules())
    channels_last = policy.channels_last and has_conv
    dtype = policy.network_dtype
    if policy.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    backbone = getattr(module, "model", None)
    if isinstance(backbone, nn.Module) and hasattr(module, "round_sigma"):
        # An EDM-style preconditioner: only its backbone changes. A shallow copy with its own
        # module table leaves the caller's network untouched.
        edm = policy.fast_layers and is_edm_backbone(backbone)
        if dtype is None and not channels_last and not edm:
            return module
        wrapped = copy.copy(module)
        wrapped._modules = dict(module._modules)
        if edm:
            if channels_last and dtype is None:
                # The copy shares float32 weights: lay them out channels-last in place (same numbers).
                backbone = backbone.to(memory_format=torch.channels_last)
            layout = torch.channels_last if channels_last else torch.preserve_format
            wrapped.model = AutocastModule(fast_edm_backbone(backbone, dtype, layout), dtype, device.type,
                                           channels_last, autocast=False)
        else:
            if channels_last:
                backbone = backbone.to(memory_format=torch.channels_last)
            wrapped.model = AutocastModule(backbone, dtype, device.type, channels_last)
        if hasattr(wrapped, "use_fp16"):
            # The policy, not the checkpoint's own fp16 flag, now decides the backbone's dtype
            # (its float32 output would otherwise fail EDM's output-dtype check on CUDA).
            wrapped.use_fp16 = False
        return wrapped
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if dtype is None and not channels_last:
        return module
    return AutocastModule(module, dtype, device.type, channels_last)
