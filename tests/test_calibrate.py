import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from elucd_fast.tools.calibrate import calibrate, expected_calibration_error, integral_calibration_error, settings_grid
from elucd_fast.tools.charts import write_calibration_chart
from elucd_fast.cli import main
from elucd_fast.guidance import ClassifierGuidance
from elucd_fast.job import Job
from elucd_fast.samplers import DDPMSettings, EDMSettings
from tiny_models import TinyClassifier, TinyEDMNet, TinyEpsModel


def test_ece_of_a_hand_computed_example():
    # Bins of width 1/15. Confidences 0.95, 0.95 (bin 15: accuracy 1/2, confidence 0.95),
    # 0.55 (bin 9: accuracy 1, confidence 0.55), 0.25 (bin 4: accuracy 0, confidence 0.25).
    # ECE = 2/4 * |0.5 - 0.95| + 1/4 * |1 - 0.55| + 1/4 * |0 - 0.25| = 0.225 + 0.1125 + 0.0625 = 0.4
    ece = expected_calibration_error(np.array([0.95, 0.95, 0.55, 0.25]), np.array([1, 0, 1, 0]))
    assert ece == pytest.approx(0.4, abs=1e-12)


def test_perfect_calibration_is_near_zero():
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.1, 1.0, 200_000)
    correct = rng.uniform(size=confidences.size) < confidences
    assert expected_calibration_error(confidences, correct) < 0.01


def test_ice_is_the_mean_over_timesteps():
    assert integral_calibration_error([0.1, 0.2, 0.6]) == pytest.approx(0.3)


def _jobs():
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    return {"edm": Job(TinyEDMNet(), guide, EDMSettings(num_steps=4, max_guidance=0.05), (3, 8, 8), 10),
            "ddpm": Job(TinyEpsModel(), guide, DDPMSettings(num_timesteps=100, timestep_respacing="4"), (3, 8, 8), 10)}


@pytest.mark.parametrize("sampler", ["edm", "ddpm"])
@pytest.mark.parametrize("source", ["forward", "reverse"])
def test_curves_for_both_inputs(sampler, source):
    job = _jobs()[sampler]
    images = torch.rand(24, 3, 8, 8) * 2 - 1
    labels = torch.arange(24) % 10
    settings = settings_grid([math.inf, 3.0], ["xt", "x0"], [1.0])
    result = calibrate(job, images if source == "forward" else None, labels, settings=settings, source=source)
    assert len(result["curves"]) == 4 and len(result["sigmas"]) == 4
    for curve in result["curves"]:
        assert len(curve["ece"]) == 4 and all(0 <= e <= 1 for e in curve["ece"])
        assert curve["ice"] == pytest.approx(np.mean(curve["ece"]))
    best = result["curves"][result["best"]]
    assert best["ice"] == min(c["ice"] for c in result["curves"]) and "lowest ICE" in result["recommendation"]
    json.dumps(result)


def test_chart_is_written(tmp_path):
    job = _jobs()["edm"]
    result = calibrate(job, torch.rand(8, 3, 8, 8) * 2 - 1, torch.arange(8), settings=settings_grid([3.0], ["x0"], [1.0]))
    write_calibration_chart(result, tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] > 100


@pytest.fixture
def tiny_presets(monkeypatch):
    import elucd_fast.tools.calibrate as calibrate_module
    import elucd_fast.presets as presets

    monkeypatch.setattr(presets, "build_job", lambda name, device="cpu", **overrides: _jobs()["edm"])
    monkeypatch.setattr(calibrate_module, "calibration_images",
                        lambda preset, num_images=None: (torch.rand(num_images or 16, 3, 8, 8) * 2 - 1,
                                                         torch.arange(num_images or 16) % 10))


def test_cli_writes_json_and_chart(tmp_path, tiny_presets):
    result = CliRunner().invoke(main, ["calibrate", "--betas", "inf,3", "--inputs", "x0", "--num-images", "12",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert len(data["curves"]) == 2 and "lowest ICE" in result.output
    Image.open(tmp_path / "calibration.png").verify()


@pytest.mark.parametrize("args,message", [
    (["--betas", "0"], "softplus_beta"),
    (["--betas", "x"], "comma-separated numbers"),
    (["--inputs", "noise"], "classifier_input"),
    (["--num-images", "0"], "num-images"),
    (["--source", "reverse", "--images", "a.npz"], ""),
])
def test_cli_bad_flags_exit_2(tmp_path, tiny_presets, args, message):
    result = CliRunner().invoke(main, ["calibrate", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output


def test_ece_bin_edges_go_to_the_lower_bin():
    # Two bins (0, 0.5] and (0.5, 1]. 0.5 joins the lower bin with 0.3: confidence 0.4, accuracy 1/2;
    # 0.9 alone: accuracy 0. ECE = 2/3 * |0.5 - 0.4| + 1/3 * |0 - 0.9| = 0.0666... + 0.3 = 0.3666...
    ece = expected_calibration_error([0.3, 0.5, 0.9], [1, 0, 0], num_bins=2)
    assert ece == pytest.approx(2 / 3 * 0.1 + 0.3, abs=1e-12)
    with pytest.raises(ValueError, match="confidences"):
        expected_calibration_error([1.5], [1])


def test_classifier_is_recovered_before_smoothing():
    from elucd_fast.tools.calibrate import calibration_parts

    raw = TinyClassifier()
    job = Job(TinyEDMNet(), ClassifierGuidance(raw, softplus_beta=3.0), EDMSettings(num_steps=4), (3, 8, 8), 10)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(calibration_parts(job).classifier(x), raw(x))


def test_labelled_images(tmp_path):
    from elucd_fast.tools.calibrate import calibration_images, load_labelled_npz

    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "s.npz", pixels, np.array([3, 7]))
    images, labels = load_labelled_npz(tmp_path / "s.npz")
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [3, 7]
    assert images[0, 1, 0, 0] == pytest.approx(1 / 127.5 - 1)
    images, labels = calibration_images("digits", 10)
    assert images.shape == (10, 1, 8, 8) and images.min() >= -1 and images.max() <= 1 and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="bundles no labelled images"):
        calibration_images("edm-imagenet64-18")


def test_cli_reverse_source(tmp_path, tiny_presets):
    result = CliRunner().invoke(main, ["calibrate", "--source", "reverse", "--betas", "3", "--inputs", "xt,x0",
                                       "--num-images", "6", "--timesteps", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["source"] == "reverse" and len(data["sigmas"]) == 3 and data["num_images"] == 6
