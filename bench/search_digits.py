"""The step search's evidence on the digits benchmark: FD, class accuracy and precision on
evaluation seeds no search ever sees, at several network-evaluation counts, for the analytic step
families, the trajectory DP and the full search, beside each preset's default schedule.

    OMP_NUM_THREADS=1 python bench/search_digits.py                     # every row (hours on 2 cores)
    python bench/search_digits.py --rows digits-ipndm --nfe 5           # one row at one count
    python bench/search_digits.py --table                               # tables and charts of what is done

Rows (preset, solver): digits-ipndm (guided EDM, iPNDM), digits-dpmpp (DPM-Solver++(2M)),
digits-heun (EDM's Heun: odd counts only, 2N - 1), digits-ddim (guided DDIM, eta 0, on digits-ddpm's
chain), digits-ddpm (digits-ddpm's own ancestral sampler). Every result is kept in OUT/ROW.json
as soon as it exists and every search resumes, so a rerun continues where one stopped (and rows
may run in parallel processes). The searches use `elucd-fast search`'s defaults (search seeds 0-499, selection seeds
20000-21999); the evaluation seeds (default 30000-31999) are disjoint from both.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from elucd_fast.atomic import atomic_write  # noqa: E402
from elucd_fast.presets import get_preset  # noqa: E402
from elucd_fast.runs import parse_seeds  # noqa: E402
from elucd_fast.search import Fitness, SearchSettings, StepSearch, analytic_families, steps_for_evaluations  # noqa: E402
from elucd_fast.search.fitness import METRICS  # noqa: E402
from elucd_fast.search.report import write_sweep_chart  # noqa: E402

ROWS = {
    "digits-ipndm": ("digits", {"solver": "ipndm"}),
    "digits-dpmpp": ("digits", {"solver": "dpmpp_2m"}),
    "digits-heun": ("digits", {}),
    "digits-ddim": ("digits-ddpm", {"use_ddim": True, "gamma_factor": 0.0}),
    "digits-ddpm": ("digits-ddpm", {}),
}
NFES = (3, 4, 5, 6, 8, 10)
KEYS = ("fd_digits", "class_accuracy", "precision", "recall", "score")


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, results: dict) -> None:
    text = json.dumps(results, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def evaluate(fitness: Fitness, settings, seeds) -> dict:
    record = fitness(settings, seeds)
    return {key: record.get(key) for key in (*KEYS, "network_evaluations", "seconds")}


def run_row(name: str, nfes, out: Path, eval_seeds, log) -> None:
    preset_name, overrides = ROWS[name]
    preset = get_preset(preset_name).configure(**overrides)
    job = preset.build()
    fitness = Fitness(job, preset.scorer(prc=True), METRICS["fd_acc"])
    row = load(out / f"{name}.json")

    def once(key: str, compute) -> None:
        if key not in row:
            start = time.perf_counter()
            row[key] = compute()
            row[key]["wall_seconds"] = time.perf_counter() - start
            save(out / f"{name}.json", row)
            log(f"{name} {key}: " + ", ".join(f"{k} {row[key][k]:.4g}" for k in KEYS if row[key].get(k) is not None))

    once("default", lambda: {**evaluate(fitness, job.settings, eval_seeds),
                             "steps": list(job.settings.step_sequence(job.net))})
    for nfe in nfes:
        try:
            num_steps = steps_for_evaluations(job.settings, nfe, net=job.net)
        except ValueError:
            continue
        for family, steps in analytic_families(job.settings, num_steps, net=job.net).items():
            once(f"{family}@{nfe}", lambda: {**evaluate(fitness, job.settings.with_steps(steps), eval_seeds),
                                            "steps": list(steps)})
        if f"search@{nfe}" in row:
            continue
        search = StepSearch(job, fitness, SearchSettings(nfe=nfe), out / f"{name}-nfe{nfe}", preset=preset_name,
                            progress=False, log=log)
        start = time.perf_counter()
        summary = search.run()
        wall = time.perf_counter() - start
        dp = summary["families"].get("dp")
        if dp is not None:
            once(f"dp@{nfe}", lambda: {**evaluate(fitness, job.settings.with_steps(dp["steps"]), eval_seeds),
                                       "steps": dp["steps"]})
        winner = summary["winner"]
        once(f"search@{nfe}", lambda: {
            **evaluate(fitness, search.settings_of(search.space.candidate(winner["steps"], winner["guidance"])),
                       eval_seeds),
            "steps": winner["steps"], "source": winner["source"],
            "search_network_evaluations": summary["network_evaluations_total"],
            "search_seconds": summary["seconds_recorded"], "search_wall_seconds_this_run": wall})


def table(results: dict, out: Path) -> str:
    """Markdown tables (one per row) and a chart per row: FD against evaluations per method."""
    lines = []
    for name, row in results.items():
        default = row.get("default")
        lines += [f"\n**{name}** (evaluation seeds; FD / class accuracy / precision)\n"]
        methods = sorted({key.split("@")[0] for key in row if "@" in key}, key=_method_order)
        nfes = sorted({int(key.split("@")[1]) for key in row if "@" in key})
        lines.append("| method | " + " | ".join(f"{n} NFE" for n in nfes) + " |")
        lines.append("|---|" + "---|" * len(nfes))
        chart_rows = []
        for method in methods:
            cells = []
            for nfe in nfes:
                cell = row.get(f"{method}@{nfe}")
                if cell is None:
                    cells.append("n/a")
                    continue
                cells.append(f"{cell['fd_digits']:.1f} / {cell['class_accuracy']:.3f} / {cell['precision']:.2f}")
                chart_rows.append({"method": method, "nfe": nfe, "fd_digits": cell["fd_digits"]})
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if default is not None:
            lines.append(f"| default ({len(default['steps'])} steps, {default['network_evaluations']} NFE) | "
                         f"{default['fd_digits']:.1f} / {default['class_accuracy']:.3f} / {default['precision']:.2f}"
                         + " |" * len(nfes))
        costs = [(int(k.split("@")[1]), v) for k, v in row.items() if k.startswith("search@")]
        if costs:
            lines.append("\nsearch cost: " + "; ".join(
                f"{nfe} NFE: {v['search_network_evaluations']:,} network evaluations, "
                f"{v['search_seconds'] / 60:.1f} min" for nfe, v in sorted(costs)))
        if chart_rows:
            if default is not None:
                chart_rows += [{"method": "default", "nfe": default["network_evaluations"],
                                "fd_digits": default["fd_digits"]}]
            write_sweep_chart(chart_rows, out / f"{name}.png", title=f"{name}: FD on evaluation seeds")
    return "\n".join(lines) + "\n"


def ranking_agreement(results: dict) -> str:
    """How each fitness ranks every evaluated schedule against what a user sees (the right digit:
    class accuracy; clean digits: precision; all the ways digits are written: recall; both: their
    harmonic mean F1): Spearman correlations over every cell of every row."""
    from scipy.stats import spearmanr

    cells = [cell for row in results.values() for cell in row.values()
             if isinstance(cell, dict) and cell.get("precision") is not None]
    if len(cells) < 3:
        return ""
    user = {"class accuracy": [c["class_accuracy"] for c in cells],
            "precision": [c["precision"] for c in cells], "recall": [c["recall"] for c in cells],
            "F1(precision, recall)": [2 * c["precision"] * c["recall"] / max(c["precision"] + c["recall"], 1e-12)
                                      for c in cells]}
    lines = [f"\nfitness (lower is better) against what a user sees (higher is better), Spearman rank correlation "
             f"over {len(cells)} schedules on the evaluation seeds (-1: the fitness ranks exactly as the quality "
             "does):\n", "| fitness | " + " | ".join(user) + " |", "|---|" + "---|" * len(user)]
    for label, key in (("fd", "fd_digits"), ("fd_acc", "score")):
        values = [c[key] for c in cells]
        lines.append(f"| {label} | " + " | ".join(f"{spearmanr(values, quality).statistic:.2f}"
                                                  for quality in user.values()) + " |")
    return "\n".join(lines) + "\n"


def _method_order(method: str) -> tuple:
    return ({"search": 0, "dp": 1}.get(method, 2), method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--nfe", default=",".join(map(str, NFES)), help="network-evaluation counts")
    parser.add_argument("--eval-seeds", default="30000-31999", help="evaluation seeds (disjoint from the search's)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "search-digits")
    parser.add_argument("--table", action="store_true", help="only write the tables and charts of what is done")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    if not args.table:
        eval_seeds = parse_seeds(args.eval_seeds)
        for name in args.rows.split(","):
            run_row(name, [int(n) for n in args.nfe.split(",")], args.out, eval_seeds, log)
    results = {name: load(args.out / f"{name}.json") for name in ROWS if (args.out / f"{name}.json").exists()}
    text = table(results, args.out) + ranking_agreement(results)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
