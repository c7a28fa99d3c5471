"""The guided-diffusion (ADM) UNet, able to load the public checkpoints of openai/guided-diffusion.

Module names, parameter shapes and numerics follow `guided_diffusion/unet.py` so that a released
state dict such as `128x128_diffusion.pt` loads with `strict=True`: a block's position in
`input_blocks` / `output_blocks` and the index of each layer inside it are part of the key names
(`input_blocks.4.0.emb_layers.1.weight`), which is why the blocks are built in exactly the
reference order.

These modules exist to run trained weights: parameters keep PyTorch's default initialisation and
training-only options (gradient checkpointing) are accepted as flags but have no effect.

Shapes: images are (B, C, H, W) in [-1, 1]; `timesteps` are (B,) integer (or fractional) steps of
the original, not respaced, schedule; `y` is (B,) integer class ids.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .block_plan import BlockCache, BlockPlan, cached_output, check_plan, is_bypassed, store_output
from .checkpoint import CheckpointError, check_finite, load_state_dict_strict, load_tensors

# `model_and_diffusion_defaults()` of guided-diffusion's `script_util`: the reference scripts
# overlay the command line on these, so a flag a README line leaves out takes this value.
_DEFAULT_FLAGS: dict[str, object] = dict(
    num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False,
    use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
    use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000, noise_schedule="linear",
    timestep_respacing="", use_kl=False, predict_xstart=False, rescale_timesteps=False,
    rescale_learned_sigmas=False,
)
# The MODEL_FLAGS line of guided-diffusion's README for each released ImageNet diffusion model,
# by file name. Only 64x64 uses the new attention order (`QKVAttention`); the others keep the
# default legacy order (`QKVAttentionLegacy`). 128x128 sets a head count, the others a head width.
_CHECKPOINT_FLAGS: dict[str, dict[str, object]] = {
    "64x64_diffusion.pt": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, dropout=0.1, image_size=64,
        learn_sigma=True, noise_schedule="cosine", num_channels=192, num_head_channels=64, num_res_blocks=3,
        resblock_updown=True, use_new_attention_order=True, use_fp16=True, use_scale_shift_norm=True),
    "128x128_diffusion.pt": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=128, learn_sigma=True,
        noise_schedule="linear", num_channels=256, num_heads=4, num_res_blocks=2, resblock_updown=True,
        use_fp16=True, use_scale_shift_norm=True),
    "256x256_diffusion.pt": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=256, learn_sigma=True,
        noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
        use_fp16=True, use_scale_shift_norm=True),
    "256x256_diffusion_uncond.pt": dict(
        attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000, image_size=256, learn_sigma=True,
        noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
        use_fp16=True, use_scale_shift_norm=True),
    "512x512_diffusion.pt": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=512, learn_sigma=True,
        noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
        use_fp16=False, use_scale_shift_norm=True),
}
PUBLIC_CHECKPOINTS = tuple(_CHECKPOINT_FLAGS)
# `script_util.create_model` picks the channel multipliers from the image size.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
# Flags the reference scripts pass around with the model flags that describe the diffusion process
# or training, not the network: `create_adm_model` accepts them so a whole flag dict can be passed.
DIFFUSION_FLAGS = frozenset({
    "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
    "rescale_timesteps", "rescale_learned_sigmas",
})
NUM_CLASSES = 1000


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 and returns the input's dtype, so fp16 torsos
    keep full-precision statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation layer: 32 groups over `channels`."""
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (may be fractional) -> (B, dim) float32: cosines of the
    `dim // 2` geometric frequencies from 1 to 1/max_period, then the sines, zero-padded to odd `dim`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A layer whose forward takes the (B, 4 * model_channels) time/class embedding as a second input."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes the embedding to the layers that take one, and bypasses the
    residual and attention layers a block plan names (by their `block_id`)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor,  # type: ignore[override]
                plan: BlockPlan | None = None) -> torch.Tensor:
        for layer in self:
            if is_bypassed(plan, getattr(layer, "block_id", -1)):
                x = layer.bypass(x)
            else:
                x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, (B, C, H, W) -> (B, out_channels, 2H, 2W), with an optional
    3x3 convolution (`conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        elif out_channels not in (None, channels):
            raise ValueError("Upsample without a convolution cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """2x downsampling, (B, C, H, W) -> (B, out_channels, H/2, W/2): a strided 3x3 convolution or,
    without one, 2x2 average pooling (`op` either way, as in the reference)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        elif out_channels not in (None, channels):
            raise ValueError("Downsample without a convolution cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding, optionally resampling (`up`/`down`) inside.

    With `use_scale_shift_norm` the embedding gives a per-channel scale and shift applied after the
    second normalisation (FiLM); otherwise it is added before it.
    (B, channels, H, W), (B, emb_channels) -> (B, out_channels, H', W').
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.updown:
            # Resample between the activation and the convolution, for both paths.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """The block without its residual branch (AutoDiffusion's skipped ResBlock): the shortcut
        alone, resampled first in an up/down block. (B, channels, H, W) -> (B, out_channels, H', W')."""
        return self.skip_connection(self.x_upd(x))


class QKVAttention(nn.Module):
    """Multi-head self-attention on stacked q, k, v: (B, 3 * H * C, T) -> (B, H * C, T).

    The checkpoints disagree on the channel layout of the stacked input: `legacy_order` (the
    default of guided-diffusion, used by its 128/256/512 models) stores each head's q, k, v
    together, `[h0: q k v | h1: q k v | ...]`; the new order (64x64 model) stores all queries, then
    all keys, then all values. q and k are each scaled by C**-1/4 before the product (more stable in
    fp16 than dividing afterwards); the softmax runs in float32.
    """

    def __init__(self, num_heads: int, legacy_order: bool):
        super().__init__()
        self.num_heads = num_heads
        self.legacy_order = legacy_order

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        if width % (3 * self.num_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.num_heads} heads")
        ch = width // (3 * self.num_heads)
        if self.legacy_order:
            q, k, v = qkv.reshape(batch * self.num_heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (part.reshape(batch * self.num_heads, ch, length) for part in qkv.chunk(3, dim=1))
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # (B*H, T, T)
        # At least float32 (as guided-diffusion for fp16); float64 stays float64.
        weight = torch.softmax(weight.to(torch.promote_types(weight.dtype, torch.float32)), dim=-1).type(weight.dtype)
        out = torch.einsum("bts,bcs->bct", weight, v)  # (B*H, C, T)
        return out.reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: (B, C, H, W) -> (B, C, H, W).

    Heads: `num_heads`, or `channels // num_head_channels` when `num_head_channels` is not -1.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(f"{channels} channels are not divisible by num_head_channels {num_head_channels}")
        else:
            heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(heads, legacy_order=not use_new_attention_order)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T = H * W)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """A skipped attention layer passes its input through."""
        return x


