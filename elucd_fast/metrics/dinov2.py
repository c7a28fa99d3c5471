"""DINOv2 features for FD-DINOv2, the Fréchet distance EDM2 reports beside FID.

EDM2's detector (`calculate_metrics.py`, after layer6ai-labs/dgm-eval) takes uint8 RGB images
(B, 3, H, W), resizes them to 224 x 224, scales them to [0, 1], normalises them with ImageNet's
mean and std, and keeps the output of DINOv2 ViT-L/14: the CLS token after the final LayerNorm,
1024 numbers per image. The resize is bicubic, either

- "torch" (EDM2's default, used for its published references): `torch.nn.functional.interpolate`
  with antialiasing on the float32 pixel values, neither rounded nor clipped; or
- "pil" (dgm-eval's original, slower): PIL's bicubic resize of each uint8 image.

Statistics (float64 mean and unbiased covariance) and the Fréchet distance are `evaluate.py`'s,
shared with FID.

The network is transformers' `Dinov2Model`, read from a local folder only (`facebook/dinov2-large`
saved with `save_pretrained`); its `pooler_output` is that CLS token. EDM2 loads DINOv2's own
code through torch.hub instead, and the two differ in one place: the position embeddings, learnt
for the 37 x 37 patches of a 518-pixel input, are resampled to the 16 x 16 patches of a 224-pixel
one. DINOv2's code calls bicubic interpolation with the scale factor (16 + 0.1) / 37 (an offset it
keeps for backward compatibility), which places the samples differently from transformers'
exact output size 16 x 16, so the features differ. `Dinov2Detector` therefore resamples the
embeddings once, DINOv2's way; transformers then uses them unchanged, and its features equal
those of DINOv2's code on the same weights.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image_source import EvaluationError, ImageSource, MissingWeightsError

DINOV2_MODEL_ID = "facebook/dinov2-large"
DINOV2_RESOLUTION = 224
# DINOv2's own position-embedding resampling adds this to the target grid size in its scale factor.
DINOV2_INTERPOLATE_OFFSET = 0.1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("torch", "pil")
DEFAULT_RESIZE_MODE = "torch"
DINOV2_WEIGHTS_HELP = (
    f"Get it once where the internet is reachable, e.g. `python -c \"from transformers import Dinov2Model; "
    f"Dinov2Model.from_pretrained('{DINOV2_MODEL_ID}').save_pretrained('dinov2-large')\"` "
    f"(or `hf download {DINOV2_MODEL_ID} --local-dir dinov2-large`), and pass that folder. "
    f"Weights are never downloaded.")
_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")


def check_dinov2_folder(path: str | os.PathLike | None) -> Path:
    """The folder of a transformers DINOv2 model (config.json and safetensors weights), or a
    MissingWeightsError naming what is missing and where the weights come from."""
    what = f"dinov2_path: FD-DINOv2 needs a local folder with {DINOV2_MODEL_ID} (DINOv2 ViT-L/14) saved by transformers"
    if path is None:
        raise MissingWeightsError(f"{what}; none was given. {DINOV2_WEIGHTS_HELP}")
    folder = Path(path)
    if not folder.is_dir():
        raise MissingWeightsError(f"{what}; {folder} is {'not a folder' if folder.exists() else 'missing'}. "
                                  f"{DINOV2_WEIGHTS_HELP}")
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in _WEIGHTS_FILES):
        missing.append("model.safetensors")
    if missing:
        raise MissingWeightsError(f"{what}; {folder} has no {' and no '.join(missing)} (only safetensors weights are "
                                  f"read). {DINOV2_WEIGHTS_HELP}")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise EvaluationError(f"dinov2_path: {folder / 'config.json'} is unreadable ({err})") from err
    if model_type != "dinov2":
        raise EvaluationError(f"dinov2_path: {folder} holds a {model_type!r} model, not 'dinov2' "
                              f"({DINOV2_MODEL_ID}; the with-registers variants are other models)")
    return folder


def load_dinov2(path: str | os.PathLike | None, *, device: torch.device | str = "cpu",
                resize_mode: str = DEFAULT_RESIZE_MODE, verbose: bool = False) -> Dinov2Detector:
    """EDM2's FD-DINOv2 detector from a local transformers DINOv2 folder, in float32 on `device`.

    Only safetensors weights are read and nothing is fetched; every parameter must come from the
    file (a folder of another architecture is refused rather than partly initialised at random).
    transformers' loading progress bar shows only when `verbose`.
    """
    folder = check_dinov2_folder(path)
    try:
        from transformers import Dinov2Model
        from transformers.utils import logging as transformers_logging
    except ImportError as err:
        raise EvaluationError(f"FD-DINOv2 reads DINOv2 through transformers, which is not installed ({err}); "
                              f"pip install transformers") from err

    bars = transformers_logging.is_progress_bar_enabled()
    if bars and not verbose:
        transformers_logging.disable_progress_bar()
    try:
        model, info = Dinov2Model.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                  dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise EvaluationError(f"dinov2_path: {folder} could not be loaded ({type(err).__name__}: {err})") from err
    finally:
        if bars and not verbose:
            transformers_logging.enable_progress_bar()
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: sorted(map(str, keys)) for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                           for kind, keys in problems.items())
        raise EvaluationError(f"dinov2_path: {folder} does not hold a complete DINOv2 model ({listed})")
    return Dinov2Detector(model.to(device), resize_mode=resize_mode)


def resample_position_embeddings(model: torch.nn.Module, resolution: int = DINOV2_RESOLUTION) -> None:
    """Replaces a transformers `Dinov2Model`'s position embeddings, in place, by those DINOv2's own
    code uses for square `resolution`-pixel inputs: the patch grid's table (1, 1 + M*M, D)
    resampled bicubically (no antialiasing, in float32) with the scale factor (G + 0.1) / M to
    G x G, G = resolution // patch size; the CLS position is kept. A no-op when M == G."""
    embeddings = model.embeddings
    patch_size = model.config.patch_size
    patch_size = patch_size if isinstance(patch_size, int) else patch_size[0]
    grid = resolution // patch_size
    table = embeddings.position_embeddings                                   # (1, 1 + M*M, D)
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise EvaluationError(f"dinov2: position embeddings for {table.shape[1] - 1} patches are not a square grid")
    if side == grid:
        return
    dim = table.shape[2]
    patches = table[:, 1:].detach().float().reshape(1, side, side, dim).permute(0, 3, 1, 2)   # (1, D, M, M)
    scale = (grid + DINOV2_INTERPOLATE_OFFSET) / side
    patches = torch.nn.functional.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)                        # (1, G*G, D)
    resampled = torch.cat([table[:, :1].detach(), patches.to(table.dtype)], dim=1)
    embeddings.position_embeddings = torch.nn.Parameter(resampled, requires_grad=False)
    model.config.image_size = resolution


