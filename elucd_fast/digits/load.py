"""Loading the digits benchmark's shipped weights, each file checked against the sha256 that
`manifest.json` records for it before it is read.

A file whose hash differs (damaged, edited, or from another training run) is refused with a
`DemoWeightsError`, as are weights trained for an architecture other than the one in the code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from ..models.checkpoint import CheckpointError, load_state_dict_strict, load_tensors, sha256_file
from .data import IMAGE_SHAPE, NUM_CLASSES
from .networks import (DENOISER_KWARGS, EDM2_DENOISER_KWARGS, EDM2_GUIDE_KWARGS, DigitsEvaluator, DigitsResNet,
                       build_denoiser, build_edm2_denoiser, build_edm2_guide)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
FILES = MappingProxyType({
    "classifier": "classifier.safetensors",
    "evaluator": "evaluator.safetensors",
    "denoiser": "denoiser.safetensors",
    "edm2_denoiser": "edm2-denoiser.safetensors",
    "edm2_guide": "edm2-guide.safetensors",
    "reference": "reference.npz",
})
RETRAIN_HINT = "retrain with `python -m elucd_fast.digits.train`"


class DemoWeightsError(CheckpointError):
    """The digits weights are missing, altered, or do not fit the code's architectures."""


def architectures() -> dict:
    """JSON form of the architectures the code builds (recorded in, and checked against, the
    manifest)."""
    return json.loads(json.dumps({
        "classifier": {"class": "DigitsResNet", "widths": DigitsResNet().widths},
        "evaluator": {"class": "DigitsEvaluator", "parameters": sum(p.numel() for p in DigitsEvaluator().parameters())},
        "denoiser": {"class": "EDMPrecond", **DENOISER_KWARGS},
        "edm2_denoiser": {"class": "EDM2Precond", **EDM2_DENOISER_KWARGS},
        "edm2_guide": {"class": "EDM2Precond", **EDM2_GUIDE_KWARGS},
    }))


def read_manifest(weights_dir: str | os.PathLike | None = None) -> dict:
    """The manifest of `weights_dir` (default: the shipped weights)."""
    path = Path(weights_dir or WEIGHTS_DIR) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DemoWeightsError(f"{path}: no manifest; {RETRAIN_HINT}") from err
    except (OSError, ValueError) as err:
        raise DemoWeightsError(f"{path}: unreadable manifest ({err}); {RETRAIN_HINT}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "files" not in manifest:
        raise DemoWeightsError(f"{path}: not a format-{MANIFEST_FORMAT} digits manifest; {RETRAIN_HINT}")
    return manifest


def verified_path(key: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of the file `key` (a key of `FILES`: "classifier", "evaluator", "denoiser",
    "edm2_denoiser", "edm2_guide", "reference") after checking its sha256 against the manifest."""
    if key not in FILES:
        raise ValueError(f"key: expected one of {sorted(FILES)}, got {key!r}")
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    manifest = read_manifest(weights_dir)
    entry = manifest["files"].get(key)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise DemoWeightsError(f"{weights_dir / MANIFEST_FILE}: records no sha256 for {key!r}; {RETRAIN_HINT}")
    path = weights_dir / entry.get("name", FILES[key])
    if not path.is_file():
        raise DemoWeightsError(f"{path}: missing; {RETRAIN_HINT}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise DemoWeightsError(f"{path}: sha256 {digest[:16]}... differs from the manifest's "
                               f"{entry['sha256'][:16]}... (damaged or altered file); {RETRAIN_HINT}")
    if key != "reference":
        recorded = manifest.get("architectures", {}).get(key)
        if recorded != architectures()[key]:
            raise DemoWeightsError(f"{path}: trained for the architecture {recorded}, but the code builds "
                                   f"{architectures()[key]}; {RETRAIN_HINT}")
    return path


def _load(module: nn.Module, key: str, weights_dir: str | os.PathLike | None,
          weights_path: str | os.PathLike | None, device: torch.device | str) -> nn.Module:
    path = Path(weights_path) if weights_path is not None else verified_path(key, weights_dir)
    load_state_dict_strict(module, load_tensors(path, what=f"digits {key}"), str(path))
    return module.to(device).eval().requires_grad_(False)


def load_classifier(weights_dir: str | os.PathLike | None = None, *, weights_path: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu") -> DigitsResNet:
    """The guiding classifier, logits (B, 10) of images (B, 1, 8, 8) in [-1, 1]; eval mode, frozen.
    `weights_path` loads that safetensors file instead (unverified: the caller's own file)."""
    return _load(DigitsResNet(), "classifier", weights_dir, weights_path, device)


def load_evaluator(weights_dir: str | os.PathLike | None = None, *, weights_path: str | os.PathLike | None = None,
                   device: torch.device | str = "cpu") -> DigitsEvaluator:
    """The evaluation network, (features (B, 64), logits (B, 10)) of images (B, 1, 8, 8)."""
    return _load(DigitsEvaluator(), "evaluator", weights_dir, weights_path, device)


def load_denoiser(weights_dir: str | os.PathLike | None = None, *, weights_path: str | os.PathLike | None = None,
                  device: torch.device | str = "cpu") -> nn.Module:
    """The EDM denoiser D(x (B, 1, 8, 8), sigma, one-hot labels (B, 10)) (EMA weights)."""
    return _load(build_denoiser(), "denoiser", weights_dir, weights_path, device)


def load_edm2_denoiser(weights_dir: str | os.PathLike | None = None, *,
                       weights_path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """The EDM2-style denoiser (`EDM2Precond`) D(x (B, 1, 8, 8), sigma, one-hot labels (B, 10))
    (power-function EMA weights), in eval mode: its layers then leave their weights as loaded."""
    return _load(build_edm2_denoiser(), "edm2_denoiser", weights_dir, weights_path, device)


def load_edm2_guide(weights_dir: str | os.PathLike | None = None, *,
                    weights_path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Its autoguidance guide: the same architecture at half width, trained a quarter as long."""
    return _load(build_edm2_guide(), "edm2_guide", weights_dir, weights_path, device)


def reference_path(weights_dir: str | os.PathLike | None = None) -> Path:
    """The verified reference npz: held-out digits (arr_0 uint8 (297, 8, 8, 1), arr_1 labels) and
    their evaluation-feature statistics (mu (64,), sigma (64, 64), float64)."""
    return verified_path("reference", weights_dir)


__all__ = ["DemoWeightsError", "FILES", "MANIFEST_FILE", "WEIGHTS_DIR", "architectures", "load_classifier",
           "load_denoiser", "load_edm2_denoiser", "load_edm2_guide", "load_evaluator", "read_manifest",
           "reference_path", "verified_path"]


def describe_weights_file(path: str | os.PathLike) -> dict | None:
    """`info`'s description of one of the digits benchmark's weight files (matched by sha256
    against the shipped manifest), or None when `path` is not one of them."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = sha256_file(path)
    manifest = read_manifest()
    key = next((k for k, entry in manifest["files"].items() if entry.get("sha256") == digest), None)
    if key is None or key == "reference":
        return None
    state = load_tensors(path, what="digits weights")
    architecture = manifest["architectures"][key]
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    return {"path": str(path), "kind": "digits-benchmark", "architecture": f"{architecture['class']} (digits {key})",
            "resolution": IMAGE_SHAPE[-1], "classes": NUM_CLASSES, "parameters": sum(v.numel() for v in state.values()),
            "dtype": ",".join(dtypes) or None, "sha256": digest,
            "details": {"role": key, "shipped": "yes: sha256 matches the package's manifest",
                        "architecture": architecture}}
