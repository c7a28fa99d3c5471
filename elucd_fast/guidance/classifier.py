"""`ClassifierGuidance`: the gradient of the calibrated objective through a frozen, smoothed
off-the-shelf classifier (SPEC §1-2).

It knows nothing of samplers: a sampler hands it the classifier input (x0 for DDPM, the
normalised x_i for EDM) and target labels, and gets back grad_x J and J.

Its two hot pieces, the classifier's Softplus modules and the closed-form logit gradient, are
plain PyTorch by default and can be swapped for implementations computing the same function
(`make_softplus`, `logit_grad`; `with_pieces` re-prepares a guidance with them): the engine
passes its fused kernels in that way, and the maths stays here.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from .objective import _logit_grad, _objective, label_ids
from .precondition import FunctionalSoftplusWrapper, count_functional_relus, make_input_transform, precondition_classifier
from .settings import GuidanceSettings


LogitGrad = Callable[[torch.Tensor, torch.Tensor, float, float, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def closed_form_logit_grad(logits: torch.Tensor, ids: torch.Tensor, joint_temperature: float,
                           marginal_temperature: float, weight: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dJ/dl (B, K), J (B,)) in the working dtype, from logits (B, K) and class ids (B,):
    `w * (tau_j onehot(y) - tau_m softmax(tau_m l))` (times the optional per-sample weight w) and
    `J = tau_j l_y - logsumexp(tau_m l)` (SPEC §1), temperatures already checked. The plain
    `logit_grad` piece of `ClassifierGuidance`; fused versions take the same arguments."""
    return (_logit_grad(logits, ids, joint_temperature, marginal_temperature, weight),
            _objective(logits, ids, joint_temperature, marginal_temperature))


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
        make_softplus: builder `beta -> module` of the Softplus replacing each ReLU; default
            `nn.Softplus(beta, threshold=20)`.
        logit_grad: `(logits, ids, tau_j, tau_m, weight) -> (dJ/dl, J)`; default
            `closed_form_logit_grad`.

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
        logit_grad: LogitGrad | None = None,
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
        self.logit_grad = logit_grad or closed_form_logit_grad
        self.num_classes: int | None = None

    @classmethod
    def from_settings(cls, classifier: nn.Module, settings: GuidanceSettings, **kwargs) -> ClassifierGuidance:
        """The guidance of `settings` through `classifier` (kwargs: input_transform, ...)."""
        return cls(classifier, softplus_beta=settings.softplus_beta, joint_temperature=settings.joint_temperature,
                   marginal_temperature=settings.marginal_temperature, **kwargs)

    def with_pieces(self, *, make_softplus: Callable[[float], nn.Module] | None = None,
                    logit_grad: LogitGrad | None = None) -> ClassifierGuidance:
        """This guidance prepared again from its source classifier, with the same settings, input
        transform and BatchNorm folding, on the device and dtype of its current classifier, but
        with these implementations of the two hot pieces (None: the plain one). The pieces must
        compute the same function as the plain ones; the guidance itself is left unchanged."""
        rebuilt = ClassifierGuidance.from_settings(
            self.source_classifier, self.settings, input_transform=copy.deepcopy(self.transform),
            fold_batchnorm=self.report["batchnorm_folded"], make_softplus=make_softplus, logit_grad=logit_grad)
        parameter = next(self.classifier.parameters(), None)
        if parameter is not None:
            rebuilt.to(device=parameter.device, dtype=parameter.dtype)
        return rebuilt

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
        # The closed-form logit gradient replaces the objective's autograd nodes.
        dlogits, objective = self.logit_grad(logits, label_ids(labels, logits.shape[1]), self.joint_temperature,
                                             self.marginal_temperature, weight)
        (grad,) = pullback(dlogits.to(logits.dtype))
        return grad.to(x.dtype), objective

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier logits (B, K) of the transformed input x (B, C, H, W)."""
        return self.classifier(self.transform(x))
