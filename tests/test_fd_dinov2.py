"""FD-DINOv2 with a tiny random DINOv2: against a direct float64 computation, EDM2's
preprocessing and position-embedding resampling, EDM2's dataset-refs pickles (and hostile ones),
and the CLI."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from click.testing import CliRunner
from PIL import Image
from scipy.linalg import sqrtm
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from transformers import Dinov2Config, Dinov2Model

from elucd_fast.cli import main as cli
from elucd_fast.metrics.dinov2 import Dinov2Detector, load_dinov2, preprocess
from elucd_fast.metrics.edm2_refs import DatasetRefsError, read_dataset_refs
from elucd_fast.metrics.evaluate import (DINOV2_MU_KEY, DINOV2_SIGMA_KEY, KEY_DINOV2_PATH, KEY_FEATURE_EXTRACTOR,
                                 KEY_METRIC_FD_DINOV2, KEY_METRIC_FID, KEY_NUM_REFERENCE_IMAGES, KEY_NUM_SAMPLES,
                                 EvaluationError, MissingWeightsError, build_reference, compute_metrics)

# EDM2's DINOv2Detector: ImageNet normalisation after scaling to [0, 1], at 224 x 224.
EDM2_MEAN, EDM2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEANS = "elucd-test-channel-means"


class ChannelMeans(torch_fidelity.FeatureExtractorBase):
    """Mean and square mean of each channel (6 features): a stand-in for Inception in FID."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("means",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "means"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        x = x.to(torch.float32) / 255
        return (torch.cat([x.mean((2, 3)), (x * x).mean((2, 3))], 1),)


if MEANS not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(MEANS, ChannelMeans)


def tiny_dinov2(image_size: int = 224, seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=image_size, patch_size=14, layerscale_value=0.5)
    return Dinov2Model(config).eval()


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    tiny_dinov2().save_pretrained(folder)
    return folder


def random_images(seed: int, n: int, size: int = 20, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 190, (n, size, size, 3)) + shift * rng.random((n, 1, 1, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("images")
    samples, real = random_images(1, 40, shift=60), random_images(2, 48)
    np.savez(folder / "samples.npz", arr_0=samples)
    np.savez(folder / "real.npz", arr_0=real)
    return {"samples": folder / "samples.npz", "real": folder / "real.npz", "samples_array": samples,
            "real_array": real}


def edm2_pixels(images: np.ndarray, resize_mode: str = "torch") -> torch.Tensor:
    """EDM2's FD-DINOv2 input, written from its formula: bicubic resize to 224 (antialiased on
    float32, or PIL on uint8), then (x / 255 - mean) / std."""
    if resize_mode == "torch":
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
    else:
        x = torch.from_numpy(np.stack([np.array(Image.fromarray(image).resize((224, 224), Image.BICUBIC))
                                       for image in images])).permute(0, 3, 1, 2).to(torch.float32)
    mean = torch.tensor(EDM2_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(EDM2_STD).reshape(1, 3, 1, 1)
    return (x / 255 - mean) / std


def direct_features(folder: Path, images: np.ndarray) -> np.ndarray:
    model = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=edm2_pixels(images)).pooler_output.numpy().astype(np.float64)


def direct_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(np.real(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2))))


def test_fd_dinov2_equals_direct_float64_computation(dinov2_folder, images):
    result = compute_metrics(images["samples"], images["real"], fid=False, fd_dinov2=True,
                             dinov2_path=dinov2_folder, batch_size=16)
    expected = direct_fd(direct_features(dinov2_folder, images["samples_array"]),
                         direct_features(dinov2_folder, images["real_array"]))
    assert expected > 0.1
    assert result[KEY_METRIC_FD_DINOV2] == pytest.approx(expected, rel=1e-6)
    assert result[KEY_NUM_SAMPLES] == 40 and result[KEY_NUM_REFERENCE_IMAGES] == 48
    assert result[KEY_DINOV2_PATH] == str(dinov2_folder)
    assert KEY_METRIC_FID not in result and KEY_FEATURE_EXTRACTOR not in result
    # Batches only stream the images: another batch size gives the same statistics.
    again = compute_metrics(images["samples"], images["real"], fid=False, fd_dinov2=True,
                            dinov2_path=dinov2_folder, batch_size=7)
    assert again[KEY_METRIC_FD_DINOV2] == pytest.approx(result[KEY_METRIC_FD_DINOV2], rel=1e-6)


