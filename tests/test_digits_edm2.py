"""The digits benchmark's EDM2-style row: the shipped EDM2 network and its autoguidance guide
(verified, tamper-refused, strictly loaded), EDM2's training pieces (learning rate, power-function
EMA, loss), a deterministic training stage, and the four presets sampling and guiding."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from elucd_fast.cli import main
from elucd_fast.digits import load
from elucd_fast.digits.data import load_digits_split
from elucd_fast.digits.networks import EDM2_DENOISER_KWARGS, EDM2_GUIDE_KWARGS, build_edm2_denoiser, build_edm2_guide
from elucd_fast.digits.train import (EDM2Loss, TrainSettings, inverse_sqrt_learning_rate, power_ema_beta,
                                     power_ema_exponent, train_edm2_denoiser)
from elucd_fast.models.edm2_networks import EDM2Precond
from elucd_fast.presets import DigitsEDM2Preset, build_job, get_preset
from elucd_fast.samplers import EDM2Settings

from digits_sampling import preset_accuracy

EDM2_PRESETS = ("digits-edm2", "digits-edm2-cls", "digits-edm2-autog", "digits-edm2-autog-cls")


def test_edm2_weights_verify_and_load_strictly():
    manifest = load.read_manifest()
    for key, kwargs in (("edm2_denoiser", EDM2_DENOISER_KWARGS), ("edm2_guide", EDM2_GUIDE_KWARGS)):
        assert manifest["architectures"][key] == json.loads(json.dumps({"class": "EDM2Precond", **kwargs}))
        assert manifest["train_seconds"][key] > 0
    extra = manifest["files"]["edm2_denoiser"]["bytes"] + manifest["files"]["edm2_guide"]["bytes"]
    assert extra < 3e6
    net, guide = load.load_edm2_denoiser(), load.load_edm2_guide()
    assert isinstance(net, EDM2Precond) and isinstance(guide, EDM2Precond)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    # The guide is the same architecture at half width.
    assert guide.unet.enc["8x8_conv"].out_channels * 2 == net.unet.enc["8x8_conv"].out_channels
    assert sum(p.numel() for p in guide.parameters()) < sum(p.numel() for p in net.parameters()) / 3
    # Strict: a state dict with a key missing is refused.
    from elucd_fast.models.checkpoint import CheckpointError, load_state_dict_strict

    state = dict(net.state_dict())
    state.pop("unet.out_gain")
    with pytest.raises(CheckpointError):
        load_state_dict_strict(build_edm2_denoiser(), state, "edm2-denoiser")
    _, _, test_x, test_y = load_digits_split()
    labels = torch.nn.functional.one_hot(test_y, 10).float()
    with torch.no_grad():
        for module in (net, guide):
            before = {k: v.clone() for k, v in module.state_dict().items()}
            denoised = module(test_x + 0.5 * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(0)),
                              torch.tensor(0.5), labels)
            assert denoised.shape == test_x.shape and torch.isfinite(denoised).all()
            # Eval mode: the forced weight normalisation of training leaves the loaded weights alone.
            assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
            # A trained denoiser at sigma 0.5 lands nearer the clean digits than the noisy input.
            noisy_error = 0.5
            assert float((denoised - test_x).square().mean().sqrt()) < noisy_error


def test_a_tampered_edm2_copy_is_refused(tmp_path):
    copy = tmp_path / "weights"
    shutil.copytree(load.WEIGHTS_DIR, copy)
    load.load_edm2_guide(copy)
    path = copy / load.FILES["edm2_guide"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(load.DemoWeightsError, match="sha256"):
        load.load_edm2_guide(copy)
    with pytest.raises(load.DemoWeightsError, match="sha256"):
        build_job("digits-edm2-autog", weights_dir=copy)
    load.load_edm2_denoiser(copy)  # the other files are still fine
    build_job("digits-edm2", weights_dir=copy)  # a preset without a guide does not read the guide file


def test_inverse_sqrt_learning_rate():
    lr = lambda step: inverse_sqrt_learning_rate(step, 0.01, 500, 100)  # noqa: E731
    assert lr(0) == pytest.approx(0.01 / 100) and lr(49) == pytest.approx(0.005)
    assert lr(99) == lr(499) == pytest.approx(0.01)
    assert lr(1999) == pytest.approx(0.01 / 2) and lr(7999) == pytest.approx(0.01 / 4)
    assert inverse_sqrt_learning_rate(10, 0.01, 0, 0) == 0.01


def test_power_function_ema():
    for std in (0.05, 0.1, 0.2):
        gamma = power_ema_exponent(std)
        assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(std, rel=1e-9)
    assert power_ema_exponent(0.05) > power_ema_exponent(0.1) > power_ema_exponent(0.2) > -1
    with pytest.raises(ValueError, match="std"):
        power_ema_exponent(0.8)
    # Averaging x_t = t over t = 1 ... T: beta_t = W_{t-1} / W_t with W_t = t^(gamma + 1), so the EMA is
    # exactly the mean weighted by W_t - W_{t-1} (about (gamma + 1) t^gamma: the power-function profile).
    gamma, total, ema = power_ema_exponent(0.1), 1000, 0.0
    for step in range(total):
        beta = power_ema_beta(step, gamma)
        ema = beta * ema + (1 - beta) * (step + 1)
    assert power_ema_beta(0, gamma) == 0
    weights = [t ** (gamma + 1) - (t - 1) ** (gamma + 1) for t in range(1, total + 1)]
    expected = sum(w * t for w, t in zip(weights, range(1, total + 1))) / total ** (gamma + 1)
    assert ema == pytest.approx(expected, rel=1e-9)
    power_mean = sum(t ** (gamma + 1) for t in range(1, total + 1)) / sum(t ** gamma for t in range(1, total + 1))
    assert ema == pytest.approx(power_mean, rel=1e-3)


def test_edm2_loss_uses_the_learned_uncertainty():
    net = build_edm2_guide().train()
    images = torch.zeros(4, 1, 8, 8)
    labels = torch.nn.functional.one_hot(torch.arange(4), 10).float()
    loss_fn = EDM2Loss(P_mean=-0.8, P_std=1.6)
    loss = loss_fn(net, images, labels, torch.Generator().manual_seed(0))
    sigma, weight, noisy = loss_fn.noised(images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.unet.out_gain.fill_(0)
        net.logvar_linear.weight.fill_(0)
    # At initialisation (zero output gain, u = 0 when its weights are zero) D(x) = c_skip x.
    with torch.no_grad():
        zero = loss_fn(net, images, labels, torch.Generator().manual_seed(0))
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(zero, weight * (c_skip * noisy) ** 2)
    assert loss.shape == images.shape and torch.isfinite(loss).all()


@pytest.mark.slow
def test_edm2_training_is_deterministic():
    train_x, train_y, _, _ = load_digits_split()
    settings = TrainSettings(edm2_lr_rampup_steps=2)

    def train():
        threads = torch.get_num_threads()
        torch.use_deterministic_algorithms(True)
        try:
            return train_edm2_denoiser(build_edm2_guide, train_x, train_y, seed=settings.edm2_guide_seed, steps=4,
                                       ema_std=0.1, settings=settings, what="guide", log=lambda message: None)
        finally:
            torch.use_deterministic_algorithms(False)
            torch.set_num_threads(threads)

    (first, loss), (second, loss_again) = train(), train()
    assert loss == loss_again
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    torch.manual_seed(settings.edm2_guide_seed)
    initial = build_edm2_guide()
    assert not torch.equal(initial.unet.enc["8x8_conv"].weight, first.unet.enc["8x8_conv"].weight)


def test_edm2_presets_and_their_jobs():
    assert all(isinstance(get_preset(name), DigitsEDM2Preset) for name in EDM2_PRESETS)
    plain, cls, autog, both = (build_job(name) for name in EDM2_PRESETS)
    for job in (plain, cls, autog, both):
        assert job.sampler == "edm2" and isinstance(job.settings, EDM2Settings)
        assert job.image_shape == (1, 8, 8) and job.num_classes == 10
        assert set(job.config["weights_sha256"]) == {"classifier", "evaluator", "edm2_denoiser", "edm2_guide",
                                                     "reference"}
        json.dumps(job.config, allow_nan=False)
    assert plain.guidance is None and plain.guide_net is None and plain.settings.guide_weight == 1
    assert cls.guidance is not None and cls.guide_net is None
    assert autog.guidance is None and autog.guide_net is not None and autog.settings.guide_weight > 1
    assert both.guidance is not None and both.guide_net is not None
    assert both.settings.guide_weight == autog.settings.guide_weight
    assert build_job("digits-edm2", guide_weight=2.0).guide_net is not None
    with pytest.raises(ValueError, match="not used by"):
        build_job("digits-edm2", max_guidance=0.01)
    with pytest.raises(ValueError, match="not a setting"):
        build_job("digits-edm2", cfg_scale=2.0)


def test_generate_cli_runs_the_combined_preset(tmp_path):
    outdir = tmp_path / "run"
    result = CliRunner().invoke(main, ["generate", "--preset", "digits-edm2-autog-cls", "--seeds", "0-5", "--steps",
                                       "3", "--guide-weight", "2", "--outdir", str(outdir), "--no-metrics",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    with np.load(outdir / "samples.npz") as data:
        assert data["arr_0"].shape == (6, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    settings = json.loads((outdir / "metrics.json").read_text())["config"]["preset"]["settings"]
    assert settings["guide_weight"] == 2.0 and settings["num_steps"] == 3


# Class accuracy by the evaluation network on seeds 0-299, 300-599, 600-899 (shipped weights):
#   digits-edm2 (the network alone)            0.973  0.983  0.980
#   digits-edm2-cls (classifier term alone)    0.987  0.993  0.987
#   digits-edm2-autog (autoguidance alone)     0.987  0.990  0.983
#   digits-edm2-autog-cls (both)               0.993  0.997  0.997
# Autoguidance's main gain is FD (README), which 300 samples cannot resolve; accuracy is checked.
SEEDS = range(300)


@pytest.mark.slow
def test_each_guidance_does_its_job():
    plain, cls, autog, both = (preset_accuracy(name, SEEDS) for name in EDM2_PRESETS)
    assert cls > plain and both > autog >= plain, (plain, cls, autog, both)
