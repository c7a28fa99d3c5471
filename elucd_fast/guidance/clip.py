"""CLIP text guidance (paper 5.4, SPEC §6): the calibrated objective over a prompt set.

CLIP becomes a classifier whose classes are prompts: for images x in [-1, 1],

    l_k = exp(logit_scale) * cos(E_img(prep(x)), E_txt(prompt_k))      # (B, K)

over the target prompt(s) followed by the contrast prompts, and J is the same calibrated
objective as for an ImageNet classifier (SPEC §1). `CLIPGuidance` is a `ClassifierGuidance` over
that classifier, so it drops into `ddpm_sampler` (labels: zeros, the first target prompt) and,
through `LatentGuidance`, into `dit_sampler`, with the same placement and sine schedule.

Text embeddings are computed once, at construction. The image preprocessing is differentiable:
shortest side resized to CLIP's resolution (bilinear, antialiased), centre crop, CLIP mean/std.
Optional cutouts replace the centre view by random square crops whose logits are averaged.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from .classifier import ClassifierGuidance
from .objective import label_ids

# Normalisation CLIP's image encoders were trained with (OpenAI's release).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A cutout's side is drawn uniformly between this fraction of the image's shorter side and all of it.
CUTOUT_MIN_FRACTION = 0.5
# Each cutout is one more CLIP image per sample and step; beyond this many a batch cannot fit.
MAX_CUTOUTS = 256


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): shorter side resized to `size` (bilinear, antialiased,
    differentiable), then the centre crop, as CLIP's own preprocessing frames an image."""
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new_size != (height, width):
        x = F.interpolate(x, size=new_size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return x[..., top:top + size, left:left + size]


class CLIPImageInput(nn.Module):
    """Differentiable CLIP preprocessing: images in [-1, 1] (B, 3, H, W) -> normalised views
    (V * B, 3, size, size), view-major (view v of sample b at row v * B + b).

    With `cutouts=0` there is one view, the centre crop. With `cutouts=n` there are n random
    square crops, each resized to `size`; their boxes are shared by the batch and drawn on the
    host from a `random.Random(cutout_seed)` (no device work, no host sync). `reset_cutouts()`
    restarts that sequence; `CLIPGuidance.check_input` calls it before every sampling run, so
    the k-th guided step of every run sees the same boxes and an image depends on its seed only.
    """

    def __init__(self, size: int, *, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 cutouts: int = 0, cutout_seed: int = 0):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"image_size: must be a positive integer, got {size!r}")
        check_int("cutouts", cutouts, minimum=0, maximum=MAX_CUTOUTS)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std: expected 3 values each (std > 0), got {mean!r}, {std!r}")
        self.size, self.cutouts, self.cutout_seed = size, cutouts, cutout_seed
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.reset_cutouts()

    def reset_cutouts(self) -> None:
        self._boxes = random.Random(self.cutout_seed)

    @property
    def num_views(self) -> int:
        return max(self.cutouts, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cutouts == 0:
            views = resize_center_crop(x, self.size)
        else:
            height, width = x.shape[-2:]
            shorter = min(height, width)
            crops = []
            for _ in range(self.cutouts):
                side = self._boxes.randint(max(1, math.ceil(CUTOUT_MIN_FRACTION * shorter)), shorter)
                top, left = self._boxes.randint(0, height - side), self._boxes.randint(0, width - side)
                crop = x[..., top:top + side, left:left + side]
                crops.append(F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                           antialias=True))
            views = torch.cat(crops)
        views = (views + 1) / 2
        return (views - self.mean.to(views.dtype)) / self.std.to(views.dtype)


