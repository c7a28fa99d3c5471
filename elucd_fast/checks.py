"""One validator per rule. Every setting, flag and argument of the engine is checked by one of
these, in one place (a settings dataclass's `__post_init__`, or a sampler's one-time input
checks before its loop), and the message names what was wrong and what is allowed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_number(name: str, value: float, *, minimum: float | None = None, maximum: float | None = None,
                 finite: bool = True, strict_minimum: bool = False) -> float:
    """`value` as a float after checking it is a real number (not bool, not NaN; finite unless
    `finite=False`) within [minimum, maximum] (minimum excluded with `strict_minimum`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name}: must be a {'finite ' if finite else ''}number, got {value!r}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise ValueError(f"{name}: must be {'>' if strict_minimum else '>='} {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be <= {maximum:g}, got {value!r}")
    return float(value)


def check_finite_number(name: str, value: float, *, minimum: float | None = None) -> float:
    """`value` as float after checking it is a finite number (and >= minimum)."""
    return check_number(name, value, minimum=minimum)


def check_int(name: str, value: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` after checking it is an integer (not bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer{_range_text(minimum, maximum)}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: must be an integer{_range_text(minimum, maximum)}, got {value!r}")
    return value


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def check_bool(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_softplus_beta(value: float) -> float:
    """Softplus beta: > 0, and math.inf keeps ReLU."""
    return check_number("softplus_beta", value, minimum=0, strict_minimum=True, finite=False)


def json_number(value: float) -> float | str:
    """A float as JSON can hold it: infinities as "inf" / "-inf" (JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def from_json_number(value: float | str) -> float:
    """The inverse of `json_number`: "inf" / "-inf" back to floats, numbers unchanged."""
    return float(value) if value in ("inf", "-inf") else value


def check_latents(name: str, latents: torch.Tensor) -> None:
    """A float tensor (B, C, H, W) of finite values (one reduction, before sampling)."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {latents.dtype}")
    if latents.ndim != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(latents.shape)}")
    if latents.numel() and not bool(torch.isfinite(latents).all()):
        bad = (~torch.isfinite(latents.flatten(1))).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{name}: non-finite values (NaN or Inf) in sample(s) {bad[:10]} of the batch; "
                         "latents must be finite (standard normal noise)")


def check_state_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The sampler state dtype: float32 by default, float64 to reproduce the authors exactly."""
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: the sampler state must be torch.float32 or torch.float64, got {dtype} "
                        "(network precision is set per network, not here)")
    return dtype


def class_ids(class_labels: torch.Tensor | None, batch: int, label_dim: int | None) -> torch.Tensor | None:
    """Integer ids (B,) from ids or one-hot rows, checked against batch and label_dim."""
    if class_labels is None:
        return None
    if not isinstance(class_labels, torch.Tensor):
        raise TypeError(f"class_labels: expected a tensor of ids (B,) or one-hot rows (B, K), got {type(class_labels).__name__}")
    if class_labels.shape[0] != batch:
        raise ValueError(f"class_labels: {class_labels.shape[0]} labels for a batch of {batch}")
    if class_labels.ndim == 2:
        if label_dim and class_labels.shape[1] != label_dim:
            raise ValueError(f"class_labels: one-hot width {class_labels.shape[1]} != the network's label_dim {label_dim}")
        return class_labels.argmax(dim=1)
    if class_labels.ndim != 1 or class_labels.is_floating_point() or class_labels.dtype == torch.bool:
        raise TypeError(f"class_labels: expected integer ids (B,) or one-hot rows (B, K), "
                        f"got {class_labels.dtype} of shape {tuple(class_labels.shape)}")
    if label_dim and class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= label_dim):
        raise ValueError(f"class_labels: ids must be in [0, {label_dim}), got range "
                         f"[{int(class_labels.min())}, {int(class_labels.max())}]")
    return class_labels



def check_device(device: torch.device | str) -> torch.device:
    """A device this machine has: "cpu", or "cuda"/"cuda:N" where CUDA is available."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asks for CUDA, but no CUDA device is available here; use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    elif resolved.type != "cpu":
        raise ValueError(f"device: {resolved.type!r} is not supported; use cpu, cuda or cuda:N")
    return resolved


class NonFiniteStateError(FloatingPointError):
    """A sampler's state became NaN or Inf; the message names the first such step."""


class NonFiniteTracker:
    """Remembers, on the device, the first sampler step whose new state holds NaN or Inf, so the
    loop never waits on the host; `check` reads it once, after the loop."""

    def __init__(self, device: torch.device | str):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, x: torch.Tensor) -> None:
        """After step `step`: x (B, ...) is its new state."""
        self.first = torch.where((self.first < 0) & ~torch.isfinite(x).all(), step, self.first)

    def check(self, x: torch.Tensor, num_steps: int, hint: str) -> None:
        """Raises NonFiniteStateError naming the first non-finite step and the samples of x (the
        final state) concerned; `hint` says which settings can cause it."""
        first = int(self.first)
        if first < 0:
            return
        bad = (~torch.isfinite(x.flatten(1))).any(dim=1).nonzero().flatten().tolist()
        raise NonFiniteStateError(f"sampling: the state became non-finite (NaN or Inf) at step {first} of {num_steps}, "
                                  f"in sample(s) {bad[:10]} of the batch; {hint}")


def check_sigmas(name: str, values) -> tuple[float, ...]:
    """Explicit noise levels as a tuple of floats after checking they are a non-empty sequence
    of finite numbers > 0, strictly decreasing (the final 0 is implied, never listed)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name}: expected a non-empty list of noise levels, strictly decreasing, each > 0 "
                         f"(the final 0 is implied), got {values!r}")
    out = tuple(check_number(f"{name}[{i}]", v, minimum=0, strict_minimum=True) for i, v in enumerate(values))
    for i in range(1, len(out)):
        if not out[i] < out[i - 1]:
            raise ValueError(f"{name}: must be strictly decreasing (the final 0 is implied), but entry {i} "
                             f"({out[i]!r}) is not below entry {i - 1} ({out[i - 1]!r})")
    return out


def check_timesteps(name: str, values, num_timesteps: int | None = None, *, descending: bool = False) -> tuple[int, ...]:
    """Explicit timesteps of a T-step chain as a descending tuple of ints, after checking they
    are at least 2 distinct integers in [0, T - 1] (any order unless `descending` asks that they
    be given in descending order already)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) < 2:
        raise ValueError(f"{name}: expected a list of at least 2 distinct integer timesteps, got {values!r}")
    top = None if num_timesteps is None else num_timesteps - 1
    out = tuple(check_int(f"{name}[{i}]", v, minimum=0, maximum=top) for i, v in enumerate(values))
    if len(set(out)) != len(out):
        repeated = sorted({t for t in out if out.count(t) > 1})
        raise ValueError(f"{name}: must be distinct, {', '.join(map(str, repeated))} repeated")
    ordered = tuple(sorted(out, reverse=True))
    if descending and out != ordered:
        raise ValueError(f"{name}: must be strictly decreasing, got {list(out)}")
    return ordered
