"""The guided-diffusion UNet: the released checkpoints' flags, key sets and numerics, loading,
fp16, attention math, and sampling with the DDPM sampler.

Reference numbers (key-set fingerprints, tiny-model outputs) were computed with
openai/guided-diffusion's own `script_util.create_model` / `create_model_and_diffusion` on the
README's flag lines; the tests rebuild the same models here and compare.
"""
from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch

from elucd_fast import ddpm_sampler
from elucd_fast.models.adm_unet import (
    PUBLIC_CHECKPOINTS, AttentionBlock, QKVAttention, adm_flags_from_state_dict, adm_model_flags,
    adm_model_for_state_dict, create_adm_model, load_adm_model, public_checkpoint_flags, public_checkpoint_of,
    timestep_embedding,
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


def test_conditioning_is_read_from_the_file(tmp_path):
    """class_cond, num_classes and learn_sigma default to the file's, so the flags need not name
    them (256x256_diffusion.pt and 256x256_diffusion_uncond.pt share their flags otherwise)."""
    structural = {k: v for k, v in TINY_FLAGS.items() if k not in ("class_cond", "num_classes", "learn_sigma")}
    for class_cond, learn_sigma in [(False, True), (True, False)]:
        path = tmp_path / f"tiny_{class_cond}_{learn_sigma}.pt"
        source = create_adm_model(**{**TINY_FLAGS, "class_cond": class_cond, "learn_sigma": learn_sigma})
        torch.save(source.state_dict(), path)
        model = load_adm_model(path, **structural)
        assert model.num_classes == (10 if class_cond else None)
        assert model.out_channels == (6 if learn_sigma else 3)


def test_a_file_at_a_public_resolution_but_not_a_public_structure_gets_no_guessed_attention_flags(tmp_path):
    """Head split and attention order are not in the weights. A file with the 64x64 channel
    multipliers but another width is not 64x64_diffusion.pt: it gets guided-diffusion's defaults
    (4 heads, legacy order, float32) unless the caller names its flags, never the 64x64 model's."""
    flags = dict(num_channels=32, num_res_blocks=1, attention_resolutions="8", learn_sigma=True, resblock_updown=True)
    source = _randomised(create_adm_model(**{**adm_model_flags(64), **flags, "num_head_channels": 16,
                                             "use_fp16": False}))
    path = tmp_path / "tiny64.pt"
    torch.save(source.state_dict(), path)
    assert public_checkpoint_of(source.state_dict()) is None
    guessed = load_adm_model(path, **flags)
    assert guessed.image_size == 64 and guessed.dtype == torch.float32
    assert {(m.attention.num_heads, m.attention.legacy_order) for m in _attention_blocks(guessed)} == {(4, True)}
    named = load_adm_model(path, **flags, num_head_channels=16, use_new_attention_order=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([500]), torch.tensor([3])
    with torch.no_grad():
        torch.testing.assert_close(named(x, t, y), source(x, t, y), rtol=0, atol=0)


def test_class_labels_must_match_conditioning():
    model = create_adm_model(**TINY_FLAGS).eval()
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


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


def _attention_blocks(model: torch.nn.Module) -> list[AttentionBlock]:
    return [m for m in model.modules() if isinstance(m, AttentionBlock)]


def _fingerprint(state) -> str:
    """Key names, their order and shapes, hashed: equal fingerprints mean equal key sets."""
    return hashlib.sha256("\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items()).encode()).hexdigest()[:16]


# ---- The released checkpoints, from guided-diffusion's README and its `script_util` ----

# `model_and_diffusion_defaults()`: what a flag the README line leaves out is.
MODEL_AND_DIFFUSION_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
    use_scale_shift_norm=True, resblock_updown=False, use_fp16=False, use_new_attention_order=False,
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
    predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
# The README's MODEL_FLAGS line for each file, verbatim.
README_MODEL_FLAGS = {
    "64x64_diffusion.pt": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                          "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                          "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                          "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
    "128x128_diffusion.pt": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
                            "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 "
                            "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "256x256_diffusion.pt": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
                            "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                            "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "256x256_diffusion_uncond.pt": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
                                   "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
                                   "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                                   "--use_scale_shift_norm True",
    "512x512_diffusion.pt": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
                            "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                            "--num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True",
}
# Measured on guided-diffusion's `create_model_and_diffusion(**flags)` built on the meta device:
# number of keys, parameters, `_fingerprint` of its state dict, and the attention blocks as
# {(channels, heads, attention class)} (QKVAttention: new order; QKVAttentionLegacy: legacy).
UPSTREAM_STRUCTURE = {
    "64x64_diffusion.pt": (541, 295_904_454, "b41189488aa25b2a",
                           {(384, 6, "QKVAttention"), (576, 9, "QKVAttention"), (768, 12, "QKVAttention")}),
    "128x128_diffusion.pt": (493, 421_529_606, "3e304371ffe30dfe",
                             {(512, 4, "QKVAttentionLegacy"), (768, 4, "QKVAttentionLegacy"),
                              (1024, 4, "QKVAttentionLegacy")}),
    "256x256_diffusion.pt": (567, 553_838_086, "34403438fb090630",
                             {(512, 8, "QKVAttentionLegacy"), (1024, 16, "QKVAttentionLegacy")}),
    "256x256_diffusion_uncond.pt": (566, 552_814_086, "99b0f51e19c0f485",
                                    {(512, 8, "QKVAttentionLegacy"), (1024, 16, "QKVAttentionLegacy")}),
    "512x512_diffusion.pt": (645, 558_997_638, "74099b42b3463e62",
                             {(512, 8, "QKVAttentionLegacy"), (1024, 16, "QKVAttentionLegacy")}),
}


def _parse_flag_line(line: str) -> dict[str, object]:
    """A MODEL_FLAGS line as guided-diffusion's argparse reads it: typed by the default's type."""
    tokens = line.split()
    flags = {}
    for name, text in zip(tokens[::2], tokens[1::2]):
        default = MODEL_AND_DIFFUSION_DEFAULTS[name.removeprefix("--")]
        if isinstance(default, bool):
            value: object = {"True": True, "False": False}[text]
        else:
            value = type(default)(text)
        flags[name.removeprefix("--")] = value
    return flags


def _layout(model) -> set[tuple[int, int, str]]:
    return {(m.qkv.in_channels, m.attention.num_heads,
             "QKVAttentionLegacy" if m.attention.legacy_order else "QKVAttention") for m in _attention_blocks(model)}


def test_public_checkpoint_flags_are_the_readme_lines_over_the_defaults():
    assert PUBLIC_CHECKPOINTS == tuple(README_MODEL_FLAGS)
    for name, line in README_MODEL_FLAGS.items():
        expected = {**MODEL_AND_DIFFUSION_DEFAULTS, **_parse_flag_line(line)}
        assert public_checkpoint_flags(name) == expected, name
    assert adm_model_flags(256, class_cond=False) == public_checkpoint_flags("256x256_diffusion_uncond.pt")
    assert adm_model_flags(64) == public_checkpoint_flags("64x64_diffusion.pt")
    with pytest.raises(ValueError, match="no public unconditional .* choose one of \\[256\\]"):
        adm_model_flags(64, class_cond=False)
    with pytest.raises(ValueError, match="not a released"):
        public_checkpoint_flags("lsun_cat.pt")


@pytest.mark.parametrize("name", list(UPSTREAM_STRUCTURE))
def test_full_size_key_sets_equal_guided_diffusions(name):
    keys, parameters, fingerprint, layout = UPSTREAM_STRUCTURE[name]
    with torch.device("meta"):
        model = create_adm_model(**public_checkpoint_flags(name))
    state = model.state_dict()
    assert (len(state), sum(v.numel() for v in state.values())) == (keys, parameters)
    assert _fingerprint(state) == fingerprint
    assert _layout(model) == layout
    assert public_checkpoint_of(state) == name
    # The loader's choice for a file with these keys: the same model, flags from the README line.
    with torch.device("meta"):
        rebuilt = adm_model_for_state_dict(state)
    assert _fingerprint(rebuilt.state_dict()) == fingerprint and _layout(rebuilt) == layout
    assert rebuilt.dtype == (torch.float16 if public_checkpoint_flags(name)["use_fp16"] else torch.float32)
    found = adm_flags_from_state_dict(state)
    assert found["class_cond"] == public_checkpoint_flags(name)["class_cond"] and found["learn_sigma"]


def _meta_state(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return create_adm_model(**public_checkpoint_flags(name)).state_dict()


def test_key_names_and_shapes_of_the_other_public_checkpoints():
    expected = {
        "64x64_diffusion.pt": {
            "time_embed.0.weight": (768, 192), "label_emb.weight": (1000, 768),
            "input_blocks.0.0.weight": (192, 3, 3, 3),
            "input_blocks.4.0.in_layers.2.weight": (192, 192, 3, 3),  # resblock_updown downsampler after 3 blocks
            "input_blocks.5.1.qkv.weight": (1152, 384, 1),  # attention from 32x32 on
            "input_blocks.15.1.qkv.weight": (2304, 768, 1), "middle_block.1.qkv.weight": (2304, 768, 1),
            "output_blocks.11.1.qkv.weight": (1152, 384, 1),
            "output_blocks.15.0.skip_connection.weight": (192, 384, 1, 1),
            "out.2.weight": (6, 192, 3, 3)},
        "256x256_diffusion_uncond.pt": {
            "time_embed.0.weight": (1024, 256), "input_blocks.10.1.qkv.weight": (1536, 512, 1),
            "input_blocks.17.1.qkv.weight": (3072, 1024, 1), "output_blocks.8.1.qkv.weight": (1536, 512, 1),
            "out.2.weight": (6, 256, 3, 3)},
        "512x512_diffusion.pt": {
            "input_blocks.0.0.weight": (128, 3, 3, 3), "label_emb.weight": (1000, 1024),
            "input_blocks.13.1.qkv.weight": (1536, 512, 1), "input_blocks.20.1.qkv.weight": (3072, 1024, 1),
            "out.2.weight": (6, 128, 3, 3)},
    }
    attention_blocks = {
        "64x64_diffusion.pt": [f"input_blocks.{i}.1" for i in (5, 6, 7, 9, 10, 11, 13, 14, 15)] + ["middle_block.1"]
        + [f"output_blocks.{i}.1" for i in range(12)],
        "256x256_diffusion_uncond.pt": [f"input_blocks.{i}.1" for i in (10, 11, 13, 14, 16, 17)] + ["middle_block.1"]
        + [f"output_blocks.{i}.1" for i in range(9)],
        "512x512_diffusion.pt": [f"input_blocks.{i}.1" for i in (13, 14, 16, 17, 19, 20)] + ["middle_block.1"]
        + [f"output_blocks.{i}.1" for i in range(9)],
    }
    blocks = {"64x64_diffusion.pt": 16, "256x256_diffusion_uncond.pt": 18, "512x512_diffusion.pt": 21}
    for name, shapes in expected.items():
        state = _meta_state(name)
        for key, shape in shapes.items():
            assert tuple(state[key].shape) == shape, (name, key)
        assert [k.removesuffix(".qkv.weight") for k in state if k.endswith(".qkv.weight")] == attention_blocks[name]
        for part in ("input_blocks", "output_blocks"):
            assert len({k.split(".")[1] for k in state if k.startswith(part + ".")}) == blocks[name]
    assert "label_emb.weight" not in _meta_state("256x256_diffusion_uncond.pt")


# ---- Tiny models of each variant, against outputs of guided-diffusion's own code ----

# `create_model` arguments; guided-diffusion's class-conditional models always have 1000 classes.
TINY_UPSTREAM = dict(image_size=16, num_channels=32, num_res_blocks=2, channel_mult="1,2",
                     attention_resolutions="16,8", learn_sigma=True, class_cond=True, use_checkpoint=False,
                     num_heads=4, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
                     dropout=0.1, resblock_updown=True, use_fp16=False, use_new_attention_order=False)
# variant: (flags over TINY_UPSTREAM, key fingerprint, out[:, :, 5, 11] flattened, mean |out| per channel),
# from guided-diffusion's `create_model(**flags)` filled by `_filled` and run on `_tiny_inputs()`.
TINY_REFERENCE = {
    "new_order": (dict(num_head_channels=8, use_new_attention_order=True), "eb54a2acccf8e7e4",
                  [-0.002713, -0.057735, -0.000872, -0.246771, -0.003765, -0.031488,
                   0.112875, -0.082342, -0.046268, -0.238722, -0.046201, -0.109575],
                  [0.068433, 0.047748, 0.081039, 0.161871, 0.044795, 0.152215]),
    "uncond": (dict(num_head_channels=16, class_cond=False), "55bcea4cd1124a92",
               [0.100375, -0.06157, 0.048539, 0.055249, -0.04076, -0.030431,
                -0.015043, 0.068953, 0.212046, 0.093668, 0.011978, -0.149405],
               [0.057182, 0.056014, 0.125358, 0.06468, 0.078543, 0.071145]),
    "num_heads": (dict(num_heads=2), "eb54a2acccf8e7e4",
                  [-0.00318, -0.057932, -0.000662, -0.247343, -0.004695, -0.031634,
                   0.112898, -0.081947, -0.045202, -0.239153, -0.046668, -0.109978],
                  [0.068457, 0.047792, 0.080998, 0.161877, 0.044819, 0.152206]),
    "conv_resample": (dict(num_heads=1, resblock_updown=False, use_scale_shift_norm=False, learn_sigma=False,
                           class_cond=False), "31a9a2d0f26e888f",
                      [-0.034951, 0.099836, -0.019764, 0.019142, 0.056934, 0.006214],
                      [0.047898, 0.092385, 0.058533]),
}


def _filled(model: torch.nn.Module) -> torch.nn.Module:
    """Parameters in state-dict order from one seeded generator: matrices N(0, 1/fan_in), vectors
    N(0, 0.1**2). Nothing stays zero-initialised, so every block shows in the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def _tiny_inputs():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([3, 870]), torch.tensor([7, 998])


def _save_like_train_loop(model: torch.nn.Module, path) -> None:
    """`TrainLoop.save` after fp16 training: the (EMA) master parameters are two flat float32
    buffers, vectors first, then matrices, and the saved state dict holds views into them."""
    named = list(model.named_parameters())
    views = {}
    for group in ([(n, p) for n, p in named if p.ndim <= 1], [(n, p) for n, p in named if p.ndim > 1]):
        flat = torch.cat([p.detach().float().reshape(-1) for _, p in group])
        offset = 0
        for name, p in group:
            views[name] = flat[offset: offset + p.numel()].view(p.shape)
            offset += p.numel()
    torch.save({name: views[name] for name in model.state_dict()}, path)


@pytest.mark.parametrize("variant", list(TINY_REFERENCE))
def test_tiny_variants_match_guided_diffusions_outputs(tmp_path, variant):
    changes, fingerprint, pixel, mean_abs = TINY_REFERENCE[variant]
    flags = {**TINY_UPSTREAM, **changes}
    model = _filled(create_adm_model(**flags))
    assert _fingerprint(model.state_dict()) == fingerprint
    path = tmp_path / f"ema_0.9999_{variant}.pt"
    _save_like_train_loop(model, path)
    stored = torch.load(path, weights_only=True)
    assert len({v.untyped_storage().data_ptr() for v in stored.values()}) == 2  # the two flat buffers
    loaded = load_adm_model(path, **flags)
    x, t, y = _tiny_inputs()
    with torch.no_grad():
        out = loaded(x, t, y if flags["class_cond"] else None)
        torch.testing.assert_close(out, model(x, t, y if flags["class_cond"] else None), rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 5, 11].flatten(), torch.tensor(pixel), rtol=0, atol=2e-6)
    torch.testing.assert_close(out.abs().mean(dim=(0, 2, 3)), torch.tensor(mean_abs), rtol=0, atol=2e-6)


def test_the_reference_outputs_tell_the_attention_orders_apart():
    changes, _, pixel, _ = TINY_REFERENCE["new_order"]
    x, t, y = _tiny_inputs()
    with torch.no_grad():
        legacy = _filled(create_adm_model(**{**TINY_UPSTREAM, **changes, "use_new_attention_order": False}))(x, t, y)
    assert (legacy[:, :, 5, 11].flatten() - torch.tensor(pixel)).abs().max() > 1e-4


def test_head_channels_split_the_qkv_rows_as_upstream():
    """New order with num_head_channels: the qkv convolution's rows are all queries, all keys, all
    values, each split into channels // num_head_channels heads of num_head_channels rows."""
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=True).eval()
    assert block.attention.num_heads == 4 and not block.attention.legacy_order
    x = torch.randn(2, 64, 3, 5)
    with torch.no_grad():
        h = block.norm(x.reshape(2, 64, 15))
        qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0], h) + block.qkv.bias[:, None]
        q, k, v = (part.reshape(2 * 4, 16, 15) for part in qkv.split(64, dim=1))
        expected = x + block.proj_out(_reference_attention(q, k, v).reshape(2, 64, 15)).reshape(2, 64, 3, 5)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


# ---- The new variants under the DDPM sampler ----

def _record_timesteps(model, seen: list):
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))