class UNetModel(nn.Module):
    """The ADM UNet: `model(x, timesteps, y=None)` -> (B, out_channels, H, W).

    With `learn_sigma` checkpoints `out_channels` is 2 * in_channels: the noise prediction eps, then
    the variance interpolation values v in [-1, 1]-ish logit space, stacked on channels.
    `attention_resolutions` holds downsample rates (1, 2, 4, ...), not pixel sizes.
    `use_fp16` runs the torso (input, middle and output blocks' convolutions) in float16 while the
    embeddings, normalisation statistics and the output head stay float32, as the reference does.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Iterable[float] = (1, 2, 4, 8), conv_resample: bool = True,
                 num_classes: int | None = None, use_fp16: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = set(attention_resolutions)
        channel_mult = tuple(channel_mult)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.dtype = torch.float32
        time_embed_dim = 4 * model_channels

        def res_block(ch: int, out_ch: int, **updown: bool) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch,
                            use_scale_shift_norm=use_scale_shift_norm, **updown)

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]  # channels of every input block's output, consumed by the output blocks
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))
        # Block ids in execution order, AutoDiffusion's numbering: every ResBlock and attention
        # layer of the input, middle and output blocks (58 in the ImageNet-64 model).
        names = []
        for part, blocks in (("input_blocks", self.input_blocks), ("middle_block", [self.middle_block]),
                             ("output_blocks", self.output_blocks)):
            for i, block in enumerate(blocks):
                for j, layer in enumerate(block):
                    if isinstance(layer, (ResBlock, AttentionBlock)):
                        layer.block_id = len(names)
                        names.append(f"{part}.{i}.{j}" if part != "middle_block" else f"{part}.{j}")
        self._block_names = tuple(names)
        if use_fp16:
            self.convert_to_fp16()

    def _torso_convs(self) -> Iterable[nn.Module]:
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            yield from (m for m in part.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))

    def convert_to_fp16(self) -> None:
        """Casts the torso's convolution weights to float16 and runs the torso in float16."""
        for conv in self._torso_convs():
            conv.half()
        self.dtype = torch.float16

    def convert_to_fp32(self) -> None:
        """Undoes `convert_to_fp16`."""
        for conv in self._torso_convs():
            conv.float()
        self.dtype = torch.float32

    def block_names(self) -> tuple[str, ...]:
        """The name of each block id (`models.block_plan`): "input_blocks.4.1" is the second layer
        of input block 4."""
        return self._block_names

    @property
    def cache_points(self) -> int:
        """Cache points: the output of output block k, k < len(output_blocks)."""
        return len(self.output_blocks)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None,
                block_plan: BlockPlan | None = None, block_cache: BlockCache | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W); timesteps: (B,); y: (B,) class ids, given if and only if the
        model is class-conditional. Returns (B, out_channels, H, W) in x's dtype.

        `block_plan` bypasses blocks and stores or reuses an output block's output in `block_cache`
        (`models.block_plan`); None runs every block."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))  # (B, 4 * model_channels)
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        if block_plan is not None:
            check_plan(block_plan, self._block_names, self.cache_points, "this ADM U-Net")
        cached = cached_output(block_plan, block_cache)
        # Reusing output block k's output: only the input blocks whose skips output blocks
        # k+1... consume run (each output block pops one skip, the last pushed first).
        encoder_blocks = len(self.input_blocks) if cached is None else len(self.output_blocks) - 1 - block_plan.reuse
        skips = []
        h = x.type(self.dtype)
        for block in self.input_blocks[:encoder_blocks]:
            h = block(h, emb, block_plan)
            skips.append(h)
        first = 0
        if cached is None:
            h = self.middle_block(h, emb, block_plan)
        else:
            h, first = cached, block_plan.reuse + 1
        for k in range(first, len(self.output_blocks)):
            h = self.output_blocks[k](torch.cat([h, skips.pop()], dim=1), emb, block_plan)
            store_output(block_plan, block_cache, k, h)
        return self.out(h.type(x.dtype))


