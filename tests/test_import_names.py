"""The import names the project claims: only `elucd_fast`, from a checkout as from an install.

`python -m ...` and `python -c ...` put the working directory first on `sys.path`, so a regular
package at the top of a checkout (a folder with `__init__.py`) hides any installed project of
the same name. The top-level `kernels/` and `csrc/` folders are therefore no packages (see
elucd_fast/source_folders.py): Hugging Face's `kernels`, which transformers and diffusers
import, must win from the repository root."""
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import importlib, json, sys
    out = {}
    for name in sys.argv[1:]:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            out[name] = {"error": str(error)}
        else:
            out[name] = {"file": getattr(module, "__file__", None), "path": list(getattr(module, "__path__", []))}
    print(json.dumps(out))
""")


def probe_from_the_root(tmp_path: Path, names: list[str], extra_path: Path | None = None) -> dict:
    """`python -m probe NAMES` started in the repository root: where each name imports from."""
    (tmp_path / "probe.py").write_text(PROBE)
    path = [str(tmp_path)] + ([str(extra_path)] if extra_path else [])
    env = {"PYTHONPATH": ":".join(path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "probe", *names], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def inside_the_repository(found: dict) -> bool:
    """Whether a probed module is a regular module or package of the checkout (a virtual
    environment inside the checkout is no part of it). A namespace package (no file) may hold a
    checkout folder: it is made only when no module or regular package of that name is
    installed, which it therefore never hides (the next test shows it)."""
    if not found.get("file"):
        return False
    file = Path(found["file"]).resolve()
    return file.is_relative_to(REPO) and not file.is_relative_to(Path(sys.prefix).resolve())


def test_the_only_top_level_package_of_a_checkout_is_elucd_fast():
    claimed = sorted(p.name for p in REPO.iterdir() if not p.name.startswith(".") and
                     ((p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"))
    assert claimed == ["elucd_fast"], claimed


def test_kernels_and_csrc_from_the_root_never_resolve_into_the_repository(tmp_path):
    found = probe_from_the_root(tmp_path, ["kernels", "csrc"])
    for name in ("kernels", "csrc"):
        assert not inside_the_repository(found[name]), (name, found[name])
    installed = importlib.util.find_spec("kernels")  # from the tests' own sys.path, not the root
    if installed is not None and installed.origin:
        # Hugging Face's kernels (the dev extra brings it through transformers) is the one imported.
        assert found["kernels"]["file"] == installed.origin, found["kernels"]


def test_an_installed_kernels_or_csrc_wins_over_the_checkouts_folders(tmp_path):
    site = tmp_path / "site"
    for name in ("kernels", "csrc"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    found = probe_from_the_root(tmp_path, ["kernels", "csrc"], extra_path=site)
    for name in ("kernels", "csrc"):
        assert found[name]["file"] == str(site / name / "__init__.py"), (name, found[name])


def test_the_fast_paths_import_as_parts_of_elucd_fast_from_the_root(tmp_path):
    found = probe_from_the_root(tmp_path, ["elucd_fast.kernels", "elucd_fast.kernels.guidance_update",
                                           "elucd_fast.csrc", "elucd_fast.csrc.ops"])
    assert found["elucd_fast.kernels"]["path"] == [str(REPO / "kernels")], found
    assert found["elucd_fast.csrc"]["path"] == [str(REPO / "csrc")], found
    assert found["elucd_fast.kernels.guidance_update"]["file"] == str(REPO / "kernels" / "guidance_update.py")
    assert found["elucd_fast.csrc.ops"]["file"] == str(REPO / "csrc" / "ops.py")


@pytest.mark.parametrize("module, attribute", [("diffusers", "AutoencoderKL"), ("transformers", "Dinov2Model")])
def test_diffusers_and_transformers_import_from_the_root(tmp_path, module, attribute):
    pytest.importorskip(module)
    (tmp_path / "probe.py").write_text(f"from {module} import {attribute}\nprint({attribute}.__name__)\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "probe"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == attribute, result.stderr[-3000:]
