"""Triton kernels against their plain PyTorch references, on odd shapes and special values.

With a CUDA device the kernels run compiled on it. Without one they run in Triton's interpreter
(numpy emulation on CPU tensors). Triton 3.8 picks interpreter or compiler when a function is
decorated with @triton.jit, its own library functions (tl.sum, tl.zeros, ...) included, which
happens when triton is first imported; and it checks the variable again at launch. So this
module sets TRITON_INTERPRET=1 before importing anything that imports triton, and leaves it set.
If triton was already imported without it (by an earlier test module in the same session),
that cannot be undone in this process: test_in_fresh_process then runs this file in a new one.

Interpreter caveat: it converts float32 to bfloat16 by truncation where GPUs round to nearest
even, so bfloat16 outputs may differ from the reference by one bfloat16 ulp (2^-7 relative);
the bfloat16 tolerance allows exactly that.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

RUN_IN_FRESH_PROCESS = (not torch.cuda.is_available() and "triton" in sys.modules
                        and os.environ.get("TRITON_INTERPRET") != "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from elucd_fast import kernels  # noqa: E402
from elucd_fast.kernels import ddpm_guided_mean as ddpm_kernels  # noqa: E402
from elucd_fast.kernels import guidance_update as guidance_kernels  # noqa: E402
from elucd_fast.kernels import logit_grad as logit_grad_kernels  # noqa: E402
from elucd_fast.kernels import softplus as softplus_kernels  # noqa: E402
from elucd_fast.guidance import ClassifierGuidance  # noqa: E402
from elucd_fast.guidance import update as plain_update  # noqa: E402
from elucd_fast.guidance.classifier import closed_form_logit_grad  # noqa: E402
from elucd_fast.guidance.objective import calibrated_objective, objective_logit_grad  # noqa: E402
from elucd_fast.numerics import max_relative_error  # noqa: E402
from tiny_models import TinyClassifier  # noqa: E402


def logit_grad_reference(logits, labels, joint_temperature, marginal_temperature, weight=None):
    """The plain path's (dJ/dl, J): the guidance's twin, checked against the public objective API."""
    twin = closed_form_logit_grad(logits, labels, joint_temperature, marginal_temperature, weight)
    public = (objective_logit_grad(logits, labels, joint_temperature, marginal_temperature, weight),
              calibrated_objective(logits, labels, joint_temperature, marginal_temperature))
    for a, b in zip(twin, public):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return twin

if not kernels.triton_available():
    pytest.skip("Triton cannot run here: no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)


@pytest.mark.skipif(not RUN_IN_FRESH_PROCESS, reason="triton was imported in interpreter mode: tests run here")
def test_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]


@pytest.fixture(autouse=True)
def _in_this_process(request):
    if RUN_IN_FRESH_PROCESS and request.function is not test_in_fresh_process:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: test_in_fresh_process runs this")


# The interpreter evaluates masked-off lanes and special values with numpy, which warns about
# the overflow and 0/0 that the kernels then discard with tl.where.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 5, 7, 9), (1, 3, 13, 17), (5, 1000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (rtol, atol) per input dtype. Half precision: one or two ulps of the output dtype.
TOLERANCES = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (2e-6, 1e-7),
    torch.float16: (2e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-4),
}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                   scale: float = 0.0) -> None:
    """Same dtype and shape, same NaN/inf positions, and values within the dtype's tolerance.
    `scale`: magnitude of the terms summed into each value; where they cancel, the rounding
    error is relative to it rather than to the result."""
    rtol, atol = TOLERANCES[dtype]
    atol = max(atol, rtol * scale)
    error = max_relative_error(actual, expected)
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, equal_nan=True,
        msg=lambda detail: f"{what}: max relative error {error:.3g} (rtol {rtol:g})\n{detail}")


def random_input(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype)


def with_special_values(x: torch.Tensor) -> torch.Tensor:
    """x with NaN, +-inf, zero, +-1e4 and values straddling a threshold of 20 (beta 2) in front."""
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 1e4, -1e4, 9.99, 10.01, 10.0, -60.0])
    x = x.clone()
    x.view(-1)[: specials.numel()] = specials.to(x.device, x.dtype)
    return x


# ------------------------------------------------------------------------------------------------
# softplus


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta,threshold", [(1.0, 20.0), (2.0, 20.0), (5.0, 10.0)])
def test_softplus_forward_backward_match_pytorch(shape, dtype, beta, threshold):
    x = with_special_values(random_input(shape, dtype))
    dy = random_input(shape, dtype, scale=1.0, seed=1)
    x_ref = x.clone().requires_grad_()
    expected = F.softplus(x_ref, beta, threshold)
    expected.backward(dy)
    x_fast = x.clone().requires_grad_()
    actual = softplus_kernels.TritonSoftplus.apply(x_fast, beta, threshold)
    actual.backward(dy)
    assert actual.dtype == dtype and x_fast.grad.dtype == dtype
    assert_matches(actual, expected, dtype, f"softplus forward {shape} {dtype}")
    assert_matches(x_fast.grad, x_ref.grad, dtype, f"softplus backward {shape} {dtype}")


def test_softplus_special_values_exactly():
    x = torch.tensor([math.nan, math.inf, -math.inf], device=DEVICE, requires_grad=True)
    y = softplus_kernels.TritonSoftplus.apply(x, 3.0, 20.0)
    y.backward(torch.full_like(y, 2.0))
    assert y[0].isnan() and y[1] == math.inf and y[2] == 0
    assert x.grad[0].isnan() and x.grad[1] == 2.0 and x.grad[2] == 0


def test_softplus_sigmoid_stays_finite_above_exp_overflow():
    # beta*x = 100 under a threshold of 200: exp overflows float32. The forward overflows as
    # PyTorch's does; the backward's 1/(1+exp(-t)) gives the true derivative 1 where PyTorch's
    # exp(t)/(1+exp(t)) gives inf/inf = NaN.
    x = torch.tensor([100.0], device=DEVICE)
    assert softplus_kernels.softplus_forward(x, 1.0, 200.0).item() == F.softplus(x, 1.0, 200.0).item() == math.inf
    assert softplus_kernels.softplus_backward(torch.ones_like(x), x, 1.0, 200.0).item() == 1.0


def test_softplus_gradcheck_float64():
    x = random_input((3, 7), torch.float64, scale=3.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: softplus_kernels.TritonSoftplus.apply(t, 2.0, 5.0), (x,))


def test_softplus_non_contiguous_and_channels_last():
    base = random_input((2, 5, 7, 3), torch.float32)
    transposed = base.transpose(1, 3)
    channels_last = random_input((2, 3, 5, 7), torch.float32).contiguous(memory_format=torch.channels_last)
    for x in (transposed, channels_last):
        assert_matches(softplus_kernels.softplus_forward(x, 2.0), F.softplus(x, 2.0), torch.float32, "layout")
    assert softplus_kernels.softplus_forward(channels_last).is_contiguous(memory_format=torch.channels_last)


def test_fused_softplus_in_the_guidance_gradient():
    """The production path: FusedSoftplus built by ClassifierGuidance, differentiated by torch.func.vjp."""
    guide = ClassifierGuidance(TinyClassifier().to(DEVICE), softplus_beta=3.0, marginal_temperature=0.5)
    fused = guide.with_pieces(make_softplus=lambda beta: softplus_kernels.FusedSoftplus(beta, 20.0))
    assert sum(isinstance(m, softplus_kernels.FusedSoftplus) for m in fused.classifier.modules()) == 1
    assert not any(isinstance(m, softplus_kernels.FusedSoftplus) for m in guide.classifier.modules())
    x = random_input((3, 3, 7, 9), torch.float32, scale=1.0)
    labels = random_labels(3, 10)
    (grad, objective), (grad_ref, objective_ref) = fused(x, labels), guide(x, labels)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(objective, objective_ref, rtol=1e-6, atol=1e-6)


def test_fused_softplus_module_is_a_drop_in():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(3.0), nn.Conv2d(4, 2, 3), nn.Softplus(3.0))
    fused = nn.Sequential(reference[0], softplus_kernels.FusedSoftplus(3.0), reference[2],
                          softplus_kernels.FusedSoftplus(3.0)).to(DEVICE)
    reference = reference.to(DEVICE)
    x = random_input((2, 3, 9, 11), torch.float32)
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference(x_ref).square().sum().backward()
    fused(x_fast).square().sum().backward()
    assert repr(fused[1]) == "FusedSoftplus(beta=3.0, threshold=20.0)"
    assert_matches(fused(x), reference(x), torch.float32, "network output")
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# calibrated-objective logit gradient


def random_labels(batch: int, num_classes: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (batch,), generator=generator).to(DEVICE)


@pytest.mark.parametrize("shape", [(5, 1000), (3, 7), (1, 13)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperatures,with_weight", [
    ((1.0, 1.0), False), ((1.0, 0.5), True), ((1.0, 0.0), True), ((0.0, 0.7), False)])
def test_logit_grad_matches_reference(shape, dtype, temperatures, with_weight):
    check_logit_grad(shape, dtype, temperatures, with_weight, max_block_k=logit_grad_kernels.MAX_BLOCK_K)


@pytest.mark.parametrize("shape,max_block_k", [((3, 1000), 64), ((2, 37), 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_grad_online_reduction_over_blocks(shape, dtype, max_block_k):
    check_logit_grad(shape, dtype, (1.0, 0.5), True, max_block_k=max_block_k)


def check_logit_grad(shape, dtype, temperatures, with_weight, max_block_k):
    logits = random_input(shape, dtype, scale=5.0)
    labels = random_labels(*shape)
    weight = random_input(shape[:1], torch.float32, seed=3) if with_weight else None
    grad, objective = logit_grad_kernels.logit_grad(logits, labels, *temperatures, weight, max_block_k=max_block_k)
    grad_ref, objective_ref = logit_grad_reference(logits, labels, *temperatures, weight)
    # The kernel reads the same rounded inputs as the reference, so its error is float32 (or
    # float64) arithmetic, whatever the logits' dtype.
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert grad.dtype == grad_ref.dtype == compute and objective.dtype == compute
    assert_matches(grad, grad_ref, compute, f"logit grad {shape} {dtype} {temperatures}")
    assert_matches(objective, objective_ref, compute, f"objective {shape} {dtype} {temperatures}")


def test_logit_grad_in_the_guidance_gradient():
    guide = ClassifierGuidance(TinyClassifier().to(DEVICE), softplus_beta=3.0, marginal_temperature=0.5)
    fused = guide.with_pieces(logit_grad=logit_grad_kernels.logit_grad)
    x = random_input((3, 3, 5, 6), torch.float32, scale=1.0)
    one_hot = F.one_hot(random_labels(3, 10), 10)
    weight = random_input((3,), torch.float32, seed=3)
    (grad, objective), (grad_ref, objective_ref) = fused(x, one_hot, weight), guide(x, one_hot, weight)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(objective, objective_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("max_block_k", [4096, 8])
def test_logit_grad_large_and_nonfinite_rows(max_block_k):
    logits = random_input((6, 37), torch.float32)
    logits[0] *= 2500.0  # logits around +-1e4
    logits[1, 5] = 1e4
    logits[1, 6] = -1e4
    logits[2, 3] = math.nan
    logits[3, 4] = math.inf
    logits[4] = -math.inf
    labels = random_labels(6, 37)
    grad, objective = logit_grad_kernels.logit_grad(logits, labels, 1.0, 0.5, max_block_k=max_block_k)
    grad_ref, objective_ref = logit_grad_reference(logits, labels, 1.0, 0.5)
    assert torch.isfinite(grad[[0, 1, 5]]).all() and torch.isfinite(objective[[0, 1, 5]]).all()
    assert grad[2].isnan().all() and objective[2].isnan()
    assert_matches(grad, grad_ref, torch.float32, "logit grad, nonfinite rows")
    assert_matches(objective, objective_ref, torch.float32, "objective, nonfinite rows")


def test_logit_grad_out_of_range_label_gives_a_nan_row():
    logits = random_input((3, 11), torch.float32)
    labels = torch.tensor([0, 11, -1], device=DEVICE)
    grad, objective = logit_grad_kernels.logit_grad(logits, labels, 1.0, 0.5)
    assert torch.isfinite(grad[0]).all() and torch.isfinite(objective[0])
    assert grad[1:].isnan().all() and objective[1:].isnan().all()


# ------------------------------------------------------------------------------------------------
# guidance update and classifier input


def guidance_inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = random_input(shape, dtype, scale=3.0)
    g = random_input(shape, dtype, scale=1e-3, seed=4)
    g[0] = 0  # a sample whose classifier gradient vanished
    z = random_input(shape, dtype, scale=1.0, seed=5)
    w = random_input(shape[:1], torch.float32, seed=6).abs()
    return x, g, z, w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [1024, 64])
def test_guidance_update_matches_reference(shape, dtype, block):
    x, g, z, w = guidance_inputs(shape, dtype)
    # A float becomes a 0-d tensor of the working dtype on the device, as a tensor does.
    for noise_scale in (0.75, torch.tensor(0.3, dtype=torch.float64, device=DEVICE)):
        actual = guidance_kernels.guidance_update(x, g, z, noise_scale, w, block=block)
        expected = plain_update.edm_guidance_update(x, g, z, noise_scale, w)
        assert actual.dtype == dtype and actual.shape == x.shape
        scale = x.abs().max().item() + z.abs().max().item()
        assert_matches(actual, expected, dtype, f"guidance update {shape} {dtype} block {block}", scale)
        assert_matches(actual[0], (x[0].double() + float(noise_scale) * z[0].double()).to(dtype), dtype,
                       "zero-gradient sample", scale)


def test_guidance_update_zero_gradient_with_large_state_is_not_nan():
    # rms(x) * w = 1e2 / 1.2e-38 overflows float32: the guidance term must still be exactly 0.
    x = random_input((2, 3, 5, 7), torch.float32, scale=100.0)
    g = torch.zeros_like(x)
    z = random_input((2, 3, 5, 7), torch.float32, seed=7)
    out = guidance_kernels.guidance_update(x, g, z, 0.5, torch.ones(2, device=DEVICE))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x + 0.5 * z, rtol=1e-6, atol=0)


def test_guidance_update_one_weight_for_all_and_long_rows():
    x, g, z, _ = guidance_inputs((2, 5000), torch.float32)
    w = torch.tensor([0.004], device=DEVICE)
    actual = guidance_kernels.guidance_update(x.t().contiguous().t(), g, z, 1.5, w, block=16)
    assert_matches(actual, plain_update.edm_guidance_update(x, g, z, 1.5, w), torch.float32,
                   "one weight, many chunks", x.abs().max().item() + 1.5 * z.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [1024, 64])
def test_classifier_input_matches_reference(shape, dtype, block):
    x = random_input(shape, dtype, scale=1.0)
    x[0] *= 3.0  # rms above 1: divided
    x[-1] *= 0.25  # rms below 1 (for B > 1): left as is
    xc, r = guidance_kernels.classifier_input(x, block=block)
    xc_ref, r_ref = plain_update.edm_classifier_input(x)
    assert xc.dtype == dtype and r.dtype == r_ref.dtype and r.shape == (shape[0],)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert_matches(r, r_ref, compute, f"rms {shape} {dtype}")
    assert_matches(xc, xc_ref, dtype, f"classifier input {shape} {dtype}")


def test_classifier_input_nan_stays_in_its_sample():
    x = random_input((3, 4, 5), torch.float32, scale=2.0)
    x[1, 2, 3] = math.nan
    xc, r = guidance_kernels.classifier_input(x)
    assert r[1].isnan() and xc[1].isnan().sum() == 1 and torch.isfinite(r[[0, 2]]).all()
    torch.testing.assert_close(xc, plain_update.edm_classifier_input(x)[0], equal_nan=True)


def test_guidance_update_nonfinite_stays_in_its_sample():
    x, g, z, w = guidance_inputs((4, 3, 5, 7), torch.float32)
    x[1, 0, 2, 3] = math.nan
    g[2, 1, 1, 1] = math.inf
    z[3, 2, 0, 0] = -math.inf
    actual = guidance_kernels.guidance_update(x, g, z, 0.5, w)
    expected = plain_update.edm_guidance_update(x, g, z, 0.5, w)
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-6, equal_nan=True)
    # NaN in x: rms(x) is NaN, so is the whole sample; inf in g: rms(g) = inf, g / rms(g) is 0
    # except NaN at the inf; -inf noise: one -inf.
    assert actual[1].isnan().all() and actual[2].isnan().sum() == 1 and actual[3].isinf().sum() == 1
    assert torch.isfinite(actual[0]).all()


# ------------------------------------------------------------------------------------------------
# DiT rule 2


def dit_inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d (B, k, ...), g as the first k channels of a (B, k + 1, ...) gradient (a strided slice, as
    the sampler passes it), gamma."""
    difference = random_input(shape, dtype, scale=0.5)
    full = random_input((shape[0], shape[1] + 1, *shape[2:]), dtype, scale=1e-2, seed=8)
    gamma = torch.tensor(0.13, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    return difference, full[:, :shape[1]], gamma


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [1024, 64])
def test_dit_guided_difference_matches_reference(shape, dtype, block):
    difference, g, gamma = dit_inputs(shape, dtype)
    assert shape[0] == 1 or not g.is_contiguous()
    for gamma_value in (gamma, 0.4):
        actual, norm = guidance_kernels.dit_guided_difference(difference, g, gamma_value, block=block)
        expected, norm_ref = plain_update.dit_guided_difference(difference, g, gamma_value)
        assert actual.dtype == dtype and actual.shape == difference.shape and norm.dtype == norm_ref.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        assert_matches(actual, expected, dtype, f"dit difference {shape} {dtype} block {block}",
                       difference.abs().max().item())
        assert_matches(norm, norm_ref, compute, f"rms(g) {shape} {dtype}")