def public_checkpoint_flags(name: str) -> dict[str, object]:
    """The complete flag set (model and diffusion flags, as guided-diffusion's scripts see them:
    the README's MODEL_FLAGS over `model_and_diffusion_defaults()`) of a released ImageNet
    diffusion model, by file name (one of `PUBLIC_CHECKPOINTS`)."""
    if name not in _CHECKPOINT_FLAGS:
        raise ValueError(f"{name!r} is not a released guided-diffusion ImageNet model; "
                         f"choose one of {PUBLIC_CHECKPOINTS}")
    return {**_DEFAULT_FLAGS, **_CHECKPOINT_FLAGS[name]}


def adm_model_flags(image_size: int, *, class_cond: bool = True) -> dict[str, object]:
    """`public_checkpoint_flags` of the public ImageNet diffusion model at `image_size` (64, 128,
    256 or 512); `class_cond=False` names the unconditional one (256 only)."""
    name = f"{image_size}x{image_size}_diffusion{'' if class_cond else '_uncond'}.pt"
    if name not in _CHECKPOINT_FLAGS:
        sizes = sorted({f["image_size"] for f in _CHECKPOINT_FLAGS.values() if f["class_cond"] == class_cond})
        kind = "class-conditional" if class_cond else "unconditional"
        raise ValueError(f"no public {kind} guided-diffusion model at {image_size}x{image_size}; choose one of {sizes}")
    return public_checkpoint_flags(name)


