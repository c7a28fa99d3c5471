"""`elucd-fast calibrate`: the integral calibration error of a classifier along a diffusion
process, per setting (`calibrate.calibrate`)."""
from __future__ import annotations

import math
from pathlib import Path

import click
import torch

from ..checks import check_regular_file
from ..npz_reader import DEFAULT_MAX_ARRAY_BYTES
from ..rng import MAX_SEED
from ..runs.ownership import check_output_apart
from ..tools.calibrate import MAX_CALIBRATION_IMAGES
from . import CommandError
from ._options import DEVICE, checkpoint_options, default_device, file_overrides, float_list, usage_errors, write_json


@click.command("calibrate")
@click.option("--preset", default="digits", show_default=True, help="Named configuration (`elucd-fast presets`).")
@click.option("--betas", default="inf,8,5,4,3", show_default=True, callback=float_list("--betas"),
              help="Softplus beta values (inf keeps ReLU).")
@click.option("--inputs", default="xt,x0", show_default=True, help="Classifier inputs: xt, x0 (comma-separated).")
@click.option("--temperatures", default="1", show_default=True, callback=float_list("--temperatures"),
              help="Marginal temperatures tau of the confidence softmax(tau * logits).")
@click.option("--num-images", type=click.IntRange(min=1, max=MAX_CALIBRATION_IMAGES), default=None,
              help="Labelled images (forward) or samples (reverse) [default: all bundled / 256].")
@click.option("--timesteps", "num_timesteps", type=click.IntRange(min=2), default=None,
              help="Evaluate the sampler's schedule with this many steps [default: the preset's].")
@click.option("--source", type=click.Choice(["forward", "reverse"]), default="forward", show_default=True,
              help="Forward-noised labelled images, or the preset's own samples with their target labels.")
@click.option("--images", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="npz of labelled images (arr_0 uint8 N,H,W,C; arr_1 labels) [default: the preset's].")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=MAX_SEED - 1), default=0, show_default=True,
              help="Image j's noise comes from seed + j.")
@click.option("--max-array-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_ARRAY_BYTES, show_default=True,
              help="Refuse --images whose images take more bytes than this in memory (as float32), checked from "
                   "the file's headers before any data is read.")
@click.option("--out", "outdir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/calibration"),
              show_default=True, help="Writes calibration.json and calibration.png here.")
@click.option("--device", type=DEVICE, default=default_device, show_default="cuda if available, else cpu")
@checkpoint_options
def command(preset: str, betas: list[float], inputs: str, temperatures: list[float], num_images: int | None,
            num_timesteps: int | None, source: str, images: Path | None, batch_size: int, seed: int, outdir: Path,
            device: str, max_array_bytes: int, **files) -> None:
    """ECE per timestep (15 bins) and its integral (ICE) for each combination of Softplus beta,
    classifier input and temperature; prints the setting with the lowest ICE.

    \b
    Examples:
      elucd-fast calibrate                                # digits: ReLU and Softplus, x_t and x0
      elucd-fast calibrate --betas inf,3 --inputs x0 --temperatures 1,0.5 --source reverse
    """
    from ..presets import build_job
    from ..tools.calibrate import calibrate, calibration_images, load_labelled_npz, settings_grid
    from ..tools.charts import write_calibration_chart

    settings = usage_errors(lambda: settings_grid(betas, [s.strip() for s in inputs.split(",") if s.strip()],
                                                  temperatures))
    if not settings:
        raise click.UsageError("--betas, --inputs, --temperatures: each needs at least one value")
    checkpoints = file_overrides(files)
    outputs = (outdir / "calibration.json", outdir / "calibration.png")
    for output in outputs:
        usage_errors(lambda: check_output_apart(output, [images, *checkpoints.values()], "--out"))
    if images is not None:
        usage_errors(lambda: _flag_error("--images", lambda: check_regular_file(images, "--images")))
    job = usage_errors(lambda: build_job(preset, device=device, **checkpoints))
    if source == "forward":
        if images is not None:
            data, labels = usage_errors(lambda: _flag_error("--images", lambda: load_labelled_npz(
                images, num_images, max_array_bytes=max_array_bytes)))
        else:
            data, labels = usage_errors(lambda: calibration_images(preset, num_images))
        data, labels = data.to(device), labels.to(device)
    else:
        if images is not None:
            raise click.UsageError("--images: the reverse source scores the preset's own samples; drop --images")
        labels = torch.arange(num_images or 256, device=device) % job.num_classes
        data = None
    result = usage_errors(lambda: calibrate(job, data, labels, settings=settings, num_timesteps=num_timesteps,
                                            source=source, batch_size=batch_size, seed=seed))
    failed = [c["label"] for c in result["curves"] if not math.isfinite(c["ice"])]
    if failed:
        raise CommandError(f"calibration: ICE came out NaN for {', '.join(failed)} (the classifier's logits are not "
                           "finite there); nothing was written")
    outdir.mkdir(parents=True, exist_ok=True)
    write_json(outdir / "calibration.json", result)
    write_calibration_chart(result, outdir / "calibration.png")
    for curve in result["curves"]:
        click.echo(f"  {curve['label']:28s} ICE {curve['ice']:.4f}")
    click.echo(result["recommendation"])
    click.echo(f"wrote {outdir / 'calibration.json'}, {outdir / 'calibration.png'}")


def _flag_error(flag: str, call):
    """`call()`, with the flag named in front of any input error it raises (ValueError)."""
    try:
        return call()
    except ValueError as err:
        raise ValueError(f"{flag}: {err}" if not str(err).startswith(flag) else str(err)) from err