def test_new_attention_order_model_samples_with_the_cosine_schedule(tmp_path):
    flags = {**TINY_UPSTREAM, **TINY_REFERENCE["new_order"][0]}
    path = tmp_path / "tiny_new_order.pt"
    _save_like_train_loop(_filled(create_adm_model(**flags)), path)
    model = load_adm_model(path, **flags)
    seen: list = []
    _record_timesteps(model, seen)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    samples = ddpm_sampler(model, noise, torch.tensor([7, 998]), num_timesteps=1000, beta_schedule="cosine",
                           timestep_respacing="5", learn_sigma=True)
    assert samples.shape == (2, 3, 16, 16) and torch.isfinite(samples).all()
    # The model sees the original timesteps of the 5 respaced ones, x_T first.
    assert seen == [[t, t] for t in (999, 749, 500, 250, 0)]


def test_unconditional_model_samples_without_labels(tmp_path):
    flags = {**TINY_UPSTREAM, **TINY_REFERENCE["uncond"][0]}
    path = tmp_path / "tiny_uncond.pt"
    _save_like_train_loop(_filled(create_adm_model(**flags)), path)
    model = load_adm_model(path, **{k: v for k, v in flags.items() if k != "class_cond"})
    assert model.num_classes is None
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for respacing, ddim in (("4", False), ("ddim4", True)):
        samples = ddpm_sampler(model, noise, None, beta_schedule="linear", timestep_respacing=respacing,
                               learn_sigma=True, use_ddim=ddim)
        assert samples.shape == (1, 3, 16, 16) and torch.isfinite(samples).all()
