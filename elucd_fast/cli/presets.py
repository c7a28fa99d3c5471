"""`elucd-fast presets [NAME]`: the named configurations, the files each expects, the paper's
FID; with NAME, every setting of that preset with its value."""
from __future__ import annotations

import json

import click

from ..presets import get_preset, list_presets
from ._options import flag_name


def describe_preset(name: str) -> dict:
    """A JSON-able description of preset `name`: what it runs, its files, its settings."""
    preset = get_preset(name)
    info = {"name": name, "description": preset.description, "sampler": preset.settings.name,
            "guidance": preset.guidance}
    for key in ("network_file", "network_source", "guide_network_file", "classifier_arch", "classifier_file",
                "vae_source", "published_fid", "settings_note"):
        if getattr(preset, key, None) is not None:
            info[key] = getattr(preset, key)
    fid = getattr(preset, "paper_fid", None)
    if fid is not None:
        info["paper_fid"] = {"unguided": fid[0], "guided": fid[1]}
    info["settings"] = preset.json()
    return info


def _format_settings(settings: dict) -> list[str]:
    """One line per setting: the `generate` flag that sets it, and its value."""
    values = {**settings.get("guidance_settings", {}), **settings.get("settings", {}),
              **{k: v for k, v in settings.items() if k not in ("guidance_settings", "settings", "preset")}}
    values.pop("sampler", None)
    return [f"    {flag_name(key):26s} {value}" for key, value in values.items()]


@click.command("presets")
@click.argument("name", required=False, type=click.Choice(list_presets()))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(name: str | None, as_json: bool) -> None:
    """List the presets: what each runs, the checkpoint files it expects, the paper's FID. With
    NAME, every setting of that preset and its value (each is a flag of `elucd-fast generate`).

    \b
    Examples:
      elucd-fast presets
      elucd-fast presets digits
      elucd-fast presets ddpm128-r101 --json
    """
    described = [describe_preset(n) for n in ([name] if name else list_presets())]
    if as_json:
        click.echo(json.dumps(described[0] if name else described, indent=2))
        return
    for info in described:
        click.echo(f"{info['name']}: {info['description']}")
        if "network_file" in info:
            click.echo(f"    --network {info['network_file']}  ({info['network_source']})")
            if info.get("guidance"):
                click.echo(f"    --classifier {info['classifier_file']}  (torchvision {info['classifier_arch']}, "
                           "IMAGENET1K_V2)")
        if "guide_network_file" in info:
            click.echo(f"    --guide-network {info['guide_network_file']}")
        if "vae_source" in info:
            click.echo(f"    --vae  ({info['vae_source']})")
        if "published_fid" in info:
            click.echo(f"    published FID (50k, without classifier guidance): {info['published_fid']}; "
                       f"{info.get('settings_note', '')}")
        if "paper_fid" in info:
            fid = info["paper_fid"]
            click.echo(f"    paper FID (50k): {fid['unguided']} unguided -> {fid['guided']} guided; {info['settings_note']}")
        if name:
            click.echo(f"  settings ({info['sampler']} sampler):")
            for line in _format_settings(info["settings"]):
                click.echo(line)
