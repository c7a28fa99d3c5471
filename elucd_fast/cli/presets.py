"""`elucd-fast presets`: the named configurations, the files each expects, the paper's FID."""
from __future__ import annotations

import json

import click

from ..presets import get_preset, list_presets


def describe_preset(name: str) -> dict:
    """A JSON-able description of preset `name`."""
    preset = get_preset(name)
    info = {"name": name, "description": preset.description}
    for key in ("sampler", "network_file", "network_source", "classifier_arch", "classifier_file", "vae_source",
                "settings_note"):
        if getattr(preset, key, None) is not None:
            info[key] = getattr(preset, key)
    fid = getattr(preset, "paper_fid", None)
    if fid is not None:
        info["paper_fid"] = {"unguided": fid[0], "guided": fid[1]}
    return info


@click.command("presets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(as_json: bool) -> None:
    """List the presets: what each runs, the checkpoint files it expects, the paper's FID."""
    described = [describe_preset(name) for name in list_presets()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for info in described:
        click.echo(f"{info['name']}: {info['description']}")
        if "network_file" in info:
            click.echo(f"    --network {info['network_file']}  ({info['network_source']})")
            click.echo(f"    --classifier {info['classifier_file']}  (torchvision {info['classifier_arch']})")
        if "vae_source" in info:
            click.echo(f"    --vae sd-vae-ft-ema  ({info['vae_source']})")
        if "paper_fid" in info:
            fid = info["paper_fid"]
            click.echo(f"    paper FID (50k): {fid['unguided']} unguided -> {fid['guided']} guided; {info['settings_note']}")
