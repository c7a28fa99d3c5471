"""`elucd-fast ablate`: the paper's ablation table (SPEC §8) on the embedded digits benchmark.

Writes ablation.md, ablation.csv and ablation.png (and each row's samples) into --outdir.
Bad flags exit with status 2 and a message on stderr before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..tools.ablate import AXES, format_table, run_ablation
from ._options import DEVICE, default_device


@click.command("ablate")
@click.option("--preset", default="digits-ddpm-uncond", show_default=True, help="A DDPM digits preset.")
@click.option("--num-samples", type=int, default=1000, show_default=True, help="Samples per row.")
@click.option("--steps", "--num-steps", "num_steps", type=int, default=None,
              help="DDPM respaced steps [default: the preset's].")
@click.option("--classifier-scale", type=float, default=None, help="Guidance scale s [default: the preset's].")
@click.option("--cfg-scale", type=float, default=None,
              help="Denoiser's classifier-free scale: 1 conditional, 0 unconditional [default: the preset's].")
@click.option("--axes", default=",".join(AXES), show_default=True, help="Comma-separated axes to run.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Images per sampler call.")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/ablation"),
              show_default=True)
@click.option("--device", type=DEVICE, default=default_device, show_default="cuda if available, else cpu")
def command(axes: str, outdir: Path, **kwargs) -> None:
    """Classifier input, Softplus beta, temperature ratio and sine factor, each row scored by FD,
    class accuracy and ICE beside the paper's FID.

    \b
    Examples:
      elucd-fast ablate                                   # the paper's four axes, 1,000 samples a row
      elucd-fast ablate --axes softplus,temperature --num-samples 200 --outdir out/quick
    """
    try:
        summary = run_ablation(outdir, axes=[a.strip() for a in axes.split(",") if a.strip()],
                               log=lambda line: click.echo(line, err=True), **kwargs)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo(format_table(summary), nl=False)
