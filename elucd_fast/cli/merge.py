"""`elucd-fast merge OUTDIR OUT.npz`: one ADM-evaluator npz from a run's shards, ordered by seed."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..runs import merge_npz_shards


@click.command(name="merge")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_path", type=click.Path(dir_okay=False, path_type=Path))
def command(outdir: Path, out_path: Path) -> None:
    """Merges the npz shards of the run in OUTDIR into OUT_PATH (arr_0 images, arr_1 labels).

    Refuses (exit status 2) a run with missing seeds, damaged shards or duplicates; resume the run
    first. OUT_PATH is written atomically: it is never left half-written.

    \b
    Examples:
      elucd-fast merge out/edm64-18 samples.npz
    """
    try:
        summary = merge_npz_shards(outdir, out_path)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo(json.dumps(summary, indent=2, sort_keys=True))
