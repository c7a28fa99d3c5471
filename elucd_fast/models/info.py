"""What is in a checkpoint file, read from its keys and shapes without building or running a model.

Shapes are all it needs: a `.safetensors` file is described from its header alone (meta tensors,
no data read). `describe_checkpoint` recognises the formats the loaders accept: torchvision classifier state
dicts, guided-diffusion UNets (and, for information, its noisy classifiers), DiT state dicts and
training checkpoints, Stable Diffusion VAEs (a diffusers directory or a `.safetensors` file), and
EDM network pickles and training snapshots (described by `edm_pickle.describe_edm_pickle`,
with the dataset options a snapshot records).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .adm_unet import adm_flags_from_state_dict, is_adm_unet_state_dict, public_checkpoint_of
from .checkpoint import HASH_IN_NAME, CheckpointError, existing_file, safetensors_shapes, sha256_file
from .classifiers import identify_torchvision_classifier
from .dit import dit_config_from_state_dict, dit_state_dict, is_dit_state_dict, read_training_checkpoint

# Keys present in every description; `details` adds what is specific to the kind.
COMMON_KEYS = ("path", "kind", "architecture", "resolution", "classes", "parameters", "dtype", "sha256")
KIND_CLASSIFIER = "classifier"
KIND_ADM = "adm-unet"
KIND_ADM_CLASSIFIER = "adm-classifier"
KIND_DIT = "dit"
KIND_VAE = "vae"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _tensor_summary(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """`parameters`: total element count of the stored tensors (buffers such as BatchNorm running
    statistics included); `dtype`: the floating dtypes stored, comma-separated when mixed."""
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    return dict(parameters=sum(v.numel() for v in state.values()), dtype=",".join(dtypes) or None)


def _describe_state(state: Mapping[str, torch.Tensor], source: str) -> dict[str, object]:
    """kind, architecture, resolution, classes and details of a state dict, by its keys."""
    if is_dit_state_dict(state):
        config = dit_config_from_state_dict(state)
        name = config["model"] or f"DiT(depth={config['depth']}, hidden={config['hidden_size']}, patch={config['patch_size']})"
        return dict(kind=KIND_DIT, architecture=name, resolution=config["image_size"],
                    classes=config["num_classes"] or None, details=config)
    if is_adm_unet_state_dict(state):
        flags = adm_flags_from_state_dict(state)
        public = public_checkpoint_of(state)
        note = (f"the structure of guided-diffusion's {public}: the loader uses its README flags" if public else
                "num_heads / num_head_channels and the attention order are not stored in the weights: pass them "
                "to the loader (default: 4 heads, legacy order)")
        details = {**flags, "public_checkpoint": public, "note": note}
        return dict(kind=KIND_ADM, architecture="guided-diffusion UNetModel", resolution=flags["image_size"],
                    classes=flags["num_classes"], details=details)
    if "time_embed.0.weight" in state and "input_blocks.0.0.weight" in state:
        # The released noisy classifiers end in attention pooling, whose projection gives the classes.
        head = state.get("out.2.c_proj.weight")
        return dict(kind=KIND_ADM_CLASSIFIER, architecture="guided-diffusion EncoderUNetModel (noisy classifier)",
                    resolution=None, classes=None if head is None else head.shape[0],
                    details=dict(note="ADM noisy classifiers are not loadable by this package"))
    if "decoder.conv_in.weight" in state and "encoder.conv_in.weight" in state:
        layout = "original LDM layout" if any(k.startswith("decoder.up.") for k in state) else "diffusers layout"
        return dict(kind=KIND_VAE, architecture=f"AutoencoderKL ({layout})", resolution=None, classes=None,
                    details=dict(latent_channels=state["decoder.conv_in.weight"].shape[1]))
    matches = identify_torchvision_classifier(state)
    if matches:
        names = [arch for arch, _ in matches]
        classes = {n for _, n in matches}
        return dict(kind=KIND_CLASSIFIER,
                    architecture=f"torchvision {names[0]}" if len(names) == 1 else "torchvision, one of " + ", ".join(names),
                    resolution=None, classes=classes.pop() if len(classes) == 1 else None,
                    details=dict(candidates=[dict(architecture=a, classes=n) for a, n in matches]))
    sample = ", ".join(list(state)[:4])
    raise CheckpointError(
        f"{source}: not a checkpoint this package knows (torchvision classifier, guided-diffusion UNet, DiT, "
        f"SD VAE, EDM .pkl); its first keys are: {sample or 'none'}")


def _describe_diffusers_dir(folder: Path) -> dict[str, object]:
    config_path = existing_file(folder / "config.json", "diffusers directory")
    weights = next((folder / name for name in _DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no {' or '.join(_DIFFUSERS_WEIGHTS)} next to config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_path}: not a readable JSON file ({err})") from err
    state = read_training_checkpoint(weights, "diffusers weights")
    summary = _tensor_summary(state)
    return dict(path=str(folder), kind=KIND_VAE, architecture=str(config.get("_class_name", "unknown")),
                resolution=config.get("sample_size"), classes=None, **summary, sha256=sha256_file(weights),
                details=dict(weights=weights.name, latent_channels=config.get("latent_channels"),
                             block_out_channels=config.get("block_out_channels"),
                             scaling_factor=config.get("scaling_factor")))


def _common_form(path: Path, edm: dict[str, object]) -> dict[str, object]:
    """An EDM pickle's description with the common keys; its other entries become details."""
    details = dict(edm)
    common = {key: details.pop(key, None) for key in COMMON_KEYS}
    common["path"] = str(path)
    # EDM networks are conditioned on one-hot vectors of `label_dim` classes (0: unconditional).
    common["classes"] = details.get("label_dim") or None
    return {**common, "details": details}


