"""The paper's result-table presets: rows, expected files, and building each kind of job from
tiny models saved in the real checkpoint formats."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision

from elucd_fast.models.adm_unet import create_adm_model
from elucd_fast.models.checkpoint import CheckpointError
from elucd_fast.presets import get_preset, list_presets
from elucd_fast.guidance import GuidanceSettings
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers import EDMSettings
from test_adm_unet import TINY_FLAGS
from test_dit import TINY, TINY_VAE, _tiny_dit
import edm_fixtures

PAPER_ROWS = {  # name: (unguided FID, guided FID) as SPEC.md reports them
    "edm64-10": (3.64, 3.38), "edm64-18": (2.54, 2.35), "edm64-36": (2.35, 2.22), "edm64-sde256": (1.41, 1.33),
    "ddpm128-r101": (5.91, 2.19), "ddpm128-r50": (5.91, 2.36), "dit256": (2.27, 2.12),
}


def test_every_paper_row_is_a_preset_with_its_settings():
    assert set(PAPER_ROWS) <= set(list_presets())
    for name, fid in PAPER_ROWS.items():
        assert get_preset(name).paper_fid == fid
    edm = get_preset("edm64-36")
    assert edm.guidance_settings == GuidanceSettings(softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0)
    assert edm.settings == EDMSettings(num_steps=36, max_guidance=0.0018, add_factor=0.3)
    sde = get_preset("edm64-sde256").settings
    assert (sde.S_churn, sde.S_min, sde.S_max, sde.S_noise, sde.max_guidance) == (40, 0.05, 50, 1.003, 0.001)
    ddpm = get_preset("ddpm128-r50")
    assert (ddpm.guidance_settings.softplus_beta, ddpm.guidance_settings.marginal_temperature,
            ddpm.settings.gamma_factor) == (3.0, 0.5, 0.3)
    assert ddpm.classifier_file == "resnet50-11ad3fa6.pth" and ddpm.quantize == "floor"


def test_missing_files_are_named_with_their_source(tmp_path):
    with pytest.raises(CheckpointError, match=r"needs --network PATH: the file edm-imagenet-64x64-cond-adm.pkl from"):
        get_preset("edm64-18").build()
    with pytest.raises(CheckpointError, match=r"--classifier: no such file: .*resnet101-cd907fc2.pth"):
        get_preset("edm64-18").build(network=tmp_path, classifier=tmp_path / "nothing.pth")


def test_overrides_are_checked():
    with pytest.raises(ValueError, match="not a setting"):
        get_preset("edm64-18").build(cfg_scale=2.0)
    with pytest.raises(ValueError, match="softplus_beta"):
        get_preset("edm64-18").configure(softplus_beta=0.0)
    assert get_preset("edm64-18").configure(num_steps=5).settings.num_steps == 5


def _classifier_file(tmp_path, num_classes):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=num_classes).state_dict(), path)
    return path


def tiny_ddpm_row(tmp_path):
    """(network file, preset): the ddpm128-r101 row over a tiny ADM network saved as a plain state
    dict (guided-diffusion's release format) in tmp_path, with a 10-class ResNet-18 at 32x32."""
    network = tmp_path / "adm.pt"
    torch.save(create_adm_model(**TINY_FLAGS).state_dict(), network)
    preset = replace(get_preset("ddpm128-r101"), classifier_arch="resnet18", image_shape=(3, 32, 32), num_classes=10,
                     network_kwargs={k: v for k, v in TINY_FLAGS.items() if k != "image_size"})
    return network, preset


def _sample(job, seeds=(0, 1)):
    rnd = StackedRandomGenerator("cpu", seeds)
    noise = rnd.randn([len(seeds), *job.noise_shape])
    labels = rnd.randint(job.num_classes, size=[len(seeds)])
    return job.sample(noise, labels, rnd.randn_like)


def test_edm_row_builds_from_an_edm_pickle(tmp_path):
    net = edm_fixtures.build_edm_network(
        "EDMPrecond", img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet", model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    network = edm_fixtures.write_edm_snapshot(tmp_path / "edm.pkl", net)
    preset = replace(get_preset("edm64-18"), classifier_arch="resnet18", image_shape=(3, 16, 16), num_classes=10)
    job = preset.build(network=network, classifier=_classifier_file(tmp_path, 10), num_steps=3)
    assert job.config["network_sha256"] and job.config["preset"]["preset"] == "edm64-18"
    images = _sample(job)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_ddpm_row_builds_from_an_adm_state_dict(tmp_path):
    network, preset = tiny_ddpm_row(tmp_path)
    job = preset.build(network=network, classifier=_classifier_file(tmp_path, 10), timestep_respacing="4")
    images = _sample(job)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    unguided = preset.build(network=network, guidance=False, timestep_respacing="4")  # no classifier needed
    assert unguided.guidance is None and "classifier_scale" not in unguided.config["preset"]["settings"]
    assert torch.isfinite(_sample(unguided)).all()


def test_dit_row_builds_with_its_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**TINY_VAE).eval().save_pretrained(tmp_path / "vae")
    network = tmp_path / "dit.pt"
    torch.save(_tiny_dit().state_dict(), network)
    with pytest.raises(CheckpointError, match="needs --vae PATH"):
        get_preset("dit256").build(network=network, classifier=_classifier_file(tmp_path, 10))
    preset = replace(get_preset("dit256"), classifier_arch="resnet18", image_shape=(3, 64, 64), num_classes=10,
                     network_kwargs=dict(model=TINY, num_classes=10))
    job = preset.build(network=network, classifier=_classifier_file(tmp_path, 10), vae=tmp_path / "vae",
                       timestep_respacing="3")
    assert job.noise_shape == (4, 8, 8)
    images = _sample(job)
    assert images.shape[:2] == (2, 3) and torch.isfinite(images).all() and images.abs().max() <= 1


def test_the_papers_classifier_files_are_the_v2_weights():
    from elucd_fast.presets import PAPER_PRESETS
    from elucd_fast.presets.checkpoint import TORCHVISION_SOURCE

    assert {p.classifier_file for p in PAPER_PRESETS} == {"resnet101-cd907fc2.pth", "resnet50-11ad3fa6.pth"}
    assert "IMAGENET1K_V2" in TORCHVISION_SOURCE and "IMAGENET1K_V1" not in TORCHVISION_SOURCE
    assert get_preset("ddpm128-r50").classifier_sha256_prefix == "11ad3fa6"


def test_another_classifier_file_is_used_with_a_note(tmp_path):
    from elucd_fast.models.checkpoint import sha256_file

    network, preset = tiny_ddpm_row(tmp_path)
    classifier = _classifier_file(tmp_path, 10)
    job = preset.build(network=network, classifier=classifier, timestep_respacing="2")
    (note,) = job.notes
    assert note.startswith(f"classifier: {classifier} is not the paper's resnet101-cd907fc2.pth")
    assert "IMAGENET1K_V2" in note and "guiding with it anyway" in note
    assert job.config["classifier_sha256"] == sha256_file(classifier)


@pytest.fixture
def tiny_rows(tmp_path, monkeypatch):
    """The ddpm128-r101 and dit256 rows on tiny stand-ins of the real file formats, registered
    under their own names so the command line runs them."""
    from elucd_fast.presets import PRESETS

    diffusers = pytest.importorskip("diffusers")
    network, ddpm_row = tiny_ddpm_row(tmp_path)
    monkeypatch.setitem(PRESETS, "ddpm128-r101", ddpm_row)
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**TINY_VAE).eval().save_pretrained(tmp_path / "vae")
    torch.save(_tiny_dit().state_dict(), tmp_path / "dit.pt")
    monkeypatch.setitem(PRESETS, "dit256", replace(
        get_preset("dit256"), classifier_arch="resnet18", image_shape=(3, 64, 64), num_classes=10,
        network_kwargs=dict(model=TINY, num_classes=10)))
    return {"classifier": _classifier_file(tmp_path, 10), "adm": network, "dit": tmp_path / "dit.pt",
            "vae": tmp_path / "vae"}


