"""The authors' own guided EDM sampler, run beside ours in the benchmarks.

Their sampler is the function `edm_sampler` in `EDM/generate.py` of the EluCD repository
(AlexMaOLS/EluCD). Nothing of theirs is copied into this project: when `ELUCD_AUTHORS_REPO`
names a local checkout of that repository, `load_authors_edm_sampler` imports their
`generate.py` from it at run time and returns their function, unchanged. Their generate.py
imports EDM's `dnnlib` and `torch_utils`, which their `EDM/` folder carries.

Their `edm_sampler` is defined inside `main()` and reads the classifier from main's local
variable `resnet`; it is rebuilt here from its code object with our classifier bound to that
name. It takes one-hot labels (it selects the target logit with `class_labels != 0`), runs the
classifier on float32 input and keeps the sampler state in float64.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

AUTHORS_REPO_ENV = "ELUCD_AUTHORS_REPO"


def authors_repo() -> Path | None:
    """The checkout named by $ELUCD_AUTHORS_REPO if it holds EDM/generate.py, else None."""
    path = os.environ.get(AUTHORS_REPO_ENV)
    if not path or not (Path(path) / "EDM" / "generate.py").is_file():
        return None
    return Path(path)


def load_authors_edm_sampler(repo: Path, classifier: nn.Module) -> Callable:
    """Their `edm_sampler(net, latents, class_labels, randn_like, num_steps, sigma_min,
    sigma_max, rho, S_churn, S_min, S_max, S_noise, use_classifier, softplus_beta,
    joint_temperature, uncond_temperature, max_guidance, add_factor)`, guiding with
    `classifier` (prepare it with `authors_classifier`). Every argument must be passed: its
    defaults are evaluated inside their main() and are not part of the code object."""
    edm_dir = str(Path(repo) / "EDM")
    if edm_dir not in sys.path:
        sys.path.insert(0, edm_dir)
    spec = importlib.util.spec_from_file_location("elucd_authors_generate", Path(edm_dir) / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = module.main.callback  # a click command: its callback is their main()
    codes = [c for c in main.__code__.co_consts if isinstance(c, types.CodeType) and c.co_name == "edm_sampler"]
    if len(codes) != 1 or codes[0].co_freevars != ("resnet",):
        raise RuntimeError(f"{spec.origin}: expected one nested edm_sampler reading `resnet`; the file has changed")
    return types.FunctionType(codes[0], module.__dict__, "edm_sampler", None, (types.CellType(classifier),))


def authors_classifier(classifier: nn.Module, softplus_beta: float) -> nn.Module:
    """`classifier` (a torchvision ResNet, left untouched) prepared the way their generate.py
    prepares its ResNet: a copy in eval mode whose ReLU modules among the top-level children and
    the children of layer1-layer4's Bottleneck blocks become Softplus(beta). Parameters keep
    requires_grad (their `param.required_grad = False` sets an unused attribute)."""
    resnet = copy.deepcopy(classifier).eval()
    for name, child in list(resnet.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(resnet, name, nn.Softplus(beta=softplus_beta))
        if name in ("layer1", "layer2", "layer3", "layer4"):
            for block in child.children():
                if isinstance(block, torchvision.models.resnet.Bottleneck):
                    for block_name, layer in list(block.named_children()):
                        if isinstance(layer, nn.ReLU):
                            setattr(block, block_name, nn.Softplus(beta=softplus_beta))
    return resnet.requires_grad_(True)


def run_authors_edm_sampler(sampler: Callable, net, latents: torch.Tensor, labels: torch.Tensor, randn_like: Callable,
                            *, num_steps: int, max_guidance: float, add_factor: float, softplus_beta: float,
                            joint_temperature: float, marginal_temperature: float) -> torch.Tensor:
    """Their sampler on integer `labels` (B,), guided, with EDM's default schedule (sigma 0.002
    to 80, rho 7, no churn)."""
    one_hot = torch.eye(net.label_dim, device=latents.device)[labels]
    return sampler(net, latents, one_hot, randn_like=randn_like, num_steps=num_steps, sigma_min=0.002, sigma_max=80,
                   rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, use_classifier=1,
                   softplus_beta=softplus_beta, joint_temperature=joint_temperature,
                   uncond_temperature=marginal_temperature, max_guidance=max_guidance, add_factor=add_factor)
