"""Argument checks shared by the samplers; they run once, before the sampling loop."""
from __future__ import annotations

import torch


def check_latents(name: str, latents: torch.Tensor) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {latents.dtype}")
    if latents.ndim != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(latents.shape)}")


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


def rms(v: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over all non-batch dims: (B, ...) -> (B,)."""
    return v.square().flatten(1).mean(dim=1).sqrt()


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def guided_steps(guidance, ids: torch.Tensor | None, shape: tuple[int, ...], device: torch.device,
                 num_steps: int, guidance_interval=None) -> list[bool]:
    """Which of the `num_steps` steps are guided, after the guidance's one-time input checks
    (labels present, classifier accepts (C, H, W) `shape`, ids in range)."""
    from ..guidance.schedules import GuidanceInterval

    if guidance is None:
        return [False] * num_steps
    if ids is None:
        raise ValueError("class_labels: guidance needs target labels")
    if hasattr(guidance, "check_input"):
        guidance.check_input(tuple(shape), ids, device)
    return (guidance_interval or GuidanceInterval()).steps(num_steps)
