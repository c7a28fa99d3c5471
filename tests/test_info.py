"""`describe_checkpoint` and `elucd-fast info` on every format, from tiny files made here."""
from __future__ import annotations

import argparse
import json
import sys
import types

import edm_fixtures as fx
import pytest
import torch
import torchvision
from click.testing import CliRunner

from elucd_fast.cli import main
from elucd_fast.models.adm_unet import adm_model_flags, create_adm_model
from elucd_fast.models.checkpoint import CheckpointError, sha256_file
from elucd_fast.models.dit import DiT
from elucd_fast.models.info import COMMON_KEYS, describe_checkpoint

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
                norm_num_groups=4, block_out_channels=(8, 8),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _numel(state):
    return sum(v.numel() for v in state.values())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny file per format: {name: (path, state dict)}."""
    folder = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def save(name, state, container=None):
        torch.save(state if container is None else container, folder / name)
        made[name] = (folder / name, state)

    save("resnet18.pth", torchvision.models.resnet18(weights=None, num_classes=10).state_dict())
    save("adm.pt", create_adm_model(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                    attention_resolutions="16", class_cond=True, num_classes=10,
                                    learn_sigma=True, resblock_updown=True).state_dict())
    # The reference 64x64 channel multipliers, at a tiny width: the resolution is readable.
    save("adm64.pt", create_adm_model(**{**adm_model_flags(64), "num_channels": 32, "num_res_blocks": 1,
                                         "attention_resolutions": "8", "num_head_channels": 32,
                                         "use_fp16": False}).state_dict())
    dit = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10).state_dict()
    save("dit.pt", dit)
    save("dit_training.pt", dit, {"model": dit, "ema": dit, "args": argparse.Namespace(model="tiny")})
    from safetensors.torch import save_file

    save_file(made["resnet18.pth"][1], folder / "resnet18.safetensors")
    made["resnet18.safetensors"] = (folder / "resnet18.safetensors", made["resnet18.pth"][1])
    (folder / "junk.pt").write_bytes(b"this is not a checkpoint")
    made["junk.pt"] = (folder / "junk.pt", None)
    return made


def _check_common(description, path, state):
    assert set(COMMON_KEYS) <= set(description)
    assert description["path"] == str(path)
    assert description["sha256"] == sha256_file(path)
    assert description["parameters"] == _numel(state)
    assert description["dtype"] == "float32"


@pytest.mark.parametrize("name", ["resnet18.pth", "resnet18.safetensors"])
def test_torchvision_classifier(files, name):
    path, state = files[name]
    description = describe_checkpoint(path)
    _check_common(description, path, state)
    assert description["kind"] == "classifier"
    assert description["architecture"] == "torchvision resnet18"
    assert description["classes"] == 10 and description["resolution"] is None


def test_adm_unet(files):
    path, state = files["adm.pt"]
    description = describe_checkpoint(path)
    _check_common(description, path, state)
    assert (description["kind"], description["classes"], description["resolution"]) == ("adm-unet", 10, None)
    details = description["details"]
    assert details["num_channels"] == 32 and details["channel_mult"] == (1, 2) and details["learn_sigma"]
    assert details["resblock_updown"] and details["attention_ds"] == (2,)
    assert details["public_checkpoint"] is None and "pass them" in details["note"]

    path, state = files["adm64.pt"]
    description = describe_checkpoint(path)
    assert description["resolution"] == 64 and description["classes"] == 1000
    assert description["details"]["attention_resolutions"] == "8"
    # The 64x64 channel multipliers at another width: not 64x64_diffusion.pt.
    assert description["details"]["public_checkpoint"] is None


@pytest.mark.parametrize("name", ["dit.pt", "dit_training.pt"])
def test_dit(files, name):
    path, state = files[name]
    description = describe_checkpoint(path)
    _check_common(description, path, state)
    assert description["kind"] == "dit"
    assert description["architecture"] == "DiT(depth=2, hidden=32, patch=2)"
    assert (description["resolution"], description["classes"]) == (64, 10)
    assert description["details"]["input_size"] == 8 and description["details"]["learn_sigma"]


def test_vae_directory_and_file(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="making a VAE needs diffusers")
    from safetensors.torch import save_file

    vae = diffusers.AutoencoderKL(**TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    description = describe_checkpoint(tmp_path / "vae")
    assert (description["kind"], description["architecture"]) == ("vae", "AutoencoderKL")
    assert description["parameters"] == _numel(vae.state_dict())
    assert description["sha256"] == sha256_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")

    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors")
    description = describe_checkpoint(tmp_path / "vae.safetensors")
    assert (description["kind"], description["architecture"]) == ("vae", "AutoencoderKL (diffusers layout)")
    assert description["details"]["latent_channels"] == 4


def test_edm_pickles_are_delegated(tmp_path, monkeypatch):
    path = tmp_path / "edm-imagenet-64x64-cond-adm.pkl"
    path.write_bytes(b"not read here")
    import elucd_fast.models.edm2_pickle  # noqa: F401  (bound to the real reader before it is faked)

    fake = types.ModuleType("elucd_fast.models.edm_pickle")
    fake.read_persistent_pickle = lambda p: {"ema": None}  # read once, then handed to the describer
    fake.describe_edm_pickle = lambda p, data=None: {
        "kind": "edm-network-pickle", "architecture": "EDMPrecond(DhariwalUNet)", "resolution": 64, "channels": 3,
        "label_dim": 1000, "parameters": 295_899_267, "dtype": "float32", "sha256": "ab" * 32, "keys": ["ema"]}
    monkeypatch.setitem(sys.modules, "elucd_fast.models.edm_pickle", fake)
    description = describe_checkpoint(path)
    assert list(description)[: len(COMMON_KEYS)] == list(COMMON_KEYS)
    assert (description["kind"], description["resolution"], description["classes"]) == ("edm-network-pickle", 64, 1000)
    assert description["details"] == {"channels": 3, "label_dim": 1000, "keys": ["ema"]}


def test_edm_training_snapshot(tmp_path):
    # As EDM's training loop writes it: numpy scalars in the layers, loss and augmentation
    # records, the dataset options.
    net = fx.edm_network("edm", "adm", use_fp16=True)
    path = fx.write_edm_snapshot(tmp_path / "network-snapshot-000000.pkl", net)
    description = describe_checkpoint(path)
    assert list(description)[: len(COMMON_KEYS)] == list(COMMON_KEYS)
    _check_common(description, path, dict(net.named_parameters()))  # parameters, not buffers
    assert (description["kind"], description["architecture"]) == ("edm-network-pickle", "EDMPrecond(DhariwalUNet)")
    assert (description["resolution"], description["classes"]) == (16, 10)
    details = description["details"]
    assert details["dataset_kwargs"] == fx.dataset_kwargs(16, True)
    assert details["use_fp16"] is True and details["keys"] == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]

    runner = CliRunner()
    table = runner.invoke(main, ["info", str(path)])
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if line.strip().startswith("dataset_kwargs"))
    assert "training.dataset.ImageFolderDataset" in row and "datasets/tiny-16x16.zip" in row
    as_json = runner.invoke(main, ["info", "--json", str(path)])
    assert json.loads(as_json.output)["details"]["dataset_kwargs"] == fx.dataset_kwargs(16, True)


def test_unreadable_pickle_is_refused(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=str(path)):
        describe_checkpoint(path)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 2 and str(path) in result.stderr


def test_unknown_and_unsafe_files_are_refused(files, tmp_path):
    with pytest.raises(CheckpointError, match="tensors-only"):
        describe_checkpoint(files["junk.pt"][0])
    torch.save({"some.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint this package knows.*some.weight"):
        describe_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        describe_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("name, kind", [("resnet18.pth", "classifier"), ("adm64.pt", "adm-unet"), ("dit.pt", "dit")])
def test_cli_table_and_json(files, name, kind):
    path, _ = files[name]
    runner = CliRunner()
    table = runner.invoke(main, ["info", str(path)])
    assert table.exit_code == 0, table.output
    assert "kind" in table.output and kind in table.output and "sha256" in table.output
    as_json = runner.invoke(main, ["info", "--json", str(path)])
    assert as_json.exit_code == 0
    assert json.loads(as_json.output)["kind"] == kind


def test_cli_junk_file_exits_2_with_a_message(files):
    result = CliRunner().invoke(main, ["info", str(files["junk.pt"][0])])
    assert result.exit_code == 2
    assert "cannot be read as a tensors-only checkpoint" in result.stderr
    assert result.stdout == ""


def test_classifier_files_say_whether_they_are_the_papers_and_whether_their_name_fits(tmp_path):
    import torchvision

    from elucd_fast.models.info import PAPER_CLASSIFIERS

    plain = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), plain)
    details = describe_checkpoint(plain)["details"]
    assert details["paper_weights"].startswith("no: the paper's are resnet101-cd907fc2.pth")
    assert "name_sha256_prefix" not in details
    misnamed = tmp_path / "resnet101-cd907fc2.pth"
    misnamed.write_bytes(plain.read_bytes())
    details = describe_checkpoint(misnamed)["details"]
    assert details["name_sha256_prefix"].startswith("MISMATCH: the name says cd907fc2, the content is")
    digest = sha256_file(plain)
    named = tmp_path / f"resnet18-{digest[:8]}.pth"
    named.write_bytes(plain.read_bytes())
    assert describe_checkpoint(named)["details"]["name_sha256_prefix"] == "matches the content"
    assert set(PAPER_CLASSIFIERS) == {"cd907fc2", "11ad3fa6"}
