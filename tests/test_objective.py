import math

import pytest
import torch

from elucd_fast.guidance import calibrated_objective, objective_logit_grad


def _reference(logits, labels, tj, tm):
    return tj * logits[torch.arange(len(labels)), labels] - torch.logsumexp(tm * logits, dim=1)


@pytest.mark.parametrize("tj,tm", [(1.0, 1.0), (1.0, 0.5), (1.0, 0.0), (0.7, 1.3), (0.0, 1.0)])
def test_objective_matches_autograd_and_finite_differences(tj, tm):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 2, 2])
    J = calibrated_objective(logits, labels, tj, tm)
    assert torch.allclose(J, _reference(logits, labels, tj, tm), rtol=0, atol=1e-14)
    (auto,) = torch.autograd.grad(J.sum(), logits)
    closed = objective_logit_grad(logits.detach(), labels, tj, tm)
    assert (closed - auto).abs().max() < 1e-14
    # Central finite differences of J_b w.r.t. logits[b, k].
    h = 1e-6
    fd = torch.zeros_like(closed)
    for b in range(5):
        for k in range(7):
            e = torch.zeros_like(logits)
            e[b, k] = h
            fd[b, k] = (calibrated_objective(logits + e, labels, tj, tm)[b]
                        - calibrated_objective(logits - e, labels, tj, tm)[b]) / (2 * h)
    assert (fd - closed).abs().max() < 1e-8


def test_one_hot_labels_equal_ids():
    logits = torch.randn(4, 6)
    ids = torch.tensor([1, 5, 0, 3])
    one_hot = torch.nn.functional.one_hot(ids, 6).float()
    assert torch.equal(calibrated_objective(logits, ids, 1.0, 0.5), calibrated_objective(logits, one_hot, 1.0, 0.5))
    assert torch.equal(objective_logit_grad(logits, ids, 1.0, 0.5), objective_logit_grad(logits, one_hot, 1.0, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [125.0, 1e3, 1e4])
def test_large_logits_stay_finite(dtype, scale):
    torch.manual_seed(1)
    logits = (torch.rand(6, 10) * 2 - 1).mul(scale).to(dtype)
    logits[0, 0] = scale
    logits[1] = -scale
    labels = torch.arange(6)
    J = calibrated_objective(logits, labels, 1.0, 0.5)
    grad = objective_logit_grad(logits, labels, 1.0, 0.5)
    assert J.dtype == torch.float32 and torch.isfinite(J).all()
    assert torch.isfinite(grad).all()
    # The naive exp/log form the authors used overflows at these sizes.
    naive = torch.log(torch.exp(logits.float()[torch.arange(6), labels]) / torch.exp(0.5 * logits.float()).sum(1))
    assert not torch.isfinite(naive).all()


def test_both_temperatures_zero_rejected():
    with pytest.raises(ValueError, match="both 0"):
        calibrated_objective(torch.randn(2, 3), torch.tensor([0, 1]), 0.0, 0.0)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_temperatures_rejected(bad):
    with pytest.raises(ValueError, match="joint_temperature"):
        calibrated_objective(torch.randn(2, 3), torch.tensor([0, 1]), bad, 1.0)


def test_weight_scales_each_sample():
    logits = torch.randn(3, 4)
    labels = torch.tensor([0, 1, 2])
    w = torch.tensor([0.0, 1.0, 2.5])
    plain = objective_logit_grad(logits, labels, 1.0, 0.3)
    assert torch.allclose(objective_logit_grad(logits, labels, 1.0, 0.3, w), plain * w[:, None])


def test_float_labels_rejected():
    with pytest.raises(TypeError, match="integer"):
        calibrated_objective(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
