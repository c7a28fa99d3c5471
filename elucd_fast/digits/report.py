"""Scoring and pictures of digit sample sets: class accuracy by the evaluation network, the
Fréchet distance and precision/recall of its features (through `evaluate.MetricsScorer` and the
"digits-eval" extractor), in memory or of a sample npz, and a class-by-class sample grid.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..metrics import evaluate
from ..runs.atomic import atomic_write
from ..npz_reader import npz_members, read_npz_member
from ..runs.encoding import png_bytes
from . import features
from .data import NUM_CLASSES
from .load import load_evaluator, read_manifest, reference_path

# metrics.json keys of `score_samples`, beside evaluate's KEY_* ones.
KEY_CLASS_ACCURACY = "class_accuracy"
# The Fréchet distance of the digits evaluation network's features (not Inception's: "FD", not "FID").
KEY_FD_DIGITS = "fd_digits"
KEY_FD_REAL_FLOOR = "fd_train_vs_test_real"


def read_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 8, 8, 1) and target labels int64 (N,) of an npz (`arr_0`, `arr_1`)."""
    members = npz_members(path)  # sizes from the headers before any data
    if "arr_0" not in members or "arr_1" not in members:
        raise ValueError(f"{path}: expected arr_0 (uint8 images) and arr_1 (labels); found {sorted(members)}")
    return (read_npz_member(path, "arr_0", member=members["arr_0"]),
            read_npz_member(path, "arr_1", member=members["arr_1"]).astype(np.int64))


@torch.no_grad()
def class_accuracy(images: np.ndarray, labels: np.ndarray, *, weights_dir: str | os.PathLike | None = None,
                   evaluator: torch.nn.Module | None = None, batch_size: int = 1000) -> float:
    """Fraction of images uint8 (N, 8, 8, C) the evaluation network (`evaluator`, default the
    shipped one, or that of `weights_dir`) assigns to their labels (N,)."""
    evaluator = evaluator if evaluator is not None else load_evaluator(weights_dir)
    hits = 0
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        _, logits = evaluator(features.images_to_input(batch))
        hits += int((logits.argmax(dim=1).numpy() == labels[start:start + batch_size]).sum())
    return hits / len(images)


class DigitsScorer:
    """Scores digit sample sets in memory against the held-out digits: class accuracy by the
    evaluation network, the Fréchet distance (FD) of its features and, with `prc`,
    precision/recall (k = 3 neighbours, torch-fidelity). The networks are loaded, and the
    reference's features computed, once (shipped, verified weights and reference)."""

    def __init__(self, *, prc: bool = True):
        self.metrics = evaluate.MetricsScorer(reference_path(), feature_extractor=features.EXTRACTOR_NAME, fid=True,
                                              prc=prc, batch_size=1000)
        self.evaluator = load_evaluator()

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict:
        """Metrics of images uint8 (N, 8, 8, 1) with their target labels (N,)."""
        result = self.metrics(images)
        result[KEY_FD_DIGITS] = result.pop(evaluate.KEY_METRIC_FID)
        result[KEY_CLASS_ACCURACY] = class_accuracy(images, labels, evaluator=self.evaluator)
        return result


def score_samples(samples: str | os.PathLike, *, prc: bool = True) -> dict:
    """Metrics of a digits sample npz (arr_0 uint8 (N, 8, 8, 1), arr_1 labels (N,)) by a
    `DigitsScorer`, plus the FD between the real training and held-out digits, the floor a
    perfect sampler would approach."""
    result = DigitsScorer(prc=prc)(*read_samples(samples))
    result[KEY_FD_REAL_FLOOR] = read_manifest()["reference"]["fd_train_vs_test"]
    return result


GRID_GAP_LEVEL = 96  # grey lines between cells: digits are white on black, so black gaps would vanish


def class_grid(images: np.ndarray, labels: np.ndarray, *, num_classes: int = NUM_CLASSES, per_class: int = 10,
               scale: int = 4, gap: int = 2) -> np.ndarray:
    """A grid uint8 of images (N, H, W, C): row c holds the first `per_class` images labelled c, in
    the given order, enlarged `scale` times (nearest neighbour), with `gap` grey pixels around
    every cell; cells without a sample stay black.

    Returns (num_classes * (H * scale + gap) + gap, per_class * (W * scale + gap) + gap, C).
    """
    _, height, width, channels = images.shape
    cell_h, cell_w = height * scale + gap, width * scale + gap
    grid = np.full((num_classes * cell_h + gap, per_class * cell_w + gap, channels), GRID_GAP_LEVEL, np.uint8)
    for c in range(num_classes):
        chosen = images[labels == c][:per_class]
        for k in range(per_class):
            top, left = gap + c * cell_h, gap + k * cell_w
            cell = chosen[k].repeat(scale, 0).repeat(scale, 1) if k < len(chosen) else 0
            grid[top:top + height * scale, left:left + width * scale] = cell
    return grid


def write_class_grid(samples: str | os.PathLike, png_path: str | os.PathLike, **kwargs) -> None:
    """Writes `class_grid` of a sample npz as a grey PNG, atomically."""
    images, labels = read_samples(samples)
    data = png_bytes(class_grid(images, labels, **kwargs))
    atomic_write(Path(png_path), lambda f: f.write(data))


__all__ = ["DigitsScorer", "KEY_CLASS_ACCURACY", "KEY_FD_DIGITS", "KEY_FD_REAL_FLOOR", "class_accuracy", "class_grid", "read_samples",
           "score_samples", "write_class_grid"]
