"""Metrics through torch-fidelity with a tiny registered feature extractor; references; CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from click.testing import CliRunner
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from elucd_fast.cli import main as cli
from elucd_fast.metrics.evaluate import (INCEPTION_WEIGHTS_FILE, KEY_FEATURE_EXTRACTOR, KEY_METRIC_F_SCORE, KEY_METRIC_FID,
                                 KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                 KEY_METRIC_PRECISION, KEY_METRIC_RECALL, KEY_NUM_REFERENCE_IMAGES, KEY_NUM_SAMPLES,
                                 KEY_REFERENCE_SHA256, EvaluationError, MissingWeightsError, build_reference,
                                 compute_metrics, frechet_distance)
from elucd_fast.runs.outputs import SampleWriter

TINY = "elucd-test-tiny"


class TinyExtractor(torch_fidelity.FeatureExtractorBase):
    """Sums of pixel values over the four quadrants of each channel (12 features, exact in float32
    for small images) and their 4 channel-mixed 'logits' for the Inception Score."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return "quadrants", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "quadrants", "kid": "quadrants", "prc": "quadrants"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        quadrants = quadrant_sums(x.to(torch.float32))
        logits = quadrants[:, :4] / 1000
        features = {"quadrants": quadrants, "logits": logits}
        return tuple(features[name] for name in self.features_list)


def quadrant_sums(x):
    """(B, 3, H, W) -> (B, 12), for torch tensors and numpy arrays alike."""
    b, c, h, w = x.shape
    return x.reshape(b, c, 2, h // 2, 2, w // 2).sum(axis=(3, 5)).reshape(b, c * 4)


if TINY not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(TINY, TinyExtractor)


def random_images(seed: int, n: int, shift: int = 0, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, size, size, 3)) + shift * rng.random((n, 1, 1, 3)), 0, 255).astype(np.uint8)


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    samples, real = random_images(1, 64, shift=50), random_images(2, 80)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "real.npz", arr_0=real)
    return {"samples": tmp_path / "samples.npz", "real": tmp_path / "real.npz", "samples_array": samples,
            "real_array": real}


def direct_fid(samples: np.ndarray, real: np.ndarray) -> float:
    """FID of the quadrant features in float64 numpy, through eigenvalues instead of sqrtm."""
    f1 = quadrant_sums(samples.transpose(0, 3, 1, 2).astype(np.float64))
    f2 = quadrant_sums(real.transpose(0, 3, 1, 2).astype(np.float64))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_result_keys_are_torch_fidelitys():
    assert KEY_METRIC_FID == torch_fidelity.KEY_METRIC_FID
    assert (KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD) == (torch_fidelity.KEY_METRIC_ISC_MEAN,
                                                         torch_fidelity.KEY_METRIC_ISC_STD)
    assert (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD) == (torch_fidelity.KEY_METRIC_KID_MEAN,
                                                         torch_fidelity.KEY_METRIC_KID_STD)
    assert (KEY_METRIC_PRECISION, KEY_METRIC_RECALL, KEY_METRIC_F_SCORE) == (
        torch_fidelity.KEY_METRIC_PRECISION, torch_fidelity.KEY_METRIC_RECALL, torch_fidelity.KEY_METRIC_F_SCORE)


def test_fid_equals_direct_float64_computation(images):
    result = compute_metrics(images["samples"], images["real"], feature_extractor=TINY, batch_size=16)
    expected = direct_fid(images["samples_array"], images["real_array"])
    assert expected > 1
    assert result[KEY_METRIC_FID] == pytest.approx(expected, rel=1e-6)
    assert result[KEY_NUM_SAMPLES] == 64 and result[KEY_NUM_REFERENCE_IMAGES] == 80
    assert result[KEY_FEATURE_EXTRACTOR] == TINY
    assert result[KEY_REFERENCE_SHA256] == hashlib.sha256(images["real"].read_bytes()).hexdigest()


def test_fid_agrees_with_torch_fidelity_itself(images):
    class Images(torch.utils.data.Dataset):
        def __init__(self, array):
            self.array = torch.from_numpy(array).permute(0, 3, 1, 2)

        def __len__(self):
            return len(self.array)

        def __getitem__(self, i):
            return self.array[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(images["samples_array"]), input2=Images(images["real_array"]), fid=True,
        feature_extractor=TINY, cuda=False, cache=False, verbose=False, save_cpu_ram=True)
    ours = compute_metrics(images["samples"], images["real"], feature_extractor=TINY)
    assert ours[KEY_METRIC_FID] == pytest.approx(theirs[KEY_METRIC_FID], rel=1e-5)


def test_stored_reference_gives_the_same_fid(images, tmp_path: Path):
    summary = build_reference(images["real"], tmp_path / "ref.npz", feature_extractor=TINY, batch_size=7)
    with np.load(tmp_path / "ref.npz") as ref:
        assert sorted(ref.files) == ["mu", "sigma"]
        assert ref["mu"].dtype == np.float64 and ref["sigma"].shape == (12, 12)
    assert summary["num_images"] == 80 and summary["feature_layer"] == "quadrants"
    from_images = compute_metrics(images["samples"], images["real"], feature_extractor=TINY)
    from_stats = compute_metrics(images["samples"], tmp_path / "ref.npz", feature_extractor=TINY)
    assert from_stats[KEY_METRIC_FID] == pytest.approx(from_images[KEY_METRIC_FID], rel=1e-12)
    assert from_stats[KEY_REFERENCE_SHA256] == summary["sha256"]
    with pytest.raises(EvaluationError, match="statistics only"):
        compute_metrics(images["samples"], tmp_path / "ref.npz", feature_extractor=TINY, kid=True)


