"""DiT: key names of the public checkpoints (256 and 512), loading (plain and training files),
CFG, sampling, and the VAE.

Reference numbers (key-set fingerprints, position-embedding values, tiny-model outputs) were
computed with facebookresearch/DiT's own `models.py` (`DiT_models`, `DiT`, timm layers).
"""
from __future__ import annotations

import argparse
import hashlib
import socket

import pytest
import torch

from elucd_fast import dit_sampler
from elucd_fast.models.checkpoint import CheckpointError
from elucd_fast.models.dit import (
    DiT, DiT_models, DiTWithVAE, dit_config_from_state_dict, load_dit, load_sd_vae, sincos_pos_embed_2d,
)

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
                norm_num_groups=4, block_out_channels=(8, 8),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _tiny_dit(seed: int = 0) -> DiT:
    """Latents 8x8 (images 64x64), 10 classes, every parameter random (DiT zero-initialises its
    adaLN layers, which would make the output ignore the input)."""
    model = DiT(input_size=8, num_classes=10, **TINY)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _inputs(batch=2):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, 8, generator=generator), torch.tensor([10, 900])[:batch], torch.tensor([3, 7])[:batch]


def test_tiny_dit_round_trips(tmp_path):
    model = _tiny_dit()
    path = tmp_path / "tiny_dit.pt"
    torch.save(model.state_dict(), path)
    loaded = load_dit(path, model=TINY, image_size=64, num_classes=10)
    assert isinstance(loaded, DiT) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x, t, y = _inputs()
    with torch.no_grad():
        out = loaded(x, t, y)
        assert out.shape == (2, 8, 8, 8)
        torch.testing.assert_close(out, model(x, t, y), rtol=0, atol=0)


def test_training_checkpoints_use_the_ema_weights(tmp_path):
    ema, raw = _tiny_dit(0), _tiny_dit(1)
    path = tmp_path / "0100000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, path)
    loaded = load_dit(path, model=TINY, image_size=64, num_classes=10)
    torch.testing.assert_close(loaded.final_layer.linear.weight, ema.final_layer.linear.weight, rtol=0, atol=0)


def test_wrong_size_is_refused_with_what_the_file_holds(tmp_path):
    path = tmp_path / "tiny_dit.pt"
    torch.save(_tiny_dit().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"DiT-S/2 at 64x64.*'image_size': 64"):
        load_dit(path, model="DiT-S/2", image_size=64, num_classes=10)


def test_forward_with_cfg_matches_a_hand_written_reference():
    model = _tiny_dit()
    x, t, y = _inputs()
    null = torch.full_like(y, 10)
    scale = 1.5
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        batched_x, batched_t, batched_y = torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([y, null])
        for guided in (3, 4, None):
            out = model.forward_with_cfg(batched_x, batched_t, batched_y, scale, guided_channels=guided)
            guided = guided or model.in_channels
            guided_eps = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
            torch.testing.assert_close(out[:2, :guided], guided_eps)
            torch.testing.assert_close(out[2:, :guided], guided_eps)
            torch.testing.assert_close(out[:2, guided:], cond[:, guided:])
            torch.testing.assert_close(out[2:, guided:], uncond[:, guided:])


def test_dit_xl_2_has_the_public_checkpoints_keys():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.0.attn.qkv.weight": (3456, 1152),
        "blocks.0.attn.proj.weight": (1152, 1152),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.linear.weight": (32, 1152),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert "blocks.28.attn.qkv.weight" not in shapes
    assert len(shapes) == 7 + 28 * 10 + 4 + 1
    print(f"DiT-XL/2: {sum(p.numel() for p in model.parameters()):,} parameters")
    config = dit_config_from_state_dict(model.state_dict())
    assert (config["model"], config["image_size"], config["num_classes"]) == ("DiT-XL/2", 256, 1000)


def test_position_embedding_is_the_2d_sincos_table():
    table = sincos_pos_embed_2d(8, 3)  # 3x3 tokens, 2 frequencies per sin/cos and axis
    omega = torch.tensor([1.0, 0.01])

    def one_axis(position):
        return torch.cat([torch.sin(position * omega), torch.cos(position * omega)])

    for row in range(3):
        for col in range(3):
            torch.testing.assert_close(table[row * 3 + col], torch.cat([one_axis(col), one_axis(row)]))


