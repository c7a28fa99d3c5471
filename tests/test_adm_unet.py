"""The guided-diffusion UNet: key names of the public checkpoints, loading, fp16, attention math."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from elucd_fast.models.adm_unet import (
    QKVAttention, adm_flags_from_state_dict, adm_model_flags, create_adm_model, load_adm_model, timestep_embedding,
)
from elucd_fast.models.checkpoint import CheckpointError

TINY_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
                  class_cond=True, num_classes=10, learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
                  num_heads=2, use_fp16=False)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random, so no zero-initialised layer hides a wiring error."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def _inputs(batch=2, size=32):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    return x, torch.tensor([3, 870])[:batch], torch.tensor([1, 7])[:batch]


def test_tiny_model_round_trips_through_a_state_dict(tmp_path):
    model = _randomised(create_adm_model(**TINY_FLAGS))
    path = tmp_path / "tiny_adm.pt"
    torch.save(model.state_dict(), path)
    loaded = load_adm_model(path, **TINY_FLAGS)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, t, y = _inputs()
    with torch.no_grad():
        out = loaded(x, t, y)
        assert out.shape == (2, 6, 32, 32)
        torch.testing.assert_close(out, model(x, t, y), rtol=0, atol=0)


def test_wrong_flags_are_refused_with_the_files_structure(tmp_path):
    path = tmp_path / "tiny_adm.pt"
    torch.save(create_adm_model(**TINY_FLAGS).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit UNetModel.*'num_channels': 32"):
        load_adm_model(path, **{**TINY_FLAGS, "num_channels": 64})
    with pytest.raises(CheckpointError, match="match no reference resolution"):
        load_adm_model(path)


def test_resolution_and_public_flags_are_taken_from_the_file(tmp_path):
    # Reference channel multipliers of the 64x64 model, at a tiny width.
    flags = dict(num_channels=32, num_res_blocks=1, attention_resolutions="8", num_head_channels=32,
                 class_cond=True, num_classes=10)
    path = tmp_path / "tiny64.pt"
    torch.save(create_adm_model(**{**adm_model_flags(64), **flags}).state_dict(), path)
    model = load_adm_model(path, **flags)
    assert model.image_size == 64
    assert model.dtype == torch.float16  # the public 64x64 flags run the torso in fp16
    assert model.out_channels == 6  # and learn sigma


def test_unconditional_file_loads_without_flags(tmp_path):
    """Conditioning is read from the file: an unconditional model at a public resolution (like
    256x256_diffusion_uncond.pt) needs no class_cond=False."""
    flags = dict(num_channels=32, num_res_blocks=1, attention_resolutions="8", num_head_channels=32)
    path = tmp_path / "tiny64_uncond.pt"
    torch.save(create_adm_model(**{**adm_model_flags(64), **flags, "class_cond": False}).state_dict(), path)
    model = load_adm_model(path, **flags)
    assert model.num_classes is None


def test_class_labels_must_match_conditioning():
    model = create_adm_model(**TINY_FLAGS).eval()
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


@pytest.mark.parametrize("size", [64, 128, 256, 512])
def test_public_flags_build_the_public_structures_on_meta(size):
    with torch.device("meta"):
        model = create_adm_model(**adm_model_flags(size))
    state = model.state_dict()
    found = adm_flags_from_state_dict(state)
    flags = adm_model_flags(size)
    assert found["image_size"] == size
    assert found["num_channels"] == flags["num_channels"]
    assert found["num_res_blocks"] == flags["num_res_blocks"]
    assert found["attention_resolutions"] == flags["attention_resolutions"]
    assert found["class_cond"] and found["num_classes"] == 1000
    assert found["learn_sigma"] and found["use_scale_shift_norm"] and found["resblock_updown"]
    parameters = sum(p.numel() for p in model.parameters())
    # Reported, not asserted: no released file is available here to compare against.
    print(f"ADM {size}x{size}: {parameters:,} parameters")


def test_key_names_and_shapes_of_the_public_128x128_checkpoint():
    with torch.device("meta"):
        state = create_adm_model(**adm_model_flags(128)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "time_embed.0.weight": (1024, 256),
        "time_embed.2.weight": (1024, 1024),
        "label_emb.weight": (1000, 1024),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (256,),
        "input_blocks.1.0.in_layers.2.weight": (256, 256, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (512, 1024),  # scale and shift
        "input_blocks.1.0.out_layers.0.weight": (256,),
        "input_blocks.1.0.out_layers.3.weight": (256, 256, 3, 3),
        "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # resblock_updown downsampler
        "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
        "input_blocks.7.1.norm.weight": (512,),  # attention at 32x32
        "input_blocks.7.1.qkv.weight": (1536, 512, 1),
        "input_blocks.7.1.proj_out.weight": (512, 512, 1),
        "input_blocks.14.1.qkv.weight": (3072, 1024, 1),
        "middle_block.0.emb_layers.1.weight": (2048, 1024),
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "middle_block.2.out_layers.3.weight": (1024, 1024, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (1024, 2048, 1, 1),
        "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),  # resblock_updown upsampler
        "output_blocks.14.0.skip_connection.weight": (256, 512, 1, 1),
        "out.0.weight": (256,),
        "out.2.weight": (6, 256, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert len(state) == 493
    assert not any(k.startswith("input_blocks.15.") or k.startswith("output_blocks.15.") for k in state)


def test_convolutional_resampling_key_names():
    with torch.device("meta"):
        state = create_adm_model(**{**adm_model_flags(128), "resblock_updown": False}).state_dict()
    assert tuple(state["input_blocks.3.0.op.weight"].shape) == (256, 256, 3, 3)
    assert tuple(state["output_blocks.2.2.conv.weight"].shape) == (1024, 1024, 3, 3)
    assert not adm_flags_from_state_dict(state)["resblock_updown"]


def test_fp16_torso_matches_float32():
    model = _randomised(create_adm_model(**TINY_FLAGS))
    half = copy.deepcopy(model)
    half.convert_to_fp16()
    assert half.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert half.middle_block[1].qkv.weight.dtype == torch.float16
    # Normalisation, embeddings and the output head stay in float32, as in guided-diffusion.
    assert half.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
    assert half.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32
    assert half.time_embed[0].weight.dtype == torch.float32 and half.out[2].weight.dtype == torch.float32
    x, t, y = _inputs()
    with torch.no_grad():
        reference, out = model(x, t, y), half(x, t, y)
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() <= 2e-2 * reference.abs().max()
    half.convert_to_fp32()
    assert half.dtype == torch.float32 and half.middle_block[1].qkv.weight.dtype == torch.float32


def _reference_attention(q, k, v):
    """Plain attention per head: q, k, v (N, C, T) -> (N, C, T)."""
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), dim=-1)  # (N, T, T)
    return (weights @ v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("legacy_order", [True, False])
def test_attention_orders_against_a_plain_reference(legacy_order):
    batch, heads, ch, length = 2, 3, 4, 5
    qkv = torch.randn(batch, 3 * heads * ch, length, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if legacy_order:
        q, k, v = qkv.reshape(batch, heads, 3, ch, length).unbind(2)  # per head: q, k, v
    else:
        q, k, v = qkv.reshape(batch, 3, heads, ch, length).unbind(1)  # all q, all k, all v
    expected = _reference_attention(*(part.reshape(batch * heads, ch, length) for part in (q, k, v)))
    out = QKVAttention(heads, legacy_order=legacy_order)(qkv)
    # float64 throughout: the softmax must not drop to float32.
    torch.testing.assert_close(out, expected.reshape(batch, heads * ch, length), rtol=1e-12, atol=1e-12)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 5)
    freqs = torch.tensor([1.0, 10000 ** -0.5])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs), torch.zeros(2, 1)], dim=1)
    torch.testing.assert_close(emb, expected)
