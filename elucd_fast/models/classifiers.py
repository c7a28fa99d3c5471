"""Off-the-shelf image classifiers (torchvision, optionally timm) from local weight files.

The architecture always comes from our installed library, built without weights (nothing is ever
downloaded); the file only supplies tensors, read with `weights_only=True`, and must fit the
architecture exactly. The returned network is frozen: eval mode (BatchNorm uses its running
statistics) and no parameter gradients, since guidance only differentiates with respect to the
input image.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
import torchvision
from torch import nn

from .checkpoint import CheckpointError, check_hash_in_name, existing_file, load_state_dict_strict, load_tensors

TIMM_PREFIX = "timm:"
# Architectures are built with their library's default head size; a file with another number of
# classes differs from the default model only in the first dimension of the head's tensors.
DEFAULT_NUM_CLASSES = 1000

# torchvision's DenseNet files predate a renaming of the dense layers' submodules
# ("denselayer1.norm.1.weight" is now "denselayer1.norm1.weight"); torchvision rewrites the keys
# when it loads them, and so do we.
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def torchvision_architectures() -> list[str]:
    """Names of the torchvision classification architectures (`resnet50`, `vit_b_16`, ...)."""
    return torchvision.models.list_models(module=torchvision.models)


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def _unknown_architecture(name: str) -> CheckpointError:
    names = torchvision_architectures()
    close = difflib.get_close_matches(name, names, n=3)
    suggestion = f" Did you mean {', '.join(close)}?" if close else ""
    timm_note = "" if _timm() is None else f" timm models are named '{TIMM_PREFIX}<name>'."
    return CheckpointError(
        f"unknown classifier architecture {name!r}.{suggestion} torchvision offers {len(names)} "
        f"(e.g. resnet50, resnet101, convnext_base, vit_b_16, efficientnet_b0).{timm_note}")


def _builder(arch: str) -> Callable[..., nn.Module]:
    """The constructor for `arch`, building random weights; never fetches any."""
    if arch.startswith(TIMM_PREFIX):
        timm = _timm()
        if timm is None:
            raise CheckpointError(f"{arch!r} needs the timm package, which is not installed")
        name = arch[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            raise CheckpointError(f"unknown timm architecture {name!r}")
        return functools.partial(timm.create_model, name, pretrained=False)
    if arch not in torchvision_architectures():
        raise _unknown_architecture(arch)
    return functools.partial(torchvision.models.get_model, arch, weights=None)


def build_classifier(arch: str, num_classes: int = DEFAULT_NUM_CLASSES, **arch_kwargs: object) -> nn.Module:
    """A randomly initialised `arch` with `num_classes` outputs; `arch_kwargs` go to its builder."""
    with warnings.catch_warnings():
        # googlenet/inception warn that their random initialisation will change; irrelevant here.
        warnings.simplefilter("ignore", FutureWarning)
        return _builder(arch)(num_classes=num_classes, **arch_kwargs)


@contextlib.contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Builds modules with every parameter and buffer on the meta device, so any architecture's
    shapes are known in milliseconds and without memory. Unlike `torch.device("meta")`, the
    builders' own arithmetic (RegNet computes its widths with tensors) still runs on the CPU.
    Patches `nn.Module` for the duration: not for use from several threads at once."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


@functools.lru_cache(maxsize=None)
def _state_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of `arch` with the default head."""
    with _weights_on_meta():
        model = build_classifier(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _modernised(arch: str, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`state` in the form today's `arch` expects: DenseNet keys renamed, and BatchNorm's
    `num_batches_tracked` counters (absent from files written before PyTorch 0.4.1, as from older
    torchvision releases) set to 0, which is what PyTorch itself does for such files."""
    if arch.startswith("densenet"):
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    if not any(k.endswith("num_batches_tracked") for k in state):
        counters = {k: torch.tensor(0) for k in _state_shapes(arch) if k.endswith("num_batches_tracked")}
        state = {**state, **counters}
    return state


def fitting_num_classes(arch: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes with which `arch` fits `state` key for key and shape for shape, or
    None when it fits with no head size. Builds nothing but a meta-device skeleton."""
    expected = _state_shapes(arch)
    state = _modernised(arch, state)
    if set(expected) != set(state):
        return None
    classes = set()
    for key, shape in expected.items():
        found = tuple(state[key].shape)
        if found == shape:
            continue
        if shape and shape[0] == DEFAULT_NUM_CLASSES and found and found[1:] == shape[1:]:
            classes.add(found[0])
            continue
        return None
    if len(classes) > 1:
        return None
    return classes.pop() if classes else DEFAULT_NUM_CLASSES


def identify_torchvision_classifier(state: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """Every (torchvision architecture, number of classes) that fits `state` exactly; usually one.
    The first call builds the skeletons of all architectures (a few seconds)."""
    found = []
    for arch in torchvision_architectures():
        num_classes = fitting_num_classes(arch, state)
        if num_classes is not None:
            found.append((arch, num_classes))
    return found


def load_classifier(name_or_arch: str, weights: str | os.PathLike | None = None, *, num_classes: int | None = None,
                    allow_random: bool = False, **arch_kwargs: object) -> nn.Module:
    """A frozen classifier: torchvision architecture `name_or_arch` (`resnet50`, `resnet101`, any
    name of `torchvision_architectures()`), or `timm:<name>` when timm is installed, with weights
    from the local file `weights` (`.pth`/`.pt`/`.safetensors`).

    The file is read tensors-only, must match the architecture exactly (strict) and hold finite
    values; a sha256 prefix in its name, as torchvision writes (`resnet50-11ad3fa6.pth`), is
    verified. `num_classes` defaults to the number the file holds. `weights=None` is an error
    unless `allow_random=True`, which returns random weights (for tests and smoke runs: a random
    classifier gives meaningless guidance). `arch_kwargs` go to the builder, e.g.
    `transform_input=True`, which torchvision sets itself when it loads its googlenet/inception_v3
    weights. Returns the model on the CPU in eval mode with `requires_grad` False everywhere.
    """
    _builder(name_or_arch)  # unknown names fail before any file is read
    if weights is None:
        if not allow_random:
            raise CheckpointError(
                f"no weights file given for {name_or_arch}; pass the local path of its weights "
                "(pass allow_random=True to get random weights on purpose)")
        model = build_classifier(name_or_arch, num_classes or DEFAULT_NUM_CLASSES, **arch_kwargs)
    else:
        source = str(weights)
        check_hash_in_name(existing_file(weights, "classifier weights"))
        state = load_tensors(weights, "classifier weights")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{source}: expected a state dict (name -> tensor), got {type(state).__name__}")
        state = _modernised(name_or_arch, state)
        if num_classes is None:
            num_classes = fitting_num_classes(name_or_arch, state) or DEFAULT_NUM_CLASSES
        model = build_classifier(name_or_arch, num_classes, **arch_kwargs)
        try:
            load_state_dict_strict(model, state, source)
        except CheckpointError as err:
            fits = [f"{arch} ({classes} classes)" for arch, classes in identify_torchvision_classifier(state)]
            hint = f"; the file fits {', '.join(fits)}" if fits else ""
            raise CheckpointError(f"{err} (architecture {name_or_arch}){hint}") from err
    return model.eval().requires_grad_(False)
