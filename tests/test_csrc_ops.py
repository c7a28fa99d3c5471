"""C++ CPU ops (`elucd_fast/csrc`) against their plain PyTorch twins, plus the fallback.

The first test to need the ops builds them into torch's extension directory (a minute or so
once per machine; later runs reuse the build). Where no build is possible the op tests skip
with the reason, and the fallback tests still run.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from elucd_fast.csrc import ops
from elucd_fast.guidance import update as plain_update
from elucd_fast.guidance.update import edm_classifier_input as classifier_input_reference
from elucd_fast.guidance.update import edm_guidance_update as guidance_update_reference
from elucd_fast.numerics import max_relative_error

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(3, 5, 7, 9), (1, 3, 13, 17), (5, 1000)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (rtol, atol) per dtype: a few ulps of float32 arithmetic, one ulp of a half-precision output.
TOLERANCES = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (2e-6, 1e-7),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-4),
}


@pytest.fixture(scope="module")
def cpp_ops():
    if not ops.cpp_ops_available():
        pytest.skip("the C++ ops could not be built here (see the RuntimeWarning); the fallback tests cover this")


needs_cpp = pytest.mark.usefixtures("cpp_ops")


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float = 0.0) -> None:
    """Same dtype, shape and NaN/inf positions; values within the dtype's tolerance, where
    `scale` is the magnitude of terms that may cancel in each value."""
    rtol, atol = TOLERANCES[expected.dtype]
    atol = max(atol, rtol * scale)
    error = max_relative_error(actual, expected)
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, equal_nan=True,
        msg=lambda detail: f"{what}: max relative error {error:.3g} (rtol {rtol:g})\n{detail}")


def random_input(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def guidance_inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = random_input(shape, dtype, scale=3.0)
    g = random_input(shape, dtype, scale=1e-3, seed=4)
    g[0] = 0  # a sample whose classifier gradient vanished
    z = random_input(shape, dtype, scale=1.0, seed=5)
    w = random_input(shape[:1], torch.float32, seed=6).abs()
    return x, g, z, w


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES + [(2, 40000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_guidance_update_matches_reference(shape, dtype):
    x, g, z, w = guidance_inputs(shape, dtype)
    scale = x.abs().max().item() + z.abs().max().item()
    for noise_scale in (0.75, torch.tensor(0.3, dtype=torch.float64)):
        actual = ops.guidance_update(x, g, z, noise_scale, w)
        expected = guidance_update_reference(x, g, z, noise_scale, w)
        assert actual.shape == x.shape
        assert_matches(actual, expected, f"guidance update {shape} {dtype}", scale)
        assert_matches(actual[0], (x[0].double() + float(noise_scale) * z[0].double()).to(dtype),
                       "zero-gradient sample", scale)


@needs_cpp
def test_guidance_update_zero_gradient_with_large_state_is_not_nan():
    # rms(x) * w = 1e2 / 1.2e-38 overflows float32: the guidance term must still be exactly 0.
    x = random_input((2, 3, 5, 7), torch.float32, scale=100.0)
    z = random_input((2, 3, 5, 7), torch.float32, seed=7)
    out = ops.guidance_update(x, torch.zeros_like(x), z, 0.5, torch.ones(2))
    torch.testing.assert_close(out, x + 0.5 * z, rtol=0, atol=0)


@needs_cpp
def test_guidance_update_mixed_dtypes_and_one_weight():
    x, g, z, _ = guidance_inputs((3, 2, 11), torch.float64)
    w = torch.tensor(0.004)
    actual = ops.guidance_update(x, g.float(), z, 1.5, w)
    assert actual.dtype == torch.float64
    assert_matches(actual, guidance_update_reference(x, g.float(), z, 1.5, w), "mixed dtypes")


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES + [(2, 40000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_classifier_input_matches_reference(shape, dtype):
    x = random_input(shape, dtype, scale=1.0)
    x[0] *= 3.0  # rms above 1: divided
    x[-1] *= 0.25  # rms below 1 (for B > 1): left as is
    x.view(-1)[-1] = math.nan  # confined to the last sample
    xc, r = ops.classifier_input(x)
    xc_ref, r_ref = classifier_input_reference(x)
    assert_matches(r, r_ref, f"rms {shape} {dtype}")
    assert_matches(xc, xc_ref, f"classifier input {shape} {dtype}")
    assert r[-1].isnan() and (shape[0] == 1 or torch.isfinite(r[:-1]).all())


@needs_cpp
def test_row_reductions_do_not_depend_on_thread_count():
    x, g, z, w = guidance_inputs((3, 50000), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.guidance_update(x, g, z, 0.5, w), ops.classifier_input(x)[1]
    finally:
        torch.set_num_threads(threads)
    multi = ops.guidance_update(x, g, z, 0.5, w), ops.classifier_input(x)[1]
    assert all(torch.equal(a, b) for a, b in zip(single, multi))


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES + [(2, 40000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dit_guided_difference_matches_reference(shape, dtype):
    difference = random_input(shape, dtype, scale=0.5)
    g = random_input((shape[0], shape[1] + 1, *shape[2:]), dtype, scale=1e-2, seed=8)[:, :shape[1]]  # a slice
    g[0] = 0  # all-zero gradient: that sample keeps d exactly, even at rms(d) > 4
    difference[0] *= 100.0
    for gamma in (0.4, torch.tensor(0.13, dtype=torch.float64)):
        actual, norm = ops.dit_guided_difference(difference, g, gamma)
        expected, norm_ref = plain_update.dit_guided_difference(difference, g, gamma)
        assert actual.dtype == dtype and norm.dtype == norm_ref.dtype
        assert_matches(actual, expected, f"dit difference {shape} {dtype}", difference[-1].abs().max().item())
        assert_matches(norm, norm_ref, f"rms(g) {shape} {dtype}")
        assert torch.equal(actual[0], difference[0]) and norm[0] == 0


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES + [(2, 40000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddpm_guided_mean_matches_reference(shape, dtype):
    mean = random_input(shape, dtype, scale=1.0)
    variance = random_input(shape, dtype, scale=0.1, seed=9).abs()
    g = random_input(shape, dtype, scale=2.0, seed=10)
    vmax = random_input(shape[:1], dtype, scale=0.2, seed=11).abs()
    sine = torch.tensor(math.sin(math.pi * 7 / 11), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for classifier_scale, gamma_factor in ((1.0, 0.3), (2.7, 0.0)):
        actual = ops.ddpm_guided_mean(mean, variance, g, vmax, sine, classifier_scale, gamma_factor)
        expected = plain_update.ddpm_guided_mean(mean, variance, g, vmax, sine, classifier_scale, gamma_factor)
        term = classifier_scale * (variance.double().abs().max() + vmax.double().abs().max()) * g.double().abs().max()
        assert actual.dtype == dtype
        assert_matches(actual, expected, f"ddpm mean {shape} {dtype}", mean.abs().max().item() + term.item())


@needs_cpp
def test_nonfinite_values_stay_in_their_sample():
    x, g, z, w = guidance_inputs((4, 3, 5, 7), torch.float32)
    x[1, 0, 2, 3] = math.nan
    g[2, 1, 1, 1] = math.inf
    pairs = [(ops.guidance_update(x, g, z, 0.5, w), guidance_update_reference(x, g, z, 0.5, w)),
             (ops.dit_guided_difference(x, g, 0.2), plain_update.dit_guided_difference(x, g, 0.2)),
             (ops.ddpm_guided_mean(x, z.abs(), g, w, 0.5, 1.0, 0.3),
              plain_update.ddpm_guided_mean(x, z.abs(), g, w, 0.5, 1.0, 0.3))]
    for actual, expected in pairs:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-6, equal_nan=True)
        first = actual[0] if isinstance(actual, tuple) else actual
        assert torch.isfinite(first[[0, 3]]).all() and not torch.isfinite(first[1]).all()
        assert not torch.isfinite(first[2]).all()


OPCHECK_CASES = {
    "guidance_update": ("guidance_update", lambda x, g, z, w: (x, g, z, torch.tensor(0.5), w)),
    "classifier_input": ("classifier_input", lambda x, g, z, w: (x,)),
    "classifier_input-float64-strided": ("classifier_input", lambda x, g, z, w: (x.double().transpose(1, 2),)),
    "ddpm_guided_mean": ("ddpm_guided_mean", lambda x, g, z, w: (x, z.abs(), g, w, torch.tensor(0.5), 1.0, 0.3)),
    "dit_guided_difference": ("dit_guided_difference", lambda x, g, z, w: (x, g, torch.tensor(0.2))),
    "dit_guided_difference-slice": ("dit_guided_difference",
                                    lambda x, g, z, w: (x[:, :2], g[:, :2], torch.tensor(0.2))),
}


@needs_cpp
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    name, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(torch.ops.elucd, name).default, make_args(*guidance_inputs((3, 4, 5), torch.float32)))


# ------------------------------------------------------------------------------------------------
# the announced fallback, each in a fresh process with an empty extension directory


FALLBACK_SCRIPT = textwrap.dedent("""
    import torch
    from elucd_fast.csrc import ops
    from elucd_fast.engine import choose_fused
    choice = choose_fused("cpu", "on", sampler="edm")
    assert choice.step_ops is None and choice.implementations == {"edm_update": "torch"}, choice
    print("chosen:", choice.messages[0])
    try:
        ops.guidance_update(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), 0.5, torch.ones(2))
    except RuntimeError as error:
        print("direct call refused:", error)
    print("backend:", ops.backend(), ops.cpp_ops_available())
""")


def failing_compiler(directory: Path) -> str:
    """A C++ compiler that answers version queries like the real one and fails every compile."""
    script = directory / "failing-c++"
    script.write_text(textwrap.dedent("""\
        #!/bin/sh
        for argument in "$@"; do
            if [ "$argument" = "-c" ]; then echo "forced compile failure" >&2; exit 1; fi
        done
        exec c++ "$@"
    """))
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("compiler,reason", [
    (lambda directory: "/nonexistent/c++", "no C++ compiler"),
    (failing_compiler, "Error building extension"),
], ids=["no-compiler", "build-fails"])
def test_fallback_is_chosen_and_announced(tmp_path, compiler, reason):
    env = dict(os.environ, CXX=compiler(tmp_path), TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
               PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "backend: torch False" in result.stdout
    expected = "chosen: fused on: edm_update runs plain PyTorch (the C++ ops could not be built"
    assert expected in result.stdout, result.stdout
    assert "direct call refused: elucd C++ ops are not built here" in result.stdout
    announcement = [line for line in result.stderr.splitlines() if "elucd C++ ops unavailable" in line]
    assert len(announcement) == 1 and reason in announcement[0] and "RuntimeWarning" in announcement[0], result.stderr
