"""Our EDM networks: tiny U-Nets under each preconditioner, checked for shapes, the accepted
forms of sigma, determinism, label handling, iDDPM's sigma rounding and input gradients."""
import math

import edm_fixtures as fx
import numpy as np
import pytest
import torch
from edm_fixtures import CHANNELS, LABELS, RESOLUTION, inputs, perturb_

from elucd_fast.models import edm_networks
from elucd_fast.models.edm_networks import (
    AttentionOp,
    Conv2d,
    DhariwalUNet,
    EDMPrecond,
    VPPrecond,
)

# 32 base channels: the 8x8 level has 64, the width of one ADM attention head.
TINY_ADM = dict(model_type="DhariwalUNet", model_channels=32, channel_mult=(1, 2), num_blocks=1,
                attn_resolutions=(8,), dropout=0.1)
TINY_DDPMPP = dict(model_type="SongUNet", model_channels=16, channel_mult=(1, 2), num_blocks=1,
                   attn_resolutions=(8,), dropout=0.1, embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=(1, 1))
TINY_NCSNPP = dict(model_type="SongUNet", model_channels=16, channel_mult=(1, 2), num_blocks=1,
                   attn_resolutions=(8,), dropout=0.1, embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=(1, 3, 3, 1))
TINY_SKIP = dict(TINY_DDPMPP, encoder_type="skip", decoder_type="skip")

# (preconditioner class name, U-Net configuration), the combinations EDM trains.
CASES = {
    "edm-adm": ("EDMPrecond", TINY_ADM),
    "edm-ddpmpp-skip": ("EDMPrecond", TINY_SKIP),
    "vp-ddpmpp": ("VPPrecond", TINY_DDPMPP),
    "ve-ncsnpp": ("VEPrecond", TINY_NCSNPP),
    "iddpm-adm": ("iDDPMPrecond", TINY_ADM),
}


def build(case: str, label_dim: int = LABELS, **overrides) -> torch.nn.Module:
    """Tiny network of `case` with perturbed weights, in eval mode."""
    class_name, config = CASES[case]
    torch.manual_seed(0)
    net = getattr(edm_networks, class_name)(img_resolution=RESOLUTION, img_channels=CHANNELS, label_dim=label_dim,
                                            **{**config, **overrides})
    return perturb_(net).eval()


@pytest.fixture(scope="module")
def nets():
    return {case: build(case) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_forward_shape_and_sigma_forms(nets, case):
    net = nets[case]
    x, labels = inputs()
    sigma = 0.7
    with torch.no_grad():
        out_float = net(x, sigma, labels)
        out_0d = net(x, torch.tensor(sigma), labels)
        out_batch = net(x, torch.full((2,), sigma, dtype=torch.float64), labels)
    assert out_float.shape == x.shape and out_float.dtype == torch.float32
    assert torch.isfinite(out_float).all()
    assert torch.equal(out_float, out_0d)
    # A (B,) sigma runs the embedding per sample instead of broadcasting one row.
    torch.testing.assert_close(out_batch, out_float, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_eval_is_deterministic_and_per_sample(nets, case):
    net = nets[case]
    x, labels = inputs(batch=3)
    sigmas = torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        first = net(x, sigmas, labels)
        second = net(x, sigmas, labels)
        alone = net(x[1:2], sigmas[1:2], labels[1:2])
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_gradient_with_respect_to_input(nets, case):
    net = nets[case]
    x, labels = inputs()
    x.requires_grad_(True)
    net(x, 1.5, labels).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_labels_matter_and_none_means_zeros(nets):
    net = nets["edm-adm"]
    x, labels = inputs()
    with torch.no_grad():
        with_labels = net(x, 1.0, labels)
        other_labels = net(x, 1.0, labels.roll(1, dims=1))
        no_labels = net(x, 1.0)
        zero_labels = net(x, 1.0, torch.zeros_like(labels))
    assert not torch.equal(with_labels, other_labels)
    # One label row broadcast over the batch instead of B rows: equal up to rounding.
    torch.testing.assert_close(no_labels, zero_labels, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["edm-adm", "vp-ddpmpp"])
def test_label_dropout_only_while_training(case):
    net = build(case, dropout=0.0, label_dropout=1.0)
    x, labels = inputs()
    other = labels.roll(1, dims=1)
    with torch.no_grad():
        assert not torch.equal(net(x, 1.0, labels), net(x, 1.0, other))
        net.train()
        # Every label dropped: the labels cannot change the output.
        assert torch.equal(net(x, 1.0, labels), net(x, 1.0, other))


def test_use_fp16_stays_float32_off_cuda(nets):
    fp16 = build("edm-adm", use_fp16=True)
    x, labels = inputs()
    with torch.no_grad():
        assert torch.equal(fp16(x, 0.5, labels), nets["edm-adm"](x, 0.5, labels))
        assert torch.equal(fp16(x, 0.5, labels, force_fp32=True), nets["edm-adm"](x, 0.5, labels))


@pytest.mark.cuda
def test_use_fp16_runs_half_precision_on_cuda(nets):
    net = nets["edm-adm"]
    fp16 = type(net)(**{**net.init_kwargs, "use_fp16": True}).cuda().eval()
    fp16.load_state_dict(net.state_dict())
    x, labels = (t.cuda() for t in inputs())
    seen = []
    fp16.model.out_conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.no_grad():
        half = fp16(x, 0.5, labels)
        full = fp16(x, 0.5, labels, force_fp32=True)
    assert seen == [torch.float16, torch.float32]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=5e-2)


@pytest.mark.parametrize("case", CASES)
def test_init_kwargs_rebuild_the_architecture(nets, case):
    net = nets[case]
    rebuilt = type(net)(**net.init_kwargs).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x, labels = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(x, 0.3, labels), net(x, 0.3, labels))


