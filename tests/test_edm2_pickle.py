"""EDM2's network pickles, written the way EDM2's training loop (and `reconstruct_phema.py`, which
copies the snapshot dict) writes them, load into our EDM2Precond without running any code, equal
to the network that was saved; `info` describes them; the EDM2 presets build from them."""
import dataclasses
import os

import edm_fixtures as fx
import pytest
import torch
from click.testing import CliRunner

from elucd_fast.cli import main
from elucd_fast.models.checkpoint import CheckpointError
from elucd_fast.models.edm2_encoders import StabilityVAEEncoder, StandardRGBEncoder
from elucd_fast.models.edm2_pickle import describe_edm2_pickle, load_edm2_network
from elucd_fast.models.info import describe_checkpoint

TINY = dict(img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
            label_balance=0.5, concat_balance=0.5)


def _network(channels: int = 3, label_dim: int = 10) -> torch.nn.Module:
    return fx.perturb_(fx.build_edm2_network(img_channels=channels, label_dim=label_dim, **TINY))


@pytest.mark.parametrize("channels,encoder,label_dim", [(3, "StandardRGBEncoder", 10),
                                                        (4, "StabilityVAEEncoder", 10),
                                                        (4, "StabilityVAEEncoder", 0)])
def test_a_training_snapshot_loads_equal_to_the_saved_network(tmp_path, channels, encoder, label_dim):
    saved = _network(channels, label_dim)
    path = fx.write_edm2_snapshot(tmp_path / "network-snapshot-0000016.pkl", saved, encoder)
    net, loaded_encoder = load_edm2_network(path)
    stored = saved.to(torch.float16)  # EDM2 stores the EMA network in float16
    assert all(p.dtype == torch.float16 for p in net.parameters())
    assert {k: v for k, v in net.state_dict().items()}.keys() == stored.state_dict().keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stored.state_dict().items())
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, channels, 16, 16, generator=generator)
    labels = torch.eye(10)[[1, 7]] if label_dim else None
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([0.3, 4.0]), labels), stored.eval()(x, torch.tensor([0.3, 4.0]), labels))
    if encoder == "StandardRGBEncoder":
        assert isinstance(loaded_encoder, StandardRGBEncoder)
    else:
        expected = StabilityVAEEncoder.from_statistics(fx.VAE_RAW_MEAN, fx.VAE_RAW_STD, 0.0, 0.5)
        assert isinstance(loaded_encoder, StabilityVAEEncoder) and loaded_encoder.vae is None
        assert torch.equal(loaded_encoder.scale, expected.scale) and torch.equal(loaded_encoder.bias, expected.bias)
        assert loaded_encoder.vae_name == "stabilityai/sd-vae-ft-mse"


@pytest.mark.parametrize("protocol,numpy_2", [(2, False), (5, False), (4, True)])
def test_other_pickle_protocols_and_numpy_2_names(tmp_path, protocol, numpy_2):
    saved = _network(4)
    path = fx.write_edm2_snapshot(tmp_path / "n.pkl", saved, "StabilityVAEEncoder", protocol=protocol,
                                  numpy_2=numpy_2)
    net, encoder = load_edm2_network(path)
    assert isinstance(encoder, StabilityVAEEncoder)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.to(torch.float16).state_dict().items())


def test_info_describes_an_edm2_pickle(tmp_path):
    path = fx.write_edm2_snapshot(tmp_path / "edm2-img512-xs-tiny.pkl", _network(4), "StabilityVAEEncoder")
    description = describe_checkpoint(path)
    assert description["kind"] == "edm2-network-pickle" and description["architecture"] == "EDM2Precond(EDM2UNet)"
    assert description["resolution"] == 16 and description["classes"] == 10 and description["dtype"] == "float16"
    assert description["details"]["encoder"] == "StabilityVAEEncoder"
    assert description["details"]["vae_name"] == "stabilityai/sd-vae-ft-mse"
    assert description["details"]["dataset_kwargs"]["use_labels"] is True
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0 and "edm2-network-pickle" in result.output
    assert describe_edm2_pickle(path)["parameters"] == sum(p.numel() for p in _network(4).parameters())


def test_an_edm_pickle_is_not_taken_for_edm2(tmp_path):
    path = fx.write_edm_snapshot(tmp_path / "edm.pkl", fx.edm_network("edm", "adm"))
    with pytest.raises(CheckpointError, match="not an EDM2 network pickle"):
        load_edm2_network(path)


def test_hostile_edm2_pickles_run_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Reduce:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    data = fx.edm2_snapshot(_network())
    data["dataset_kwargs"]["path"] = Reduce()
    path = tmp_path / "evil.pkl"
    path.write_bytes(fx.pickle_bytes(data))
    with pytest.raises(CheckpointError, match="refused the global"):
        load_edm2_network(path)
    foreign = fx.edm2_snapshot(_network())
    foreign["ema"].unet.out_conv.__class__ = type("Evil", (torch.nn.Module,), {})
    path.write_bytes(fx.pickle_bytes(foreign))
    with pytest.raises(CheckpointError, match="unknown class 'Evil'"):
        load_edm2_network(path)
    assert not marker.exists()


def test_an_edm2_preset_samples_from_real_pickles(tmp_path):
    from elucd_fast.presets import get_preset
    from elucd_fast.rng import StackedRandomGenerator

    net_path = fx.write_edm2_snapshot(tmp_path / "edm2-img64-s-1073741-0.075.pkl", _network(label_dim=1000))
    guide_path = fx.write_edm2_snapshot(tmp_path / "edm2-img64-xs-0134217-0.110.pkl", _network(label_dim=1000))
    preset = dataclasses.replace(get_preset("edm2-img64-s-autog-fid"), image_shape=(3, 16, 16))
    job = preset.build(network=net_path, guide_network=guide_path, num_steps=4)
    rnd = StackedRandomGenerator("cpu", [0, 1])
    labels = rnd.randint(1000, size=[2])
    images = job.sample(rnd.randn([2, *job.noise_shape]), labels, rnd.randn_like)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