@pytest.mark.parametrize("resize_mode", ["torch", "pil"])
def test_preprocessing_equals_edm2_formula(resize_mode):
    rng = np.random.default_rng(3)
    for shape in ((3, 37, 53, 3), (2, 224, 224, 3), (2, 300, 260, 3)):
        images = rng.integers(0, 256, shape).astype(np.uint8)
        ours = preprocess(torch.from_numpy(images).permute(0, 3, 1, 2), resize_mode)
        assert ours.dtype == torch.float32 and ours.shape == (shape[0], 3, 224, 224)
        torch.testing.assert_close(ours, edm2_pixels(images, resize_mode), rtol=0, atol=0)
    # At 224 pixels the resize keeps the image: only the normalisation is left.
    images = rng.integers(0, 256, (1, 224, 224, 3)).astype(np.uint8)
    plain = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255 - torch.tensor(EDM2_MEAN).reshape(1, 3, 1, 1)) \
        / torch.tensor(EDM2_STD).reshape(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(torch.from_numpy(images).permute(0, 3, 1, 2), resize_mode), plain,
                               rtol=0, atol=2e-6)
    with pytest.raises(EvaluationError, match="uint8"):
        preprocess(torch.zeros(1, 3, 8, 8), resize_mode)


def cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 neighbours at fractional offset t (PyTorch's a)."""
    def w(x):
        x = abs(x)
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1 if x <= 1 else a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return np.array([w(t + 1), w(t), w(1 - t), w(2 - t)])


def dinov2_resample(table: np.ndarray, grid: int, offset: float = 0.1) -> np.ndarray:
    """DINOv2's resampling of an (M, M, D) position table to (G, G, D), written out in numpy:
    bicubic, no antialiasing, source coordinate (i + 0.5) / s - 0.5 with s = (G + offset) / M
    (transformers' has offset 0)."""
    side = table.shape[0]
    scale = (grid + offset) / side
    matrix = np.zeros((grid, side))
    for i in range(grid):
        source = (i + 0.5) / scale - 0.5
        base = int(np.floor(source))
        for k, weight in enumerate(cubic_weights(source - base)):
            matrix[i, min(max(base - 1 + k, 0), side - 1)] += weight
    return np.einsum("im,jn,mnd->ijd", matrix, matrix, table)


def test_position_embeddings_resampled_as_dinov2_does():
    model = tiny_dinov2(image_size=98)                                      # a 7 x 7 grid of patches
    table = model.embeddings.position_embeddings.detach().numpy().astype(np.float64)
    x = preprocess(torch.from_numpy(random_images(4, 2)).permute(0, 3, 1, 2))
    with torch.no_grad():
        transformers_own = model(pixel_values=x).pooler_output
    detector = Dinov2Detector(model)
    resampled = detector.model.embeddings.position_embeddings.detach().numpy()
    assert resampled.shape == (1, 1 + 16 * 16, 24)
    np.testing.assert_array_equal(resampled[0, 0], table[0, 0].astype(np.float32))
    expected = dinov2_resample(table[0, 1:].reshape(7, 7, 24), 16).reshape(256, 24)
    np.testing.assert_allclose(resampled[0, 1:], expected, rtol=0, atol=1e-5)
    # transformers' own resampling (to the exact size 16 x 16) samples elsewhere.
    transformers_table = dinov2_resample(table[0, 1:].reshape(7, 7, 24), 16, offset=0).reshape(256, 24)
    assert np.abs(resampled[0, 1:] - transformers_table).max() > 100 * 1e-5
    with torch.no_grad():
        ours = detector(torch.from_numpy(random_images(4, 2)).permute(0, 3, 1, 2))
    assert (ours - transformers_own).abs().max() > 1e-4


def edm2_style_refs(path: Path, features: dict[str, np.ndarray], protocol: int = pickle.DEFAULT_PROTOCOL) -> dict:
    """What EDM2's `calculate_metrics.py ref` saves: plain `pickle.dump` of numpy statistics."""
    stats = {"num_images": len(next(iter(features.values())))}
    for metric, f in features.items():
        f = torch.from_numpy(f).to(torch.float64)
        mu = f.sum(0) / len(f)
        sigma = (f.T @ f - mu.ger(mu) * len(f)) / (len(f) - 1)
        stats[metric] = {"mu": mu.numpy(), "sigma": sigma.numpy()}
    with open(path, "wb") as file:
        pickle.dump(stats, file, protocol=protocol)
    return stats


def test_dataset_refs_round_trip(tmp_path: Path):
    rng = np.random.default_rng(5)
    features = {"fid": rng.normal(size=(30, 6)), "fd_dinov2": rng.normal(size=(30, 4))}
    for protocol in (3, 4, 5):
        stats = edm2_style_refs(tmp_path / "refs.pkl", features, protocol)
        read = read_dataset_refs(tmp_path / "refs.pkl")
        assert sorted(read) == ["fd_dinov2", "fid", "num_images"] and read["num_images"] == 30
        for metric in ("fid", "fd_dinov2"):
            for key in ("mu", "sigma"):
                assert read[metric][key].dtype == np.float64
                np.testing.assert_array_equal(read[metric][key], stats[metric][key])
    # numpy 2 writes numpy._core where numpy 1 writes numpy.core.
    blob = pickle.dumps(stats, protocol=3).replace(b"cnumpy.core.multiarray\n", b"cnumpy._core.multiarray\n")
    assert b"numpy._core" in blob
    (tmp_path / "numpy2.pkl").write_bytes(blob)
    np.testing.assert_array_equal(read_dataset_refs(tmp_path / "numpy2.pkl")["fid"]["sigma"], stats["fid"]["sigma"])


def test_stored_references_give_the_same_fd_dinov2(dinov2_folder, images, tmp_path: Path):
    kwargs = {"fid": False, "fd_dinov2": True, "dinov2_path": dinov2_folder, "batch_size": 16}
    from_images = compute_metrics(images["samples"], images["real"], **kwargs)[KEY_METRIC_FD_DINOV2]
    edm2_style_refs(tmp_path / "edm2.pkl", {"fd_dinov2": direct_features(dinov2_folder, images["real_array"])})
    from_edm2 = compute_metrics(images["samples"], tmp_path / "edm2.pkl", **kwargs)
    assert from_edm2[KEY_METRIC_FD_DINOV2] == pytest.approx(from_images, rel=1e-6)
    assert KEY_NUM_REFERENCE_IMAGES not in from_edm2
    for name in ("ours.npz", "ours.pkl"):
        summary = build_reference(images["real"], tmp_path / name, **kwargs)
        assert summary["metrics"] == ["fd_dinov2"] and summary["num_images"] == 48
        result = compute_metrics(images["samples"], tmp_path / name, **kwargs)
        assert result[KEY_METRIC_FD_DINOV2] == pytest.approx(from_images, rel=1e-12)
    with np.load(tmp_path / "ours.npz") as npz:
        assert sorted(npz.files) == [DINOV2_MU_KEY, DINOV2_SIGMA_KEY] and npz[DINOV2_SIGMA_KEY].shape == (24, 24)
    with open(tmp_path / "ours.pkl", "rb") as file:                   # as EDM2's load_stats reads it
        theirs = pickle.load(file)
    assert sorted(theirs) == ["fd_dinov2", "num_images"] and theirs["num_images"] == 48
    assert sorted(theirs["fd_dinov2"]) == ["mu", "sigma"] and theirs["fd_dinov2"]["mu"].dtype == np.float64
    with pytest.raises(EvaluationError, match=r"statistics only; these need reference images .*: FID$"):
        compute_metrics(images["samples"], tmp_path / "ours.pkl", fid=True, feature_extractor=MEANS)


class RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Evaluates:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


def test_hostile_pickles_are_refused_without_running(tmp_path: Path, images, dinov2_folder):
    marker = tmp_path / "ran"
    sigma = np.eye(3)
    hostile = {
        "system": {"num_images": 5, "fid": {"mu": RunsCommand(marker), "sigma": sigma}},
        "eval": {"fd_dinov2": {"mu": np.zeros(3), "sigma": Evaluates(marker)}},
        "object_array": {"fid": {"mu": np.array([1.0, None, 2.0], dtype=object), "sigma": sigma}},
        "not_stats": [np.zeros(3)],
    }
    for name, value in hostile.items():
        (tmp_path / f"{name}.pkl").write_bytes(pickle.dumps(value))
    messages = {}
    for name in hostile:
        with pytest.raises(DatasetRefsError) as info:
            read_dataset_refs(tmp_path / f"{name}.pkl")
        messages[name] = str(info.value)
    assert "posix.system" in messages["system"] and "nothing was run" in messages["system"]
    assert "builtins.eval" in messages["eval"]
    assert "not numeric" in messages["object_array"]
    assert "not EDM2's dict" in messages["not_stats"]
    # An array whose state claims more data than the file holds.
    blob = pickle.dumps({"fid": {"mu": np.zeros(4), "sigma": np.eye(4)}}, protocol=3)
    (tmp_path / "short.pkl").write_bytes(blob.replace(b"K\x04\x85", b"M\x00\x10\x85", 1))
    with pytest.raises(DatasetRefsError, match="array data of 32 bytes"):
        read_dataset_refs(tmp_path / "short.pkl")
    with pytest.raises(EvaluationError, match="refused as EDM2 dataset-refs"):
        compute_metrics(images["samples"], tmp_path / "system.pkl", fid=False, fd_dinov2=True,
                        dinov2_path=dinov2_folder)
    assert not marker.exists()


def test_loading_refuses_other_or_incomplete_models(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    tiny_dinov2().save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layer.1." not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(EvaluationError, match="not hold a complete DINOv2 model.*missing keys"):
        load_dinov2(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(EvaluationError, match="'vit' model"):
        load_dinov2(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="no model.safetensors"):
        load_dinov2(folder)
    for path, message in ((None, "none was given"), (tmp_path / "nowhere", "nowhere is missing")):
        with pytest.raises(MissingWeightsError, match=message) as info:
            load_dinov2(path)
        assert "facebook/dinov2-large" in str(info.value) and "save_pretrained" in str(info.value)


def test_cli_fid_and_fd_dinov2_end_to_end(dinov2_folder, images, tmp_path: Path):
    runner = CliRunner()
    common = ["--dinov2", str(dinov2_folder), "--feature-extractor", MEANS, "--batch-size", "16"]
    result = runner.invoke(cli, ["fid", "ref", "--images", str(images["real"]), "--out-path", str(tmp_path / "ref.pkl"),
                                 "--metrics", "fid,fd_dinov2", *common])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["metrics"] == ["fid", "fd_dinov2"]
    out = tmp_path / "metrics.json"
    result = runner.invoke(cli, ["fid", "calc", "--samples", str(images["samples"]), "--reference",
                                 str(tmp_path / "ref.pkl"), "--metrics", "fid,fd_dinov2", "--json-out", str(out),
                                 *common])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert json.loads(out.read_text()) == metrics
    by_images = compute_metrics(images["samples"], images["real"], feature_extractor=MEANS, fd_dinov2=True,
                                dinov2_path=dinov2_folder)
    assert metrics[KEY_METRIC_FID] == pytest.approx(by_images[KEY_METRIC_FID], rel=1e-9)
    assert metrics[KEY_METRIC_FD_DINOV2] == pytest.approx(
        direct_fd(direct_features(dinov2_folder, images["samples_array"]),
                  direct_features(dinov2_folder, images["real_array"])), rel=1e-6)
    # fd_dinov2 alone needs no Inception weights (the default extractor would ask for them).
    result = runner.invoke(cli, ["fid", "calc", "--samples", str(images["samples"]), "--reference",
                                 str(images["real"]), "--metrics", "fd_dinov2", "--dinov2", str(dinov2_folder)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[KEY_METRIC_FD_DINOV2] == pytest.approx(metrics[KEY_METRIC_FD_DINOV2], rel=1e-6)


def test_cli_bad_input_exits_2_and_writes_nothing(dinov2_folder, images, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "metrics.json"
    (tmp_path / "hostile.pkl").write_bytes(pickle.dumps({"fid": RunsCommand(tmp_path / "ran")}))
    samples, real = ["--samples", str(images["samples"])], ["--reference", str(images["real"])]
    cases = [
        ([*samples, *real, "--metrics", "fd_dinov2", "--dinov2", str(tmp_path / "no-such-folder")],
         ["no-such-folder is missing", "facebook/dinov2-large"]),
        ([*samples, *real, "--metrics", "fd_dinov2"], ["none was given", "save_pretrained"]),
        ([*samples, *real, "--metrics", "fid,fd_dino", "--dinov2", str(dinov2_folder)],
         ["unknown metric 'fd_dino'", "fid, fd_dinov2"]),
        ([*samples, "--reference", str(tmp_path / "hostile.pkl"), "--metrics", "fd_dinov2", "--dinov2",
          str(dinov2_folder)], ["posix.system", "nothing was run"]),
    ]
    for args, messages in cases:
        result = runner.invoke(cli, ["fid", "calc", "--json-out", str(out), *args])
        assert result.exit_code == 2, result.output
        for message in messages:
            assert message in result.output
    result = runner.invoke(cli, ["fid", "ref", "--images", str(images["real"]), "--out-path", str(tmp_path / "r.npz"),
                                 "--metrics", "fd_dinov2", "--dinov2", str(tmp_path / "no-such-folder")])
    assert result.exit_code == 2 and "no-such-folder is missing" in result.output
    assert not out.exists() and not (tmp_path / "r.npz").exists() and not (tmp_path / "ran").exists()
