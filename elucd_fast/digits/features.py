"""The digits evaluation network as a torch-fidelity feature extractor, registered on import
under the name "digits-eval":

    import elucd_fast.digits.features  # registers "digits-eval"
    compute_metrics(samples, reference, feature_extractor="digits-eval", prc=True)

It plays Inception-v3's part for 8x8 digits: 64-d penultimate features for the Fréchet distance,
precision/recall and KID, logits for the Inception Score.
"""
from __future__ import annotations

import os

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from .data import IMAGE_SHAPE

EXTRACTOR_NAME = "digits-eval"
FEATURES = "features"  # (B, 64) penultimate SiLU features
LOGITS = "logits"      # (B, 10)


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, 8, 8), C = 1 or 3 (grey repeated, as torch-fidelity feeds them) ->
    the networks' input (B, 1, 8, 8) float32 in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) \
            or tuple(images.shape[2:]) != IMAGE_SHAPE[1:]:
        raise ValueError(f"{EXTRACTOR_NAME}: expected uint8 images (B, 1|3, {IMAGE_SHAPE[1]}, {IMAGE_SHAPE[2]}), "
                         f"got {images.dtype} {tuple(images.shape)}")
    return images.to(torch.float32).mean(dim=1, keepdim=True) / 127.5 - 1


class DigitsEvalFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around the shipped digits evaluation network.

    Args:
        name: the registered name ("digits-eval").
        features_list: requested features, a subset of ("features", "logits").
        feature_extractor_weights_path: an evaluator safetensors file to use instead of the
            shipped, hash-verified one.
    """

    def __init__(self, name: str, features_list: list[str],
                 feature_extractor_weights_path: str | os.PathLike | None = None, **kwargs):
        super().__init__(name, features_list)
        from .load import load_evaluator

        self.evaluator = load_evaluator(weights_path=feature_extractor_weights_path)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 images (B, 1|3, 8, 8) -> the requested features, float32, in `features_list` order."""
        x = images_to_input(images).to(next(self.evaluator.parameters()).device)
        features, logits = self.evaluator(x)
        found = {FEATURES: features, LOGITS: logits}
        return tuple(found[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURES, LOGITS)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": LOGITS, "fid": FEATURES, "kid": FEATURES, "prc": FEATURES}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros((1, 3, *IMAGE_SHAPE[1:]), dtype=torch.uint8)


def register() -> None:
    """Registers the extractor as "digits-eval" (once; importing this module does it)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, DigitsEvalFeatureExtractor)


register()

__all__ = ["DigitsEvalFeatureExtractor", "EXTRACTOR_NAME", "FEATURES", "LOGITS", "images_to_input", "register"]
