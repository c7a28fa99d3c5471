"""Tuning a preset's classifier weight on a small subset of seeds: one sample set per value (and
one unguided, for reference), the same seeds for every value, so each seed's image moves only
with the weight.

    sweep_classifier_weight("edm2-img64-s-fid+cls", [0.001, 0.002, 0.004, 0.008], range(1000),
                            "out/sweep", build_kwargs={"network": ..., "classifier": ...},
                            reference="imagenet-64x64.npz")

The weight is the sampler's classifier-term strength (`CLASSIFIER_WEIGHT_FIELDS`: wmax for EDM
and EDM2, s for DDPM, the base of gamma_t for DiT). The networks are loaded once; each value
only changes the sampler settings. Per value the samples go to samples/<field>-<value>.npz
(arr_0 uint8 NHWC, arr_1 labels) and are scored: by `score(path)` when given, else against
`reference` (`evaluate.compute_metrics`), else by the preset's bundled evaluation network
(`preset.score_samples`, the digits presets); otherwise only the samples are written. Every row
also reports the guiding classifier's mean objective J and accuracy on the final images: cheap,
available for every preset, and biased (it is the classifier being followed), so a trend to
read beside the metrics, not a substitute for them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..checks import check_int, check_number, json_number
from ..guidance.objective import calibrated_objective
from ..job import Job
from ..presets import get_preset
from ..rng import check_seeds
from ..runs.atomic import atomic_write
from ..runs.encoding import write_npz
from ..runs.generation import generate

# Sampler name -> the settings field that scales its classifier term.
CLASSIFIER_WEIGHT_FIELDS = {"edm": "max_guidance", "edm2": "max_guidance", "ddpm": "classifier_scale",
                            "dit": "guidance_scale"}


def sweep_classifier_weight(preset, values: Iterable[float], seeds: Iterable[int], outdir: str | os.PathLike, *,
                            field: str | None = None, include_unguided: bool = True,
                            overrides: Mapping | None = None, build_kwargs: Mapping | None = None,
                            reference: str | os.PathLike | None = None, metrics_kwargs: Mapping | None = None,
                            score: Callable[[Path], dict] | None = None,
                            configure: Callable[[Job], Job] | None = None, batch_size: int = 64,
                            device: torch.device | str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Samples `seeds` with the preset's classifier weight set to each of `values`.

    Args:
        preset: a preset or its registered name; it is sampled with classifier guidance on.
        values: the weights to try (each checked by the preset's settings before anything loads).
        seeds: the subset, the same for every value.
        outdir: where samples/*.npz and sweep.json go.
        field: the settings field swept; default the sampler's (CLASSIFIER_WEIGHT_FIELDS).
        include_unguided: also sample the seeds without classifier guidance (the first row).
        overrides: other preset settings for every row (e.g. num_steps).
        build_kwargs: the preset's `build` arguments besides settings: its files (network,
            guide_network, classifier, vae) or weights_dir.
        reference, metrics_kwargs: score each row with `compute_metrics(samples, reference,
            **metrics_kwargs)` (FID by default).
        score: scores a row's npz itself (takes precedence over `reference`).
        configure: applied to the built job once (e.g. the engine's
            `lambda job: configure_job(job, precision="fp16")[0]`).
        batch_size: images per sampler call; device: where the networks run; log: one line per row.
    Returns:
        {"preset", "field", "num_samples", "rows": [per row: value (None for unguided), guided,
        samples (path relative to outdir), metrics (dict or None), mean_objective,
        classifier_accuracy], "seconds"}, also written to outdir/sweep.json.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    overrides = dict(overrides or {})
    field = field or CLASSIFIER_WEIGHT_FIELDS.get(preset.settings.name)
    if field is None or field not in preset.settings.field_names():
        raise ValueError(f"field: the {preset.settings.name} sampler has no classifier weight {field!r}; its settings: "
                         f"{', '.join(preset.settings.field_names())}")
    values = [check_number(field, v) for v in values]
    if not values:
        raise ValueError("values: give at least one classifier weight")
    if len(set(values)) != len(values):
        raise ValueError(f"values: each weight once, got {values}")
    seeds = check_seeds(list(seeds))
    check_int("batch_size", batch_size, minimum=1)
    # Every row's settings are checked before anything is loaded or written.
    configured = {v: preset.configure(guidance=True, **{**overrides, field: v}) for v in values}
    scorer = _scorer(preset, score, reference, metrics_kwargs)

    start = time.perf_counter()
    job = preset.build(device=device, guidance=True, **dict(build_kwargs or {}), **overrides)
    if configure is not None:
        job = configure(job)
    base_config = dict(job.config)
    rows = []
    if include_unguided:
        unguided = dataclasses.replace(configured[values[0]], guidance=False)
        rows.append((None, dataclasses.replace(job, guidance=None, config={**base_config, "preset": unguided.json()})))
    for value in values:
        rows.append((value, dataclasses.replace(job, settings=configured[value].settings,
                                                config={**base_config, "preset": configured[value].json()})))
    outdir = Path(outdir)
    results = []
    for value, row_job in rows:
        name = "unguided" if value is None else f"{field}-{value:g}"
        path = outdir / "samples" / f"{name}.npz"
        objective, correct = _sample_to_npz(row_job, job.guidance, seeds, path, batch_size)
        metrics = scorer(path, outdir / name) if scorer is not None else None
        result = {"value": value, "guided": value is not None, "samples": str(path.relative_to(outdir)),
                  "metrics": metrics, "mean_objective": objective, "classifier_accuracy": correct}
        results.append(result)
        shown = "" if metrics is None else "  " + "  ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        log(f"{name:24s} J {objective:.4f}  classifier accuracy {correct:.3f}{shown}")
    summary = {"preset": preset.name, "field": field, "num_samples": len(seeds), "rows": results,
               "seconds": time.perf_counter() - start}
    _write_json(outdir / "sweep.json", summary)
    return summary


def _scorer(preset, score, reference, metrics_kwargs):
    """(npz path, row folder) -> metrics, or None where the preset cannot score."""
    if score is not None:
        return lambda path, _folder: score(path)
    if reference is not None:
        from ..metrics.evaluate import compute_metrics

        return lambda path, _folder: compute_metrics(path, reference, **dict(metrics_kwargs or {}))
    if hasattr(preset, "score_samples"):
        return preset.score_samples
    return None


@torch.no_grad()
def _sample_to_npz(job: Job, guidance, seeds: Sequence[int], path: Path, batch_size: int) -> tuple[float, float]:
    """Samples `seeds` with `job` into an npz (arr_0 uint8 (N, H, W, C), arr_1 labels (N,)) and
    returns the guiding classifier's mean J and accuracy on the final images."""
    images, labels, objectives, hits = [], [], [], []

    def sample(latents, batch_labels, randn_like):
        x = job.sample(latents, batch_labels, randn_like)
        if guidance is not None and batch_labels is not None:
            logits = guidance.logits(x.to(guidance.input_dtype)).float()
            settings = guidance.settings
            objectives.append(calibrated_objective(logits, batch_labels, settings.joint_temperature,
                                                   settings.marginal_temperature).cpu())
            hits.append((logits.argmax(dim=1) == batch_labels).float().cpu())
        return x

    for batch in generate(sample, seeds, image_shape=job.noise_shape, num_classes=job.num_classes,
                          batch_size=batch_size, quantize=job.quantize, device=job.device):
        images.append(batch.images.numpy())
        if batch.labels is not None:
            labels.append(batch.labels.numpy())
    arrays = {"arr_0": np.concatenate(images)}
    if labels:
        arrays["arr_1"] = np.concatenate(labels)
    buffer = io.BytesIO()
    write_npz(buffer, arrays)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return _mean(objectives), _mean(hits)


def _mean(parts: list[torch.Tensor]) -> float:
    """The mean of per-batch values; NaN where there are none (an unconditional job)."""
    return float(torch.cat(parts).mean()) if parts else math.nan


def _write_json(path: Path, value) -> None:
    """`value` as indented JSON, written atomically (NaN as null, infinities as strings)."""

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and math.isnan(v):
            return None
        return json_number(v)

    text = json.dumps(clean(value), indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


__all__ = ["CLASSIFIER_WEIGHT_FIELDS", "sweep_classifier_weight"]