def test_png_tree_and_npz_samples_agree(images, tmp_path: Path):
    SampleWriter(tmp_path / "run", formats=("png",)).write(images["samples_array"], None, range(1990, 2054))
    from_tree = compute_metrics(tmp_path / "run", images["real"], feature_extractor=TINY)
    from_npz = compute_metrics(images["samples"], images["real"], feature_extractor=TINY)
    assert from_tree[KEY_METRIC_FID] == pytest.approx(from_npz[KEY_METRIC_FID], rel=1e-12)


def test_adm_virtual_reference_uses_stats_for_fid_and_images_for_prc_kid(images, tmp_path: Path):
    real = images["real_array"]
    features = quadrant_sums(real.transpose(0, 3, 1, 2).astype(np.float64))
    virtual = tmp_path / "VIRTUAL_tiny.npz"
    # Statistics deliberately of other data: FID must come from them, not from arr_0.
    np.savez(virtual, arr_0=real, mu=features.mean(0) + 1.0, sigma=np.cov(features, rowvar=False))
    result = compute_metrics(images["samples"], virtual, feature_extractor=TINY, isc=True, prc=True, kid=True,
                             kid_subsets=5, kid_subset_size=32, isc_splits=4)
    by_images = compute_metrics(images["samples"], images["real"], feature_extractor=TINY)
    assert result[KEY_METRIC_FID] != pytest.approx(by_images[KEY_METRIC_FID])
    for key in (KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                KEY_METRIC_PRECISION, KEY_METRIC_RECALL, KEY_METRIC_F_SCORE):
        assert np.isfinite(result[key]), key
    assert 0 <= result[KEY_METRIC_PRECISION] <= 1 and result[KEY_NUM_REFERENCE_IMAGES] == 80


def test_fid_formula_matches_edm_on_known_gaussians():
    sigma = np.diag([1.0, 4.0])
    assert frechet_distance(np.zeros(2), sigma, np.ones(2), sigma) == pytest.approx(2.0, abs=1e-12)
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), 4 * np.eye(2)) == pytest.approx(2.0, abs=1e-12)


def test_missing_inception_weights_name_the_file(images, tmp_path: Path):
    for weights in (None, tmp_path / "nowhere.pth"):
        with pytest.raises(MissingWeightsError, match=INCEPTION_WEIGHTS_FILE) as info:
            compute_metrics(images["samples"], images["real"], feature_extractor_weights_path=weights)
        assert "torch-fidelity/releases" in str(info.value)
    unsafe = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({"weight": torch.zeros(1), "extra": Path("x")}, unsafe)
    with pytest.raises(EvaluationError, match="tensors-only"):
        build_reference(images["real"], tmp_path / "ref.npz", feature_extractor_weights_path=unsafe)
    assert not (tmp_path / "ref.npz").exists()


def test_bad_inputs_are_named(images, tmp_path: Path):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(5), sigma=np.eye(5))
    (tmp_path / "empty").mkdir()
    cases = [
        ((tmp_path / "floats.npz", images["real"]), "arr_0 must be uint8"),
        ((tmp_path / "empty", images["real"]), "no .png images"),
        ((images["samples"], tmp_path / "missing.npz"), "no such file"),
        ((images["samples"], tmp_path / "stats.npz"), "dimension 5"),
    ]
    for (samples, reference), message in cases:
        with pytest.raises(EvaluationError, match=message):
            compute_metrics(samples, reference, feature_extractor=TINY)
    with pytest.raises(EvaluationError, match="not registered"):
        compute_metrics(images["samples"], images["real"], feature_extractor="no-such-extractor")


def test_cli_calc_and_ref(images, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(cli, ["fid", "ref", "--images", str(images["real"]), "--out-path",
                                 str(tmp_path / "ref.npz"), "--feature-extractor", TINY])
    assert result.exit_code == 0, result.output
    out = tmp_path / "metrics.json"
    result = runner.invoke(cli, ["fid", "calc", "--samples", str(images["samples"]), "--reference",
                                 str(tmp_path / "ref.npz"), "--feature-extractor", TINY, "--isc",
                                 "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == json.loads(result.output)
    assert json.loads(result.output)[KEY_METRIC_FID] == pytest.approx(
        direct_fid(images["samples_array"], images["real_array"]), rel=1e-6)


def test_cli_bad_input_exits_2_and_writes_nothing(images, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "metrics.json"
    for args, message in [
        (["--reference", str(tmp_path / "missing.npz"), "--feature-extractor", TINY], "no such file"),
        (["--reference", str(images["real"])], INCEPTION_WEIGHTS_FILE),
        (["--reference", str(images["real"]), "--feature-extractor", TINY, "--batch-size", "0"], "--batch-size"),
    ]:
        result = runner.invoke(cli, ["fid", "calc", "--samples", str(images["samples"]), "--json-out", str(out),
                                     *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
    assert not out.exists()
