"""The networks of NVlabs EDM ("Elucidating the Design Space of Diffusion-Based Generative
Models", `training/networks.py`): its layers, the DDPM++/NCSN++ U-Net (`SongUNet`), the ADM
U-Net (`DhariwalUNet`) and the four preconditioners (`VPPrecond`, `VEPrecond`, `iDDPMPrecond`,
`EDMPrecond`).

Constructor arguments, state-dict keys and forward numerics follow EDM's classes, so that the
weights of a released EDM pickle (read by `edm_pickle.load_edm_network`, which never runs the
code stored in the pickle) give the same outputs here. EDM's list and dict defaults appear as
tuples and read-only mappings of the same values. Each network (the two U-Nets and the four
preconditioners) keeps its constructor arguments, defaults filled in, as `init_kwargs`, so
`type(net)(**net.init_kwargs)` rebuilds the architecture.

Units and shapes: images `x` are (B, C, H, W) with data in [-1, 1]; the noise level `sigma` is
the standard deviation of the Gaussian noise added to such data; class labels are one-hot (or
soft) vectors (B, label_dim).
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch.nn.functional import silu

from .block_plan import BlockCache, BlockPlan, assign_block_ids, cached_output, check_plan, is_bypassed, store_output

_NO_OVERRIDES: Mapping[str, Any] = MappingProxyType({})
_ZERO_WEIGHT: Mapping[str, Any] = MappingProxyType({"init_weight": 0})


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random initial weights of `shape` with EDM's four schemes (uniform or normal, Xavier or
    Kaiming scaling), drawn from the global torch generator in EDM's order."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"')


def _records_init_kwargs(init: Callable[..., None]) -> Callable[..., None]:
    """Wraps a network's `__init__` so that it stores its arguments, defaults filled in and any
    `**model_kwargs` merged in, as the dict `self.init_kwargs`."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording_init(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        recorded: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            else:
                recorded[name] = value
        init(self, *args, **kwargs)
        self.init_kwargs = copy.deepcopy(recorded)

    return recording_init


class Linear(torch.nn.Module):
    """Fully-connected layer: (..., in_features) -> (..., out_features), computed in the input's
    dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


class Conv2d(torch.nn.Module):
    """Square convolution with optional 2x up- or downsampling by a separable FIR filter.

    (B, in_channels, H, W) -> (B, out_channels, H', W') with H' = 2H (up), H / 2 (down) or H.
    `kernel=0` gives a pure resampling layer without weights. `fused_resample` folds the
    resampling into the convolution's padding and stride, which changes the border handling and
    so the numbers: it is part of the architecture, not an optimisation switch. EDM's networks
    fuse only downsampling; fused upsampling with a 3x3 kernel gives 2H - 4 pixels, kept as EDM
    has it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0) -> None:
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        # (1, 1, k, k) outer product, normalised to unit gain.
        filter_2d = torch.outer(taps, taps).unsqueeze(0).unsqueeze(1) / taps.sum().square()
        self.register_buffer("resample_filter", filter_2d if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv2d = torch.nn.functional.conv2d
        conv_transpose2d = torch.nn.functional.conv_transpose2d

        if self.fused_resample and self.up and w is not None:
            # Upsampling by transposed convolution with 4x the filter keeps the mean intensity.
            x = conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                 padding=w_pad + f_pad)
            x = conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = conv2d(x, w, padding=w_pad + f_pad)
            x = conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                     padding=f_pad)
            if self.down:
                x = conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation of (B, C, H, W) with at least `min_channels_per_group` channels per
    group (fewer groups than `num_groups` for narrow layers)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                              bias=self.bias.to(x.dtype), eps=self.eps)