def _tiny_vae():
    diffusers = pytest.importorskip("diffusers", reason="the VAE decoder needs diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(**TINY_VAE).eval()


def test_vae_directory_loads_offline_with_the_dit(tmp_path, no_network):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    dit_path = tmp_path / "tiny_dit.pt"
    torch.save(_tiny_dit().state_dict(), dit_path)
    loaded = load_dit(dit_path, model=TINY, image_size=64, num_classes=10, vae=tmp_path / "vae")
    assert isinstance(loaded, DiTWithVAE)
    assert not loaded.vae.training and not any(p.requires_grad for p in loaded.vae.parameters())
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        image = loaded.vae.decode(z / loaded.vae.config.scaling_factor).sample
        torch.testing.assert_close(image, vae.decode(z / vae.config.scaling_factor).sample, rtol=0, atol=0)
    assert image.shape == (1, 3, 8, 8)


def test_vae_directory_with_missing_weights_is_refused(tmp_path, no_network):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cannot load"):
        load_sd_vae(tmp_path / "vae")


def test_single_safetensors_vae_with_legacy_attention_names(tmp_path):
    from safetensors.torch import save_file

    vae = _tiny_vae()
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v.contiguous() for k, v in vae.state_dict().items()}
    assert any(".proj_attn." in k for k in legacy)
    path = tmp_path / "vae.safetensors"
    save_file(legacy, path)
    loaded = load_sd_vae(path, config=TINY_VAE)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z).sample, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="does not fit AutoencoderKL"):
        load_sd_vae(path)  # the full-size SD configuration


