"""A regular (non-editable) install ships the package with its kernels and C++ sources, which sit
at the repository root and are mapped into `elucd_fast` by setuptools' package-dir."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys, torch
    import elucd_fast, elucd_fast.kernels, elucd_fast.csrc.ops as ops
    from elucd_fast.guidance.update import edm_guidance_update
    target = sys.argv[1]
    for module in (elucd_fast, elucd_fast.kernels, ops):
        assert module.__file__.startswith(target), module.__file__
    assert ops.SOURCE.is_file() and ops.SOURCE.is_relative_to(target), ops.SOURCE
    assert ops.cpp_ops_available()
    x, g, z, w = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.rand(3)
    torch.testing.assert_close(ops.guidance_update(x, g, z, 0.5, w), edm_guidance_update(x, g, z, 0.5, w))
    print("installed fused op ok")
""")


@pytest.mark.slow
def test_regular_install_runs_a_fused_op(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(REPO)], check=True, capture_output=True, timeout=600)
    assert (target / "elucd_fast" / "kernels" / "guidance_update.py").is_file()
    assert (target / "elucd_fast" / "csrc" / "elucd_ops.cpp").is_file()
    assert (target / "elucd_fast" / "digits" / "weights" / "manifest.json").is_file()
    # The only import name the install claims is elucd_fast (no top-level kernels or csrc).
    claimed = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", "__pycache__")) and p.name != "bin"}
    assert claimed == {"elucd_fast"}, claimed
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "installed fused op ok" in result.stdout
