"""Our EDM2 networks and encoders: the published architectures' state-dict keys and sizes (facts
taken from NVlabs/edm2's `training/networks_edm2.py`, which the tests cannot import), tiny networks
against a plain float64 transcription of the paper's formulas, float16 weights, and the two
decodings of each encoder."""
import copy
import hashlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elucd_fast.models.edm2_encoders import (
    RAW_MEAN,
    RAW_STD,
    StabilityVAEEncoder,
    StandardRGBEncoder,
)
from elucd_fast.models.edm2_networks import (
    EDM2_CONFIGS,
    EDM2_PICKLE_CLASSES,
    EDM2Precond,
    EDM2UNet,
    edm2_config,
)

# --------------------------------------------------------------------------------------------
# (a) The published architectures, built on the meta device (no memory, no arithmetic).

# (parameters, buffer elements in the state dict) of each configuration, counted with EDM2's own
# `Precond` (the Fourier features' frequencies and phases are its only buffers).
EXPECTED_SIZES = {
    "img512-xxs": (31_309_029, 384),
    "img512-xs": (124_713_253, 512),
    "img512-s": (280_212_837, 640),
    "img512-m": (497_807_781, 768),
    "img512-l": (777_498_085, 896),
    "img512-xl": (1_119_283_749, 1024),
    "img512-xxl": (1_523_164_773, 1152),
    "img512-xs-uncond": (124_201_253, 512),
    "img512-s-uncond": (279_444_837, 640),
    "img64-xs": (124_710_949, 512),
    "img64-s": (280_209_381, 640),
    "img64-m": (497_803_173, 768),
    "img64-l": (777_492_325, 896),
    "img64-xl": (1_119_276_837, 1024),
}
# sha256 of EDM2's state dict as "name shape" lines, in its order, joined by newlines.
EXPECTED_KEY_DIGESTS = {
    "img64-xl": "341b1cdf7847a39f665bcff82c5583ec4c1fe893dd335d7af1afc0b56e0c38b8",
    "img512-xxl": "9fa47a1933941992c1eef36c81580f83a1d5afcc164ce53d38f7fe1e94b81fe4",
    "img512-xs-uncond": "a55652b5a95cf159a2ac4d9a663c79254e32ae5e7d9b3ae4e85c5d9e1f787dd9",
}
# A readable sample of those lines (img512-xxl; img64-xl has 384 base channels, 3 image channels).
XXL_SAMPLE = {
    "unet.out_gain": (),
    "unet.emb_fourier.freqs": (448,),
    "unet.emb_fourier.phases": (448,),
    "unet.emb_noise.weight": (1792, 448),
    "unet.emb_label.weight": (1792, 1000),
    "unet.enc.64x64_conv.weight": (448, 5, 3, 3),
    "unet.enc.32x32_down.conv_res0.weight": (448, 448, 3, 3),
    "unet.enc.32x32_block0.conv_skip.weight": (896, 448, 1, 1),
    "unet.enc.16x16_block0.attn_qkv.weight": (4032, 1344, 1, 1),
    "unet.enc.8x8_block2.attn_proj.weight": (1792, 1792, 1, 1),
    "unet.dec.8x8_in0.attn_qkv.weight": (5376, 1792, 1, 1),
    "unet.dec.8x8_in1.emb_gain": (),
    "unet.dec.64x64_block3.conv_res0.weight": (448, 896, 3, 3),
    "unet.dec.64x64_block3.emb_linear.weight": (448, 1792),
    "unet.dec.64x64_block3.conv_skip.weight": (448, 896, 1, 1),
    "unet.out_conv.weight": (4, 448, 3, 3),
    "logvar_fourier.freqs": (128,),
    "logvar_fourier.phases": (128,),
    "logvar_linear.weight": (1, 128),
}


def meta_network(name: str) -> EDM2Precond:
    with torch.device("meta"):
        return EDM2Precond.from_config(name)


def key_lines(net: torch.nn.Module) -> list[str]:
    return [f"{key} {tuple(value.shape)}" for key, value in net.state_dict().items()]


def test_every_published_config_has_edm2s_size():
    assert set(EDM2_CONFIGS) == set(EXPECTED_SIZES)
    for name, (parameters, buffer_elements) in EXPECTED_SIZES.items():
        net = meta_network(name)
        assert sum(p.numel() for p in net.parameters()) == parameters, name
        state = net.state_dict()
        assert sum(value.numel() for value in state.values()) == parameters + buffer_elements, name
        assert len(state) == (202 if name.endswith("-uncond") else 203), name


