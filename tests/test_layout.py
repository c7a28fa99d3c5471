"""The shape of the package: layers point one way, the plain path never imports the fast paths,
no import circle, no private module used across packages, and every package ships."""
import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where each top-level part of elucd_fast lives on disk: kernels and csrc sit at the repository
# root, with their package faces elucd_fast/kernels.py and elucd_fast/csrc.py.
SOURCE_FOLDERS = {"elucd_fast.kernels": REPO / "kernels", "elucd_fast.csrc": REPO / "csrc"}
ROOTS = {"elucd_fast": REPO / "elucd_fast", **SOURCE_FOLDERS}
FAST_OR_UPPER = ("elucd_fast.kernels", "elucd_fast.csrc", "elucd_fast.engine", "elucd_fast.cli", "elucd_fast.digits",
                 "elucd_fast.presets", "elucd_fast.runs", "elucd_fast.tools", "elucd_fast.search")
PLAIN = ("elucd_fast.samplers", "elucd_fast.guidance", "elucd_fast.models", "elucd_fast.schedules")


def modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The elucd_fast modules `name` imports (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) - {name} for name, path in found.items()}


def test_the_plain_path_never_imports_fast_paths_or_upper_layers():
    offenders = [(name, target) for name, targets in graph().items() if name.startswith(PLAIN)
                 for target in targets if target.startswith(FAST_OR_UPPER)]
    assert not offenders, offenders


def test_the_search_sits_above_presets_runs_metrics_and_the_engine():
    below = ("elucd_fast.presets", "elucd_fast.runs", "elucd_fast.metrics", "elucd_fast.engine", "elucd_fast.digits",
             "elucd_fast.job")
    offenders = [(name, target) for name, targets in graph().items() if name.startswith(below)
                 for target in targets if target.startswith(("elucd_fast.search", "elucd_fast.cli"))]
    assert not offenders, offenders


def test_kernels_and_csrc_are_leaves():
    allowed = ("elucd_fast.kernels", "elucd_fast.csrc", "elucd_fast.numerics", "elucd_fast.source_folders")
    offenders = [(name, target) for name, targets in graph().items()
                 if name.startswith(("elucd_fast.kernels", "elucd_fast.csrc"))
                 for target in targets if not target.startswith(allowed)]
    assert not offenders, offenders


def test_no_private_module_is_imported_from_another_package():
    offenders = []
    for name, targets in graph().items():
        for target in targets:
            leaf = target.rsplit(".", 1)[-1]
            if leaf.startswith("_") and target.rsplit(".", 1)[0] != name.rsplit(".", 1)[0]:
                offenders.append((name, target))
    assert not offenders, offenders


def test_no_import_circle_between_modules():
    edges = graph()
    # Package __init__ files re-export their modules: an edge into a package means its modules.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target.startswith(node + "."):  # a package importing its own modules
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    pytest.fail(f"import circle: {' -> '.join(cycle)}")
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_every_package_is_listed_for_installation():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert set(config["packages"]) == packages | set(SOURCE_FOLDERS)
    assert config["package-dir"] == {"elucd_fast.kernels": "kernels", "elucd_fast.csrc": "csrc"}


def test_the_source_folders_are_no_packages_and_their_faces_live_in_the_package():
    # A top-level kernels/__init__.py would hide Hugging Face's installed `kernels` from any
    # `python -m` run in a checkout (see elucd_fast/source_folders.py).
    for name, folder in SOURCE_FOLDERS.items():
        assert not (folder / "__init__.py").exists(), folder
        assert (REPO / "elucd_fast" / f"{name.rsplit('.', 1)[1]}.py").is_file(), name