@pytest.mark.parametrize("row,steps,extra", [
    ("ddpm128-r101", 25, []),
    ("ddpm128-r101", 5, ["--ddim", "--gamma-factor", "0", "--eta", "0.5"]),
    ("dit256", 50, []),
])
def test_the_command_line_sets_the_steps_of_ddpm_and_dit_rows(tiny_rows, tmp_path, row, steps, extra):
    import json

    from click.testing import CliRunner

    from elucd_fast.cli import main

    files = ["--network", str(tiny_rows["adm" if row.startswith("ddpm") else "dit"]),
             "--classifier", str(tiny_rows["classifier"])]
    if row == "dit256":
        files += ["--vae", str(tiny_rows["vae"])]
    outdir = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--preset", row, "--steps", str(steps), "--seeds", "0-1",
                                       "--batch", "2", "--outdir", str(outdir), "--no-progress", *files, *extra])
    assert result.exit_code == 0, result.output
    assert "is not the paper's resnet101-cd907fc2.pth" in result.output
    settings = json.loads((outdir / "run.json").read_text())["config"]["preset"]["settings"]
    assert settings["timestep_respacing"] == str(steps)
    assert settings.get("use_ddim", False) == ("--ddim" in extra)
    with np.load(outdir / "samples.npz") as data:
        assert data["arr_0"].shape[0] == 2


def test_command_line_settings_are_checked_before_any_file_is_read(tmp_path):
    from click.testing import CliRunner

    from elucd_fast.cli import main

    missing = str(tmp_path / "no-such.pt")
    for flags, message in ((["--steps", "1"], "num_steps: must be an integer in [2, 1000]"),
                           (["--ddim"], "gamma_factor: the sine-added variance is defined for ancestral"),
                           (["--max-guidance", "0.1"], "max_guidance: not a setting of preset 'ddpm128-r101'")):
        result = CliRunner().invoke(main, ["generate", "--preset", "ddpm128-r101", "--network", missing,
                                           "--outdir", str(tmp_path / "out"), *flags])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,size,conditional", [("adm64", 64, True), ("adm256", 256, True),
                                                   ("adm256-uncond", 256, False), ("adm512", 512, True)])
def test_zoo_rows_build_from_adm_state_dicts(tmp_path, name, size, conditional):
    preset = get_preset(name)
    assert preset.image_shape == (3, size, size) and preset.paper_fid is None and "untuned" in preset.settings_note
    assert preset.settings.beta_schedule == ("cosine" if size == 64 else "linear")
    tiny = dict(TINY_FLAGS, class_cond=conditional)
    network = tmp_path / "adm.pt"
    torch.save(create_adm_model(**tiny).state_dict(), network)
    flags = {k: v for k, v in tiny.items() if k != "image_size"}
    job = replace(preset, classifier_arch="resnet18", image_shape=(3, 32, 32), num_classes=10,
                  network_kwargs=flags).build(network=network, classifier=_classifier_file(tmp_path, 10), num_steps=2)
    assert (getattr(job.net, "num_classes", None) is not None) == conditional
    images = _sample(job)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_dit512_row():
    preset = get_preset("dit512")
    assert preset.image_shape == (3, 512, 512) and preset.network_file == "DiT-XL-2-512x512.pt"
    assert preset.settings.cfg_scale == 1.5 and preset.settings.cfg_channels == 3
