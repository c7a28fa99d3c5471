"""Click options and helpers shared by the commands that build a preset's job."""
from __future__ import annotations

from pathlib import Path

import click
import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def usage_errors(call):
    """Runs `call()`, turning the library's input errors into click usage errors (exit status 2)."""
    try:
        return call()
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from err


def checkpoint_options(command):
    """--network / --classifier / --vae: the local checkpoint files of the paper's presets."""
    for option in reversed((
        click.option("--network", type=click.Path(path_type=Path), default=None,
                     help="Diffusion network file, for presets that take one (see `elucd-fast presets`)."),
        click.option("--classifier", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Classifier weights file, for presets that take one."),
        click.option("--vae", type=click.Path(path_type=Path), default=None,
                     help="VAE decoder (diffusers directory or .safetensors), for the DiT preset."),
    )):
        command = option(command)
    return command


def file_overrides(network: Path | None, classifier: Path | None, vae: Path | None) -> dict:
    """The given checkpoint paths as preset build arguments."""
    return {k: v for k, v in (("network", network), ("classifier", classifier), ("vae", vae)) if v is not None}


def float_list(name: str):
    """A click callback parsing "inf,8,5" into floats, naming the option on error."""
    def parse(ctx, param, value):
        try:
            return [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=name) from None
    return parse