@pytest.mark.parametrize("name", sorted(EXPECTED_KEY_DIGESTS))
def test_state_dict_keys_and_shapes_equal_edm2s(name):
    lines = key_lines(meta_network(name))
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == EXPECTED_KEY_DIGESTS[name]


def test_state_dict_sample_and_structure_of_img512_xxl_and_img64_xl():
    xxl = meta_network("img512-xxl").state_dict()
    assert {key: tuple(xxl[key].shape) for key in XXL_SAMPLE} == XXL_SAMPLE
    assert sum(".attn_qkv." in key for key in xxl) == 15
    assert sum(".conv_skip." in key for key in xxl) == 19
    assert sum(key.endswith(".emb_gain") for key in xxl) == 36
    assert all(value.dtype == torch.float32 for value in xxl.values())
    xl = meta_network("img64-xl").state_dict()
    assert tuple(xl["unet.enc.64x64_conv.weight"].shape) == (384, 4, 3, 3)
    assert tuple(xl["unet.out_conv.weight"].shape) == (3, 384, 3, 3)
    assert tuple(xl["unet.dec.8x8_in0.attn_qkv.weight"].shape) == (4608, 1536, 1, 1)


def test_configs_interface_and_rebuild():
    net = meta_network("img512-xs")
    assert (net.img_resolution, net.img_channels, net.label_dim, net.sigma_data) == (64, 4, 1000, 0.5)
    assert (net.sigma_min, net.sigma_max, net.use_fp16) == (0, float("inf"), True)
    assert float(net.round_sigma(0.37)) == pytest.approx(0.37)
    assert edm2_config("edm2-img64-s") == edm2_config("img64-s") == dict(
        img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, dropout=0.0, use_fp16=True)
    with pytest.raises(ValueError, match="unknown EDM2 configuration"):
        edm2_config("img256-s")
    with torch.device("meta"):
        rebuilt = type(net)(**net.init_kwargs)
    assert key_lines(rebuilt) == key_lines(net)
    assert set(EDM2_PICKLE_CLASSES) == {"Precond", "UNet", "Block", "MPConv", "MPFourier"}


# --------------------------------------------------------------------------------------------
# (b) Tiny networks against a float64 reference written from the paper's equations.

TINY = dict(img_resolution=16, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
            channels_per_head=8, dropout=0.0)
EPS = 1e-4
SIGMA_DATA = 0.5


def tiny_network(img_channels: int, label_dim: int, seed: int = 0, **overrides) -> EDM2Precond:
    """Random weights, and random nonzero gains: EDM2 initialises them to 0, which would make
    every residual branch and the output trivial."""
    torch.manual_seed(seed)
    net = EDM2Precond(img_channels=img_channels, label_dim=label_dim, **{**TINY, **overrides})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(0.5 + torch.rand([], generator=generator))
    return net.eval()


def tiny_inputs(img_channels: int, label_dim: int, batch: int = 3, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, img_channels, 16, 16, generator=generator) * 1.5
    sigma = torch.tensor([0.02, 0.9, 40.0])[:batch]
    labels = None
    if label_dim:
        labels = F.one_hot(torch.randint(0, label_dim, (batch,), generator=generator), label_dim).float()
    return x, sigma, labels


def ref_unit(v, dims):
    """v / (eps + rms of v over dims)."""
    return v / (EPS + v.square().mean(dim=dims, keepdim=True).sqrt())


def ref_weight(w, gain=1.0):
    """Each output channel's weights at unit rms (with eps), times gain / sqrt(fan_in)."""
    return ref_unit(w, tuple(range(1, w.ndim))) * gain / math.sqrt(w[0].numel())


def ref_conv(x, w, gain=1.0):
    return F.conv2d(x, ref_weight(w, gain), padding=w.shape[-1] // 2)


def ref_linear(x, w, gain=1.0):
    return x @ ref_weight(w, gain).T


def ref_silu(x):
    return x * torch.sigmoid(x) / 0.596


def ref_blend(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def ref_concat(a, b, t):
    n_a, n_b = a.shape[1], b.shape[1]
    total = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * total * (1 - t) / math.sqrt(n_a), b * total * t / math.sqrt(n_b)], dim=1)


def ref_fourier(s, freqs, phases):
    return math.sqrt(2) * torch.cos(s[:, None] * freqs[None, :] + phases[None, :])