def test_ldm_layout_vae_file_is_refused_with_a_hint(tmp_path):
    pytest.importorskip("diffusers", reason="the VAE decoder needs diffusers")
    from safetensors.torch import save_file

    path = tmp_path / "vae-ft-ema-560000-ema-pruned.safetensors"
    save_file({"decoder.up.0.block.0.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="original \\(LDM\\) layout"):
        load_sd_vae(path)


def test_sd_vae_configuration_size():
    diffusers = pytest.importorskip("diffusers", reason="the VAE decoder needs diffusers")
    from elucd_fast.models.dit import SD_VAE_CONFIG

    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**SD_VAE_CONFIG)
    # Encoder and decoder; the released float32 files are about 335 MB, 4 bytes a parameter.
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def _fingerprint(state) -> str:
    """Key names, their order and shapes, hashed: equal fingerprints mean equal key sets."""
    return hashlib.sha256("\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items()).encode()).hexdigest()[:16]


# DiT's `DiT_models["DiT-XL/2"](input_size=image_size // 8)` on the meta device: keys,
# parameters (pos_embed included: it is a frozen parameter, so the released files store it) and
# `_fingerprint` of the state dict.
UPSTREAM_XL2 = {256: (292, 675_129_632, "cc17d3ed739757c3"), 512: (292, 676_014_368, "8a4f73702d025f05")}


@pytest.mark.parametrize("image_size", list(UPSTREAM_XL2))
def test_dit_xl_2_key_sets_equal_dits(image_size):
    keys, parameters, fingerprint = UPSTREAM_XL2[image_size]
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=image_size // 8)
    state = model.state_dict()
    assert (len(state), sum(v.numel() for v in state.values()), _fingerprint(state)) == (keys, parameters, fingerprint)
    tokens = (image_size // 16) ** 2  # 2x2 patches of the image_size / 8 latent
    assert tuple(state["pos_embed"].shape) == (1, tokens, 1152)
    config = dit_config_from_state_dict(state)
    assert (config["model"], config["input_size"], config["image_size"]) == ("DiT-XL/2", image_size // 8, image_size)


def test_512_position_embedding_equals_dits_table():
    """DiT-XL/2 at 512: 32x32 tokens. Values from DiT's `get_2d_sincos_pos_embed(1152, 32)`: the
    first 576 channels encode the token's column, the last 576 its row."""
    table = sincos_pos_embed_2d(1152, 32)
    assert table.shape == (1024, 1152) and table.dtype == torch.float32
    channels = [1, 2, 575, 576, 577, 1151]
    expected = {37: [-0.9915309, -0.999754, 0.9999999, 0.841471, 0.8240513, 1.0],  # row 1, column 5
                1000: [0.9944109, 0.9394938, 0.9999997, -0.4040376, -0.983993, 0.9999949]}  # row 31, column 8
    for token, values in expected.items():
        torch.testing.assert_close(table[token, channels], torch.tensor(values), rtol=0, atol=1e-6)


# Tiny DiTs (patch 2, hidden 64, depth 2, 4 heads, 10 classes) at latent 8 (a 64-pixel image) and
# 16 (128 pixels, the 512 model's latent-to-token ratio scaled down): key fingerprint,
# out[:, :, 5, 3] flattened and mean |out| per channel from DiT's own `DiT` filled by `_filled`.
TINY_UPSTREAM = dict(patch_size=2, hidden_size=64, depth=2, num_heads=4)
TINY_REFERENCE = {
    8: ("55a1214bc8485bab",
        [-0.397311, 0.72543, -1.524909, 0.104394, -1.250945, 1.082454, 0.479508, -0.220689,
         -0.280308, 0.171309, -2.08762, 2.015573, 1.503352, 0.913455, -0.127476, 1.685411],
        [0.858469, 0.917629, 0.994716, 0.745447, 0.753859, 0.852478, 0.780656, 0.901752]),
    16: ("84956fe19714bdea",
         [0.241816, 0.773702, -2.373589, 0.819156, 0.05371, -1.48547, 0.109754, 0.643516,
          -0.946514, -0.851474, -0.193678, 0.548377, 1.831057, 1.201823, 0.294848, 1.800274],
         [0.888806, 0.864328, 0.789078, 0.732819, 0.69468, 0.860438, 0.825536, 0.862789]),
}


def _filled(model: DiT) -> DiT:
    """Every parameter but the position table, in state-dict order from one seeded generator:
    matrices N(0, 1/fan_in), vectors N(0, 0.1**2) (DiT zero-initialises its adaLN and output layers)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


@pytest.mark.parametrize("latent", list(TINY_REFERENCE))
def test_tiny_dits_match_dits_outputs(tmp_path, latent):
    fingerprint, pixel, mean_abs = TINY_REFERENCE[latent]
    model = _filled(DiT(input_size=latent, num_classes=10, **TINY_UPSTREAM))
    assert _fingerprint(model.state_dict()) == fingerprint
    path = tmp_path / f"tiny-{latent * 8}.pt"
    torch.save(model.state_dict(), path)  # the released files are plain state dicts
    loaded = load_dit(path, model=TINY_UPSTREAM, num_classes=10)  # image size read from pos_embed
    assert loaded.x_embedder.img_size == (latent, latent)
    z = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([999, 41]), torch.tensor([3, 10])  # 10: the "no class" token
    with torch.no_grad():
        out = loaded(z, t, y)
    torch.testing.assert_close(out[:, :, 5, 3].flatten(), torch.tensor(pixel), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.abs().mean(dim=(0, 2, 3)), torch.tensor(mean_abs), rtol=0, atol=1e-5)


def test_train_py_checkpoint_with_optimizer_state_and_args(tmp_path):
    """DiT's train.py saves {"model", "ema", "opt", "args"}: the EMA weights are the model, as in
    DiT's `find_model`; the AdamW state and the argparse flags load as plain data."""
    raw = _filled(DiT(input_size=16, num_classes=10, **TINY_UPSTREAM)).train()
    ema = DiT(input_size=16, num_classes=10, **TINY_UPSTREAM)  # differs from raw everywhere but pos_embed
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-4, weight_decay=0)
    raw(torch.randn(2, 4, 16, 16), torch.tensor([5, 6]), torch.tensor([1, 2])).square().mean().backward()
    optimizer.step()
    args = argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model="DiT-XL/2",
                              image_size=128, num_classes=10, epochs=1400, global_batch_size=256, global_seed=0,
                              vae="ema", num_workers=4, log_every=100, ckpt_every=50_000)
    path = tmp_path / "0050000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(), "args": args},
               path)
    loaded = load_dit(path, model=TINY_UPSTREAM, image_size=128, num_classes=10)
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


def test_larger_latent_dit_samples_with_cfg(tmp_path):
    """The 512 model's setting at tiny width (latent 16 here): DiT's diffusion (1000 linear steps,
    respaced, learned sigma) and CFG on 3 channels."""
    path = tmp_path / "tiny-128.pt"
    torch.save(_filled(DiT(input_size=16, num_classes=10, **TINY_UPSTREAM)).state_dict(), path)
    model = load_dit(path, model=TINY_UPSTREAM, num_classes=10)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    samples = dit_sampler(model, latents, torch.tensor([3, 7]), cfg_scale=4.0, timestep_respacing="4")
    assert samples.shape == (2, 4, 16, 16) and torch.isfinite(samples).all()
    # One doubled (conditional, unconditional) batch per step, at the original timesteps.
    assert seen == [[t] * 4 for t in (999, 666, 333, 0)]
