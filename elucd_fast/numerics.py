"""Small numerical helpers shared by the plain path: the working dtype of reductions, per-sample
rms, and the relative error by which fast paths are compared with it."""
from __future__ import annotations

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions and guidance arithmetic run in for inputs of `dtype`: float64 stays
    float64, every other float dtype (float32, bfloat16, float16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms(v: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over all non-batch dims: (B, ...) -> (B,)."""
    return v.square().flatten(1).mean(dim=1).sqrt()


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| / |expected| over the elements where expected is finite and
    nonzero (float64 arithmetic), for reporting how far a fast path is from its reference;
    0.0 when there are none. Non-finite elements are compared separately by the caller."""
    actual, expected = actual.double(), expected.double()
    where = torch.isfinite(expected) & (expected != 0)
    if not where.any():
        return 0.0
    return ((actual[where] - expected[where]).abs() / expected[where].abs()).max().item()