class _TransformersImageEncoder(nn.Module):
    """transformers `CLIPModel`'s image tower: pixels (N, 3, S, S) -> projected embeddings (N, D).
    Position embeddings are interpolated when S differs from the model's resolution."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, interpolate_pos_encoding: bool):
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixels, interpolate_pos_encoding=self.interpolate_pos_encoding)
        return self.visual_projection(out.pooler_output)


def _is_transformers_clip(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("vision_model", "visual_projection", "text_model", "text_projection"))


def _is_open_clip(model: nn.Module) -> bool:
    return hasattr(model, "visual") and hasattr(model, "encode_text")


def native_image_size(clip_model: nn.Module) -> int:
    """The resolution a CLIP model's image tower was trained at (224, 336, ...)."""
    if _is_transformers_clip(clip_model):
        return int(clip_model.config.vision_config.image_size)
    size = getattr(clip_model.visual, "image_size", None)
    if size is None:
        raise ValueError("image_size: cannot read the CLIP model's resolution; pass image_size")
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def encode_prompts(clip_model: nn.Module, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-norm text embeddings (K, D) float32 of `prompts`, on the model's device."""
    device = next(clip_model.parameters()).device
    if _is_transformers_clip(clip_model):
        tokens = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                           max_length=clip_model.config.text_config.max_position_embeddings)
        out = clip_model.text_model(input_ids=tokens["input_ids"].to(device),
                                    attention_mask=tokens["attention_mask"].to(device))
        embeddings = clip_model.text_projection(out.pooler_output)
    else:
        embeddings = clip_model.encode_text(tokenizer(list(prompts)).to(device))
    return F.normalize(embeddings.float(), dim=-1)


