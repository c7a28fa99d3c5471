"""The paper's ablation of its design choices (SPEC §8), on the embedded digits benchmark.

The paper varies one design at a time on ImageNet 128 (10k samples, 250 DDPM steps), keeping
the choices already made, in four axes:

    classifier input   x_t, x0                                (ReLU, tau_m = tau_j, gamma 0)
    Softplus beta      ReLU (inf), 8, 5, 4, 3                 (x0, tau_m = tau_j, gamma 0)
    tau_m / tau_j      1.0, 0.8, 0.7, 0.5, 0.3                (x0, beta 3, gamma 0)
    sine factor gamma  0, 0.1, 0.2, 0.3, 0.4                  (x0, beta 3, tau_m / tau_j 0.5)

Here each row samples the DDPM path of a digits preset (the EDM denoiser as an eps-model, ancestral
steps) from the same seeds and reports, beside the paper's FID: the Fréchet distance (FD) of the
digits evaluation features, the class accuracy by the evaluation network, and the integral
calibration error (ICE, SPEC §7) of the row's classifier setting on the forward-noised held-out
digits at the sampler's noise levels.

The default base is `digits-ddpm-uncond`, the denoiser's unconditional mode guided with the
paper's s = 1, so the class comes from the classifier alone. On the conditional denoiser
(`--preset digits-ddpm`) the digits model already draws the right class about 98% of the time,
guidance has little left to do, and the rows differ by less than the seed noise. Seed noise is measured by sampling
the last row (the full method) again from disjoint seeds: differences smaller than that are not
meaningful. The paper's recurrent-guidance rows are not reproduced (no sampler here repeats steps).

Outputs in `outdir`: ablation.md (the table), ablation.csv, ablation.png (FD and the paper's FID
per axis), and samples/<row>.npz (each row's samples).
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .calibrate import calibrate
from .charts import write_ablation_chart
from ..checks import check_int, json_number
from ..presets import get_preset
from ..samplers import DDPMSettings
from ..runs.atomic import atomic_write
from ..runs.encoding import write_npz
from ..runs.generation import generate
from ..runs.seeds import MAX_SEEDS_PER_RUN

AXES = ("input", "softplus", "temperature", "sine")


@dataclass(frozen=True)
class AblationRow:
    """One design of the paper's table.

    axis: which design axis; label: the design as the paper names it; settings: preset overrides
    (guidance_input, softplus_beta, marginal_temperature with tau_j = 1, gamma_factor);
    paper_fid: the paper's FID for it (ImageNet 128, 10k samples).
    """

    axis: str
    label: str
    settings: dict
    paper_fid: float

    def key(self) -> tuple:
        return tuple(sorted(self.settings.items()))


def _row(axis: str, label: str, paper_fid: float, *, guidance_input: str = "x0", softplus_beta: float = math.inf,
         ratio: float = 1.0, gamma_factor: float = 0.0) -> AblationRow:
    return AblationRow(axis, label, {"guidance_input": guidance_input, "softplus_beta": softplus_beta,
                                     "joint_temperature": 1.0, "marginal_temperature": ratio,
                                     "gamma_factor": gamma_factor}, paper_fid)


def ablation_rows(axes: Sequence[str] = AXES) -> list[AblationRow]:
    """The rows of the chosen axes, in the paper's order (SPEC §8)."""
    unknown = [axis for axis in axes if axis not in AXES]
    if unknown or not axes:
        raise ValueError(f"axes: choose one or more of {', '.join(AXES)}; got {list(axes)}")
    rows = {
        "input": [_row("input", "x_t as input", 8.61, guidance_input="xt"), _row("input", "x0 as input", 7.17)],
        "softplus": [_row("softplus", "ReLU", 7.17)] + [
            _row("softplus", f"Softplus beta {beta:g}", fid, softplus_beta=beta)
            for beta, fid in ((8, 6.99), (5, 6.89), (4, 6.73), (3, 6.61))],
        "temperature": [_row("temperature", f"tau_m/tau_j {ratio:g}", fid, softplus_beta=3, ratio=ratio)
                        for ratio, fid in ((1.0, 6.20), (0.8, 5.62), (0.7, 5.45), (0.5, 5.27), (0.3, 5.30))],
        "sine": [_row("sine", f"gamma {gamma:g}", fid, softplus_beta=3, ratio=0.5, gamma_factor=gamma)
                 for gamma, fid in ((0.0, 5.57), (0.1, 5.30), (0.2, 5.27), (0.3, 5.24), (0.4, 5.38))],
    }
    return [row for axis in AXES if axis in axes for row in rows[axis]]


# The full method (the paper's final choices), sampled twice for the seed-noise estimate.
FULL_METHOD = _row("seed noise", "full method", 5.24, softplus_beta=3, ratio=0.5, gamma_factor=0.3)


