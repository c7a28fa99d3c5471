"""Digits evidence for block plans: held-out quality and speed of schedule files, in one process.

    OMP_NUM_THREADS=1 python bench/plans_digits.py NAME=SCHEDULE.json ... [--seeds 30000-31999]
        [--rounds 3] [--out results.json]

Each schedule (a step search's or a block-plan search's `schedule.json`, or "default" for the
preset's own 18-step Heun) is sampled on the held-out seeds (disjoint from the searches' search
and selection seeds) and scored with the digits evaluation network (FD, class accuracy); its speed
is the images per second of sampling a batch of `--speed-batch` seeds, timed in interleaved
rounds (one schedule after another, round by round, so a busy moment of the shared machine hits
each alike) by process CPU time with one thread, median over rounds. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elucd_fast.presets import get_preset, preset_with_schedule  # noqa: E402
from elucd_fast.rng import StackedRandomGenerator  # noqa: E402
from elucd_fast.runs import parse_seeds  # noqa: E402
from elucd_fast.runs.generation import generate  # noqa: E402
from elucd_fast.schedules.schedule_file import read_schedule, schedule_block_plans  # noqa: E402


def job_of(path: str, preset: str = "digits"):
    configured = get_preset(preset)
    if path == "default":
        return configured.build(device="cpu"), configured
    if path.startswith("sigmas:"):  # the preset's sampler on explicit noise levels, no plans
        configured = configured.configure(sigmas=tuple(float(s) for s in path.removeprefix("sigmas:").split(",")))
        return configured.build(device="cpu"), configured
    schedule = read_schedule(path)
    configured = preset_with_schedule(configured, schedule)
    job = configured.build(device="cpu")
    return dataclasses.replace(job, block_plans=schedule_block_plans(schedule, job.net)), configured


def quality(job, configured, seeds) -> dict:
    images, labels = [], []
    for batch in generate(job.sample, seeds, image_shape=job.noise_shape, num_classes=job.num_classes,
                          batch_size=500, quantize=job.quantize):
        images.append(batch.images.numpy())
        labels.append(batch.labels.numpy())
    metrics = configured.scorer()(np.concatenate(images), np.concatenate(labels))
    return {key: metrics[key] for key in ("fd_digits", "class_accuracy", "precision", "recall") if key in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("schedules", nargs="+",
                        help="NAME=PATH (PATH a schedule file, 'default', or 'sigmas:S0,S1,...')")
    parser.add_argument("--seeds", default="30000-31999")
    parser.add_argument("--speed-batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    jobs = {}
    for item in args.schedules:
        name, _, path = item.partition("=")
        jobs[name] = job_of(path)
    results = {name: {"network_evaluations": job.settings.network_evaluations, "steps": job.settings.num_steps,
                      "plans": None if job.block_plans is None else [p.to_json() for p in job.block_plans],
                      **quality(job, configured, seeds)} for name, (job, configured) in jobs.items()}

    speed_seeds = seeds[:args.speed_batch]
    rnd = StackedRandomGenerator("cpu", speed_seeds)
    latents = rnd.randn([len(speed_seeds), 1, 8, 8])
    labels = torch.as_tensor(np.asarray(speed_seeds) % 10)
    times = {name: [] for name in jobs}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for name, (job, _) in jobs.items():
                start = time.process_time()
                job.sample(latents, labels, StackedRandomGenerator("cpu", speed_seeds).randn_like)
                times[name].append(time.process_time() - start)
    for name in jobs:
        kept = times[name][1:]
        results[name]["images_per_second"] = len(speed_seeds) / statistics.median(kept)
        results[name]["images_per_second_range"] = [len(speed_seeds) / max(kept), len(speed_seeds) / min(kept)]
    reference = next(iter(results))
    print(f"held-out seeds {args.seeds}; speed: batch {len(speed_seeds)}, {args.rounds} interleaved rounds, one thread")
    print("| schedule | NFE | FD | class accuracy | precision | images/s (CPU time) | vs " + reference + " |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['network_evaluations']} | {r['fd_digits']:.2f} | {r['class_accuracy']:.3f} | "
              f"{r.get('precision', float('nan')):.2f} | {r['images_per_second']:.0f} "
              f"({r['images_per_second_range'][0]:.0f}-{r['images_per_second_range'][1]:.0f}) | "
              f"{r['images_per_second'] / results[reference]['images_per_second']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
