"""Fused kernels for the hot pieces of a guided step, and the choice `--fused auto|on|off` makes.

| piece | computes | plain twin | CPU | CUDA |
|---|---|---|---|---|
| edm_update | x / rms(x); x + s z + g / rms(g) rms(x) w | `guidance.update.edm_*` | C++ | Triton |
| ddpm_mean | mu + s (Sigma + a_t) g, a_t from the running max | `guidance.update.ddpm_guided_mean` | C++ | Triton |
| dit_difference | d - g / rms(g) gamma_t rms(d), and rms(g) | `guidance.update.dit_guided_difference` | C++ | Triton |
| softplus | the classifier's Softplus, forward and backward | `nn.Softplus` | - | Triton |
| logit_grad | w (tau_j onehot - tau_m softmax(tau_m l)), and J | `classifier.closed_form_logit_grad` | - | Triton |

The first three are the sampler's `ops` (`samplers.edm/ddpm/dit.StepOps`); the last two enter
the classifier guidance through `ClassifierGuidance.with_pieces`. Each kernel computes its twin's
function (tests compare them on odd shapes, all float dtypes and non-finite inputs), so a choice
changes images only in the last bits; it is recorded in the run's config all the same.

`off` keeps every piece plain. `on` uses every kernel that exists for the device and runs here.
`auto` uses a kernel only where it was measured faster than its twin on that kind of device
(`Kernel.measured`, from bench/bench_kernels.py and bench/gpu_check.py): a recorded measurement
rather than a timing at start-up, so the same command always picks the same kernels and its
images do not change between runs or on resume. Under torch.compile, `auto` keeps the plain
pieces (the kernels were measured against eager PyTorch, and inductor fuses the plain ops
itself), and no choice uses the Triton softplus (it cannot be traced inside `torch.func.vjp`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import check_choice
from ..guidance.precondition import SOFTPLUS_THRESHOLD
from ..samplers import ddpm, dit, edm

FUSED_CHOICES = ("auto", "on", "off")

PLAIN = "torch"
_NAMES = {"cpp": "C++", "triton": "Triton"}
# EDM2 applies Algorithm 2 as EDM does: the same two pieces (`samplers.edm.StepOps`).
SAMPLER_PIECES = {"edm": "edm_update", "edm2": "edm_update", "ddpm": "ddpm_mean", "dit": "dit_difference"}
GUIDANCE_PIECES = ("softplus", "logit_grad")


def _edm_cpp():
    from ..csrc import ops

    return edm.StepOps(ops.classifier_input, ops.guidance_update)


def _edm_triton():
    from ..kernels import guidance_update

    return edm.StepOps(guidance_update.classifier_input, guidance_update.guidance_update)


def _ddpm_cpp():
    from ..csrc import ops

    return ddpm.StepOps(ops.ddpm_guided_mean)


def _ddpm_triton():
    from ..kernels import ddpm_guided_mean

    return ddpm.StepOps(ddpm_guided_mean.ddpm_guided_mean)


def _dit_cpp():
    from ..csrc import ops

    return dit.StepOps(ops.dit_guided_difference)


def _dit_triton():
    from ..kernels import guidance_update

    return dit.StepOps(guidance_update.dit_guided_difference)


def _softplus_triton():
    from ..kernels.softplus import FusedSoftplus

    return lambda beta: FusedSoftplus(beta, SOFTPLUS_THRESHOLD)


def _logit_grad_triton():
    from ..kernels.logit_grad import logit_grad

    return logit_grad


@dataclass(frozen=True)
class Kernel:
    """One fused implementation of a piece on one kind of device.

    Attributes:
        piece: a key of SAMPLER_PIECES' values or GUIDANCE_PIECES.
        device_type: "cpu" or "cuda".
        implementation: "cpp" or "triton".
        load: imports the kernel and returns the piece's value (a sampler's StepOps, a Softplus
            module builder `beta -> module`, or a logit-gradient function).
        measured: the measurement showing it faster than its twin on this kind of device (what
            `auto` reads); None where it was not measured faster.
    """

    piece: str
    device_type: str
    implementation: str
    load: Callable[[], Any] = field(repr=False)
    measured: str | None


# CPU measurements: bench/bench_kernels.py, one thread, best of 30 rounds (bench/RESULTS.md,
# "Kernels"). Each is a few hundredths of a millisecond of a step whose networks take the rest:
# the guided digits EDM step (batch 250) is 394 vs 406 ms, within the machine's noise.
KERNELS = (
    Kernel("edm_update", "cpu", "cpp", _edm_cpp,
           "guidance_update 3.3x, classifier_input 2.5x faster than PyTorch, fp32 (8, 3, 64, 64)"),
    Kernel("ddpm_mean", "cpu", "cpp", _ddpm_cpp, "2.1x faster than PyTorch, fp32 (8, 3, 64, 64)"),
    Kernel("dit_difference", "cpu", "cpp", _dit_cpp, "3.2x faster than PyTorch, fp32 (8, 3, 32, 32)"),
    Kernel("edm_update", "cuda", "triton", _edm_triton, None),
    Kernel("ddpm_mean", "cuda", "triton", _ddpm_triton, None),
    Kernel("dit_difference", "cuda", "triton", _dit_triton, None),
    Kernel("softplus", "cuda", "triton", _softplus_triton, None),
    Kernel("logit_grad", "cuda", "triton", _logit_grad_triton, None),
)

# Why a piece has no kernel on a kind of device.
NO_KERNEL = {
    ("softplus", "cpu"): "no CPU kernel: a C++ softplus measured no faster than PyTorch's own (forward + backward "
                         "2.76 vs 2.35 ms fp32) and was removed",
    ("logit_grad", "cpu"): "no CPU kernel: the plain (64, 1000) logit gradient takes 0.2 ms on one core, a small "
                           "part of the classifier's backward pass",
}
NOT_MEASURED = "not yet measured faster on {device} (bench/gpu_check.py measures it)"


def kernel_for(piece: str, device_type: str) -> Kernel | None:
    """The fused kernel of `piece` for `device_type`, or None."""
    return next((k for k in KERNELS if k.piece == piece and k.device_type == device_type), None)


def _unavailable(implementation: str) -> str | None:
    """Why kernels of `implementation` cannot run here, or None when they can."""
    if implementation == "triton":
        from .. import kernels

        return None if kernels.triton_importable() else "Triton is not importable"
    from ..csrc import ops

    return None if ops.cpp_ops_available() else "the C++ ops could not be built (see the warning above)"


@dataclass(frozen=True)
class FusedChoice:
    """The pieces `choose_fused` picked.

    Attributes:
        step_ops: the sampler's `StepOps` with fused kernels, or None (its plain ops).
        make_softplus, logit_grad: the guidance pieces to swap in, or None (plain).
        implementations: piece -> "cpp", "triton" or "torch" (plain) for every piece of the job;
            recorded in the run's config.
        messages: one line per piece: what runs and why.
    """

    step_ops: Any = None
    make_softplus: Callable | None = None
    logit_grad: Callable | None = None
    implementations: dict[str, str] = field(default_factory=dict)
    messages: tuple[str, ...] = ()

    def prepare_guidance(self, guidance):
        """`guidance` with the chosen guidance pieces (a re-prepared copy), or itself when none."""
        if self.make_softplus is None and self.logit_grad is None:
            return guidance
        return guidance.with_pieces(make_softplus=self.make_softplus, logit_grad=self.logit_grad)


def _guidance_pieces_unused(guidance) -> str:
    """Why the guidance pieces do not apply to this guidance ("" where they do)."""
    if guidance is None:
        return "unguided"
    if not hasattr(guidance, "with_pieces"):
        return f"{type(guidance).__name__} has no swappable pieces"
    return ""


def choose_fused(device: torch.device | str, fused: str = "auto", *, sampler: str = "edm", guidance=None,
                 compiled: bool = False) -> FusedChoice:
    """The fused pieces for a job: its sampler's step piece and, for a `ClassifierGuidance`, the
    classifier's softplus and logit gradient, on `device`, for `fused` in FUSED_CHOICES and
    whether the step is compiled. Every piece's choice, and every fallback, gets one message;
    pieces the job does not use are named once and not recorded."""
    check_choice("fused", fused, FUSED_CHOICES)
    device_type = torch.device(device).type
    pieces = [SAMPLER_PIECES.get(sampler, f"{sampler}_step")]
    unused = {}
    if reason := _guidance_pieces_unused(guidance):
        unused = dict.fromkeys(GUIDANCE_PIECES, reason)
    elif guidance.softplus_beta == float("inf"):
        unused["softplus"] = "the classifier keeps ReLU"
    pieces += [piece for piece in GUIDANCE_PIECES if piece not in unused]
    unused_messages = [f"fused {fused}: {', '.join(names)} not used ({reason})"
                       for reason, names in _group(unused).items()]
    if fused == "off":
        return FusedChoice(implementations=dict.fromkeys(pieces, PLAIN),
                           messages=(f"fused off (requested): {', '.join(pieces)} run plain PyTorch", *unused_messages))
    messages = []
    chosen: dict[str, Any] = {}
    implementations: dict[str, str] = {}
    for piece in pieces:
        implementations[piece] = PLAIN
        kernel = kernel_for(piece, device_type)
        if sampler not in SAMPLER_PIECES and piece == f"{sampler}_step":
            reason = f"no fused kernels for the {sampler} sampler"
        elif kernel is None:
            reason = NO_KERNEL.get((piece, device_type), f"no {device_type} kernel")
        elif compiled and piece == "softplus":
            reason = ("under torch.compile: inductor fuses the softplus itself, and the Triton autograd function "
                      "cannot be traced inside torch.func.vjp")
        elif fused == "auto" and compiled:
            reason = ("auto under torch.compile: the kernels were measured against eager PyTorch; inductor fuses "
                      "the plain ops")
        elif fused == "auto" and kernel.measured is None:
            reason = NOT_MEASURED.format(device=device_type)
        elif (missing := _unavailable(kernel.implementation)) is not None:
            reason = missing
        else:
            chosen[piece] = kernel.load()
            implementations[piece] = kernel.implementation
            why = f"measured {kernel.measured}" if fused == "auto" else "requested"
            messages.append(f"fused {fused}: {piece} runs the {_NAMES[kernel.implementation]} kernel ({why})")
            continue
        messages.append(f"fused {fused}: {piece} runs plain PyTorch ({reason})")
    return FusedChoice(step_ops=chosen.get(SAMPLER_PIECES.get(sampler)), make_softplus=chosen.get("softplus"),
                       logit_grad=chosen.get("logit_grad"), implementations=implementations,
                       messages=(*messages, *unused_messages))


def _group(reasons: dict[str, str]) -> dict[str, list[str]]:
    """reason -> the pieces it applies to."""
    grouped: dict[str, list[str]] = {}
    for piece, reason in reasons.items():
        grouped.setdefault(reason, []).append(piece)
    return grouped
