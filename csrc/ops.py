"""The C++ CPU ops (`elucd_ops.cpp`), built on first use, with an announced PyTorch fallback.

The first call of any op below compiles `elucd_ops.cpp` with `torch.utils.cpp_extension.load`
(a minute or so; later processes reuse the build in torch's extension directory,
`$TORCH_EXTENSIONS_DIR` or `~/.cache/torch_extensions`) and registers the ops `torch.ops.elucd.*`
with fake implementations (so they trace under torch.compile). If no C++ compiler is found or
the build fails, a RuntimeWarning says why, `cpp_ops_available()` is False and the engine keeps
the plain PyTorch step ops (`elucd_fast.guidance.update`, the twins these ops are tested
against). `__all__` names the ops; `elucd_fast.engine.fused` is their one production caller.

No C++ softplus: measured on the CPU it was no faster than PyTorch's own vectorised softplus
(forward + backward 2.76 vs 2.35 ms fp32, 1.80 vs 1.62 ms bf16, (8, 64, 32, 32); bench/RESULTS.md),
so the classifier keeps `nn.Softplus` there.

Build flags. The source is compiled for the CPU capability PyTorch itself dispatches to here
(`torch.backends.cpu.get_cpu_capability()`: AVX512, AVX2 or DEFAULT), with the same `-m` flags
PyTorch's own kernels use for it, not with `-march=native`: the build then runs on any machine
with that capability, and the capability is part of the extension's name, so machines sharing
one extension directory never load a build made for a richer instruction set.

Only CPU kernels are built. No CUDA sources ship with the package (none could be compiled and
tested where it was written); on a GPU the Triton kernels in `elucd_fast.kernels` are the fused
path.
"""
from __future__ import annotations

import logging
import shutil
import threading
import warnings
from pathlib import Path

import torch
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

__all__ = ["guidance_update", "classifier_input", "ddpm_guided_mean", "dit_guided_difference"]

SOURCE = Path(__file__).with_name("elucd_ops.cpp")
BACKEND_CPP = "cpp"
BACKEND_TORCH = "torch"

# PyTorch's own per-capability compiler flags (cmake/Codegen.cmake), plus the at::vec macros
# that select the matching Vectorized<T> implementation.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}

_lock = threading.Lock()
_backend: str | None = None


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else "DEFAULT"


def _build_and_load() -> str:
    """Compile (or reuse) the extension and load it into torch.ops; returns the library name."""
    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} (from $CXX, default 'c++') is not on PATH")
    capability = _capability()
    name = f"elucd_ops_{capability.lower()}"
    cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        + _CAPABILITY_FLAGS[capability],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    return name


