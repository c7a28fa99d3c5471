"""Loading torchvision classifiers from local files: hash check, strictness, safety."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision

from elucd_fast.models.checkpoint import CheckpointError, sha256_file
from elucd_fast.models.classifiers import identify_torchvision_classifier, load_classifier


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A randomly initialised resnet18 saved as torchvision names its files: `<arch>-<sha8>.pth`."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    folder = tmp_path_factory.mktemp("resnet18")
    plain = folder / "resnet18.pth"
    torch.save(model.state_dict(), plain)
    named = folder / f"resnet18-{sha256_file(plain)[:8]}.pth"
    plain.rename(named)
    return model, named


def test_loads_file_with_matching_hash_prefix(resnet18_file):
    reference, path = resnet18_file
    model = load_classifier("resnet18", path)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_refuses_wrong_hash_prefix(resnet18_file, tmp_path):
    _, path = resnet18_file
    real = path.name.split("-")[1][:8]
    wrong = tmp_path / f"resnet18-{'0' * 8 if real != '0' * 8 else '1' * 8}.pth"
    wrong.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="does not match the prefix"):
        load_classifier("resnet18", wrong)


def test_wrong_architecture_names_file_and_the_fitting_one(resnet18_file):
    _, path = resnet18_file
    with pytest.raises(CheckpointError) as err:
        load_classifier("resnet50", path)
    message = str(err.value)
    assert str(path) in message and "resnet50" in message
    assert "fits resnet18 (1000 classes)" in message


def test_identifies_the_architecture(resnet18_file):
    _, path = resnet18_file
    state = torch.load(path, weights_only=True)
    assert identify_torchvision_classifier(state) == [("resnet18", 1000)]


def test_number_of_classes_is_read_from_the_file(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18_digits.pth"
    torch.save(model.state_dict(), path)
    assert load_classifier("resnet18", path).fc.out_features == 10
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_classifier("resnet18", path, num_classes=1000)


def test_refuses_nan_weights(resnet18_file, tmp_path):
    _, path = resnet18_file
    state = torch.load(path, weights_only=True)
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "resnet18_nan.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight.*NaN"):
        load_classifier("resnet18", bad)


def test_refuses_truncated_file(resnet18_file, tmp_path):
    _, path = resnet18_file
    data = path.read_bytes()
    cut = tmp_path / "resnet18_cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(cut))):
        load_classifier("resnet18", cut)


class _CreatesMarker:
    """Unpickling this object would create a file: the shape of a code-execution payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "resnet18_evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _CreatesMarker(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_classifier("resnet18", evil)
    assert not marker.exists()


def test_missing_file_and_unknown_architecture(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_classifier("resnet18", tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="unknown classifier architecture 'resnet5'.*resnet50"):
        load_classifier("resnet5", tmp_path / "absent.pth")


def test_random_weights_only_on_request():
    with pytest.raises(CheckpointError, match="allow_random"):
        load_classifier("resnet18")
    model = load_classifier("resnet18", allow_random=True, num_classes=7)
    assert model.fc.out_features == 7 and not model.training


def test_densenet_files_with_old_key_names_load(tmp_path):
    model = torchvision.models.densenet121(weights=None, num_classes=4).eval()
    # torchvision's released DenseNet files spell `denselayer1.norm1` as `denselayer1.norm.1` and,
    # written before PyTorch 0.4.1, hold no BatchNorm `num_batches_tracked` counters.
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(".norm.1." in k for k in old)
    path = tmp_path / "densenet121.pth"
    torch.save(old, path)
    loaded = load_classifier("densenet121", path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_timm_models_load_when_timm_is_installed(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is optional and not installed here")
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    path = tmp_path / "timm_resnet18.pth"
    torch.save(model.state_dict(), path)
    loaded = load_classifier("timm:resnet18", path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