def describe_checkpoint(path: str | os.PathLike) -> dict[str, object]:
    """Identifies a checkpoint file (or diffusers VAE directory) without running any model.

    Returns a dict with `COMMON_KEYS`: path, kind (`classifier`, `adm-unet`, `adm-classifier`,
    `dit`, `vae`, or the EDM description's kind), architecture, resolution (image pixels, or None
    when the file does not tell), classes (or None), parameters (stored tensor elements), dtype,
    sha256 (of the weights file), plus `details` specific to the kind.
    Raises CheckpointError for missing, unreadable, unsafe or unrecognised files.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return _describe_diffusers_dir(p / "vae" if (p / "vae" / "config.json").is_file() else p)
    existing_file(p, "checkpoint")
    if p.suffix == ".pkl":
        from .edm2_pickle import describe_edm2_pickle, is_edm2_pickle_data
        from .edm_pickle import describe_edm_pickle, read_persistent_pickle

        data = read_persistent_pickle(p)
        describe = describe_edm2_pickle if is_edm2_pickle_data(data) else describe_edm_pickle
        return _common_form(p, describe(p, data=data))
    source = str(p)
    # A safetensors header describes the whole file: its data is never read here.
    state = safetensors_shapes(p) if p.suffix == ".safetensors" else read_training_checkpoint(p, "checkpoint")
    if isinstance(state, Mapping):
        state = dit_state_dict(state, source)
    if not isinstance(state, Mapping) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{source}: not a state dict (name -> tensor)")
    try:
        described = _describe_state(state, source)
    except CheckpointError as err:
        if source in str(err):
            raise
        raise CheckpointError(f"{source}: {err}") from err
    digest = sha256_file(p)
    details = dict(described["details"], **_name_and_paper_notes(p, digest, described["kind"]))
    return dict(path=source, kind=described["kind"], architecture=described["architecture"],
                resolution=described["resolution"], classes=described["classes"], **_tensor_summary(state),
                sha256=digest, details=details)


# The classifiers the paper guided with: torchvision's IMAGENET1K_V2 files, by sha256 prefix.
PAPER_CLASSIFIERS = {"cd907fc2": "resnet101-cd907fc2.pth (torchvision ResNet-101 IMAGENET1K_V2)",
                     "11ad3fa6": "resnet50-11ad3fa6.pth (torchvision ResNet-50 IMAGENET1K_V2)"}


def _name_and_paper_notes(path: Path, digest: str, kind: str) -> dict[str, str]:
    """Whether a file name's torchvision-style sha256 prefix matches the content, and whether a
    classifier is one the paper used."""
    notes = {}
    match = HASH_IN_NAME.search(path.name)
    if match is not None:
        notes["name_sha256_prefix"] = ("matches the content" if digest.startswith(match.group(1)) else
                                       f"MISMATCH: the name says {match.group(1)}, the content is {digest[:8]}... "
                                       "(corrupt or substituted file; the loaders refuse it)")
    if kind == KIND_CLASSIFIER:
        paper = next((name for prefix, name in PAPER_CLASSIFIERS.items() if digest.startswith(prefix)), None)
        notes["paper_weights"] = (f"yes: {paper}" if paper else
                                  "no: the paper's are " + " and ".join(PAPER_CLASSIFIERS.values()))
    return notes
