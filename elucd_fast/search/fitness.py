"""Fitness on fixed seeds: a candidate's settings sampled on a seed set shared by every candidate
(common random numbers: each seed's noise and label are the same whatever the candidate, so two
candidates differ only by their schedules), scored in memory by the engine's own metrics.

Samples go through `runs.generation.generate` with the job's sampling function, the path
`generate` writes to disk, batched and split over ranks as it is; here the batches stay in memory.
The ranks' images are gathered and ordered by seed, and rank 0 scores them and shares the result:
every image depends on its seed alone, so the score does not depend on the world size.

The metrics (lower is better):
- `fd_acc` (digits): FD of the evaluation network's features + 100 (1 - class accuracy): one
  point of class accuracy weighs as one FD unit. On digits the FD alone hardly moves from 18 to 6
  Heun steps while accuracy and precision fall (the FD rests on 297 real digits); the accuracy
  term ranks wrong-class digits as a user would. 100 puts the accuracy's seed noise (about 0.4
  points at 2,000 samples and 0.97) well below the FD's (about 3).
- `fd` (digits): the FD alone.
- `fid`: FID (Inception-v3, torch-fidelity) against reference statistics (`fid ref`).
- `fd_dinov2`: FD-DINOv2 against reference statistics, with a local DINOv2 folder.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..runs import dist
from ..runs.generation import NonFiniteSampleError, generate
from ..samplers import SamplerSettings

# Scores images uint8 (N, H, W, C) with their labels (N,) or None -> a metrics dict.
Scorer = Callable[[np.ndarray, "np.ndarray | None"], dict]


@dataclass(frozen=True)
class Metric:
    """A fitness: the name, the key of the value it minimises (or a combination), what it needs."""

    name: str
    description: str
    digits: bool          # scored by the digits benchmark's bundled evaluation network

    def value(self, metrics: dict) -> float:
        """The fitness of a metrics dict (lower is better)."""
        if self.name == "fd_acc":
            return metrics["fd_digits"] + 100.0 * (1.0 - metrics["class_accuracy"])
        return float(metrics[{"fd": "fd_digits", "fid": "frechet_inception_distance",
                              "fd_dinov2": "fd_dinov2"}[self.name]])


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("fd_acc", "digits: FD + 100 (1 - class accuracy)", True),
    Metric("fd", "digits: FD of the evaluation network's features", True),
    Metric("fid", "FID (Inception-v3) against reference statistics (--reference, --inception)", False),
    Metric("fd_dinov2", "FD-DINOv2 against reference statistics (--reference, --dinov2)", False),
)}


def check_metric(name: str, *, digits: bool) -> Metric:
    """The metric `name`, if the preset can be scored by it; ValueError otherwise."""
    usable = [m.name for m in METRICS.values() if m.digits == digits]
    if name not in METRICS:
        raise ValueError(f"metric: unknown {name!r}; choose one of {', '.join(usable)}")
    if name not in usable:
        raise ValueError(f"metric: {name!r} is not available for this preset; choose one of {', '.join(usable)}")
    return METRICS[name]


def reference_scorer(reference, metric: Metric, *, weights_path=None, dinov2_path=None, device="cpu") -> Scorer:
    """A `Scorer` by FID or FD-DINOv2 against `reference` (the checks and the reference read once)."""
    from ..metrics.evaluate import MetricsScorer

    scorer = MetricsScorer(reference, fid=metric.name == "fid", fd_dinov2=metric.name == "fd_dinov2",
                           feature_extractor_weights_path=weights_path, dinov2_path=dinov2_path, device=device)
    return lambda images, labels: scorer(images)


class Fitness:
    """Scores sampler settings on seed sets with `job`'s sampler and `scorer`.

    Calling it with settings and seeds returns a record: `score` (the metric's value; inf when a
    sample came out non-finite, with `error`), the scorer's metrics, `network_evaluations` per
    image and in total, `seconds` (sampling and scoring, rank 0's wall time).
    """

    def __init__(self, job, scorer: Scorer, metric: Metric, *, batch_size: int = 500):
        self.job, self.scorer, self.metric, self.batch_size = job, scorer, metric, batch_size

    def images(self, settings: SamplerSettings, seeds: Sequence[int], block_plans: tuple | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """The images uint8 (N, H, W, C) and labels (N,) of `seeds` in seed order, every rank's
        share gathered, sampled with `block_plans` (one per step) if given. Raises
        NonFiniteSampleError (on every rank) if a sample is non-finite."""
        job = dataclasses.replace(self.job, settings=settings, block_plans=block_plans)
        mine: list = []
        error = None
        try:
            for batch in generate(job.sample, seeds, image_shape=job.noise_shape, num_classes=job.num_classes,
                                  batch_size=self.batch_size, quantize=job.quantize, device=job.device,
                                  rank=dist.get_rank(), world_size=dist.get_world_size()):
                labels = None if batch.labels is None else batch.labels.numpy()
                mine.append((batch.seeds, batch.images.numpy(), labels))
        except NonFiniteSampleError as err:
            error = err.seeds
        parts = dist.gather_objects((mine, error))
        bad = sorted(s for _, e in parts if e for s in e)
        if bad:
            raise NonFiniteSampleError(bad)
        by_seed = {seed: (image, None if labels is None else labels[k])
                   for part, _ in parts for batch_seeds, images, labels in part
                   for k, (seed, image) in enumerate(zip(batch_seeds, images))}
        order = [by_seed[int(seed)] for seed in seeds]
        images = np.stack([image for image, _ in order])
        labels = None if order[0][1] is None else np.asarray([label for _, label in order], dtype=np.int64)
        return images, labels

    def __call__(self, settings: SamplerSettings, seeds: Sequence[int], block_plans: tuple | None = None) -> dict:
        start = time.perf_counter()
        evaluations = int(settings.network_evaluations)
        record: dict = {"network_evaluations": evaluations, "num_seeds": len(seeds),
                        "network_evaluations_total": evaluations * len(seeds)}
        try:
            images, labels = self.images(settings, seeds, block_plans)
        except NonFiniteSampleError as err:
            record.update(score=math.inf, error=str(err))
        else:
            if dist.is_main():
                metrics = self.scorer(images, labels)
                record.update({key: value for key, value in metrics.items() if _is_number(value)})
                record["score"] = self.metric.value(metrics)
        record["seconds"] = time.perf_counter() - start
        return dist.broadcast_from_main(record)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["METRICS", "Fitness", "Metric", "Scorer", "check_metric", "reference_scorer"]
