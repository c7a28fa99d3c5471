"""Where the fast-path sources live: the repository's top-level `kernels/` and `csrc/` folders,
which ship inside the package as `elucd_fast.kernels` and `elucd_fast.csrc`.

Those folders hold no `__init__.py` on purpose. A regular package named `kernels` or `csrc` at
the top of a checkout would be imported by `python -m ...` or `python -c ...` started there
(the working directory comes first on `sys.path`) instead of the installed project of that name
(Hugging Face's `kernels`, which transformers and diffusers import). Without `__init__.py` such
a folder is at most a namespace portion, which never hides an installed package.

The package's face is therefore a module inside `elucd_fast/` (`elucd_fast/kernels.py`,
`elucd_fast/csrc.py`) that sets its `__path__` to the folder holding the sources: beside itself
in a regular or `--target` install (setuptools' package-dir copies the top-level folder to
`elucd_fast/<name>/`), or the top-level folder in a checkout and an editable install.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def source_folder(name: str, marker: str) -> Path:
    """The folder of the `name` sources (`kernels` or `csrc`): `elucd_fast/<name>/` when the
    package is installed, else the repository's `<name>/`. `marker` is a file that folder must
    hold, so an unrelated folder of the same name is never taken."""
    for folder in (PACKAGE_ROOT / name, PACKAGE_ROOT.parent / name):
        if (folder / marker).is_file():
            return folder
    raise ImportError(f"elucd_fast.{name}: its sources ({marker}) are neither in {PACKAGE_ROOT / name} (an "
                      f"installed package) nor in {PACKAGE_ROOT.parent / name} (a checkout); reinstall elucd-fast")
