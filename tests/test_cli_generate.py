"""`elucd-fast generate` end to end on the digits preset, and its refusal of bad flags."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from elucd_fast.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("generate") / "digits"
    result = CliRunner().invoke(main, ["generate", "--seeds", "0-99", "--batch", "64", "--outdir", str(outdir),
                                       "--formats", "npz,png", "--no-progress"])
    assert result.exit_code == 0, result.output
    return outdir


def test_samples_npz(run_dir):
    with np.load(run_dir / "samples.npz") as data:
        assert set(data.files) == {"arr_0", "arr_1"}
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (100, 8, 8, 1)
    assert labels.dtype == np.int64 and labels.shape == (100,) and 0 <= labels.min() and labels.max() < 10
    assert len(list(run_dir.glob("shards/*.npz"))) == 2  # batches of 64 and 36
    png = np.asarray(Image.open(run_dir / "000000" / "000007.png"))
    assert png.shape == (8, 8) and np.array_equal(png, images[7, :, :, 0])


def test_grid_png(run_dir):
    with Image.open(run_dir / "grid.png") as grid:
        assert grid.size == (10 * (8 * 4 + 2) + 2, 10 * (8 * 4 + 2) + 2) and grid.mode == "L"


def test_metrics_json(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("class_accuracy", "fd_digits", "precision", "recall", "images_per_second",
                "config", "feature_extractor", "fd_train_vs_test_real", "num_samples"):
        assert key in metrics, key
    assert metrics["feature_extractor"] == "digits-eval" and metrics["num_samples"] == 100
    assert 0.8 < metrics["class_accuracy"] <= 1 and np.isfinite(metrics["fd_digits"])
    assert metrics["config"]["preset"]["preset"] == "digits" and metrics["config"]["preset"]["guidance"] is True


def test_rerun_resumes_without_regenerating(run_dir):
    before = (run_dir / "samples.npz").read_bytes()
    result = CliRunner().invoke(main, ["generate", "--seeds", "0-99", "--batch", "64", "--outdir", str(run_dir),
                                       "--formats", "npz,png", "--no-progress", "--no-metrics"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "metrics.json").read_text())["skipped_finished_seeds"] == 100
    assert (run_dir / "samples.npz").read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "5-1"], "backwards"),
    (["--steps", "1"], "num_steps"),
    (["--softplus-beta", "-1"], "softplus_beta"),
    (["--no-guidance", "--max-guidance", "0.1"], "not used by"),
    (["--classifier-scale", "2"], "not used by"),
    (["--network", "edm.pkl"], "not a setting"),
    (["--class", "10"], "class_label"),
    (["--formats", "jpg"], "formats"),
    (["--preset", "imagenet"], "imagenet"),
    (["--batch", "0"], "batch_size"),
])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, flags, message):
    outdir = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--outdir", str(outdir), "--seeds", "0-3", *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not outdir.exists()


@pytest.mark.parametrize("cpu_bf16", [False], indirect=True)
def test_bf16_on_a_cpu_without_it_is_refused(tmp_path, cpu_bf16):
    # Every machine runs this branch: the CPU's bf16 probe is overridden.
    outdir = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--outdir", str(outdir), "--seeds", "0-3", "--precision", "bf16"])
    assert result.exit_code == 2, result.output
    assert "bf16 needs AMX/AVX512-BF16 (CPU) or sm80+ (GPU); cpu has neither" in result.output
    assert result.exc_info is None or isinstance(result.exc_info[1], SystemExit)
    assert not outdir.exists()
