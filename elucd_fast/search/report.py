"""The step search's chart (matplotlib, drawn off-screen): the fitness per generation, and the
declared schedule beside the DP's and every analytic family's on the selection seeds; and the
chart of a sweep over evaluation counts (`bench/search_digits.py`)."""
from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path

from ..atomic import atomic_write


def _save(figure, path: str | Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    data = buffer.getvalue()
    atomic_write(Path(path), lambda f: f.write(data))


def write_search_chart(state: Mapping, png_path: str | Path) -> None:
    """Two panels from a search.json: the best fitness so far and the median of each
    generation's new candidates; the selection-seed fitness of the winner, the DP and each family."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = state["values"]
    summary = values["summary"]
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    generations = values.get("generations", [])
    index = [g["index"] for g in generations]
    left.plot(index, [g["best"] for g in generations], "o-", label="best so far")
    medians = [(g["index"], g["median_new"]) for g in generations if g["median_new"] is not None]
    if medians:
        left.plot(*zip(*medians), "s--", alpha=0.7, label="median of the new candidates")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("generation")
    left.set_ylabel(f"{summary['metric']} (search seeds)")
    left.set_title(f"{summary['preset']}: search at {summary['nfe']} network evaluations", fontsize="medium")
    left.legend(fontsize="small")

    rows = [("winner", summary["winner"]["selection"]["score"])]
    rows += [(name, family["selection"]["score"]) for name, family in summary["families"].items()]
    names = [name for name, _ in rows]
    heights = [score if math.isfinite(score) else math.nan for _, score in rows]
    right.bar(names, heights, color=["tab:red"] + ["tab:blue"] * (len(rows) - 1))
    right.set_ylabel(f"{summary['metric']} (selection seeds)")
    right.set_title("declared schedule beside the DP and the analytic families", fontsize="medium")
    right.tick_params(axis="x", labelrotation=30)
    _save(figure, png_path)


def write_sweep_chart(rows: list[Mapping], png_path: str | Path, *, title: str, key: str = "fd_digits") -> None:
    """`key` against network evaluations, one line per method (rows: method, nfe, and `key`)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        points = sorted((row["nfe"], row[key]) for row in rows if row["method"] == method and row.get(key) is not None)
        if points:
            axes.plot(*zip(*points), "o-", label=method, linewidth=2.5 if "search" in method else 1.2)
    axes.set_yscale("log")
    axes.set_xlabel("network evaluations per image")
    axes.set_ylabel(key.replace("_", " "))
    axes.set_title(title, fontsize="medium")
    axes.legend(fontsize="small")
    _save(figure, png_path)


__all__ = ["write_search_chart", "write_sweep_chart"]
