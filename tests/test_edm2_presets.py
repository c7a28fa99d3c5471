"""EDM2's published rows as presets: their files, guide weights, EMA lengths and FIDs; the +cls
rows' classifier settings; checked overrides and files; jobs from tiny in-memory EDM2 networks
(pixels and latents) and `build` through a stand-in for the EDM2 pickle loader."""
import dataclasses
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

from elucd_fast.guidance import GuidanceSettings
from elucd_fast.models.checkpoint import CheckpointError
from elucd_fast.models.edm2_encoders import StabilityVAEEncoder, StandardRGBEncoder
from elucd_fast.presets import EDM2_PRESETS, get_preset, list_presets
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.runs.generation import generate, quantize_round
from elucd_fast.samplers import EDM2Settings
from elucd_fast.samplers.edm2 import edm2_sampler
from test_edm2_networks import tiny_network
from tiny_models import TinyClassifier

# name: (network file, guide network file, guide weight, FID) of NVlabs/edm2 generate_images.py's
# config_presets "-fid" rows (its FIDs are the comments there).
XS_UNCOND = "edm2-img512-xs-uncond-2147483"
EDM2_FID_ROWS = {
    "edm2-img512-xs-fid": ("edm2-img512-xs-2147483-0.135.pkl", None, 1.0, 3.53),
    "edm2-img512-s-fid": ("edm2-img512-s-2147483-0.130.pkl", None, 1.0, 2.56),
    "edm2-img512-m-fid": ("edm2-img512-m-2147483-0.100.pkl", None, 1.0, 2.25),
    "edm2-img512-l-fid": ("edm2-img512-l-1879048-0.085.pkl", None, 1.0, 2.06),
    "edm2-img512-xl-fid": ("edm2-img512-xl-1342177-0.085.pkl", None, 1.0, 1.96),
    "edm2-img512-xxl-fid": ("edm2-img512-xxl-0939524-0.070.pkl", None, 1.0, 1.91),
    "edm2-img64-s-fid": ("edm2-img64-s-1073741-0.075.pkl", None, 1.0, 1.58),
    "edm2-img64-m-fid": ("edm2-img64-m-2147483-0.060.pkl", None, 1.0, 1.43),
    "edm2-img64-l-fid": ("edm2-img64-l-1073741-0.040.pkl", None, 1.0, 1.33),
    "edm2-img64-xl-fid": ("edm2-img64-xl-0671088-0.040.pkl", None, 1.0, 1.33),
    "edm2-img512-xs-guid-fid": ("edm2-img512-xs-2147483-0.045.pkl", f"{XS_UNCOND}-0.045.pkl", 1.4, 2.91),
    "edm2-img512-s-guid-fid": ("edm2-img512-s-2147483-0.025.pkl", f"{XS_UNCOND}-0.025.pkl", 1.4, 2.23),
    "edm2-img512-m-guid-fid": ("edm2-img512-m-2147483-0.030.pkl", f"{XS_UNCOND}-0.030.pkl", 1.2, 2.01),
    "edm2-img512-l-guid-fid": ("edm2-img512-l-1879048-0.015.pkl", f"{XS_UNCOND}-0.015.pkl", 1.2, 1.88),
    "edm2-img512-xl-guid-fid": ("edm2-img512-xl-1342177-0.020.pkl", f"{XS_UNCOND}-0.020.pkl", 1.2, 1.85),
    "edm2-img512-xxl-guid-fid": ("edm2-img512-xxl-0939524-0.015.pkl", f"{XS_UNCOND}-0.015.pkl", 1.2, 1.81),
    "edm2-img512-s-autog-fid": ("edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl", 2.1, 1.34),
    "edm2-img512-xxl-autog-fid": ("edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.pkl", 2.05, 1.25),
    "edm2-img512-s-uncond-autog-fid": ("edm2-img512-s-uncond-2147483-0.070.pkl",
                                       "edm2-img512-xs-uncond-0134217-0.110.pkl", 2.85, 3.86),
    "edm2-img64-s-autog-fid": ("edm2-img64-s-1073741-0.045.pkl", "edm2-img64-xs-0134217-0.110.pkl", 1.7, 1.01),
}
# SPEC §9's published FIDs.
SPEC_FIDS = {"edm2-img64-s-fid": 1.58, "edm2-img64-m-fid": 1.43, "edm2-img64-l-fid": 1.33, "edm2-img64-xl-fid": 1.33,
             "edm2-img64-s-autog-fid": 1.01, "edm2-img512-xxl-fid": 1.91, "edm2-img512-xxl-guid-fid": 1.81,
             "edm2-img512-xxl-autog-fid": 1.25}