@pytest.mark.parametrize("case", CASES)
def test_numpy_constructor_arguments_change_nothing(nets, case):
    # Built as EDM builds its networks (numpy float64 where EDM computes np.sqrt, as its pickles
    # record them): the same weights and outputs.
    class_name, config = CASES[case]
    torch.manual_seed(0)
    net = perturb_(fx.build_edm_network(class_name, img_resolution=RESOLUTION, img_channels=CHANNELS,
                                        label_dim=LABELS, **config)).eval()
    state, expected = net.state_dict(), nets[case].state_dict()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    if config["model_type"] == "SongUNet":
        assert type(net.model.enc["8x8_block0"].skip_scale) is np.float64
        assert type(net.model.enc["8x8_block0"].qkv._init_kwargs["init_weight"]) is np.float64
    else:
        assert type(net.model.map_layer0._init_kwargs["init_weight"]) is np.float64
    x, labels = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, 0.4, labels), nets[case](x, 0.4, labels))


def test_state_dict_names_follow_edm(nets):
    adm = nets["edm-adm"].state_dict()
    for name in ("model.map_layer0.weight", "model.map_label.weight", "model.enc.16x16_conv.weight",
                 "model.enc.8x8_down.conv0.resample_filter", "model.enc.8x8_block0.qkv.weight",
                 "model.dec.8x8_in0.proj.bias", "model.dec.16x16_up.skip.resample_filter", "model.out_conv.weight"):
        assert name in adm, name
    assert "model.map_label.bias" not in adm  # ADM's label embedding has no bias
    ncsnpp = nets["ve-ncsnpp"].state_dict()
    for name in ("model.map_noise.freqs", "model.enc.8x8_aux_residual.weight", "model.dec.16x16_aux_norm.weight",
                 "model.dec.16x16_aux_conv.weight"):
        assert name in ncsnpp, name
    skip = nets["edm-ddpmpp-skip"].state_dict()
    assert "model.enc.8x8_aux_skip.weight" in skip and "model.dec.8x8_aux_conv.weight" in skip
    assert "u" in nets["iddpm-adm"].state_dict()


def test_imagenet_adm_has_edm_parameter_count():
    # EDM's ImageNet-64 network (edm-imagenet-64x64-cond-adm.pkl) has 296M parameters; build it
    # without memory on the meta device.
    with torch.device("meta"):
        unet = DhariwalUNet(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=192,
                            channel_mult=[1, 2, 3, 4], dropout=0.1)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 296


def test_iddpm_round_sigma(nets):
    net = nets["iddpm-adm"]
    u = net.u
    assert u.shape == (1001,) and u[-1] == 0 and bool((u[:-1] > u[1:]).all())
    assert net.sigma_min == float(u[999]) and net.sigma_max == float(u[0])
    sigma = torch.tensor([[0.0, 0.5], [3.0, 1e6]], dtype=torch.float64)
    rounded = net.round_sigma(sigma)
    index = net.round_sigma(sigma, return_index=True)
    assert rounded.shape == sigma.shape and rounded.dtype == torch.float64
    assert index.dtype == torch.int64 and index.shape == sigma.shape
    nearest = (sigma.reshape(-1, 1) - u.double().reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)
    assert torch.equal(index, nearest)
    assert torch.equal(rounded, u[index].double())
    assert index[1, 1] == 0 and index[0, 0] == 1000
    assert float(net.round_sigma(float(u[500]))) == float(u[500])


def test_vp_sigma_and_inverse():
    net = VPPrecond(img_resolution=RESOLUTION, img_channels=CHANNELS, **TINY_DDPMPP)
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0])
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t, rtol=1e-4, atol=1e-6)
    assert net.sigma_min == pytest.approx(float(net.sigma(1e-5))) and net.sigma_max == pytest.approx(152.0, rel=0.01)


def test_edm_precond_defaults():
    net = EDMPrecond(img_resolution=RESOLUTION, img_channels=CHANNELS, **TINY_ADM)
    assert net.sigma_min == 0 and net.sigma_max == math.inf and net.sigma_data == 0.5
    assert net.init_kwargs["use_fp16"] is False and net.init_kwargs["model_type"] == "DhariwalUNet"
    assert net.label_dim == 0 and net.model.map_label is None


def test_attention_backward_matches_autograd():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 5, generator=generator, requires_grad=True)
    k = torch.randn(2, 8, 7, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 5, 7, generator=generator)
    (AttentionOp.apply(q, k) * upstream).sum().backward()
    q_ref, k_ref = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    reference = torch.einsum("ncq,nck->nqk", q_ref, k_ref / math.sqrt(8)).softmax(dim=2)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.grad, k_ref.grad, rtol=1e-5, atol=1e-6)


# EDM's networks fuse only downsampling (NCSN++'s residual encoder); its fused upsampling path
# does not double the size and is never used, so it is not exercised here.
@pytest.mark.parametrize("direction, fused", [("up", False), ("down", False), ("down", True)])
def test_conv_resampling_shapes(direction, fused):
    conv = Conv2d(4, 6, kernel=3, resample_filter=(1, 3, 3, 1), fused_resample=fused, **{direction: True})
    out = conv(torch.randn(1, 4, 8, 8))
    assert out.shape == ((1, 6, 16, 16) if direction == "up" else (1, 6, 4, 4))
    # Without weights the layer only resamples, with unit gain: a constant image stays constant
    # away from the borders.
    resample = Conv2d(2, 2, kernel=0, resample_filter=(1, 3, 3, 1), **{direction: True})
    flat = resample(torch.ones(1, 2, 8, 8))
    torch.testing.assert_close(flat[..., 2:-2, 2:-2], torch.ones_like(flat[..., 2:-2, 2:-2]))