def test_dit_zero_gradient_with_large_difference_is_exact():
    # rms(d) / tiny overflows float32 for rms(d) > 4: the term must still be exactly 0.
    difference, g, gamma = dit_inputs((2, 3, 5, 7), torch.float32)
    difference = difference * 100.0
    g[0] = 0
    for implementation in (guidance_kernels.dit_guided_difference, plain_update.dit_guided_difference):
        actual, norm = implementation(difference, g, gamma)
        assert torch.equal(actual[0], difference[0]) and norm[0] == 0 and torch.isfinite(actual).all()


def test_dit_nonfinite_stays_in_its_sample():
    difference, g, gamma = dit_inputs((4, 3, 5, 7), torch.float32)
    difference[1, 0, 0, 1] = math.nan
    g[2, 2, 1, 1] = math.inf
    actual, norm = guidance_kernels.dit_guided_difference(difference, g, gamma)
    expected, norm_ref = plain_update.dit_guided_difference(difference, g, gamma)
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(norm, norm_ref, equal_nan=True)
    assert actual[1].isnan().all() and actual[2].isnan().sum() == 1 and torch.isfinite(actual[[0, 3]]).all()
    assert norm[1] > 0 and norm[2] == math.inf


# ------------------------------------------------------------------------------------------------
# DDPM guided mean


