"""The tools' charts (matplotlib, drawn off-screen): the profile's per-step cost, the calibration
curves, the ablation's FD beside the paper's FID."""
from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..runs.atomic import atomic_write
from .profile import PARTS


def write_profile_chart(report: Mapping, png_path: str | Path) -> None:
    """Stacked bars of the guided time per step (seconds per batch, by part), with the
    unguided step time marked, to a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    steps = [row["step"] for row in report["steps"]]
    bottom = np.zeros(len(steps))
    for part in PARTS:
        heights = np.array([max(row[part], 0.0) for row in report["steps"]])
        axes.bar(steps, heights, bottom=bottom, label=part.replace("_", " "))
        bottom += heights
    if report["unguided_steps"] is not None:
        axes.plot(steps, [row["total"] for row in report["unguided_steps"]], "k_", markersize=14, mew=2,
                  label="unguided step")
    overhead = report["guidance_overhead_ratio"]
    limit = report["flop_limit_ratio"]
    axes.set_title(f"{report['sampler']} on {report['device']}, batch {report['batch_size']}: guidance overhead "
                   f"{'n/a' if overhead is None else f'{overhead:.2f}x'} (FLOP limit "
                   f"{'n/a' if limit is None else f'{limit:.2f}x'})", fontsize="medium")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("sampler step")
    axes.set_ylabel("seconds per batch")
    axes.legend(fontsize="small")
    figure.savefig(png_path, dpi=120)


def write_calibration_chart(result: Mapping, png_path: str | Path) -> None:
    """ECE against timestep, one line per setting (as the paper's Figures 1-2), to a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for curve in result["curves"]:
        axes.plot(result["timesteps"], curve["ece"], marker=".", label=f"{curve['label']} (ICE {curve['ice']:.3f})")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("timestep t (0 = clean, larger = noisier)")
    axes.set_ylabel(f"ECE ({result['num_bins']} bins)")
    axes.set_title(f"Calibration along the process ({result['source']}, {result['num_images']} images)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(png_path, dpi=120)


def write_ablation_chart(summary: dict, path: Path) -> None:
    """One panel per axis: our FD (with the seed-noise band) and the paper's FID on a twin axis."""
    from matplotlib.figure import Figure

    axes_names = list(dict.fromkeys(row["axis"] for row in summary["rows"]))
    figure = Figure(figsize=(4 * len(axes_names), 3.8), layout="constrained")
    panels = figure.subplots(1, len(axes_names), squeeze=False)[0]
    noise = summary["seed_noise"]["fd_difference"]
    handles = []
    for panel, axis in zip(panels, axes_names):
        rows = [row for row in summary["rows"] if row["axis"] == axis]
        x = np.arange(len(rows))
        fd = np.array([row["fd"] for row in rows])
        panel.plot(x, fd, marker="o", color="tab:blue", label="digits FD (ours)")
        panel.fill_between(x, fd - noise, fd + noise, color="tab:blue", alpha=0.15, label="± seed noise")
        panel.set_xticks(x, [row["label"].replace(" as input", "") for row in rows], rotation=30, ha="right",
                         fontsize="small")
        panel.set_ylabel("digits FD", color="tab:blue")
        panel.set_title(axis)
        twin = panel.twinx()
        twin.plot(x, [row["paper_fid"] for row in rows], marker="s", linestyle="--", color="tab:red",
                  label="paper FID")
        twin.set_ylabel("paper FID (ImageNet 128)", color="tab:red")
        if not handles:
            handles = panel.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    figure.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncols=3, fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