def create_adm_model(*, image_size: int, num_channels: int = 128, num_res_blocks: int = 2,
                     channel_mult: str | Iterable[float] = "", learn_sigma: bool = False,
                     class_cond: bool = False, use_checkpoint: bool = False,
                     attention_resolutions: str = "16,8", num_heads: int = 4, num_head_channels: int = -1,
                     num_heads_upsample: int = -1, use_scale_shift_norm: bool = True, dropout: float = 0.0,
                     resblock_updown: bool = False, use_fp16: bool = False,
                     use_new_attention_order: bool = False, in_channels: int = 3,
                     num_classes: int = NUM_CLASSES, **diffusion_flags: object) -> UNetModel:
    """`script_util.create_model` from guided-diffusion, with `model_and_diffusion_defaults()` as
    defaults so that `create_adm_model(**adm_model_flags(128))` builds the released 128x128 model.

    `attention_resolutions` lists feature-map sizes in pixels ("32,16,8"), turned into downsample
    rates `image_size // res`. `channel_mult` "" picks the reference multipliers for the image size.
    `use_checkpoint` (gradient checkpointing) only saves training memory and is ignored; the
    diffusion flags in `DIFFUSION_FLAGS` are accepted and ignored, anything else is an error.
    """
    unknown = sorted(set(diffusion_flags) - DIFFUSION_FLAGS)
    if unknown:
        raise TypeError(f"unknown ADM flags: {unknown}")
    if channel_mult == "":
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image size {image_size}; "
                             f"pass channel_mult (e.g. '1,2,2') or use one of {sorted(DEFAULT_CHANNEL_MULT)}")
        mult = DEFAULT_CHANNEL_MULT[image_size]
    elif isinstance(channel_mult, str):
        mult = tuple(float(m) for m in channel_mult.split(","))
    else:
        mult = tuple(channel_mult)
    attention_ds = tuple(image_size // int(res) for res in str(attention_resolutions).split(",") if res)
    return UNetModel(
        image_size=image_size, in_channels=in_channels, model_channels=num_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels, num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds, dropout=dropout, channel_mult=mult,
        num_classes=num_classes if class_cond else None, use_fp16=use_fp16, num_heads=num_heads,
        num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order)


def is_adm_unet_state_dict(state: Mapping[str, object]) -> bool:
    """True when the keys look like a guided-diffusion `UNetModel` (encoder, decoder and head)."""
    return all(k in state for k in ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")) and any(
        k.startswith("output_blocks.") for k in state)


def _block_layers(state: Mapping[str, torch.Tensor], prefix: str) -> dict[int, set[str]]:
    """{block index: names of the keys under it} for `input_blocks` or `output_blocks`."""
    blocks: dict[int, set[str]] = {}
    for key in state:
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            blocks.setdefault(int(index), set()).add(rest)
    return blocks


def adm_flags_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """The network flags readable from a UNet state dict's keys and shapes, without running it.

    Returns num_channels, num_res_blocks, channel_mult, attention downsample rates, class_cond,
    num_classes, learn_sigma, use_scale_shift_norm, resblock_updown, in/out channels, and
    `image_size`: the reference resolution whose default `channel_mult` matches, else None.
    Head counts and the attention order leave no trace in the weights and are not returned.
    Raises CheckpointError when the keys do not form a UNet.
    """
    if not is_adm_unet_state_dict(state):
        raise CheckpointError("not a guided-diffusion UNet state dict (no time_embed/input_blocks/output_blocks/out)")
    try:
        return _read_adm_flags(state)
    except (KeyError, ValueError, IndexError, AttributeError, ZeroDivisionError) as err:
        raise CheckpointError(f"UNet keys in an unfamiliar arrangement ({type(err).__name__}: {err})") from err


def _read_adm_flags(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    model_channels = state["time_embed.0.weight"].shape[1]
    in_channels = state["input_blocks.0.0.weight"].shape[1]
    out_channels = state["out.2.weight"].shape[0]
    outputs = _block_layers(state, "output_blocks")
    inputs = _block_layers(state, "input_blocks")
    # Each level but the top one ends in an upsampler placed after the ResBlock (and its attention,
    # if any): a ResBlock when resblock_updown, else a convolution. Counting them gives the depth.
    up_layers = []
    for names in outputs.values():
        positions = {int(n.split(".", 1)[0]) for n in names}
        last = max(positions)
        if last > 0 and not any(n.startswith(f"{last}.qkv.") for n in names):
            up_layers.append("resblock" if f"{last}.in_layers.0.weight" in names else "conv")
    levels = len(up_layers) + 1
    if len(outputs) % levels:
        raise CheckpointError(f"{len(outputs)} output blocks do not split into {levels} levels")
    num_res_blocks = len(outputs) // levels - 1
    channel_mult, attention_ds = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)  # the level's first ResBlock among input_blocks
        channel_mult.append(state[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0] / model_channels)
        if "1.qkv.weight" in inputs.get(first, set()):
            attention_ds.append(2 ** level)
    first_out = state["input_blocks.1.0.in_layers.2.weight"].shape[0]
    mult = tuple(int(m) if float(m).is_integer() else m for m in channel_mult)
    image_size = next((size for size, default in DEFAULT_CHANNEL_MULT.items() if default == mult), None)
    return dict(
        image_size=image_size, in_channels=in_channels, out_channels=out_channels,
        num_channels=model_channels, num_res_blocks=num_res_blocks, channel_mult=mult,
        attention_ds=tuple(attention_ds),
        attention_resolutions=(",".join(str(image_size // ds) for ds in attention_ds) if image_size else None),
        class_cond="label_emb.weight" in state,
        num_classes=state["label_emb.weight"].shape[0] if "label_emb.weight" in state else None,
        learn_sigma=out_channels == 2 * in_channels,
        use_scale_shift_norm=state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * first_out,
        resblock_updown=bool(up_layers) and all(kind == "resblock" for kind in up_layers),
    )


def _structure_hint(state: Mapping[str, torch.Tensor]) -> str:
    """What the file's shapes say about its flags, to append to a loading error."""
    try:
        found = adm_flags_from_state_dict(state)
    except CheckpointError:
        return ""
    keys = ("num_channels", "num_res_blocks", "channel_mult", "class_cond", "learn_sigma", "resblock_updown",
            "use_scale_shift_norm")
    structure = {k: found[k] for k in keys}
    return f". The file's structure reads as {structure}"


_STRUCTURE_KEYS = ("image_size", "in_channels", "out_channels", "num_channels", "num_res_blocks", "channel_mult",
                   "attention_ds", "learn_sigma", "use_scale_shift_norm", "resblock_updown")


def _checkpoint_structure(flags: Mapping[str, object]) -> dict[str, object]:
    """What `adm_flags_from_state_dict` reads from a file made with these (public) flags."""
    size = int(flags["image_size"])
    return dict(
        image_size=size, in_channels=3, out_channels=6 if flags["learn_sigma"] else 3,
        num_channels=flags["num_channels"], num_res_blocks=flags["num_res_blocks"],
        channel_mult=DEFAULT_CHANNEL_MULT[size],
        attention_ds=tuple(sorted(size // int(r) for r in str(flags["attention_resolutions"]).split(","))),
        learn_sigma=flags["learn_sigma"], use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"])


def _same_conditioning(name: str, found: Mapping[str, object]) -> bool:
    return _CHECKPOINT_FLAGS[name]["class_cond"] == found["class_cond"] and found["num_classes"] in (None, NUM_CLASSES)


def _checkpoints_with_structure(found: Mapping[str, object]) -> list[str]:
    """The released models whose network has the structure `found` (as `adm_flags_from_state_dict`
    returns it), conditioning aside; those with the same conditioning first."""
    names = [name for name, flags in _CHECKPOINT_FLAGS.items()
             if all(_checkpoint_structure(flags)[k] == found[k] for k in _STRUCTURE_KEYS)]
    return sorted(names, key=lambda name: not _same_conditioning(name, found))


def public_checkpoint_of(state: Mapping[str, torch.Tensor]) -> str | None:
    """The released ImageNet model (a `PUBLIC_CHECKPOINTS` name) whose keys, shapes and
    conditioning the UNet state dict has, or None. Guided-diffusion's LSUN models share the
    unconditional 256x256 structure (and its head and attention-order flags)."""
    found = adm_flags_from_state_dict(state)
    return next((name for name in _checkpoints_with_structure(found) if _same_conditioning(name, found)), None)


def adm_model_for_state_dict(state: Mapping[str, torch.Tensor], *, image_size: int | None = None,
                             source: str = "state dict", **flags: object) -> UNetModel:
    """Builds (without loading) the UNet for a guided-diffusion state dict; see `load_adm_model`.
    Works on meta tensors, so the full-size models can be checked without memory."""
    try:
        found = adm_flags_from_state_dict(state)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}; pass image_size and the model flags") from err
    if image_size is None:
        image_size = found["image_size"]
        if image_size is None:
            raise CheckpointError(f"{source}: channel multipliers {found['channel_mult']} match no reference "
                                  "resolution; pass image_size and the model flags")
    # Head split and attention order leave no trace in the weights: they come from the released
    # model with this structure, and for any other file from the caller (else the defaults).
    matches = [name for name in _checkpoints_with_structure(found)
               if _CHECKPOINT_FLAGS[name]["image_size"] == image_size]
    public = _CHECKPOINT_FLAGS[matches[0]] if matches else {}
    # Conditioning and output channels default to the file's: 256x256_diffusion.pt and
    # 256x256_diffusion_uncond.pt differ only by the class embedding.
    from_file: dict[str, object] = {k: found[k] for k in ("class_cond", "learn_sigma")}
    if found["class_cond"]:
        from_file["num_classes"] = found["num_classes"]
    return create_adm_model(**{**public, **from_file, **flags, "image_size": image_size})


def load_adm_model(path: str | os.PathLike, *, image_size: int | None = None, **flags: object) -> UNetModel:
    """Loads a guided-diffusion UNet checkpoint (e.g. `128x128_diffusion.pt`) from a local file.

    A file with the structure of a released ImageNet model (`PUBLIC_CHECKPOINTS`: 64, 128, 256
    class-conditional and unconditional, 512) is built with that model's README flags, so the
    released files need no flags at all. The head split and attention order are not stored in
    the weights: for any other file pass them (`num_heads` or `num_head_channels`,
    `use_new_attention_order`) with the structural flags, else guided-diffusion's defaults apply
    (4 heads, legacy order), as its scripts would. Conditioning (`class_cond`, `num_classes`) and
    `learn_sigma` default to what the file holds; `image_size` to the resolution its channel
    multipliers give. The file is read tensors-only, must fit the model exactly and hold
    finite values. `use_fp16` follows the README flags (True at 64/128/256): pass
    `use_fp16=False` to keep the whole network in float32, e.g. on a CPU.
    Returns the model in eval mode with gradients disabled for its parameters, on the CPU.
    """
    state = load_tensors(path, "ADM checkpoint")
    if not isinstance(state, Mapping) or not is_adm_unet_state_dict(state):
        raise CheckpointError(f"{path}: not a guided-diffusion UNet state dict")
    model = adm_model_for_state_dict(state, image_size=image_size, source=str(path), **flags)
    try:
        load_state_dict_strict(model, state, str(path))
    except CheckpointError as err:
        raise CheckpointError(f"{err}{_structure_hint(state)}") from err
    # A float32 value beyond float16's range becomes Inf when the torso is cast.
    check_finite(model.state_dict(), f"{path} (after conversion to the model's dtypes)")
    return model.eval().requires_grad_(False)