def ddpm_inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    mean = random_input(shape, dtype, scale=1.0)
    variance = random_input(shape, dtype, scale=0.1, seed=9).abs()
    g = random_input(shape, dtype, scale=2.0, seed=10)
    vmax = random_input(shape[:1], dtype, scale=0.2, seed=11).abs()
    sine = torch.tensor(math.sin(math.pi * 7 / 11), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        device=DEVICE)
    return mean, variance, g, vmax, sine


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classifier_scale,gamma_factor", [(1.0, 0.3), (2.7, 0.0), (0.3, 1.7)])
def test_ddpm_guided_mean_matches_reference(shape, dtype, classifier_scale, gamma_factor):
    mean, variance, g, vmax, sine = ddpm_inputs(shape, dtype)
    actual = ddpm_kernels.ddpm_guided_mean(mean, variance, g, vmax, sine, classifier_scale, gamma_factor)
    expected = plain_update.ddpm_guided_mean(mean, variance, g, vmax, sine, classifier_scale, gamma_factor)
    assert actual.dtype == dtype and actual.shape == mean.shape
    term = classifier_scale * (variance.double().abs().max() + vmax.double().abs().max()) * g.double().abs().max()
    assert_matches(actual, expected, dtype, f"ddpm mean {shape} {dtype}", mean.abs().max().item() + term.item())


def test_ddpm_guided_mean_negative_sine_clamps_and_nonfinite_stay_put():
    mean, variance, g, vmax, _ = ddpm_inputs((4, 3, 5, 7), torch.float32)
    variance[1, 0, 0, 0] = math.nan
    g[2, 1, 2, 3] = -math.inf
    vmax[3] = math.inf
    sine = torch.tensor(-0.5, device=DEVICE)  # a_t = max(negative, 0) = 0
    actual = ddpm_kernels.ddpm_guided_mean(mean, variance, g, vmax, sine, 1.0, 0.3)
    expected = plain_update.ddpm_guided_mean(mean, variance, g, vmax, sine, 1.0, 0.3)
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert actual[1].isnan().sum() == 1 and actual[2].isinf().sum() == 1 and torch.isfinite(actual[[0, 3]]).all()


def test_ddpm_guided_mean_refuses_tensor_scales():
    mean, variance, g, vmax, sine = ddpm_inputs((2, 3), torch.float32)
    with pytest.raises(TypeError, match="floats"):
        ddpm_kernels.ddpm_guided_mean(mean, variance, g, vmax, sine, torch.tensor(1.0), 0.3)
