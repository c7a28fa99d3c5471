"""`elucd-fast generate`: sample a preset's job, write the samples, a class grid and metrics.

With no arguments it runs the embedded digits benchmark: guided EDM sampling of seeds 0-1999
(class drawn per seed from the seed's own generator) into out/digits/:

    shards/*.npz, run.json, manifest-rank000.jsonl   the resumable run (writers.py layout)
    samples.npz      arr_0 uint8 (N, 8, 8, 1), arr_1 int64 labels, ordered by seed
    grid.png         10 x 10: row c holds the first ten samples of class c
    metrics.json     class accuracy, FD and precision/recall (digits-eval features), images/s

Bad flags exit with status 2 and a message on stderr before anything is written.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import torch

from ..checks import check_int
from ..engine import COMPILE_MODES, FUSED_CHOICES, PRECISIONS, configure_job
from ..presets import list_presets
from ..runs import dist, merge_npz_shards, parse_seeds, run_generation
from ..runs.atomic import check_free_space, check_writable
from ..runs.ownership import check_output_apart, check_run_folder
from ..runs.layout import estimated_run_bytes
from ..runs.outputs import check_formats
from ._options import (DEVICE, checkpoint_options, configure_preset, default_device, file_overrides,
                       schedule_options, settings_options, usage_errors, with_schedule, write_json)


@click.command("generate")
@click.option("--preset", default="digits", show_default=True, type=click.Choice(list_presets()),
              help="Named configuration (`elucd-fast presets NAME` shows its settings).")
@click.option("--seeds", default="0-1999", show_default=True, help="Seeds: comma-separated integers and ranges.")
@click.option("--batch", "batch_size", type=int, default=500, show_default=True, help="Images per sampler call.")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: out/PRESET].")
@click.option("--class", "--class-label", "class_label", type=int, default=None,
              help="Generate only this class [default: drawn per seed].")
@click.option("--formats", default="npz", show_default=True,
              help="Comma-separated sample formats: npz (always written: metrics read it), png (a PNG tree).")
@click.option("--guidance/--no-guidance", default=None, help="Classifier guidance on or off [default: the preset's].")
@click.option("--sampler", type=click.Choice(["edm", "ddpm"]), default=None,
              help="The digits presets' sampler [default: the preset's].")
@settings_options
@schedule_options
@checkpoint_options
@click.option("--metrics/--no-metrics", default=None,
              help="Score the samples into metrics.json [default: on for presets that bundle an evaluation "
                   "network (digits); score others with `elucd-fast fid`].")
@click.option("--device", type=DEVICE, default=None, help="[default: under torchrun cuda:LOCAL_RANK or cpu; else cuda if "
              "available, else cpu]")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Network precision (sampler state stays float32; fp64 is the authors' float64 state).")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_MODES), default="off", show_default=True,
              help="torch.compile one whole guided step (auto: only when the run is large enough).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
              help="Capture each step in a CUDA graph and replay it (CUDA only).")
@click.option("--fused", type=click.Choice(FUSED_CHOICES), default="off", show_default=True,
              help="Fused kernels for the sampler's guided update (C++ on CPU, Triton on CUDA) and, on CUDA, the "
                   "classifier's softplus and logit gradient; auto: only where measured faster (every choice is "
                   "printed and recorded in run.json). Off by default: on CPU the measured gain per step is "
                   "within noise and the first use builds the C++ ops (about a minute).")
@click.option("--progress/--no-progress", default=True)
@click.option("--discard-damaged", is_flag=True, default=False,
              help="On resume, delete the run's damaged and unrecorded files instead of moving them aside into "
                   "OUTDIR/damaged/.")
def command(preset: str, seeds: str, batch_size: int, outdir: Path | None, class_label: int | None, formats: str,
            metrics: bool | None, device: str | None, precision: str, compile_mode: str, cuda_graphs: bool,
            fused: str, progress: bool, discard_damaged: bool, schedule_path: Path | None, step_family: str | None,
            **settings) -> None:
    """Sample a preset (default: the embedded digits benchmark), write the samples, a class grid
    and metrics. Every flag, the seeds, the device and the output folder are checked before any
    model is loaded or anything written.

    \b
    Examples:
      elucd-fast generate                                   # digits, seeds 0-1999, scored
      elucd-fast generate --preset digits --max-guidance 0.05 --steps 12 --outdir out/try
      elucd-fast generate --preset digits --sigmas 80,10,1.5,0.3,0.002 --outdir out/five
      elucd-fast generate --preset digits-ddpm --timesteps 999,749,499,249
      elucd-fast generate --preset digits-ddpm --step-family trailing --steps 4 --ddim --gamma-factor 0
      elucd-fast generate --preset digits --schedule schedule.json  # e.g. written by `elucd-fast search`
      elucd-fast presets digits                             # the values every flag defaults to
      elucd-fast generate --preset edm64-18 --network edm-imagenet-64x64-cond-adm.pkl \\
          --classifier resnet101-cd907fc2.pth --seeds 0-49999 --batch 64 --formats png,npz
      torchrun --standalone --nproc_per_node 8 -m elucd_fast generate --preset ddpm128-r101 \\
          --network 128x128_diffusion.pt --classifier resnet101-cd907fc2.pth --steps 250
    """
    start = time.perf_counter()
    # The flags in `settings` are preset settings; those given override the preset's values,
    # checked here before any file is read.
    files = file_overrides(settings)
    overrides = {key: value for key, value in settings.items() if value is not None}
    configured, schedule = configure_preset(preset, overrides, schedule_path, step_family)
    scorable = hasattr(configured, "score_samples")
    if metrics and not scorable:
        raise click.UsageError(f"--metrics: preset {preset!r} has no bundled evaluation network; "
                               f"score its samples with `elucd-fast fid`")
    metrics = scorable if metrics is None else metrics
    seed_list = usage_errors(lambda: parse_seeds(seeds))
    usage_errors(lambda: check_int("batch_size", batch_size, minimum=1))
    format_list = usage_errors(lambda: check_formats(tuple(dict.fromkeys(
        ["npz", *(f.strip() for f in formats.split(",") if f.strip())]))))
    if class_label is not None and not 0 <= class_label < (configured.num_classes or 0):
        raise click.UsageError(f"--class (class_label): must be in [0, {configured.num_classes}) for preset "
                               f"{preset!r}, got {class_label}" if configured.num_classes else
                               f"--class (class_label): preset {preset!r} is unconditional; drop --class")
    if metrics and len(seed_list) < 2:
        raise click.UsageError(f"--metrics: scoring needs at least 2 samples (a covariance of features), got "
                               f"{len(seed_list)}; give more --seeds or --no-metrics")
    outdir = outdir or Path("out") / preset
    usage_errors(lambda: check_writable(outdir, "--outdir", directory=True))
    usage_errors(lambda: check_run_folder(outdir))
    usage_errors(lambda: check_output_apart(outdir, [*files.values(), schedule_path], "--outdir", folder=True))
    usage_errors(lambda: check_free_space(outdir, estimated_run_bytes(len(seed_list), configured.image_shape,
                                                                      format_list), "--outdir"))
    rank, _, dist_device = dist.init_distributed()
    device = device or (str(dist_device) if dist.get_world_size() > 1 else default_device())
    job = usage_errors(lambda: with_schedule(configured.build(device=device, **files), schedule))
    for note in job.notes:
        dist.print_main(note)
    job, choices = usage_errors(lambda: configure_job(job, precision=precision, compile=compile_mode,
                                                      cuda_graphs=cuda_graphs, fused=fused,
                                                      num_images=len(seed_list)))
    for line in choices:
        dist.print_main(line)
    summary = usage_errors(lambda: run_generation(
        job.sample, seed_list, outdir, config=job.config, image_shape=job.noise_shape, num_classes=job.num_classes,
        class_label=class_label, batch_size=batch_size, formats=format_list, quantize=job.quantize, device=job.device,
        progress=progress, compile_seconds=lambda: getattr(job.step_runner, "compile_seconds", 0.0),
        discard_damaged=discard_damaged))
    if rank != 0:  # rank 0 alone merges, draws and scores what every rank wrote
        dist.shutdown()
        return
    samples_path = outdir / "samples.npz"
    merge_npz_shards(outdir, samples_path)
    result = {"preset": preset, "config": job.config, "seeds": seeds, "num_samples": len(seed_list),
              "generation_seconds": summary["seconds"], "compile_seconds": summary["compile_seconds"],
              # None where nothing was left to time (JSON has no NaN).
              "images_per_second": summary["images_per_second"] if math.isfinite(summary["images_per_second"])
              else None,
              "skipped_finished_seeds": summary["skipped"], "device": str(job.device),
              "threads": torch.get_num_threads()}
    if metrics:
        result.update(usage_errors(lambda: configured.score_samples(samples_path, outdir)))
    result["total_seconds"] = time.perf_counter() - start
    write_json(outdir / "metrics.json", result)
    shown = {key: result[key] for key in ("class_accuracy", "fd_digits", "precision", "recall",
                                          "images_per_second") if key in result}
    click.echo(f"{outdir}: {json.dumps(shown)}")
    dist.shutdown()
