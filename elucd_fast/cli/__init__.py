"""The `elucd-fast` command line: a click group whose commands compose library calls.

Each command lives in its own module of this package and exposes a click command named
`command`; the group collects them, so adding a command never edits this file. Errors a user can
act on (bad input, an operating-system error such as a full disk or a read-only folder, a run
whose samples turned non-finite) end a command with a one-paragraph message and exit status 2,
never a traceback.
"""
from __future__ import annotations

import errno
import importlib
import pkgutil

import click


class CommandError(click.ClickException):
    """A failure the user can act on; exit status 2, like a usage error."""

    exit_code = 2


def describe_os_error(err: OSError) -> str:
    """`path: reason (ERRNO)`, plus what was kept for the errors a run survives."""
    code = errno.errorcode.get(err.errno, "") if err.errno else ""
    where = f"{err.filename}: " if err.filename else ""
    text = f"{where}{err.strerror or err}{f' ({code})' if code else ''}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free some space, then rerun the same command: it resumes where it stopped"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        text += "; choose a folder you can write to"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        text += "; a file stands where a folder is needed (or the reverse)"
    return text


class ElucdGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OSError as err:
            raise CommandError(describe_os_error(err)) from err
        except FloatingPointError as err:  # non-finite samples: nothing of their batch was written
            raise CommandError(f"{err}. Nothing non-finite was written; lower the guidance or fix the input, "
                               "then rerun") from err


@click.group(cls=ElucdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="elucd-fast")
def main() -> None:
    """Off-the-shelf classifier guidance for diffusion models (EluCD).

    \b
    Examples:
      elucd-fast generate                       # the embedded digits benchmark, scored
      elucd-fast presets                        # every preset and the files it expects
      elucd-fast generate --help                # every flag, with units
    """


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            main.add_command(command)


_register_commands()
