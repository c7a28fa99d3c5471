"""The three networks of the digits benchmark, as small stand-ins for the paper's ImageNet ones.

- The classifier (`DigitsResNet`): an ordinary ResNet of torchvision `BasicBlock`s (ReLU,
  BatchNorm), trained on clean images only, as an off-the-shelf ImageNet ResNet is. Guidance
  smooths and calibrates it; nothing about it is made for diffusion.
- The evaluation network (`DigitsEvaluator`): a different architecture (a plain SiLU CNN without
  BatchNorm), another seed, trained with augmentation. It plays Inception-v3's part: its
  64-d penultimate features give a Fréchet distance, precision and recall, and its predictions
  the class accuracy of samples. Guidance never sees it, so improvements it measures are not
  the guiding classifier grading its own work.
- The denoiser: EDM's `EDMPrecond` around a small `SongUNet`, the code path of the released EDM
  checkpoints, trained with label dropout so the same network also serves classifier-free
  guidance.
- The EDM2-style denoiser and its guide: EDM2's magnitude-preserving `EDM2Precond` (the code
  path of the released EDM2 pickles) at 8x8, class-conditional as EDM2's ImageNet-64 models,
  and, for autoguidance, EDM2's "bad version of itself": the same architecture at half width,
  trained for a quarter of the steps.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from ..models.edm2_networks import EDM2Precond
from ..models.edm_networks import EDMPrecond
from .data import IMAGE_SHAPE, NUM_CLASSES

# Constructor arguments of the denoiser (EDM's names). 8x8 and 4x4 levels with one residual
# block each: about 0.7M parameters, fast enough to sample thousands of images a minute on a
# CPU core pair.
DENOISER_KWARGS = MappingProxyType({
    "img_resolution": IMAGE_SHAPE[1],
    "img_channels": IMAGE_SHAPE[0],
    "label_dim": NUM_CLASSES,
    "sigma_data": 0.5,              # EDM's default for images in [-1, 1]
    "model_type": "SongUNet",
    "model_channels": 32,
    "channel_mult": (1, 2),
    "num_blocks": 1,
    "attn_resolutions": (),         # SongUNet still attends once at its 4x4 bottleneck
    "dropout": 0.1,                 # 1,500 training images: regularise against memorisation
    "label_dropout": 0.1,           # learn D(x, sigma) unconditionally too, for CFG
})

# Constructor arguments of the EDM2-style denoiser (EDM2's names): 8x8 and 4x4 levels of 24 and
# 48 channels, one encoder block per level (the decoder has two), self-attention at 4x4 (EDM2's
# ImageNet-64 models attend at their two lowest resolutions; ours has one). About 0.41M
# parameters (1.6 MB in float32).
EDM2_DENOISER_KWARGS = MappingProxyType({
    "img_resolution": IMAGE_SHAPE[1],
    "img_channels": IMAGE_SHAPE[0],
    "label_dim": NUM_CLASSES,
    "use_fp16": False,              # float32 on every device: a tiny network gains nothing from fp16
    "sigma_data": 0.5,
    "model_channels": 24,
    "channel_mult": (1, 2),
    "num_blocks": 1,
    "attn_resolutions": (4,),
    "channels_per_head": 24,        # two heads of 24 channels at 4x4
    "dropout": 0.1,                 # as EDM2's img64-m/l/xl; 1,500 training images
})

# The autoguidance guide: the same architecture at half width (channels and channels per head
# halved, so the same two heads), about 0.1M parameters.
EDM2_GUIDE_KWARGS = MappingProxyType({
    **EDM2_DENOISER_KWARGS,
    "model_channels": EDM2_DENOISER_KWARGS["model_channels"] // 2,
    "channels_per_head": EDM2_DENOISER_KWARGS["channels_per_head"] // 2,
})

EVAL_FEATURE_DIM = 64


def build_denoiser() -> EDMPrecond:
    """The digits denoiser D(x (B, 1, 8, 8), sigma, one-hot labels (B, 10)) -> (B, 1, 8, 8)."""
    return EDMPrecond(**DENOISER_KWARGS)


def build_edm2_denoiser() -> EDM2Precond:
    """The EDM2-style digits denoiser D(x (B, 1, 8, 8), sigma, one-hot labels (B, 10)) -> (B, 1, 8, 8)."""
    return EDM2Precond(**EDM2_DENOISER_KWARGS)


def build_edm2_guide() -> EDM2Precond:
    """Its autoguidance guide (same interface, half width)."""
    return EDM2Precond(**EDM2_GUIDE_KWARGS)


class DigitsResNet(nn.Module):
    """A ResNet-8 for 8x8 digits: 3x3 stem, three `BasicBlock`s (widths 16, 32, 64 at 8x8,
    4x4, 2x2), global average pooling, linear head.

    forward(x (B, 1, 8, 8) in [-1, 1]) -> logits (B, 10).
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = NUM_CLASSES):
        super().__init__()
        self.widths = tuple(widths)
        self.stem = nn.Sequential(nn.Conv2d(IMAGE_SHAPE[0], widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks = [BasicBlock(widths[0], widths[0])]
        for cin, cout in zip(widths[:-1], widths[1:]):
            downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
            blocks.append(BasicBlock(cin, cout, stride=2, downsample=downsample))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class DigitsEvaluator(nn.Module):
    """A plain CNN: two stages of two 3x3 SiLU convolutions and 2x2 average pooling
    (8x8 -> 4x4 -> 2x2), a 64-d SiLU feature layer, a linear head.

    forward(x (B, 1, 8, 8) in [-1, 1]) -> (features (B, 64), logits (B, 10)).
    """

    def __init__(self, widths: tuple[int, int] = (32, 64), feature_dim: int = EVAL_FEATURE_DIM,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        c0, c1 = widths
        self.body = nn.Sequential(
            nn.Conv2d(IMAGE_SHAPE[0], c0, 3, padding=1), nn.SiLU(), nn.Conv2d(c0, c0, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(c0, c1, 3, padding=1), nn.SiLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),  # (B, c1 * 2 * 2)
            nn.Linear(c1 * (IMAGE_SHAPE[1] // 4) ** 2, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


__all__ = ["DENOISER_KWARGS", "DigitsEvaluator", "DigitsResNet", "EDM2_DENOISER_KWARGS", "EDM2_GUIDE_KWARGS",
           "EVAL_FEATURE_DIM", "build_denoiser", "build_edm2_denoiser", "build_edm2_guide"]
