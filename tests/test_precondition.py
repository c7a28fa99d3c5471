import math

import pytest
import torch
import torchvision
from torch import nn

from elucd_fast.guidance import ClassifierGuidance, precondition_classifier
from elucd_fast.guidance.precondition import count_functional_relus, fold_batchnorm, make_input_transform
from tiny_models import TinyClassifier, rel_err


def _relus(model):
    return [m for m in model.modules() if isinstance(m, nn.ReLU)]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_softplus_swap_leaves_no_relu_in_torchvision_resnets(arch):
    model = getattr(torchvision.models, arch)(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    smoothed, report = precondition_classifier(model, softplus_beta=3.0, example=x)
    assert _relus(model), "the original is untouched"
    assert not _relus(smoothed)
    assert report["relu_modules_replaced"] == (9 if arch == "resnet18" else 17)
    assert report["functional_relus"] == 0
    assert all(not p.requires_grad for p in smoothed.parameters()) and not smoothed.training


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.ReLU()
        self.body = nn.Sequential(nn.Linear(4, 4), shared, nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(inplace=True)))
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)
        for block in self.blocks:
            h = block(h)
        return self.head(torch.nn.functional.relu(h))


def test_nested_custom_module_and_functional_relu():
    model = Nested()
    x = torch.randn(5, 4)
    smoothed, report = precondition_classifier(model, softplus_beta=2.0, example=x)
    assert not _relus(smoothed)
    assert report["functional_relus"] == 1
    # After the wrapper, no ReLU is called at all during a forward.
    assert count_functional_relus(smoothed, x) == 0
    # The function really is the Softplus network: compare with a hand-written one.
    b = model.body
    sp = lambda v: torch.nn.functional.softplus(v, beta=2.0)  # noqa: E731
    h = sp(b[2][0](sp(b[0](x))))
    h = sp(h)
    for block in model.blocks:
        h = sp(block[0](h))
    expected = model.head(sp(h))
    assert torch.allclose(smoothed(x), expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_large_beta_approaches_relu(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        errors = [rel_err(precondition_classifier(model, softplus_beta=beta)[0](x), ref) for beta in (10.0, 100.0, 1e4)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-3, errors


def test_infinite_beta_keeps_relu():
    model = TinyClassifier()
    smoothed, report = precondition_classifier(model, softplus_beta=math.inf)
    assert len(_relus(smoothed)) == 1 and report["relu_modules_replaced"] == 0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_bad_beta_rejected(bad):
    with pytest.raises(ValueError, match="softplus_beta"):
        precondition_classifier(TinyClassifier(), softplus_beta=bad)


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_batchnorm_folding_is_equal(arch):
    torch.manual_seed(0)
    model = TinyClassifier() if arch == "tiny" else torchvision.models.resnet18(num_classes=10)
    if arch == "resnet18":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2)
    model = model.double().eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 17, 19, dtype=torch.float64)
    with torch.no_grad():
        err = rel_err(folded(x), model(x))
    assert err < 1e-12, err


def test_imagenet_transform():
    t = make_input_transform("imagenet224")
    x = torch.zeros(2, 3, 32, 32)
    y = t(x)
    assert y.shape == (2, 3, 224, 224)
    assert torch.allclose(y[:, 0], torch.full_like(y[:, 0], (0.5 - 0.485) / 0.229))
    with pytest.raises(ValueError, match="input_transform"):
        make_input_transform("bogus")


def test_guidance_gradient_matches_autograd_of_objective():
    torch.manual_seed(0)
    clf = TinyClassifier(functional_relu=True).double()
    guide = ClassifierGuidance(clf, softplus_beta=3.0, joint_temperature=1.0, marginal_temperature=0.5)
    x = torch.randn(4, 3, 9, 11, dtype=torch.float64)
    y = torch.tensor([1, 4, 9, 0])
    guide.check_input((3, 9, 11), y, "cpu")
    assert guide.report["functional_relus"] == 1
    grad, J = guide(x, y)
    xr = x.clone().requires_grad_(True)
    sp = lambda v: torch.nn.functional.softplus(v, beta=3.0)  # noqa: E731
    h = sp(clf.bn1(clf.conv1(xr)))
    h = sp(clf.bn2(clf.conv2(h)) + h)
    logits = clf.fc(h.mean(dim=(2, 3)))
    ref_J = logits[torch.arange(4), y] - torch.logsumexp(0.5 * logits, 1)
    (ref_grad,) = torch.autograd.grad(ref_J.sum(), xr)
    assert rel_err(grad, ref_grad) < 1e-12 and rel_err(J, ref_J) < 1e-12


def test_proposition_4_2_gaussian_mixture():
    """For an exact Gaussian-mixture classifier with identity covariances and tau_m = 0,
    grad J = mu_y - x (paper Proposition 4.2)."""
    torch.manual_seed(0)
    means = torch.randn(5, 2 * 3 * 3, dtype=torch.float64)
    log_prior = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)

    class Mixture(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("means", means)
            self.register_buffer("log_prior", log_prior)
            self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            d = x.flatten(1)[:, None, :] - self.means[None]
            return -0.5 * d.square().sum(-1) + self.log_prior

    guide = ClassifierGuidance(Mixture(), joint_temperature=1.0, marginal_temperature=0.0)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2])
    grad, _ = guide(x, y)
    assert rel_err(grad, means[y].reshape(4, 2, 3, 3) - x) < 1e-13


def test_check_input_errors():
    guide = ClassifierGuidance(TinyClassifier(channels=3))
    with pytest.raises(ValueError, match="cannot take images of shape"):
        guide.check_input((1, 8, 8), torch.tensor([0]), "cpu")
    with pytest.raises(ValueError, match=r"class_labels: ids must be in \[0, 10\)"):
        guide.check_input((3, 8, 8), torch.tensor([10]), "cpu")
