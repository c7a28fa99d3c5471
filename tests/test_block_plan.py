"""Block plans (`models.block_plan`) on every architecture: an empty plan is the plain forward bit
for bit; each bypass rule equals a hand-built reference (the same network with the bypassed
branch's output forced to zero and its balance undone); a reused cache point equals the plain
network with that decoder block's output replaced by the stored one, and runs none of the deep path."""
from __future__ import annotations

import copy

import pytest
import torch

from elucd_fast.digits.networks import build_denoiser, build_edm2_denoiser
from elucd_fast.models.adm_unet import AttentionBlock, ResBlock, create_adm_model
from elucd_fast.models.block_plan import BlockPlan, check_plan, plan_fingerprint
from elucd_fast.models.denoiser import EpsModelDenoiser
from elucd_fast.models.dit import DiT
from elucd_fast.models.edm2_networks import EDM2Block, EDM2Precond
from elucd_fast.models.edm_networks import EDMPrecond, UNetBlock

ADM_FLAGS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="2",
                 class_cond=True, num_classes=10, learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
                 num_heads=2, use_fp16=False)
SONG = dict(model_type="SongUNet", model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
            embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
            resample_filter=(1, 1))
NCSN = dict(SONG, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=(1, 3, 3, 1))
DHARIWAL = dict(model_type="DhariwalUNet", model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))
EDM2 = dict(img_resolution=16, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
            channels_per_head=8, use_fp16=False)


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and nonzero (zero-initialised output layers and gains would make a
    bypassed branch indistinguishable from a computed one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (0.5 if p.ndim == 0 else 0))
    return net.eval()


def _adm():
    return EpsModelDenoiser(_randomised(create_adm_model(**ADM_FLAGS)), img_resolution=16, label_dim=10)


ARCHITECTURES = {
    "adm": _adm,
    "song": lambda: _randomised(EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, **SONG)),
    "ncsn": lambda: _randomised(EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, **NCSN)),
    "dhariwal": lambda: _randomised(EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, **DHARIWAL)),
    "edm2": lambda: _randomised(EDM2Precond(img_channels=3, label_dim=10, **EDM2)),
    "digits": lambda: _randomised(build_denoiser()),
    "digits_edm2": lambda: _randomised(build_edm2_denoiser()),
}


def _inputs(net, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=generator) * 2
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()
    return x, torch.tensor(1.3), labels


def _blocks(net) -> dict[int, torch.nn.Module]:
    """Block id -> the module that holds it (an attention id maps to its residual block for the
    EDM U-Nets, to the attention layer for ADM)."""
    found = {}
    for module in net.modules():
        for attr in ("block_id", "attention_id"):
            if hasattr(module, attr):
                found[getattr(module, attr)] = module
    return found


def _zero_branch(net, block_id: int) -> None:
    """The hand-written reference of a bypass: the branch the plan drops made to contribute
    exactly nothing, and the two-branch balance undone, in an ordinary forward."""
    module = _blocks(net)[block_id]
    attention = getattr(module, "attention_id", None) == block_id
    with torch.no_grad():
        if isinstance(module, ResBlock):
            module.out_layers[-1].weight.zero_()
            module.out_layers[-1].bias.zero_()
        elif isinstance(module, AttentionBlock):
            module.proj_out.weight.zero_()
            module.proj_out.bias.zero_()
        elif isinstance(module, EDM2Block):
            if attention:
                module.attn_balance = 0.0  # mp_sum(x, y, 0) = x
            else:
                module.res_balance = 0.0
        elif isinstance(module, UNetBlock):
            if attention:
                module.attention = lambda x: x
            else:
                module.conv1.weight.zero_()
                module.conv1.bias.zero_()
                scale = module.skip_scale
                module.skip_scale = 1.0  # the shortcut alone, unscaled

                # The attention (if any) still runs with its own scale, as in the plan.
                if module.num_heads:
                    plain_attention = type(module).attention.__get__(module)

                    def attention(x, plain_attention=plain_attention, module=module, scale=scale):
                        module.skip_scale = scale
                        try:
                            return plain_attention(x)
                        finally:
                            module.skip_scale = 1.0
                    module.attention = attention
        else:
            raise AssertionError(type(module))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_an_empty_plan_is_the_plain_forward_bit_for_bit(name):
    net = ARCHITECTURES[name]()
    x, sigma, labels = _inputs(net)
    plain = net(x, sigma, labels)
    assert torch.equal(net(x, sigma, labels, block_plan=BlockPlan(), block_cache={}), plain)
    assert torch.equal(net(x, sigma, labels, block_plan=None), plain)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_bypass_rule_equals_the_network_with_that_branch_zeroed(name):
    net = ARCHITECTURES[name]()
    x, sigma, labels = _inputs(net)
    names = net.block_names()
    assert len(names) == len(set(names)) == len(_blocks(net))
    for block_id in range(len(names)):
        reference = copy.deepcopy(net)
        _zero_branch(reference, block_id)
        expected = reference(x, sigma, labels)
        got = net(x, sigma, labels, block_plan=BlockPlan(frozenset({block_id})))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"block {block_id} {names[block_id]}")
        assert not torch.allclose(got, net(x, sigma, labels), rtol=1e-4, atol=1e-4), names[block_id]