def ref_block(P, name, x, emb, flavor, resample, heads):
    if resample == "down":
        x = F.avg_pool2d(x, 2)  # the (1, 1) filter
    elif resample == "up":
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    skip = P.get(f"{name}.conv_skip.weight")
    if flavor == "enc":
        if skip is not None:
            x = ref_conv(x, skip)
        x = ref_unit(x, (1,))
    y = ref_conv(ref_silu(x), P[f"{name}.conv_res0.weight"])
    scale = ref_linear(emb, P[f"{name}.emb_linear.weight"], gain=P[f"{name}.emb_gain"]) + 1
    y = ref_conv(ref_silu(y * scale[:, :, None, None]), P[f"{name}.conv_res1.weight"])
    if flavor == "dec" and skip is not None:
        x = ref_conv(x, skip)
    x = ref_blend(x, y, 0.3)
    if heads:
        batch, channels, height, width = x.shape
        per_head = channels // heads
        qkv = ref_conv(x, P[f"{name}.attn_qkv.weight"]).reshape(batch, 3 * channels, height * width)
        outputs = []
        for head in range(heads):
            # Channel (head, c, j) of the projection is head * 3 * per_head + 3 c + j, j = q, k, v.
            group = qkv[:, head * 3 * per_head:(head + 1) * 3 * per_head]
            q, k, v = (ref_unit(group[:, j::3], (1,)) for j in range(3))  # (B, per_head, H * W)
            logits = q.transpose(1, 2) @ k / math.sqrt(per_head)  # (B, queries, keys)
            weights = (logits - logits.amax(dim=2, keepdim=True)).exp()
            weights = weights / weights.sum(dim=2, keepdim=True)
            outputs.append(v @ weights.transpose(1, 2))  # (B, per_head, queries)
        y = ref_conv(torch.cat(outputs, dim=1).reshape(batch, channels, height, width), P[f"{name}.attn_proj.weight"])
        x = ref_blend(x, y, 0.3)
    return x.clamp(-256, 256)


def ref_denoiser(P, config, x, sigma, labels):
    """(D(x; sigma), u(sigma)) of EDM2 with default balances, from the state dict P."""
    resolution, base, mults = config["img_resolution"], config["model_channels"], config["channel_mult"]
    blocks, per_head = config["num_blocks"], config["channels_per_head"]

    def heads(res, channels, attention=None):
        return channels // per_head if (res in config["attn_resolutions"] if attention is None else attention) else 0

    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    c_in = 1 / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    c_noise = sigma.log() / 4

    emb = ref_linear(ref_fourier(c_noise, P["unet.emb_fourier.freqs"], P["unet.emb_fourier.phases"]),
                     P["unet.emb_noise.weight"])
    if labels is not None:
        emb = ref_blend(emb, ref_linear(labels * math.sqrt(labels.shape[1]), P["unet.emb_label.weight"]), 0.5)
    emb = ref_silu(emb)

    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    h = ref_conv(h, P[f"unet.enc.{resolution}x{resolution}_conv.weight"])
    skips = [h]
    for level, mult in enumerate(mults):
        res = resolution >> level
        if level:
            h = ref_block(P, f"unet.enc.{res}x{res}_down", h, emb, "enc", "down", 0)
            skips.append(h)
        for idx in range(blocks):
            h = ref_block(P, f"unet.enc.{res}x{res}_block{idx}", h, emb, "enc", None, heads(res, base * mult))
            skips.append(h)
    for level, mult in reversed(list(enumerate(mults))):
        res = resolution >> level
        if level == len(mults) - 1:
            h = ref_block(P, f"unet.dec.{res}x{res}_in0", h, emb, "dec", None, heads(res, h.shape[1], True))
            h = ref_block(P, f"unet.dec.{res}x{res}_in1", h, emb, "dec", None, 0)
        else:
            h = ref_block(P, f"unet.dec.{res}x{res}_up", h, emb, "dec", "up", 0)
        for idx in range(blocks + 1):
            h = ref_concat(h, skips.pop(), 0.5)
            h = ref_block(P, f"unet.dec.{res}x{res}_block{idx}", h, emb, "dec", None, heads(res, base * mult))
    F_x = ref_conv(h, P["unet.out_conv.weight"], gain=P["unet.out_gain"])
    logvar = ref_linear(ref_fourier(c_noise, P["logvar_fourier.freqs"], P["logvar_fourier.phases"]),
                        P["logvar_linear.weight"])
    return c_skip * x + c_out * F_x, logvar.reshape(-1, 1, 1, 1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.parametrize("img_channels,label_dim", [(3, 10), (4, 10), (4, 0)],
                         ids=["img64-style", "img512-style", "img512-style-uncond"])
def test_float64_network_equals_reference_of_the_formulas(img_channels, label_dim):
    net = tiny_network(img_channels, label_dim).double()
    x, sigma, labels = tiny_inputs(img_channels, label_dim)
    x, sigma = x.double(), sigma.double()
    labels = labels.double() if labels is not None else None
    with torch.no_grad():
        D_x, logvar = net(x, sigma, labels, return_logvar=True)
        expected_D, expected_logvar = ref_denoiser(net.state_dict(), {**TINY, **net.init_kwargs}, x, sigma, labels)
    assert D_x.dtype == torch.float64 and D_x.shape == x.shape and logvar.shape == (3, 1, 1, 1)
    # The network part alone, so that c_skip x cannot hide an error.
    c_skip = (SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)).reshape(-1, 1, 1, 1)
    assert relative_error(D_x - c_skip * x, expected_D - c_skip * x) < 1e-12
    assert relative_error(logvar, expected_logvar) < 1e-12


