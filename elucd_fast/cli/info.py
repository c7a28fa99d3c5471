"""`elucd-fast info PATH`: what a checkpoint holds, read from its keys and shapes."""
from __future__ import annotations

import json

import click

from elucd_fast.models.checkpoint import CheckpointError
from elucd_fast.models.info import COMMON_KEYS, describe_checkpoint


def _format_value(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key == "parameters" and isinstance(value, int):
        return f"{value:,} ({value / 1e6:.1f}M)"
    if key == "resolution" and isinstance(value, int):
        return f"{value}x{value}"
    return str(value)


def format_description(description: dict[str, object]) -> str:
    """A two-column table: the common keys, then the kind's details."""
    rows = [(key, _format_value(key, description.get(key))) for key in COMMON_KEYS]
    details = description.get("details") or {}
    rows += [(f"  {key}", _format_value(key, value)) for key, value in details.items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


@click.command("info")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def command(path: str, as_json: bool) -> None:
    """Identify the checkpoint at PATH without running it: kind, architecture, resolution,
    classes, parameters, dtype, sha256. Exits with status 2 for unknown or unreadable files.

    \b
    Examples:
      elucd-fast info edm-imagenet-64x64-cond-adm.pkl
      elucd-fast info resnet101-cd907fc2.pth --json
      elucd-fast info elucd_fast/digits/weights/classifier.safetensors
    """
    try:
        description = describe_checkpoint(path)
    except CheckpointError as err:
        from ..digits.load import describe_weights_file

        description = describe_weights_file(path)  # the package's own shipped digits weights
        if description is None:
            click.echo(f"error: {err}", err=True)
            raise click.exceptions.Exit(2) from err
    if as_json:
        click.echo(json.dumps(description, indent=2, default=str))
    else:
        click.echo(format_description(description))