def test_adm_numbers_its_layers_as_autodiffusion_does():
    """58 ids in the ImageNet-64 network (AutoDiffusion's `layer_num`): every ResBlock (the
    resampling ones too) and attention layer."""
    from elucd_fast.models.adm_unet import public_checkpoint_flags
    flags = {k: v for k, v in public_checkpoint_flags("64x64_diffusion.pt").items()}
    with torch.device("meta"):
        model = create_adm_model(**flags)
    names = model.block_names()
    assert len(names) == 58 and names[0] == "input_blocks.1.0" and names[-1] == "output_blocks.15.0"


def test_several_bypasses_together_and_both_parts_of_one_block():
    net = ARCHITECTURES["dhariwal"]()
    x, sigma, labels = _inputs(net)
    names = net.block_names()
    attn = names.index("enc.8x8_block0.attn")
    skip = {attn - 1, attn, names.index("dec.8x8_in1")}
    reference = copy.deepcopy(net)
    for block_id in sorted(skip):
        _zero_branch(reference, block_id)
    torch.testing.assert_close(net(x, sigma, labels, block_plan=BlockPlan(frozenset(skip))),
                               reference(x, sigma, labels), rtol=1e-5, atol=1e-5)


def _decoder_modules(net):
    unet = getattr(net, "model", None) or getattr(net, "unet", None)
    if hasattr(unet, "output_blocks"):
        return list(unet.output_blocks), [unet.middle_block]
    decoder = [m for m in unet.dec.values() if isinstance(m, (UNetBlock, EDM2Block))]
    return decoder, []


@pytest.mark.parametrize("name", ["adm", "song", "ncsn", "dhariwal", "edm2", "digits", "digits_edm2"])
def test_a_reused_cache_point_is_the_stored_feature_in_the_plain_network(name):
    net = ARCHITECTURES[name]()
    x1, sigma1, labels = _inputs(net, seed=1)
    x2, sigma2 = _inputs(net, seed=2)[0], torch.tensor(0.7)
    decoder, middle = _decoder_modules(net)
    assert net.cache_points == len(decoder)
    for point in range(len(decoder) - 1):
        cache = {}
        first = net(x1, sigma1, labels, block_plan=BlockPlan(store=point), block_cache=cache)
        assert torch.equal(first, net(x1, sigma1, labels)) and set(cache) == {point}
        # Reference: the ordinary forward at (x2, sigma2) with decoder block `point`'s output
        # replaced by the stored feature.
        handle = decoder[point].register_forward_hook(lambda module, args, out: cache[point])
        expected = net(x2, sigma2, labels)
        handle.remove()
        calls = []
        handles = [m.register_forward_hook(lambda module, args, out: calls.append(1))
                   for m in middle + decoder[:point + 1]]
        got = net(x2, sigma2, labels, block_plan=BlockPlan(reuse=point), block_cache=cache)
        for handle in handles:
            handle.remove()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert not calls, "the deep path ran although its output was reused"


def test_dit_bypasses_blocks_and_has_no_cache_points():
    torch.manual_seed(0)
    model = _randomised(DiT(input_size=8, num_classes=10, patch_size=2, hidden_size=32, depth=3, num_heads=2))
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 10])
    assert torch.equal(model(x, t, y, block_plan=BlockPlan()), model(x, t, y))
    reference = copy.deepcopy(model)
    with torch.no_grad():  # adaLN gates of zero: both residual branches add nothing
        reference.blocks[1].adaLN_modulation[-1].weight.zero_()
        reference.blocks[1].adaLN_modulation[-1].bias.zero_()
    torch.testing.assert_close(model(x, t, y, block_plan=BlockPlan(frozenset({1}))), reference(x, t, y))
    with pytest.raises(ValueError, match="not a cache point of this DiT .allowed: none"):
        model(x, t, y, block_plan=BlockPlan(store=0), block_cache={})


def test_bad_plans_are_refused_with_what_is_allowed():
    net = ARCHITECTURES["digits"]()
    x, sigma, labels = _inputs(net)
    count = len(net.block_names())
    with pytest.raises(ValueError, match=rf"block ids \[{count}\] are not blocks of SongUNet .it has ids 0..{count - 1}"):
        net(x, sigma, labels, block_plan=BlockPlan(frozenset({count})))
    with pytest.raises(ValueError, match="reuses cache point 1, which no earlier call of this run stored"):
        net(x, sigma, labels, block_plan=BlockPlan(reuse=1), block_cache={})
    with pytest.raises(ValueError, match="pass a block_cache dict"):
        net(x, sigma, labels, block_plan=BlockPlan(store=1))
    with pytest.raises(ValueError, match="store 99 is not a cache point"):
        check_plan(BlockPlan(store=99), net.block_names(), net.cache_points, "net")
    with pytest.raises(ValueError, match="reads and writes one cache point"):
        BlockPlan(store=1, reuse=2)


def test_plans_round_trip_through_json_and_bad_json_is_refused():
    plan = BlockPlan(frozenset({3, 1}), store=2)
    assert BlockPlan.from_json(plan.to_json()) == plan and plan.to_json() == {"skip": [1, 3], "store": 2, "reuse": None}
    for bad, message in [({"skip": [1, 1]}, "twice"), ({"skip": "1"}, "list of integer"), ({"reuse": 1.5}, "integer"),
                         ({"skipped": []}, "keys skip, store, reuse"), ([], "keys skip, store, reuse")]:
        with pytest.raises(ValueError, match=message):
            BlockPlan.from_json(bad)
    assert plan_fingerprint(ARCHITECTURES["digits"]().block_names()) != plan_fingerprint(
        ARCHITECTURES["digits_edm2"]().block_names())