def test_every_published_row_is_a_preset_with_and_without_the_classifier():
    names = set(list_presets())
    assert {p.name for p in EDM2_PRESETS} == set(EDM2_FID_ROWS) | {f"{n}+cls" for n in EDM2_FID_ROWS} <= names
    for name, (network, guide, weight, fid) in EDM2_FID_ROWS.items():
        for preset in (get_preset(name), get_preset(f"{name}+cls")):
            assert (preset.network_file, preset.guide_network_file, preset.settings.guide_weight,
                    preset.published_fid) == (network, guide, weight, fid)
            assert preset.settings.num_steps == 32 and preset.settings.S_churn == 0
            img512 = "img512" in name
            assert preset.image_shape == ((3, 512, 512) if img512 else (3, 64, 64))
            assert preset.latent_shape == ((4, 64, 64) if img512 else None)
        assert not get_preset(name).guidance and get_preset(f"{name}+cls").guidance
    for name, fid in SPEC_FIDS.items():
        assert get_preset(name).published_fid == fid


def test_ema_lengths_and_training_lengths_come_from_the_file_names():
    row = get_preset("edm2-img512-xxl-autog-fid")
    assert (row.training_kimg, row.ema_length, row.guide_ema_length) == (939524, 0.075, 0.155)
    plain = get_preset("edm2-img64-s-fid")
    assert plain.ema_length == 0.075 and plain.guide_ema_length is None
    uncond = get_preset("edm2-img512-s-uncond-autog-fid")
    assert not uncond.conditional and uncond.num_classes is None  # EDM2 draws no label for it
    assert get_preset("edm2-img512-s-uncond-autog-fid+cls").num_classes == 1000  # the classifier's targets


def test_cls_rows_carry_our_untuned_classifier_settings():
    preset = get_preset("edm2-img64-s-autog-fid+cls")
    assert preset.guidance_settings == GuidanceSettings(softplus_beta=5.0, joint_temperature=1.0,
                                                        marginal_temperature=0.0)
    assert (preset.settings.max_guidance, preset.settings.add_factor) == (0.004, 0.3)
    assert (preset.classifier_arch, preset.classifier_file) == ("resnet101", "resnet101-cd907fc2.pth")
    assert "ours" in preset.settings_note and "untuned" in preset.settings_note
    assert preset.settings == EDM2Settings(guide_weight=1.7, max_guidance=0.004, add_factor=0.3)


def test_missing_files_are_named_with_their_source(tmp_path):
    with pytest.raises(CheckpointError, match=r"needs --network PATH: edm2-img64-s-1073741-0.045.pkl from EDM2's"):
        get_preset("edm2-img64-s-autog-fid").build()
    (tmp_path / "net.pkl").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"needs --guide-network PATH: edm2-img64-xs-0134217-0.110.pkl"):
        get_preset("edm2-img64-s-autog-fid").build(network=tmp_path / "net.pkl")
    with pytest.raises(CheckpointError, match=r"needs --classifier PATH: resnet101-cd907fc2.pth"):
        get_preset("edm2-img64-s-fid+cls").build(network=tmp_path / "net.pkl")
    with pytest.raises(CheckpointError, match=r"needs --vae PATH: sd-vae-ft-mse"):
        get_preset("edm2-img512-xs-fid").build(network=tmp_path / "net.pkl")
    with pytest.raises(CheckpointError, match=r"--guide-network: no such file: .*nothing.pkl"):
        get_preset("edm2-img64-s-autog-fid").build(network=tmp_path / "net.pkl", guide_network=tmp_path / "nothing.pkl")
    # A guide weight on a row without a guide needs the user's guide network; w = 1 needs none.
    with pytest.raises(CheckpointError, match=r"needs --guide-network PATH: a guide network for guide_weight 1.3"):
        get_preset("edm2-img64-s-fid").build(network=tmp_path / "net.pkl", guide_weight=1.3)
    unguided = get_preset("edm2-img64-s-autog-fid").configure(guide_weight=1.0)
    files = unguided.required_files(network=tmp_path / "net.pkl")
    assert set(files) == {"network"}


