"""Sample-quality metrics: FID/IS/KID/precision-recall through torch-fidelity (`evaluate`),
FD-DINOv2 (`dinov2`), reference statistics in EDM2's dataset-refs format (`edm2_refs`), and the
image sources they read (`image_source`). `fid calc`/`fid ref` and the schedule search score
with the same code."""
from .evaluate import MetricsScorer, build_reference, compute_metrics

__all__ = ["MetricsScorer", "build_reference", "compute_metrics"]