def test_float32_network_equals_the_float64_one():
    net = tiny_network(3, 10)
    x, sigma, labels = tiny_inputs(3, 10)
    with torch.no_grad():
        D32, logvar32 = net(x, sigma, labels, return_logvar=True)
        D64, logvar64 = copy.deepcopy(net).double()(x, sigma, labels, return_logvar=True)
    assert D32.dtype == torch.float32
    assert relative_error(D32, D64) < 1e-5
    assert relative_error(logvar32, logvar64) < 1e-5


def test_sigma_forms_and_labels():
    net = tiny_network(3, 10)
    x, _, labels = tiny_inputs(3, 10)
    with torch.no_grad():
        # A scalar sigma gives one embedding broadcast over the batch: same values, other rounding.
        batch = net(x, torch.full([3], 0.7), labels)
        torch.testing.assert_close(net(x, 0.7, labels), batch, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net(x, torch.tensor(0.7), labels), batch, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net(x, 0.7), net(x, 0.7, torch.zeros(3, 10)), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(net(x, 0.7, labels), net(x, 0.7))
        uncond = tiny_network(4, 0)
        x4 = torch.randn(2, 4, 16, 16)
        assert torch.equal(uncond(x4, 0.7, torch.ones(2, 5)), uncond(x4, 0.7))


def test_training_mode_forces_weight_normalisation():
    net = tiny_network(3, 10).train()
    before = {name: p.detach().clone() for name, p in net.named_parameters() if p.ndim > 1}
    x, sigma, labels = tiny_inputs(3, 10)
    trained, trained_logvar = net(x, sigma, labels, return_logvar=True)
    for name, p in net.named_parameters():
        if p.ndim > 1:
            w = before[name]
            rms = w.square().mean(dim=tuple(range(1, w.ndim)), keepdim=True).sqrt()
            torch.testing.assert_close(p.detach(), w / (EPS + rms), rtol=1e-6, atol=1e-7)
    # The forward pass used the normalised weights: the eval pass now gives the same output.
    with torch.no_grad():
        D_x, logvar = net.eval()(x, sigma, labels, return_logvar=True)
    torch.testing.assert_close(D_x, trained.detach(), rtol=0, atol=0)
    torch.testing.assert_close(logvar, trained_logvar.detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# (c) Float16 weights, as the released pickles store every tensor.

def test_float16_weights_run_and_agree_with_float32():
    net = tiny_network(4, 10)
    stored = copy.deepcopy(net).half()
    x, sigma, labels = tiny_inputs(4, 10)
    with torch.no_grad():
        D_x, logvar = stored(x, sigma, labels, return_logvar=True)
        expected = copy.deepcopy(stored).float()(x, sigma, labels)  # the same fp16-rounded weights
        original = net(x, sigma, labels)
    assert D_x.dtype == logvar.dtype == torch.float32
    # With float16 gains held as such, the scale gain / sqrt(fan_in) rounds to float16 (as in EDM2).
    assert relative_error(D_x, expected) < 2e-3
    assert relative_error(D_x, original) < 1e-2


def test_float16_unet_keeps_a_float32_embedding_and_agrees_with_float32():
    net = tiny_network(3, 10).half()
    x, sigma, labels = tiny_inputs(3, 10)
    c_noise = sigma.log() / 4
    x_in = x / (sigma ** 2 + SIGMA_DATA ** 2).sqrt().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        F16 = net.unet(x_in.half(), c_noise, labels)
        F32 = net.unet(x_in, c_noise, labels)
        emb = net.unet.emb_noise(net.unet.emb_fourier(c_noise))
    assert F16.dtype == torch.float16 and F32.dtype == emb.dtype == torch.float32
    assert relative_error(F16, F32) < 1e-2


@pytest.mark.cuda
def test_fp16_on_cuda_matches_fp32():
    net = tiny_network(4, 10).half().cuda()
    x, sigma, labels = tiny_inputs(4, 10)
    x, sigma, labels = x.cuda(), sigma.cuda(), labels.cuda()
    with torch.no_grad():
        D16 = net(x, sigma, labels)
        D32 = net(x, sigma, labels, force_fp32=True)
    assert D16.dtype == torch.float32
    assert relative_error(D16, D32) < 1e-2


def test_unet_records_its_arguments():
    net = tiny_network(3, 10)
    assert isinstance(net.unet, EDM2UNet)
    assert net.unet.init_kwargs["channels_per_head"] == 8
    assert net.init_kwargs["logvar_channels"] == 128 and net.init_kwargs["use_fp16"] is True


# --------------------------------------------------------------------------------------------
# (d) Encoders.

def test_rgb_decode_and_images():
    encoder = StandardRGBEncoder()
    x = torch.tensor([-2.0, -1.0, -1 + 0.5 / 127.5, 0.0, 1 - 0.6 / 127.5, 1.0, 3.0]).reshape(1, 1, 1, 7)
    assert encoder.decode(x).flatten().tolist() == [0, 0, 1, 128, 254, 255, 255]
    assert encoder.decode(x).dtype == torch.uint8
    assert encoder(x) is x


def test_vae_whitening_from_edm2s_statistics():
    encoder = StabilityVAEEncoder.from_statistics()
    scale = np.float32(0.5) / np.float32(RAW_STD)  # float32 arithmetic, as EDM2 does it
    bias = np.float32(0) - np.float32(RAW_MEAN) * scale
    assert np.array_equal(encoder.scale.numpy(), scale) and np.array_equal(encoder.bias.numpy(), bias)
    np.testing.assert_allclose(encoder.scale.numpy(), [0.11990407, 0.10822511, 0.13477089, 0.15243903], rtol=1e-7)
    np.testing.assert_allclose(encoder.bias.numpy(), [-0.69664264, -0.3517316, -0.01617251, 0.32774392], rtol=1e-6)
    # The pickle record holds the arrays themselves.
    from_record = StabilityVAEEncoder(scale, bias, vae_name="stabilityai/sd-vae-ft-mse", batch_size=8)
    assert torch.equal(from_record.scale, encoder.scale) and from_record.batch_size == 8
    with pytest.raises(ValueError, match="4 values"):
        StabilityVAEEncoder(scale[:3], bias)
    with pytest.raises(RuntimeError, match="no VAE attached"):
        encoder.decode(torch.zeros(1, 4, 2, 2))


class StubVAE(torch.nn.Module):
    """Decodes z (B, 4, h, w) to v = 0.1 z[:, :3] + 0.5, upsampled 8x; records batch sizes."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.batches = []

    def decode(self, z):
        self.batches.append(z.shape[0])
        v = (0.1 * z[:, :3] + 0.5).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        return SimpleNamespace(sample=v)


def test_vae_decode_and_differentiable_images():
    vae = StubVAE()
    encoder = StabilityVAEEncoder.from_statistics(batch_size=3).use_vae(vae)
    x = torch.randn(7, 4, 2, 2) * 2
    raw = (x - encoder.bias.reshape(1, -1, 1, 1)) / encoder.scale.reshape(1, -1, 1, 1)
    v = (0.1 * raw[:, :3] + 0.5).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    pixels = encoder.decode(x)
    assert pixels.dtype == torch.uint8 and pixels.shape == (7, 3, 16, 16)
    assert torch.equal(pixels, (v.clamp(0, 1) * 255).to(torch.uint8))
    assert vae.batches == [3, 3, 1]

    x.requires_grad_(True)
    images = encoder(x)
    torch.testing.assert_close(images, 2 * v - 1)
    images.sum().backward()
    # d/dx of sum(2 v - 1) = 2 * 0.1 / scale per latent pixel, times its 64 image pixels.
    expected = torch.cat([2 * 0.1 * 64 / encoder.scale[:3], torch.zeros(1)]).reshape(1, 4, 1, 1).expand_as(x)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.slow
def test_vae_decode_through_a_tiny_diffusers_autoencoder():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.models.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, sample_size=32).eval().requires_grad_(False)
    encoder = StabilityVAEEncoder.from_statistics(batch_size=2, vae=vae)
    x = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        v = vae.decode(encoder.raw_latents(x)).sample
        assert torch.equal(encoder.decode(x), (v.clamp(0, 1) * 255).to(torch.uint8))
        torch.testing.assert_close(encoder(x), 2 * v - 1)
    assert encoder.decode(x).shape == (3, 3, 32, 32)