def test_overrides_are_checked_without_loading():
    row = get_preset("edm2-img512-s-guid-fid")
    assert row.configure(guide_weight=1.8, num_steps=64).settings == EDM2Settings(guide_weight=1.8, num_steps=64)
    with pytest.raises(ValueError, match="cfg_scale: not a setting of preset .* not used by its edm2 sampler"):
        row.configure(cfg_scale=2.0)
    with pytest.raises(ValueError, match="max_guidance: not used by an unguided job"):
        row.configure(max_guidance=0.01)
    with pytest.raises(ValueError, match="guide_weight: must be a finite number"):
        row.configure(guide_weight=float("nan"))
    turned_on = row.configure(guidance=True, max_guidance=0.002)
    assert turned_on.guidance and turned_on.settings.max_guidance == 0.002
    assert get_preset("edm2-img64-s-fid+cls").configure(softplus_beta=3.0).guidance_settings.softplus_beta == 3.0
    assert get_preset("edm2-img64-s-fid+cls").json()["settings"]["guide_weight"] == 1.0


def _tiny_preset(name, **changes):
    """The row at 16x16 (pixels) or on 4 x 16 x 16 latents decoding to 32 x 32 images."""
    preset = get_preset(name)
    if preset.latent:
        return dataclasses.replace(preset, image_shape=(3, 32, 32), latent_shape=(4, 16, 16), **changes)
    return dataclasses.replace(preset, image_shape=(3, 16, 16), **changes)


