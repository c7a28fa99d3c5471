"""The versions of the direct dependencies the suite last passed with, as one README line.

A fresh install takes the newest diffusers, transformers, torch-fidelity, k-diffusion (users
will have them); when one of them breaks something, this line says what changed. After a green
run of the suite, refresh it with

    python tests/tested_versions.py --write

`tests/test_tested_versions.py` checks that the line names every direct dependency, pinned.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = "<!-- tested-versions -->"
LINE = re.compile(re.escape(MARKER) + r"\n`([^`\n]*)`")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct_dependencies() -> list[str]:
    """The project's dependencies and its dev extra's (what the test command installs), by name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return sorted({normalise(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in specs})


def installed_line() -> str:
    """`name==version` of each direct dependency as installed here (missing: `name==?`)."""
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return " ".join(f"{name}=={version(name)}" for name in direct_dependencies())


def readme_line() -> str | None:
    found = LINE.search(README.read_text())
    return found.group(1) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the installed versions into README.md")
    args = parser.parse_args()
    line = installed_line()
    if "==?" in line:
        print(f"not every direct dependency is installed here: {line}", file=sys.stderr)
        return 2
    if args.write:
        text = README.read_text()
        if not LINE.search(text):
            print(f"README.md has no {MARKER} line to replace", file=sys.stderr)
            return 2
        README.write_text(LINE.sub(lambda _: f"{MARKER}\n`{line}`", text))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
