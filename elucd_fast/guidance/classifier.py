"""`ClassifierGuidance`: the gradient of the calibrated objective through a frozen, smoothed
off-the-shelf classifier (SPEC §1-2).

It knows nothing of samplers: a sampler hands it the classifier input (x0 for DDPM, the
normalised x_i for EDM) and target labels, and gets back grad_x J and J.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .objective import _logit_grad, _objective, label_ids
from .precondition import FunctionalSoftplusWrapper, count_functional_relus, make_input_transform, precondition_classifier
from .settings import GuidanceSettings


class ClassifierGuidance(nn.Module):
    """Calibrated classifier guidance.

    Args:
        classifier: image classifier, (B, C, H, W) -> logits (B, K); copied, frozen, smoothed.
        softplus_beta: every ReLU becomes Softplus(beta); math.inf keeps ReLU.
        joint_temperature: tau_j.
        marginal_temperature: tau_m; None means tau_m = tau_j (ordinary log-softmax).
        input_transform: "identity" (images in [-1, 1] straight in, as the paper), "imagenet",
            "imagenet224", or a differentiable callable.
        fold_batchnorm: fold Conv->BatchNorm pairs of the classifier (same function, faster).
        make_softplus: builder of the Softplus module (e.g. a fused kernel version).

    Calling it with x (B, C, H, W) and labels ((B,) ids or (B, K) one-hot) returns
    (grad, J): grad_x J with x's shape and dtype, and J (B,) in float32 (float64 for a float64
    classifier). No host synchronisation, no per-sample Python loop.
    """

    def __init__(
        self,
        classifier: nn.Module,
        *,
        softplus_beta: float = math.inf,
        joint_temperature: float = 1.0,
        marginal_temperature: float | None = None,
        input_transform: str | Callable = "identity",
        fold_batchnorm: bool = False,
        make_softplus: Callable[[float], nn.Module] | None = None,
    ):
        super().__init__()
        self.settings = GuidanceSettings(softplus_beta, joint_temperature, marginal_temperature)
        self.classifier, self.report = precondition_classifier(
            classifier, softplus_beta=self.settings.softplus_beta, fold_batchnorm_layers=fold_batchnorm,
            make_softplus=make_softplus)
        # The classifier as given, before smoothing (not a submodule: it is neither moved nor
        # saved with the guidance); calibration re-smooths it per setting.
        self.__dict__["source_classifier"] = classifier
        self.transform = make_input_transform(input_transform)
        self.num_classes: int | None = None

    @classmethod
    def from_settings(cls, classifier: nn.Module, settings: GuidanceSettings, **kwargs) -> ClassifierGuidance:
        """The guidance of `settings` through `classifier` (kwargs: input_transform, ...)."""
        return cls(classifier, softplus_beta=settings.softplus_beta, joint_temperature=settings.joint_temperature,
                   marginal_temperature=settings.marginal_temperature, **kwargs)

    @property
    def softplus_beta(self) -> float:
        return self.settings.softplus_beta

    @property
    def joint_temperature(self) -> float:
        return self.settings.joint_temperature

    @property
    def marginal_temperature(self) -> float:
        return self.settings.marginal_temperature

    @property
    def input_dtype(self) -> torch.dtype:
        """The classifier's parameter dtype; inputs are cast to it."""
        for p in self.classifier.parameters():
            return p.dtype
        return torch.float32

    def check_input(self, image_shape: tuple[int, ...], labels: torch.Tensor, device: torch.device | str) -> None:
        """Runs once before sampling (host syncs allowed here, never in the loop): checks the
        classifier accepts images of `image_shape` (C, H, W), finds ReLUs called as functions
        (and smooths them), and checks labels against the number of classes."""
        example = torch.zeros((1, *image_shape), device=device, dtype=self.input_dtype)
        try:
            with torch.no_grad():
                logits = self.classifier(self.transform(example))
        except Exception as err:  # any architecture error means this shape cannot be classified
            raise ValueError(f"guidance: the classifier cannot take images of shape {tuple(image_shape)} "
                             f"({type(err).__name__}: {err})") from err
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"guidance: the classifier must return logits as one tensor (B, K), got "
                            f"{type(logits).__name__}; wrap it to return the logits alone")
        if logits.ndim != 2:
            raise ValueError(f"guidance: classifier output must be logits (B, K), got shape {tuple(logits.shape)}")
        self.num_classes = logits.shape[1]
        ids = label_ids(labels, self.num_classes)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_classes):
            raise ValueError(f"class_labels: ids must be in [0, {self.num_classes}) for this classifier, "
                             f"got range [{int(ids.min())}, {int(ids.max())}]")
        if not math.isinf(self.softplus_beta) and self.report["functional_relus"] is None:
            found = count_functional_relus(self.classifier, self.transform(example))
            self.report["functional_relus"] = found
            if found:
                self.classifier = FunctionalSoftplusWrapper(self.classifier, self.softplus_beta)

    def forward(self, x: torch.Tensor, labels: torch.Tensor,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """grad_x J (x's shape and dtype) and J (B,) for classifier input x (B, C, H, W).
        `weight` (B,) scales each sample's gradient (J is unweighted)."""
        # torch.func.vjp rather than autograd.grad: the same code then runs eagerly (also under
        # an outer no_grad) and inside torch.compile / CUDA-graph capture without a graph break.
        logits, pullback = torch.func.vjp(self.logits, x.detach().to(self.input_dtype))
        objective = _objective(logits, labels, self.joint_temperature, self.marginal_temperature)
        # The closed-form logit gradient replaces one autograd node and is what fused kernels compute.
        dlogits = _logit_grad(logits, labels, self.joint_temperature, self.marginal_temperature, weight)
        (grad,) = pullback(dlogits.to(logits.dtype))
        return grad.to(x.dtype), objective

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier logits (B, K) of the transformed input x (B, C, H, W)."""
        return self.classifier(self.transform(x))