class TinyVAE(nn.Module):
    """The diffusers AutoencoderKL interface the encoder needs: decode(z).sample, dtype."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    @property
    def dtype(self):
        return self.conv.weight.dtype

    def decode(self, z):
        return SimpleNamespace(sample=torch.sigmoid(self.conv(nn.functional.interpolate(z, scale_factor=2))))


def _sample(job, seeds=(0, 1, 2)):
    batches = list(generate(job.sample, seeds, image_shape=job.noise_shape, num_classes=job.num_classes,
                            quantize=job.quantize))
    return batches[0]


def test_pixel_job_is_edm2s_sampler_and_rounding():
    preset = _tiny_preset("edm2-img64-s-autog-fid")
    net, gnet = tiny_network(3, 1000), tiny_network(3, 1000, seed=7, model_channels=8)
    job = preset.configure(num_steps=4).job(net, encoder=StandardRGBEncoder(), guide_net=gnet)
    assert job.decoder is None and job.guide_net is gnet and job.num_classes == 1000
    batch = _sample(job)
    rnd = StackedRandomGenerator("cpu", [0, 1, 2])
    latents, labels = rnd.randn([3, 3, 16, 16]), rnd.randint(1000, size=[3])
    direct = edm2_sampler(net, latents, labels, gnet=gnet, guide_weight=1.7, num_steps=4, randn_like=rnd.randn_like)
    assert torch.equal(batch.labels, labels)
    assert torch.equal(batch.images, StandardRGBEncoder().decode(direct).permute(0, 2, 3, 1))
    assert torch.equal(batch.images, quantize_round(direct).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="guide_network: .* needs a guide network"):
        preset.job(net)
    with pytest.raises(ValueError, match="network: preset .* expects a network of 3 channels at 16x16, got 4"):
        preset.job(tiny_network(4, 1000), guide_net=gnet)
    with pytest.raises(ValueError, match="network: preset .* expects label_dim 1000, got 0"):
        preset.job(tiny_network(3, 0), guide_net=gnet)


def test_latent_cls_job_decodes_with_the_encoder_and_guides_through_it():
    preset = _tiny_preset("edm2-img512-xs-guid-fid+cls")
    net, gnet = tiny_network(4, 1000), tiny_network(4, 0, seed=5)
    encoder = StabilityVAEEncoder.from_statistics(batch_size=2)
    classifier = TinyClassifier(num_classes=1000)
    job = preset.configure(num_steps=4, max_guidance=0.05).job(net, encoder=encoder, guide_net=gnet,
                                                               classifier=classifier, vae=TinyVAE())
    assert job.decoder is encoder and job.noise_shape == (4, 16, 16) and job.guidance is not None
    batch = _sample(job)
    assert batch.images.shape == (3, 32, 32, 3)
    rnd = StackedRandomGenerator("cpu", [0, 1, 2])
    latents, labels = rnd.randn([3, 4, 16, 16]), rnd.randint(1000, size=[3])
    kwargs = dict(gnet=gnet, guide_weight=1.4, num_steps=4, decoder=encoder)
    guided = edm2_sampler(net, latents, labels, guidance=job.guidance, max_guidance=0.05, add_factor=0.3,
                          randn_like=rnd.randn_like, **kwargs)
    assert torch.equal(batch.images, encoder.decode(guided).permute(0, 2, 3, 1))  # EDM2's bytes
    plain = edm2_sampler(net, latents, labels, **kwargs)
    assert not torch.equal(encoder.decode(plain), encoder.decode(guided))
    with pytest.raises(ValueError, match="encoder: preset .* works on latents"):
        preset.job(net, guide_net=gnet, classifier=classifier)
    with pytest.raises(ValueError, match="classifier: preset .* is classifier-guided"):
        preset.job(net, encoder=encoder, guide_net=gnet)


def test_unconditional_cls_row_draws_labels_for_the_classifier():
    preset = _tiny_preset("edm2-img512-s-uncond-autog-fid+cls")
    net, gnet = tiny_network(4, 0), tiny_network(4, 0, seed=5, model_channels=8)
    job = preset.configure(num_steps=3).job(net, encoder=StabilityVAEEncoder.from_statistics(), guide_net=gnet,
                                            classifier=TinyClassifier(num_classes=1000), vae=TinyVAE())
    batch = _sample(job)
    assert batch.labels is not None and batch.images.shape == (3, 32, 32, 3)
    unguided = _tiny_preset("edm2-img512-s-uncond-autog-fid").configure(num_steps=3).job(
        net, encoder=StabilityVAEEncoder.from_statistics(), guide_net=gnet, vae=TinyVAE())
    assert unguided.num_classes is None and _sample(unguided).labels is None


def test_build_loads_through_the_edm2_pickle_loader(tmp_path, monkeypatch):
    """`build` with a stand-in for `models.edm2_pickle.load_edm2_network(path, device=...) ->
    (net, encoder)`, the loader this preset expects."""
    networks = {"main.pkl": tiny_network(3, 1000), "edm2-img64-xs-0134217-0.110.pkl": tiny_network(3, 1000, seed=7)}
    calls = []

    def load_edm2_network(path, *, device):
        calls.append((str(path), device))
        return networks[str(path).rsplit("/", 1)[-1]], StandardRGBEncoder()

    monkeypatch.setitem(sys.modules, "elucd_fast.models.edm2_pickle",
                        types.SimpleNamespace(load_edm2_network=load_edm2_network))
    for file in networks:
        (tmp_path / file).write_bytes(file.encode())
    classifier = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), classifier)
    preset = _tiny_preset("edm2-img64-s-autog-fid+cls", classifier_arch="resnet18")
    job = preset.build(network=tmp_path / "main.pkl", guide_network=tmp_path / "edm2-img64-xs-0134217-0.110.pkl",
                       classifier=classifier, num_steps=3)
    assert [c[0].rsplit("/", 1)[-1] for c in calls] == ["main.pkl", "edm2-img64-xs-0134217-0.110.pkl"]
    assert all(c[1] == torch.device("cpu") for c in calls)
    assert job.net is networks["main.pkl"] and job.guide_net is networks["edm2-img64-xs-0134217-0.110.pkl"]
    assert {"network_sha256", "guide_network_sha256", "classifier_sha256"} <= set(job.config)
    assert job.config["preset"]["preset"] == "edm2-img64-s-autog-fid+cls"
    assert any("main.pkl is not EDM2's edm2-img64-s-1073741-0.045.pkl" in note for note in job.notes)
    assert any("classifier:" in note for note in job.notes)  # not the paper's ResNet-101 file
    batch = _sample(job, seeds=(5, 6))
    assert batch.images.shape == (2, 16, 16, 3)
    calls.clear()
    unguided = preset.build(network=tmp_path / "main.pkl", guide_weight=1.0, guidance=False)
    assert len(calls) == 1 and unguided.guide_net is None and unguided.guidance is None


def test_sweep_of_the_classifier_weight(tmp_path, monkeypatch):
    import numpy as np

    from elucd_fast.tools.sweep import sweep_classifier_weight

    loads = []

    def load_edm2_network(path, *, device):
        loads.append(path)
        return tiny_network(3, 1000), StandardRGBEncoder()

    monkeypatch.setitem(sys.modules, "elucd_fast.models.edm2_pickle",
                        types.SimpleNamespace(load_edm2_network=load_edm2_network))
    network = tmp_path / "net.pkl"
    network.write_bytes(b"net")
    classifier = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), classifier)
    preset = _tiny_preset("edm2-img64-s-fid+cls", classifier_arch="resnet18")
    files = {"network": network, "classifier": classifier}
    with pytest.raises(ValueError, match="max_guidance: must be >= 0"):
        sweep_classifier_weight(preset, [0.01, -1.0], range(3), tmp_path / "bad", build_kwargs=files)
    assert loads == [] and not (tmp_path / "bad").exists()  # checked before anything is loaded

    scored = []
    summary = sweep_classifier_weight(preset, [0.01, 0.05], range(3), tmp_path / "sweep", build_kwargs=files,
                                      overrides={"num_steps": 3}, score=lambda path: scored.append(path) or {"n": 1.0},
                                      log=lambda line: None)
    assert len(loads) == 1 and len(scored) == 3  # networks loaded once; each row scored
    assert [row["value"] for row in summary["rows"]] == [None, 0.01, 0.05]
    assert [row["samples"] for row in summary["rows"]] == [
        "samples/unguided.npz", "samples/max_guidance-0.01.npz", "samples/max_guidance-0.05.npz"]
    assert all(row["metrics"] == {"n": 1.0} and 0 <= row["classifier_accuracy"] <= 1 for row in summary["rows"])
    assert (tmp_path / "sweep" / "sweep.json").is_file()
    arrays = [np.load(tmp_path / "sweep" / row["samples"]) for row in summary["rows"]]
    assert all(a["arr_0"].shape == (3, 16, 16, 3) and np.array_equal(a["arr_1"], arrays[0]["arr_1"]) for a in arrays)
    assert not np.array_equal(arrays[0]["arr_0"], arrays[2]["arr_0"])
    # The unguided row is the row's job without the classifier, seed for seed.
    plain = preset.configure(guidance=False, num_steps=3).job(tiny_network(3, 1000))
    assert np.array_equal(arrays[0]["arr_0"], _sample(plain).images.numpy())
    # Without a scorer (no reference, no bundled evaluation network) only the samples are written.
    bare = sweep_classifier_weight(preset, [0.02], [7], tmp_path / "bare", build_kwargs=files, include_unguided=False,
                                   overrides={"num_steps": 2}, log=lambda line: None)
    assert [row["metrics"] for row in bare["rows"]] == [None] and bare["field"] == "max_guidance"