class CLIPPromptClassifier(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> prompt logits (B, K):
    l_k = logit_scale * cos(E_img(view), E_txt(prompt_k)), averaged over the views (cutouts).

    Args:
        image_encoder: pixels (N, 3, S, S) -> embeddings (N, D).
        text_embeddings: (K, D), one row per prompt.
        logit_scale: CLIP's multiplier exp(logit_scale parameter), 100 for the released models.
        preprocess: a `CLIPImageInput`.
    """

    def __init__(self, image_encoder: nn.Module, text_embeddings: torch.Tensor, logit_scale: float,
                 preprocess: CLIPImageInput):
        super().__init__()
        self.image_encoder, self.preprocess, self.logit_scale = image_encoder, preprocess, float(logit_scale)
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.float(), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        views = self.preprocess(x)  # (V * B, 3, S, S)
        image = F.normalize(self.image_encoder(views), dim=-1)  # (V * B, D)
        logits = self.logit_scale * image @ self.text_embeddings.to(image.dtype).T  # (V * B, K)
        return logits.view(-1, batch, logits.shape[-1]).mean(dim=0)  # (B, K)


class CLIPGuidance(ClassifierGuidance):
    """Calibrated CLIP guidance toward a text prompt (SPEC §6).

    Args:
        clip_model: transformers `CLIPModel` (or an open_clip model: `visual`, `encode_text`,
            `logit_scale`); only its image tower is kept (copied and frozen), the text tower
            runs once here.
        processor_or_tokenizer: `CLIPProcessor` (its tokenizer, and its image mean/std) or the
            tokenizer alone.
        prompts: the target prompt, or several (labels choose among them).
        contrast_prompts: prompts the image should not match; they enter J's logsumexp only.
        joint_temperature: tau_j.
        marginal_temperature: tau_m; None means 0 (J = tau_j * l_target, plain CLIP score) without
            contrast prompts, and tau_j (log-softmax over the prompt set) with them.
        image_size: CLIP's input resolution; None: the model's own (224, or 336 for ViT-L/14-336).
            Other sizes interpolate the position embeddings (transformers models).
        cutouts: 0 for the centre view, n for n random crops (see `CLIPImageInput`).
        cutout_seed: seed of the crop boxes.
        mean, std: CLIP's input normalisation; None: the processor's, else OpenAI's.
        softplus_beta: smoothing of ReLUs (only ResNet CLIPs have any); math.inf keeps them.

    Called with x (B, 3, H, W) in [-1, 1] and labels (B,) prompt indices (zeros for the first
    target) it returns (grad_x J, J), like `ClassifierGuidance`.
    """

    def __init__(self, clip_model: nn.Module, processor_or_tokenizer, prompts: str | Sequence[str], *,
                 contrast_prompts: Sequence[str] = (), joint_temperature: float = 1.0,
                 marginal_temperature: float | None = None, image_size: int | None = None, cutouts: int = 0,
                 cutout_seed: int = 0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 softplus_beta: float = math.inf):
        targets = [prompts] if isinstance(prompts, str) else list(prompts)
        contrast = [contrast_prompts] if isinstance(contrast_prompts, str) else list(contrast_prompts)
        if not targets or not all(isinstance(p, str) and p.strip() for p in targets + contrast):
            raise ValueError(f"prompts: need at least one target prompt, all non-empty strings; got {targets!r}, "
                             f"contrast {contrast!r}")
        if not (_is_transformers_clip(clip_model) or _is_open_clip(clip_model)):
            raise TypeError(f"clip_model: expected a transformers CLIPModel or an open_clip model, "
                            f"got {type(clip_model).__name__}")
        image_processor = getattr(processor_or_tokenizer, "image_processor", None)
        tokenizer = getattr(processor_or_tokenizer, "tokenizer", None) or processor_or_tokenizer
        mean = mean or getattr(image_processor, "image_mean", None) or OPENAI_CLIP_MEAN
        std = std or getattr(image_processor, "image_std", None) or OPENAI_CLIP_STD
        native = native_image_size(clip_model)
        size = native if image_size is None else image_size
        if _is_transformers_clip(clip_model):
            encoder = _TransformersImageEncoder(clip_model.vision_model, clip_model.visual_projection, size != native)
        else:
            encoder = clip_model.visual
        preprocess = CLIPImageInput(size, mean=tuple(mean), std=tuple(std), cutouts=cutouts, cutout_seed=cutout_seed)
        classifier = CLIPPromptClassifier(encoder, encode_prompts(clip_model, tokenizer, targets + contrast),
                                          float(clip_model.logit_scale.detach().exp()), preprocess)
        if marginal_temperature is None:
            marginal_temperature = joint_temperature if contrast else 0.0
        super().__init__(classifier, softplus_beta=softplus_beta, joint_temperature=joint_temperature,
                         marginal_temperature=marginal_temperature)
        self.prompts, self.contrast_prompts = tuple(targets), tuple(contrast)

    def reset_cutouts(self) -> None:
        """Restarts the cutout boxes' sequence (see `CLIPImageInput`)."""
        for module in self.modules():
            if isinstance(module, CLIPImageInput):
                module.reset_cutouts()

    def check_input(self, image_shape: tuple[int, ...], labels: torch.Tensor, device: torch.device | str) -> None:
        """Runs once before sampling: restarts the cutouts, checks that CLIP takes images of
        `image_shape` and that labels index target prompts (contrast prompts are never targets)."""
        super().check_input(image_shape, labels, device)
        self.reset_cutouts()
        ids = label_ids(labels, len(self.prompts) + len(self.contrast_prompts))
        if ids.numel() and int(ids.max()) >= len(self.prompts):
            raise ValueError(f"labels: must index the {len(self.prompts)} target prompt(s), got {int(ids.max())}")


def load_clip(path: str | Path):
    """A CLIP model and its processor (or tokenizer) from a local transformers directory
    (config.json, weights, tokenizer files), e.g. a download of `openai/clip-vit-large-patch14-336`.
    Nothing is fetched. Returns (CLIPModel in eval mode with frozen parameters, CLIPProcessor or
    CLIPTokenizer)."""
    try:
        from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
    except ImportError as err:
        raise ImportError("CLIP guidance needs the transformers package (pip install transformers)") from err
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory; pass a local CLIP model directory "
                                "(config.json, model weights and tokenizer files)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: no config.json; not a transformers model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file}: not a readable JSON model configuration ({err})") from err
    if model_type != "clip":
        raise ValueError(f"{folder}: config.json describes a {model_type!r} model, not a CLIP model ('clip')")
    try:
        model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: cannot load the CLIP model ({err})") from err
    if info.get("missing_keys"):
        raise ValueError(f"{folder}: the weights miss {len(info['missing_keys'])} tensors of the CLIP model, "
                         f"e.g. {sorted(info['missing_keys'])[:3]}")
    try:
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError):
        try:
            processor = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{folder}: no CLIP tokenizer files (vocab.json, merges.txt or tokenizer.json)") from err
    return model.eval().requires_grad_(False), processor


__all__ = ["CLIPGuidance", "CLIPImageInput", "CLIPPromptClassifier", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
           "encode_prompts", "load_clip", "native_image_size", "resize_center_crop"]
