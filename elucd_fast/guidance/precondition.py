"""Classifier preconditioning (SPEC §2): smooth activations, freezing, BatchNorm folding, and
the input transform.

The ReLU -> Softplus(beta) swap must reach every ReLU of any architecture: module ReLUs are
replaced in the module tree (reused modules such as torchvision BasicBlock's single `relu` are
replaced once and so change at every use); ReLUs called functionally in a `forward`
(`F.relu`, `torch.relu`, `Tensor.relu`) cannot be reached by a module walk, so a probe forward
counts them, and if any remain the classifier is wrapped so those calls compute Softplus too.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..checks import check_softplus_beta

# PyTorch's own Softplus switches to the identity above beta * x > 20; keep its semantics.
SOFTPLUS_THRESHOLD = 20.0

_FUNCTIONAL_RELUS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu_)


def replace_relu_modules(module: nn.Module, softplus_beta: float,
                         make_softplus: Callable[[float], nn.Module] | None = None) -> int:
    """Replaces every `nn.ReLU` in the tree, in place, by Softplus(beta); returns how many
    module slots were replaced. `make_softplus(beta)` builds the replacement (a fused kernel
    version may be passed); the default is `nn.Softplus(beta, threshold=20)`."""
    make_softplus = make_softplus or (lambda beta: nn.Softplus(beta=beta, threshold=SOFTPLUS_THRESHOLD))
    replaced = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, make_softplus(softplus_beta))
                replaced += 1
    return replaced


class _CountFunctionalRelu(TorchFunctionMode):
    """Counts ReLUs called as functions (modules already swapped call Softplus instead)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FUNCTIONAL_RELUS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _FunctionalReluToSoftplus(TorchFunctionMode):
    """Computes Softplus(beta) wherever a forward calls ReLU as a function."""

    def __init__(self, softplus_beta: float):
        super().__init__()
        self.softplus_beta = softplus_beta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FUNCTIONAL_RELUS:
            x = args[0]
            y = F.softplus(x, beta=self.softplus_beta, threshold=SOFTPLUS_THRESHOLD)
            inplace = func in (torch.relu_, torch.Tensor.relu_, F.relu_) or bool((kwargs or {}).get("inplace")) \
                or (func is F.relu and len(args) > 1 and bool(args[1]))
            return x.copy_(y) if inplace else y
        return func(*args, **(kwargs or {}))


class FunctionalSoftplusWrapper(nn.Module):
    """Runs `model` with its functional ReLU calls computed as Softplus(beta)."""

    def __init__(self, model: nn.Module, softplus_beta: float):
        super().__init__()
        self.model = model
        self.softplus_beta = softplus_beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _FunctionalReluToSoftplus(self.softplus_beta):
            return self.model(x)


def count_functional_relus(model: nn.Module, example: torch.Tensor) -> int:
    """ReLU calls made as functions during one forward of `model` on `example`."""
    counter = _CountFunctionalRelu()
    with torch.no_grad(), counter:
        model(example)
    return counter.count


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses running statistics) and no parameter gradients: only the input
    gradient is ever computed."""
    model.eval()
    model.requires_grad_(False)
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Returns a copy with every Conv -> BatchNorm pair folded into the convolution (eval-mode
    arithmetic, fewer kernels and bytes per forward). Needs an fx-traceable model."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval(), inplace=True)
    except Exception as err:  # fx raises many error types for untraceable control flow
        raise ValueError(f"fold_batchnorm: the classifier cannot be traced by torch.fx ({type(err).__name__}: {err}); "
                         "use fold_batchnorm=False") from err


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetInput(nn.Module):
    """Maps images in [-1, 1] to the ImageNet-normalised input torchvision classifiers were
    trained on, optionally resized (bilinear, antialiased) to `size` x `size` first."""

    def __init__(self, size: int | None = None):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x + 1) / 2
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


INPUT_TRANSFORMS = ("identity", "imagenet", "imagenet224")


def make_input_transform(input_transform: str | nn.Module | Callable) -> nn.Module | Callable:
    """`identity` feeds images in [-1, 1] at the diffusion resolution straight to the classifier
    (what the paper's authors did; paper presets use it); `imagenet` adds ImageNet mean/std
    normalisation; `imagenet224` also resizes to 224 x 224; a module/callable is used as given."""
    if callable(input_transform):
        return input_transform
    if input_transform == "identity":
        return nn.Identity()
    if input_transform == "imagenet":
        return ImageNetInput()
    if input_transform == "imagenet224":
        return ImageNetInput(size=224)
    raise ValueError(f"input_transform: expected one of {INPUT_TRANSFORMS} or a callable, got {input_transform!r}")


def precondition_classifier(
    classifier: nn.Module,
    *,
    softplus_beta: float = math.inf,
    fold_batchnorm_layers: bool = False,
    example: torch.Tensor | None = None,
    make_softplus: Callable[[float], nn.Module] | None = None,
) -> tuple[nn.Module, dict]:
    """A frozen, smoothed copy of `classifier` and a report of what was done.

    Args:
        classifier: any image classifier module mapping (B, C, H, W) to logits (B, K).
        softplus_beta: beta of Softplus replacing each ReLU; math.inf keeps ReLU.
        fold_batchnorm_layers: fold Conv->BatchNorm pairs (equal outputs, faster forward).
        example: an input batch used to find ReLUs called as functions; without it they are
            not searched for (and the report says so).
        make_softplus: builder of the replacement module, default `nn.Softplus(beta, 20)`.
    Returns:
        (model, report) with report keys `relu_modules_replaced`, `functional_relus`
        (None when not searched) and `batchnorm_folded`.
    """
    check_softplus_beta(softplus_beta)
    model = copy.deepcopy(classifier)
    freeze(model)
    if fold_batchnorm_layers:
        model = freeze(fold_batchnorm(model))
    report = {"relu_modules_replaced": 0, "functional_relus": None, "batchnorm_folded": fold_batchnorm_layers}
    if math.isinf(softplus_beta):
        return model, report
    report["relu_modules_replaced"] = replace_relu_modules(model, softplus_beta, make_softplus)
    if example is not None:
        report["functional_relus"] = count_functional_relus(model, example)
        if report["functional_relus"]:
            model = FunctionalSoftplusWrapper(model, softplus_beta)
    return model, report