class AttentionOp(torch.autograd.Function):
    """Attention weights softmax_k(q . k / sqrt(C)): q (N, C, Q), k (N, C, K) -> w (N, Q, K).

    The products, the softmax and its backward run in float32 whatever the input dtype, because
    fp16 softmax gradients lose too much; inputs, outputs and gradients keep the input dtype to
    save memory. Use as `AttentionOp.apply(q, k)`.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        w = torch.einsum("ncq,nck->nqk", q.to(torch.float32),
                         (k / math.sqrt(k.shape[1])).to(torch.float32)).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx: Any, dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, w = ctx.saved_tensors
        w32 = w.to(torch.float32)
        dw32 = dw.to(torch.float32)
        # Gradient of the logits through softmax: w * (dw - <dw, w>) along the key axis.
        db = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))
        dq = torch.einsum("nck,nqk->ncq", k.to(torch.float32), db).to(q.dtype) / math.sqrt(k.shape[1])
        dk = torch.einsum("ncq,nqk->nck", q.to(torch.float32), db).to(k.dtype) / math.sqrt(k.shape[1])
        return dq, dk


class UNetBlock(torch.nn.Module):
    """Residual U-Net block with optional 2x up/downsampling and self-attention: the union of the
    blocks of DDPM++, NCSN++ and ADM.

    forward(x (B, in_channels, H, W), emb (B or 1, emb_channels)) -> (B, out_channels, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Mapping[str, Any] = _NO_OVERRIDES, init_zero: Mapping[str, Any] = _ZERO_WEIGHT,
                 init_attn: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, plan: BlockPlan | None = None) -> torch.Tensor:
        """`plan` may bypass the residual unit (`block_id`: the shortcut alone, resampled or
        projected, unscaled: `skip_scale` normalises a sum of two branches, and one is left) and
        the attention (`attention_id`: x itself), each independently."""
        if is_bypassed(plan, getattr(self, "block_id", -1)):
            x = self.skip(x) if self.skip is not None else x
            if self.num_heads and not is_bypassed(plan, self.attention_id):
                x = self.attention(x)
            return x
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)  # (B, C or 2C, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads and not is_bypassed(plan, getattr(self, "attention_id", -1)):
            x = self.attention(x)
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the H x W positions, residual added and scaled:
        (B, C, H, W) -> (B, C, H, W). A method of its own so that the engine can run the same
        function through a fused kernel."""
        # (B * heads, C / heads, 3, H * W) split into q, k, v of (B * heads, C / heads, H * W).
        q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads,
                                                  3, -1).unbind(2)
        w = AttentionOp.apply(q, k)
        a = torch.einsum("nqk,nck->ncq", w, v)
        x = self.proj(a.reshape(*x.shape)).add_(x)
        return x * self.skip_scale


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of DDPM++ and ADM: (N,) noise labels -> (N, num_channels), cosines
    then sines."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier-feature embedding of NCSN++: (N,) noise labels -> (N, num_channels)."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _drop_labels(class_labels: torch.Tensor, label_dropout: float, batch: int, training: bool) -> torch.Tensor:
    """Zeroes each sample's labels with probability `label_dropout` while training, so the network
    also learns the unconditional model used by classifier-free guidance."""
    if not (training and label_dropout):
        return class_labels
    keep = torch.rand([batch, 1], device=class_labels.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)


def _number_unet_blocks(enc: torch.nn.ModuleDict, dec: torch.nn.ModuleDict) -> tuple[str, ...]:
    """Block ids of an EDM U-Net: its `UNetBlock`s, encoder then decoder, each followed by its
    attention when it has one."""
    return assign_block_ids((f"{part}.{name}", block, bool(block.num_heads))
                            for part, blocks in (("enc", enc), ("dec", dec))
                            for name, block in blocks.items() if isinstance(block, UNetBlock))


def _decoder_block_count(dec: torch.nn.ModuleDict) -> int:
    return sum(isinstance(block, UNetBlock) for block in dec.values())


def _encoder_skips_needed(dec: torch.nn.ModuleDict, plan: BlockPlan | None, cached: torch.Tensor | None) -> int | None:
    """How many encoder skips the decoder consumes: None (all) without a reused feature; with a
    reused cache point k, those the blocks after k pop (the `_block` ones take a skip each, the
    last pushed first, so the encoder's first ones)."""
    if cached is None:
        return None
    blocks = [name for name, block in dec.items() if isinstance(block, UNetBlock)]
    return sum("_block" in name for name in blocks[plan.reuse + 1:])


def _checked_cache(unet: torch.nn.Module, plan: BlockPlan | None, cache: BlockCache | None) -> torch.Tensor | None:
    if plan is None:
        return None
    check_plan(plan, unet.block_names(), unet.cache_points, type(unet).__name__)
    return cached_output(plan, cache)


class SongUNet(torch.nn.Module):
    """The DDPM++ and NCSN++ U-Nets of Song et al. ("Score-Based Generative Modeling through
    Stochastic Differential Equations"), as reimplemented by EDM.

    forward(x (B, in_channels, R, R), noise_labels (B,) or (1,), class_labels (B or 1, label_dim)
    or None, augment_labels (B, augment_dim) or None) -> (B, out_channels, R, R).
    """

    @_records_init_kwargs
    def __init__(self,
                 img_resolution: int,                       # Image resolution at input and output.
                 in_channels: int,                          # Colour channels at input.
                 out_channels: int,                         # Colour channels at output.
                 label_dim: int = 0,                        # Number of class labels, 0 = unconditional.
                 augment_dim: int = 0,                      # Augmentation label size, 0 = no augmentation.
                 model_channels: int = 128,                 # Base multiplier for the number of channels.
                 channel_mult: Sequence[int] = (1, 2, 2, 2),  # Per-resolution channel multipliers.
                 channel_mult_emb: int = 4,                 # Multiplier for the embedding width.
                 num_blocks: int = 4,                       # Residual blocks per resolution.
                 attn_resolutions: Sequence[int] = (16,),   # Resolutions with self-attention.
                 dropout: float = 0.10,                     # Dropout probability of intermediate activations.
                 label_dropout: float = 0,                  # Label dropout probability (classifier-free guidance).
                 embedding_type: str = "positional",        # 'positional' for DDPM++, 'fourier' for NCSN++.
                 channel_mult_noise: int = 1,               # Noise embedding width: 1 for DDPM++, 2 for NCSN++.
                 encoder_type: str = "standard",            # 'standard' for DDPM++, 'residual' for NCSN++.
                 decoder_type: str = "standard",            # 'standard' for both DDPM++ and NCSN++.
                 resample_filter: Sequence[float] = (1, 1),  # (1, 1) for DDPM++, (1, 3, 3, 1) for NCSN++.
                 ) -> None:
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"SongUNet: unknown embedding_type {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"SongUNet: unknown encoder_type {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet: unknown decoder_type {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = (Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init)
                            if augment_dim else None)
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder. Block names carry the resolution; the decoder pops skips in reverse order.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(in_channels=cout, out_channels=cout, down=True,
                                                          **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(in_channels=caux, out_channels=cout, kernel=3,
                                                                   down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(in_channels=cout, out_channels=cout, attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn,
                                                                **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(in_channels=out_channels, out_channels=out_channels,
                                                             kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3,
                                                           **init_zero)
        self._block_names = _number_unet_blocks(self.enc, self.dec)
        # Decoder "skip" heads accumulate across levels: a cached feature would miss them.
        self.cache_points = 0 if decoder_type == "skip" else _decoder_block_count(self.dec)

    def block_names(self) -> tuple[str, ...]:
        """The name of each block id (`models.block_plan`)."""
        return self._block_names

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None, block_plan: BlockPlan | None = None,
                block_cache: BlockCache | None = None) -> torch.Tensor:
        """`block_plan` bypasses blocks and stores or reuses decoder block k's output in
        `block_cache` (`models.block_plan`); None runs every block."""
        cached = _checked_cache(self, block_plan, block_cache)
        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # sines first, as in Song et al.
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, x.shape[0], self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder (with a reused decoder feature, only until the skips the rest consumes exist).
        needed = _encoder_skips_needed(self.dec, block_plan, cached)
        skips = []
        aux = x
        for name, block in self.enc.items():
            if needed is not None and "aux" not in name and len(skips) == needed:
                break
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb, block_plan) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder: the output is the sum of the auxiliary heads.
        aux = None
        tmp = None
        point = -1
        if cached is not None:
            x = cached
        for name, block in self.dec.items():
            if isinstance(block, UNetBlock):
                point += 1
                if cached is not None and point <= block_plan.reuse:
                    continue
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb, block_plan)
                store_output(block_plan, block_cache, point, x)
        return aux


class DhariwalUNet(torch.nn.Module):
    """The ADM U-Net of Dhariwal & Nichol ("Diffusion Models Beat GANs on Image Synthesis"), as
    reimplemented by EDM (the network of `edm-imagenet-64x64-cond-adm.pkl`).

    forward(x (B, in_channels, R, R), noise_labels (B,) or (1,), class_labels (B or 1, label_dim)
    or None, augment_labels (B, augment_dim) or None) -> (B, out_channels, R, R).
    """

    @_records_init_kwargs
    def __init__(self,
                 img_resolution: int,                           # Image resolution at input and output.
                 in_channels: int,                              # Colour channels at input.
                 out_channels: int,                             # Colour channels at output.
                 label_dim: int = 0,                            # Number of class labels, 0 = unconditional.
                 augment_dim: int = 0,                          # Augmentation label size, 0 = no augmentation.
                 model_channels: int = 192,                     # Base multiplier for the number of channels.
                 channel_mult: Sequence[int] = (1, 2, 3, 4),    # Per-resolution channel multipliers.
                 channel_mult_emb: int = 4,                     # Multiplier for the embedding width.
                 num_blocks: int = 3,                           # Residual blocks per resolution.
                 attn_resolutions: Sequence[int] = (32, 16, 8),  # Resolutions with self-attention.
                 dropout: float = 0.10,                         # Dropout probability of intermediate activations.
                 label_dropout: float = 0,                      # Label dropout probability (classifier-free guidance).
                 ) -> None:
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = (Linear(in_features=label_dim, out_features=emb_channels, bias=False,
                                 init_mode="kaiming_normal", init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(in_channels=cout, out_channels=cout, down=True,
                                                          **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=res in attn_resolutions, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(in_channels=cout, out_channels=cout, attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=res in attn_resolutions, **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)
        self._block_names = _number_unet_blocks(self.enc, self.dec)
        self.cache_points = _decoder_block_count(self.dec)

    def block_names(self) -> tuple[str, ...]:
        """The name of each block id (`models.block_plan`)."""
        return self._block_names

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None, block_plan: BlockPlan | None = None,
                block_cache: BlockCache | None = None) -> torch.Tensor:
        """`block_plan` bypasses blocks and stores or reuses decoder block k's output in
        `block_cache` (`models.block_plan`); None runs every block."""
        cached = _checked_cache(self, block_plan, block_cache)
        # Mapping.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, x.shape[0], self.training))
        emb = silu(emb)

        # Encoder (with a reused decoder feature, only the blocks whose skips the rest consumes).
        skips = []
        for block in itertools.islice(self.enc.values(), _encoder_skips_needed(self.dec, block_plan, cached)):
            x = block(x, emb, block_plan) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        first = 0
        if cached is not None:
            x, first = cached, block_plan.reuse + 1
        for point, block in enumerate(self.dec.values()):
            if point < first:
                continue
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, block_plan)
            store_output(block_plan, block_cache, point, x)
        return self.out_conv(silu(self.out_norm(x)))


def _unet_class(model_type: str) -> type[torch.nn.Module]:
    # Resolved by module-level name when called, as EDM's `globals()[model_type]` is, so that a
    # subclass rebound to the same name is the one built.
    unets = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
    if model_type not in unets:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(unets)}")
    return unets[model_type]


class _Preconditioner(torch.nn.Module):
    """What EDM's four preconditioners share: the denoiser

        D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

    around the U-Net F (`self.model`), with the coefficients given by the subclass.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 model_out_channels: int, model_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = _unet_class(model_type)(img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=model_out_channels, label_dim=label_dim, **model_kwargs)

    def preconditioning(self, sigma: torch.Tensor) -> tuple[Any, Any, Any, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for float32 `sigma` of shape (N, 1, 1, 1); each a
        tensor of that shape or a Python number."""
        raise NotImplementedError

    def block_names(self) -> tuple[str, ...]:
        """The U-Net's block names by id (`models.block_plan`); plans pass through `forward`'s
        `block_plan=` / `block_cache=` keywords."""
        return self.model.block_names()

    @property
    def cache_points(self) -> int:
        return self.model.cache_points

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, **model_kwargs: Any) -> torch.Tensor:
        """Denoised estimate D(x; sigma), float32 (B, C, R, R).

        Args:
            x: noisy images (B, img_channels, R, R), any float dtype.
            sigma: noise level: a Python float, a 0-d tensor or a (B,) tensor.
            class_labels: (B, label_dim) or (label_dim,) one-hot labels; None gives all-zero
                labels for a conditional network and is required for an unconditional one.
            force_fp32: run the U-Net in float32 even when `use_fp16` is set.
            model_kwargs: passed to the U-Net (e.g. `augment_labels`).
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        # fp16 only on CUDA: CPU half-precision kernels are slow or missing.
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32

        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f"{type(self.model).__name__} returned {F_x.dtype}, expected {dtype}")
        # Networks that also predict a variance (iDDPM) put it after the image channels.
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The noise level(s) the network supports nearest to `sigma`; any sigma here."""
        return torch.as_tensor(sigma)


class VPPrecond(_Preconditioner):
    """Preconditioning of the variance-preserving (VP) formulation of Song et al.:
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t in [epsilon_t, 1]."""

    @_records_init_kwargs
    def __init__(self,
                 img_resolution: int,              # Image resolution.
                 img_channels: int,                # Number of colour channels.
                 label_dim: int = 0,               # Number of class labels, 0 = unconditional.
                 use_fp16: bool = False,           # Run the U-Net at FP16 precision (on CUDA)?
                 beta_d: float = 19.9,             # Extent of the noise level schedule.
                 beta_min: float = 0.1,            # Initial slope of the noise level schedule.
                 M: int = 1000,                    # Original number of timesteps in the DDPM formulation.
                 epsilon_t: float = 1e-5,          # Minimum t-value used during training.
                 model_type: str = "SongUNet",     # Class name of the underlying U-Net.
                 **model_kwargs: Any,              # Keyword arguments of the U-Net.
                 ) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def preconditioning(self, sigma: torch.Tensor) -> tuple[Any, Any, Any, torch.Tensor]:
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        """Noise level at VP time t in [0, 1]."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """VP time t of noise level sigma."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Preconditioner):
    """Preconditioning of the variance-exploding (VE) formulation of Song et al."""

    @_records_init_kwargs
    def __init__(self,
                 img_resolution: int,              # Image resolution.
                 img_channels: int,                # Number of colour channels.
                 label_dim: int = 0,               # Number of class labels, 0 = unconditional.
                 use_fp16: bool = False,           # Run the U-Net at FP16 precision (on CUDA)?
                 sigma_min: float = 0.02,          # Minimum supported noise level.
                 sigma_max: float = 100,           # Maximum supported noise level.
                 model_type: str = "SongUNet",     # Class name of the underlying U-Net.
                 **model_kwargs: Any,              # Keyword arguments of the U-Net.
                 ) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def preconditioning(self, sigma: torch.Tensor) -> tuple[Any, Any, Any, torch.Tensor]:
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


class iDDPMPrecond(_Preconditioner):
    """Preconditioning of improved DDPM (Nichol & Dhariwal): the U-Net only knows the M discrete
    noise levels `u` of the cosine schedule, and predicts a variance in its second half of output
    channels (dropped here)."""

    @_records_init_kwargs
    def __init__(self,
                 img_resolution: int,                # Image resolution.
                 img_channels: int,                  # Number of colour channels.
                 label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
                 use_fp16: bool = False,             # Run the U-Net at FP16 precision (on CUDA)?
                 C_1: float = 0.001,                 # Timestep adjustment at low noise levels.
                 C_2: float = 0.008,                 # Timestep adjustment at high noise levels.
                 M: int = 1000,                      # Original number of timesteps in the DDPM formulation.
                 model_type: str = "DhariwalUNet",   # Class name of the underlying U-Net.
                 **model_kwargs: Any,                # Keyword arguments of the U-Net.
                 ) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels * 2,
                         model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        # u[j] is the noise level of step j, u[M] = 0 ... u[0] = largest, built downwards from 0.
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def preconditioning(self, sigma: torch.Tensor) -> tuple[Any, Any, Any, torch.Tensor]:
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise

    def alpha_bar(self, j: int | torch.Tensor) -> torch.Tensor:
        """Cosine-schedule alpha-bar at step j (not normalised by its value at 0)."""
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma: float | torch.Tensor, return_index: bool = False) -> torch.Tensor:
        """The nearest of the M + 1 levels `u` to each element of `sigma` (same shape, dtype and
        device as `sigma`), or with `return_index` its int64 index into `u`."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
                            self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


class EDMPrecond(_Preconditioner):
    """EDM's own preconditioning (Karras et al. 2022, Table 1), with data standard deviation
    `sigma_data`."""

    @_records_init_kwargs
    def __init__(self,
                 img_resolution: int,                # Image resolution.
                 img_channels: int,                  # Number of colour channels.
                 label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
                 use_fp16: bool = False,             # Run the U-Net at FP16 precision (on CUDA)?
                 sigma_min: float = 0,               # Minimum supported noise level.
                 sigma_max: float = float("inf"),    # Maximum supported noise level.
                 sigma_data: float = 0.5,            # Expected standard deviation of the training data.
                 model_type: str = "DhariwalUNet",   # Class name of the underlying U-Net.
                 **model_kwargs: Any,                # Keyword arguments of the U-Net.
                 ) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def preconditioning(self, sigma: torch.Tensor) -> tuple[Any, Any, Any, torch.Tensor]:
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


#: EDM's preconditioner classes by name, the top-level networks of its pickles.
PRECONDITIONERS: dict[str, type[_Preconditioner]] = {
    cls.__name__: cls for cls in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)
}
#: Every class name of EDM's `training/networks.py` that this module implements.
NETWORK_CLASS_NAMES: frozenset[str] = frozenset({
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
    "SongUNet", "DhariwalUNet", *PRECONDITIONERS,
})