def preprocess(images: torch.Tensor, resize_mode: str = DEFAULT_RESIZE_MODE) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 (B, 3, 224, 224): EDM2's FD-DINOv2 input (see the
    module's docstring for the two resize modes)."""
    if resize_mode not in RESIZE_MODES:
        raise EvaluationError(f"dinov2_resize_mode: one of {RESIZE_MODES}, got {resize_mode!r}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise EvaluationError(f"dinov2: expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    size = (DINOV2_RESOLUTION, DINOV2_RESOLUTION)
    if resize_mode == "torch":
        x = torch.nn.functional.interpolate(images.to(torch.float32), size=size, mode="bicubic", antialias=True)
    else:
        resized = [np.asarray(Image.fromarray(image, "RGB").resize(size, Image.Resampling.BICUBIC))
                   for image in images.permute(0, 2, 3, 1).cpu().numpy()]
        x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(images.device, torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).reshape(1, 3, 1, 1)
    return (x / 255 - mean) / std


class Dinov2Detector:
    """uint8 images (B, 3, H, W) -> DINOv2 features (B, D), float32: EDM2's FD-DINOv2 detector.

    Takes a transformers `Dinov2Model` and puts it in eval mode, frozen, with its position
    embeddings resampled in place as DINOv2's own code does for 224-pixel inputs.
    """

    def __init__(self, model: torch.nn.Module, *, resize_mode: str = DEFAULT_RESIZE_MODE):
        if resize_mode not in RESIZE_MODES:
            raise EvaluationError(f"dinov2_resize_mode: one of {RESIZE_MODES}, got {resize_mode!r}")
        self.model = model.eval().requires_grad_(False)
        self.resize_mode = resize_mode
        self.feature_dim = model.config.hidden_size
        resample_position_embeddings(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.cls_token.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pixels = preprocess(images.to(self.device), self.resize_mode)
            return self.model(pixel_values=pixels).pooler_output.float()       # (B, D)


def dinov2_features(detector: Dinov2Detector, images: ImageSource, *, batch_size: int,
                    verbose: bool = False) -> np.ndarray:
    """Features (N, D) float32 of every image of `images`, in its order, read batch by batch."""
    from tqdm import tqdm

    if batch_size < 1:
        raise EvaluationError(f"batch_size: must be at least 1, got {batch_size}")
    chunks = []
    with tqdm(total=len(images), unit="img", desc=f"DINOv2 features {images.path.name}", disable=not verbose,
              leave=False) as bar:
        for batch in images.batches(batch_size):
            chunks.append(detector(batch).cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(chunks)


__all__ = [
    "DEFAULT_RESIZE_MODE", "DINOV2_MODEL_ID", "DINOV2_RESOLUTION", "Dinov2Detector", "IMAGENET_MEAN", "IMAGENET_STD",
    "RESIZE_MODES", "check_dinov2_folder", "dinov2_features", "load_dinov2", "preprocess",
    "resample_position_embeddings",
]
