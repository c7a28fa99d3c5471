"""`elucd-fast profile`: where the time of a guided sampling step goes (`profile.profile_job`)."""
from __future__ import annotations

from pathlib import Path

import click

from ..runs.ownership import check_output_apart
from ..tools.profile import MAX_PROFILE_BATCH, MAX_PROFILE_ROUNDS
from ..samplers.multistep import SOLVERS
from ._options import (DEVICE, checkpoint_options, configure_preset, default_device, file_overrides,
                       schedule_options, usage_errors, with_schedule, write_json)


@click.command("profile")
@click.option("--preset", default="digits", show_default=True, help="Named configuration (`elucd-fast presets`).")
@click.option("--batch", "batch_size", type=click.IntRange(min=1, max=MAX_PROFILE_BATCH), default=64, show_default=True)
@click.option("--batches", "--rounds", "num_batches", type=click.IntRange(min=1, max=MAX_PROFILE_ROUNDS), default=5,
              show_default=True,
              help="Timed rounds: each a guided batch, then the same seeds unguided; the overhead is their "
                   "median ratio, with its spread.")
@click.option("--steps", "num_steps", type=click.IntRange(min=2), default=None,
              help="Override the preset's num_steps.")
@click.option("--solver", type=click.Choice(SOLVERS), default=None,
              help="EDM/EDM2 ODE solver: heun, or the multistep ipndm or dpmpp_2m [default: the preset's].")
@click.option("--out", "outdir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/profile"),
              show_default=True, help="Writes profile.json and profile.png here.")
@click.option("--trace", is_flag=True, help="Also write a torch.profiler Chrome trace (trace.json).")
@click.option("--device", type=DEVICE, default=default_device, show_default="cuda if available, else cpu")
@schedule_options
@checkpoint_options
def command(preset: str, batch_size: int, num_batches: int, num_steps: int | None, solver: str | None, outdir: Path,
            trace: bool, device: str, schedule_path: Path | None, step_family: str | None, **files) -> None:
    """Per-step breakdown of a guided sampling run: denoiser, classifier forward, classifier input
    gradient, noise, update, I/O; FLOPs per part; guidance overhead next to its FLOP limit.

    \b
    Examples:
      elucd-fast profile                                  # digits, 5 interleaved rounds of 64
      elucd-fast profile --preset digits-ddpm --batch 256 --rounds 9 --trace
      elucd-fast profile --preset edm64-18 --network edm-imagenet-64x64-cond-adm.pkl \\
          --classifier resnet101-cd907fc2.pth --batch 64 --steps 18
      elucd-fast profile --schedule schedule.json         # the steps of a schedule file
    """
    from ..tools.charts import write_profile_chart
    from ..tools.profile import profile_job

    files = file_overrides(files)
    for name in ("profile.json", "profile.png", "trace.json"):
        usage_errors(lambda: check_output_apart(outdir / name, [*files.values(), schedule_path], "--out"))
    overrides = {"num_steps": num_steps} if num_steps is not None else {}
    if solver is not None:
        overrides["solver"] = solver
    configured, schedule = configure_preset(preset, overrides, schedule_path, step_family)
    job = usage_errors(lambda: with_schedule(configured.build(device=device, **files), schedule))
    for note in job.notes:
        click.echo(note)
    if job.guidance is None:
        raise click.UsageError(f"preset {preset!r} is unguided: there is no guidance to profile")
    report = usage_errors(lambda: profile_job(job, batch_size=batch_size, num_batches=num_batches,
                                              trace_path=outdir / "trace.json" if trace else None))
    outdir.mkdir(parents=True, exist_ok=True)
    write_json(outdir / "profile.json", report)
    write_profile_chart(report, outdir / "profile.png")
    totals = report["totals"]
    evaluations = job.settings.network_evaluations
    click.echo(f"{preset}: {report['num_steps']} steps ({evaluations} network evaluations), batch {batch_size} x "
               f"{num_batches}, {report['device']}")
    for part in ("denoiser", "classifier_forward", "classifier_gradient", "noise", "update"):
        click.echo(f"  {part:20s} {totals[part]:9.4f} s  {100 * totals[part] / totals['total']:5.1f}%")
    click.echo(f"  {'io':20s} {totals['io']:9.4f} s")
    low, high = report["guidance_overhead_spread"]
    click.echo(f"guidance overhead (guided / unguided time, median of {num_batches} interleaved rounds): "
               f"{report['guidance_overhead_ratio']:.3f} (range {low:.3f}-{high:.3f}); "
               f"FLOP limit: {report['flop_limit_ratio']:.3f}")
    telemetry = report["telemetry"]
    click.echo(telemetry if isinstance(telemetry, str) else "GPU telemetry: see profile.json")
    click.echo(f"wrote {outdir / 'profile.json'}, {outdir / 'profile.png'}" + (", trace.json" if trace else ""))
