"""Sampling a digits preset and scoring it with the bundled evaluation network, for the tests
that check guidance doing its job."""
from collections.abc import Sequence

import numpy as np

from elucd_fast.digits.report import class_accuracy
from elucd_fast.presets import build_job
from elucd_fast.runs.generation import generate


def preset_accuracy(preset: str, seeds: Sequence[int], **overrides) -> float:
    """Class accuracy of `preset` (with `overrides`) on `seeds`, sampled in one batch."""
    job = build_job(preset, **overrides)
    images, labels = [], []
    for batch in generate(job.sample, seeds, image_shape=job.image_shape, num_classes=10, batch_size=len(seeds)):
        images.append(batch.images.numpy())
        labels.append(batch.labels.numpy())
    return class_accuracy(np.concatenate(images), np.concatenate(labels))