def _register_python_parts() -> None:
    """Fake (shape-only) implementations, so the ops trace under torch.compile."""

    def opmath(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("elucd::guidance_update")
    def _(x: torch.Tensor, g: torch.Tensor, z: torch.Tensor, noise_scale: torch.Tensor,
          w: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("elucd::classifier_input")
    def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((x.shape[0],), dtype=opmath(x))

    @torch.library.register_fake("elucd::ddpm_guided_mean")
    def _(mean: torch.Tensor, variance: torch.Tensor, g: torch.Tensor, vmax: torch.Tensor, sine: torch.Tensor,
          classifier_scale: float, gamma_factor: float) -> torch.Tensor:
        return torch.empty_like(mean, memory_format=torch.contiguous_format)

    @torch.library.register_fake("elucd::dit_guided_difference")
    def _(difference: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty_like(difference, memory_format=torch.contiguous_format),
                difference.new_empty((difference.shape[0],), dtype=opmath(difference)))


def backend() -> str:
    """The implementation the ops below use for CPU tensors: "cpp" or "torch" (the fallback).

    The first call builds or loads the extension and announces the choice: an INFO log line
    for "cpp", a RuntimeWarning with the reason for "torch"."""
    global _backend
    if _backend is not None:
        return _backend
    with _lock:
        if _backend is None:
            try:
                name = _build_and_load()
            except Exception as error:  # any build or load failure means: the plain ops
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warnings.warn(
                    f"elucd C++ ops unavailable ({reason}); using the plain PyTorch implementations",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _backend = BACKEND_TORCH
            else:
                _register_python_parts()
                logger.info("elucd C++ ops: loaded %s (CPU only; CUDA tensors use the PyTorch path)", name)
                _backend = BACKEND_CPP
    return _backend


def cpp_ops_available() -> bool:
    """True when the C++ ops are built and loaded (building them on first call)."""
    return backend() == BACKEND_CPP


def _require_cpp(*tensors: torch.Tensor) -> None:
    """The ops run on CPU tensors once built; the engine checks `cpp_ops_available()` before it
    chooses them, so reaching this with anything else is a caller's error."""
    devices = sorted({t.device.type for t in tensors} - {"cpu"})
    if devices:
        raise ValueError(f"elucd C++ ops take CPU tensors only, got {', '.join(devices)} tensors")
    if not cpp_ops_available():
        raise RuntimeError("elucd C++ ops are not built here (see the warning above); use the plain "
                           "elucd_fast.guidance.update functions")


def guidance_update(
    x: torch.Tensor,
    g: torch.Tensor,
    z: torch.Tensor,
    noise_scale: float | torch.Tensor,
    w: torch.Tensor,
) -> torch.Tensor:
    """EDM guided churn step (SPEC §4), per sample b of the batch (rows of (B, N)):
    `x_b + noise_scale * z_b + g_b / max(rms(g_b), tiny) * rms(x_b) * w_b`.

    Args:
        x: (B, ...) state. g, z: same shape (guidance gradient, unit noise); cast to x's dtype.
        noise_scale: float or one-element tensor, e.g. sqrt(t_hat^2 - sigma^2) * S_noise.
        w: (B,) per-sample guidance weight, or one value for all.
    Returns:
        (B, ...) in x's dtype; reductions in float32 (float64 for float64 x).
    """
    _require_cpp(x, g, z)
    noise_scale = torch.as_tensor(noise_scale, dtype=torch.float64)
    w = torch.as_tensor(w)
    return torch.ops.elucd.guidance_update(x, g.to(x.dtype), z.to(x.dtype), noise_scale, w)


def classifier_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier input of SPEC §4: `xc_b = x_b / rms(x_b)` where rms(x_b) > 1, else x_b.

    Returns:
        xc: same shape and dtype as x. r: (B,) rms per sample, float32 (float64 for float64 x).
    """
    _require_cpp(x)
    return torch.ops.elucd.classifier_input(x)


def ddpm_guided_mean(mean: torch.Tensor, variance: torch.Tensor, g: torch.Tensor, vmax: torch.Tensor,
                     sine: float | torch.Tensor, classifier_scale: float, gamma_factor: float) -> torch.Tensor:
    """Algorithm 1's guided mean (SPEC §3), per sample b:
    `mean_b + s * (Sigma_b + max(sine * gamma * vmax_b, 0)) * g_b`.

    Args:
        mean, variance, g: (B, ...) mu, Sigma and the gradient at x0; variance and g are cast to
            mean's dtype.
        vmax: (B,) running max of Sigma[:, 0, 0, 0] including this step.
        sine: sin(pi t / T), float or one-element tensor.
        classifier_scale, gamma_factor: s and gamma (floats: the sampler's settings).
    Returns:
        (B, ...) in mean's dtype; arithmetic in float32 (float64 for float64 mean).
    """
    _require_cpp(mean, variance, g, vmax)
    return torch.ops.elucd.ddpm_guided_mean(mean, variance.to(mean.dtype), g.to(mean.dtype), vmax,
                                            torch.as_tensor(sine, dtype=torch.float64), float(classifier_scale),
                                            float(gamma_factor))


def dit_guided_difference(difference: torch.Tensor, g: torch.Tensor,
                          gamma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 3's rule 2 (SPEC §5), per sample b:
    `d_b - g_b / max(rms(g_b), tiny) * (gamma * rms(d_b))`, and rms(g_b).

    Args:
        difference: (B, ...) the CFG difference d = eps_c - eps_u.
        g: same shape (a channel slice of the latent gradient is read in place), cast to d's dtype.
        gamma: gamma_t, float or one-element tensor.
    Returns:
        d' in d's dtype and rms(g) (B,) in float32 (float64 for float64 d).
    """
    _require_cpp(difference, g)
    return torch.ops.elucd.dit_guided_difference(difference, g.to(difference.dtype),
                                                 torch.as_tensor(gamma, dtype=torch.float64))
