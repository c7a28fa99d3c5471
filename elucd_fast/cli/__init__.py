"""The `elucd-fast` command line: a click group whose commands compose library calls.

Each command lives in its own module of this package and exposes a click command named
`command`; the group collects them, so adding a command never edits this file.
"""
from __future__ import annotations

import importlib
import pkgutil

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="elucd-fast")
def main() -> None:
    """Off-the-shelf classifier guidance for diffusion models (EluCD)."""


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            main.add_command(command)


_register_commands()
