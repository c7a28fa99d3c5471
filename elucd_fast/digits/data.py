"""The digits data set of the embedded benchmark: scikit-learn's bundled `load_digits`
(1,797 grey 8x8 images of the digits 0-9, 17 intensity levels), so nothing is downloaded.

The train/test split is fixed here, in code: a seeded permutation with a fixed test size, so
every network, reference statistic and metric of the benchmark refers to the same images.
"""
from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)  # (C, H, W)
TEST_SIZE = 297          # held out for test accuracy and the reference statistics; 1,500 train
SPLIT_SEED = 0
MAX_INTENSITY = 16       # load_digits pixels are integers 0 ... 16


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed split of the digits.

    Returns:
        train_x (1500, 1, 8, 8) float32 in [-1, 1], train_y (1500,) int64,
        test_x (297, 1, 8, 8) float32 in [-1, 1], test_y (297,) int64.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) * (2 / MAX_INTENSITY) - 1).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return images[train], labels[train], images[test], labels[test]


__all__ = ["IMAGE_SHAPE", "MAX_INTENSITY", "NUM_CLASSES", "TEST_SIZE", "load_digits_split"]