def _sample_to_npz(job, seeds: Sequence[int], path: Path, batch_size: int) -> None:
    """Samples `seeds` with `job` into an npz: arr_0 uint8 (N, H, W, C), arr_1 labels (N,)."""
    images, labels = [], []
    for batch in generate(job.sample, seeds, image_shape=job.noise_shape, num_classes=job.num_classes,
                          batch_size=batch_size, quantize=job.quantize, device=job.device):
        images.append(batch.images.numpy())
        labels.append(batch.labels.numpy())
    buffer = io.BytesIO()
    write_npz(buffer, {"arr_0": np.concatenate(images), "arr_1": np.concatenate(labels)})
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _file_name(row: AblationRow) -> str:
    s = row.settings
    beta = "relu" if math.isinf(s["softplus_beta"]) else f"beta{s['softplus_beta']:g}"
    return f"{s['guidance_input']}-{beta}-tau{s['marginal_temperature']:g}-gamma{s['gamma_factor']:g}.npz"


def _ice(job, images: torch.Tensor, labels: torch.Tensor, settings: dict) -> float:
    setting = {"softplus_beta": settings["softplus_beta"], "classifier_input": settings["guidance_input"],
               "marginal_temperature": settings["marginal_temperature"]}
    return calibrate(job, images, labels, settings=[setting], source="forward", batch_size=len(images))["curves"][0]["ice"]


def run_ablation(outdir: str | os.PathLike, *, preset: str = "digits-ddpm-uncond", num_samples: int = 1000,
                 num_steps: int | None = None, classifier_scale: float | None = None, cfg_scale: float | None = None,
                 axes: Sequence[str] = AXES, batch_size: int = 500, device: torch.device | str = "cpu",
                 log: Callable[[str], None] = print) -> dict:
    """Runs the ablation rows of `axes` and writes ablation.md / .csv / .png into `outdir`.

    Args:
        outdir: output folder.
        preset: a DDPM digits preset; every row overrides its guidance settings.
        num_samples: samples per row, seeds 0 ... num_samples - 1 (the seed-noise row uses the
            next num_samples seeds).
        num_steps, classifier_scale, cfg_scale: override the preset's (None keeps them); cfg_scale 0
            guides the denoiser's unconditional mode, so that the class comes from guidance alone.
        axes: which axes of AXES to run.
        batch_size: images per sampler call.
        device: where the networks run.
        log: receives one line per finished row.
    Returns:
        {"rows": [per row: axis, label, paper_fid, fd, class_accuracy, ice, settings],
         "seed_noise": {...}, "unguided": {...}, "settings": {...}, "seconds": float}
    """
    from ..digits.data import load_digits_split
    from ..digits.report import KEY_CLASS_ACCURACY, KEY_FD_DIGITS, score_samples

    # A Fréchet distance needs a covariance; a row and its seed-noise twin are one run's seeds each.
    check_int("num_samples", num_samples, minimum=2, maximum=MAX_SEEDS_PER_RUN // 2)
    check_int("batch_size", batch_size, minimum=1)
    rows = ablation_rows(axes)
    base = get_preset(preset)
    common = {key: value for key, value in (("num_steps", num_steps), ("classifier_scale", classifier_scale),
                                            ("cfg_scale", cfg_scale)) if value is not None}
    if not isinstance(base.settings, DDPMSettings):
        raise ValueError(f"preset: the ablation runs the DDPM path; {preset!r} is not a DDPM preset")
    # Every setting is checked before anything is sampled or written.
    for row in rows + [FULL_METHOD]:
        base.configure(guidance=True, **common, **row.settings)
    _, _, test_x, test_y = load_digits_split()
    outdir = Path(outdir)
    start = time.perf_counter()
    seeds = range(num_samples)
    done: dict[tuple, dict] = {}

    def measure(row: AblationRow, row_seeds: Sequence[int], name: str) -> dict:
        job = base.build(device=device, guidance=True, **common, **row.settings)
        path = outdir / "samples" / name
        _sample_to_npz(job, row_seeds, path, batch_size)
        metrics = score_samples(path, prc=False)
        return {"fd": metrics[KEY_FD_DIGITS], "class_accuracy": metrics[KEY_CLASS_ACCURACY],
                "ice": _ice(job, test_x, test_y, row.settings), "samples": str(path.relative_to(outdir))}

    results = []
    for row in rows:
        if row.key() not in done:
            done[row.key()] = measure(row, seeds, _file_name(row))
        result = {"axis": row.axis, "label": row.label, "paper_fid": row.paper_fid, **done[row.key()],
                  "settings": _json_settings(row.settings)}
        results.append(result)
        log(f"{row.axis:12s} {row.label:20s} FD {result['fd']:.3f}  accuracy {result['class_accuracy']:.3f}  "
            f"ICE {result['ice']:.4f}")

    first = done.get(FULL_METHOD.key()) or measure(FULL_METHOD, seeds, _file_name(FULL_METHOD))
    second = measure(FULL_METHOD, range(num_samples, 2 * num_samples), "seed-noise-" + _file_name(FULL_METHOD))
    seed_noise = {"label": "full method on seeds 0..N-1 vs N..2N-1", "fd": [first["fd"], second["fd"]],
                  "class_accuracy": [first["class_accuracy"], second["class_accuracy"]],
                  "fd_difference": abs(first["fd"] - second["fd"]),
                  "accuracy_difference": abs(first["class_accuracy"] - second["class_accuracy"])}
    log(f"seed noise: FD {first['fd']:.3f} vs {second['fd']:.3f}, accuracy {first['class_accuracy']:.3f} vs "
        f"{second['class_accuracy']:.3f}")
    unguided_job = base.build(device=device, guidance=False,
                              **{key: value for key, value in common.items() if key != "classifier_scale"})
    unguided_path = outdir / "samples" / "unguided.npz"
    _sample_to_npz(unguided_job, seeds, unguided_path, batch_size)
    unguided_metrics = score_samples(unguided_path, prc=False)
    unguided = {"fd": unguided_metrics[KEY_FD_DIGITS], "class_accuracy": unguided_metrics[KEY_CLASS_ACCURACY],
                "paper_fid": 5.91}
    log(f"unguided: FD {unguided['fd']:.3f}  accuracy {unguided['class_accuracy']:.3f}")
    configured = base.configure(**common)
    summary = {"rows": results, "seed_noise": seed_noise, "unguided": unguided,
               "settings": {"preset": preset, "num_samples": num_samples, "num_steps": configured.settings.num_steps,
                            "classifier_scale": configured.settings.classifier_scale,
                            "cfg_scale": configured.cfg_scale, "axes": list(axes),
                            "ice_images": len(test_x)},
               "seconds": time.perf_counter() - start}
    write_table(summary, outdir / "ablation.md")
    write_csv(summary, outdir / "ablation.csv")
    write_ablation_chart(summary, outdir / "ablation.png")
    return summary


def _json_settings(settings: dict) -> dict:
    return {**settings, "softplus_beta": json_number(settings["softplus_beta"])}


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _denoiser_text(cfg_scale: float) -> str:
    if cfg_scale == 1:
        return "conditional denoiser"
    if cfg_scale == 0:
        return "unconditional denoiser (the class comes from guidance alone)"
    return f"classifier-free scale {cfg_scale:g}"


def format_table(summary: dict) -> str:
    """The ablation as a markdown table, with the paper's FID beside ours and the seed noise."""
    settings = summary["settings"]
    lines = [
        f"Digits ablation: {settings['num_samples']} samples per row, {settings['num_steps']} DDPM steps, "
        f"classifier scale {settings['classifier_scale']:g}, {_denoiser_text(settings['cfg_scale'])}; "
        f"FD of the digits evaluation features against "
        f"the held-out digits; ICE on the {settings['ice_images']} held-out digits.",
        "",
        "| design | paper FID (ImageNet 128) | digits FD | digits accuracy | ICE |",
        "|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        lines.append(f"| {row['axis']}: {row['label']} | {row['paper_fid']:.2f} | {row['fd']:.3f} | "
                     f"{row['class_accuracy']:.3f} | {row['ice']:.4f} |")
    unguided = summary["unguided"]
    lines.append(f"| no guidance | {unguided['paper_fid']:.2f} | {unguided['fd']:.3f} | "
                 f"{unguided['class_accuracy']:.3f} | - |")
    noise = summary["seed_noise"]
    lines += ["", f"Seed noise: the full method (x0, beta 3, tau_m/tau_j 0.5, gamma 0.3) on two disjoint seed sets "
                  f"gives FD {noise['fd'][0]:.3f} and {noise['fd'][1]:.3f} (difference {noise['fd_difference']:.3f}), "
                  f"accuracy {noise['class_accuracy'][0]:.3f} and {noise['class_accuracy'][1]:.3f}. "
                  f"Differences between rows smaller than these are not meaningful.",
              f"Run time: {summary['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_table(summary: dict, path: Path) -> None:
    _atomic_text(path, format_table(summary))


def write_csv(summary: dict, path: Path) -> None:
    """One line per row: axis, label, paper_fid, fd, class_accuracy, ice, then the settings."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = ("guidance_input", "softplus_beta", "joint_temperature", "marginal_temperature", "gamma_factor")
    writer.writerow(["axis", "label", "paper_fid", "fd", "class_accuracy", "ice", *keys])
    for row in summary["rows"]:
        writer.writerow([row["axis"], row["label"], row["paper_fid"], f"{row['fd']:.6f}",
                         f"{row['class_accuracy']:.6f}", f"{row['ice']:.6f}", *(row["settings"][k] for k in keys)])
    _atomic_text(path, buffer.getvalue())


__all__ = ["AXES", "AblationRow", "FULL_METHOD", "ablation_rows", "format_table", "run_ablation",
           "write_csv", "write_table"]
