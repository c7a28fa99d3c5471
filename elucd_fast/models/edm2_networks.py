"""The networks of NVlabs EDM2 ("Analyzing and Improving the Training Dynamics of Diffusion
Models", Karras et al. 2024): magnitude-preserving layers, the EDM2 U-Net (the paper's
Figure 21, config G) and its preconditioner with the learned uncertainty u(sigma).

Parameter and buffer names and shapes equal those of EDM2's `training/networks_edm2.py`
(`Precond`, `UNet`, `Block`, `MPConv`, `MPFourier`), so the tensors of a released EDM2 pickle load
strictly into `EDM2Precond`; `EDM2_PICKLE_CLASSES` maps EDM2's class names to ours.

Magnitude preservation: every layer keeps activations at unit expected magnitude (rms 1 per
sample). Weights are normalised to unit norm per output channel in every forward pass (and,
while training, rewritten so in place: the paper's forced weight normalisation), the
nonlinearity and the sums and concatenations are rescaled to unit variance, and the network's
only learned scales are the zero-initialised gains `emb_gain` (per block) and `out_gain`.

Precision follows the weights, not the input. Released pickles store every tensor in float16;
the network normalises weights in float32 and, like EDM2, runs the U-Net in float16 only on CUDA
with `use_fp16` (the embeddings stay float32 there). Weights cast to float64 (`net.double()`)
run everything in float64: a reference mode EDM2 lacks (it rounds to float32).

Loading a released pickle (`network-snapshot-*.pkl`, `edm2-img*-*.pkl`: an EasyDict with `ema`,
`encoder`, `dataset_kwargs`, `loss_fn`): build `EDM2Precond(**ema._init_kwargs)` (EDM2 records
the Precond's constructor arguments there), convert it to float16 (`.half()`) and load the
record's tensors strictly, so that the module holds them exactly as EDM2's does: the gains then
scale the weights in float16 arithmetic, as in EDM2 (loaded into float32 parameters instead, the
outputs differ from EDM2's by about 1e-4 relative). The encoder record maps onto
`edm2_encoders`.

Units and shapes: `x` (B, C, R, R) is in the data's units, standard deviation `sigma_data`
(0.5: pixels in [-1, 1] for ImageNet-64, whitened SD-VAE latents for ImageNet-512); `sigma` is
the noise standard deviation in the same units; class labels are one-hot (B, label_dim).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from .block_plan import BlockCache, BlockPlan, assign_block_ids, cached_output, check_plan, is_bypassed, store_output

from .edm_networks import _records_init_kwargs

# Expected magnitude of silu(x) for x ~ N(0, 1): dividing by it keeps unit magnitude (paper Eq. 81).
_SILU_MAGNITUDE = 0.596


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + rms(x)), the root-mean-square taken over `dim` (default: all but the first) in
    at least float32; the result keeps x's dtype and shape."""
    if dim is None:
        dim = tuple(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_accumulation_dtype(x.dtype))
    group_size = x.numel() // norm.numel()
    # eps + norm / sqrt(group_size) as one fused operation (one rounding), as EDM2 computes it.
    denominator = torch.add(eps, norm, alpha=math.sqrt(1 / group_size))
    return x / denominator.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude (paper Eq. 81)."""
    return torch.nn.functional.silu(x) / _SILU_MAGNITUDE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): the blend of two unit-magnitude, uncorrelated
    tensors with unit magnitude (paper Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along `dim` that keeps unit magnitude and gives a and b the shares 1 - t
    and t of the result's magnitude whatever their widths (paper Eq. 103)."""
    width_a = a.shape[dim]
    width_b = b.shape[dim]
    total = math.sqrt((width_a + width_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (total / math.sqrt(width_a) * (1 - t)), b * (total / math.sqrt(width_b) * t)], dim=dim)


class MPFourier(torch.nn.Module):
    """Fourier features sqrt(2) cos(2 pi (f x + p)) with fixed random frequencies f ~ N(0,
    bandwidth^2) and phases p ~ U[0, 1) (paper Eq. 75): (N,) -> (N, num_channels), unit
    magnitude, computed in at least float32 and returned in x's dtype.

    The buffers hold 2 pi f (`freqs`) and 2 pi p (`phases`).
    """

    def __init__(self, num_channels: int, bandwidth: float = 1) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _accumulation_dtype(x.dtype)
        angles = torch.outer(x.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)  # (N, num_channels)
        return (angles.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (`kernel` (k, k)) or fully-connected layer (`kernel`
    ()) without bias (paper Eq. 47): each output channel's weights are normalised to unit norm,
    then scaled by gain / sqrt(fan_in), so unit-magnitude inputs give outputs of magnitude `gain`.

    forward(x (B, in_channels, H, W) or (..., in_channels), gain) -> same with out_channels;
    'same' padding. Weights are normalised in at least float32 and cast to x's dtype. In training
    mode the stored weights are first replaced by their normalised values (forced weight
    normalisation, paper Eq. 66), so their norm cannot grow and shrink the effective learning rate.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.weight.to(_accumulation_dtype(self.weight.dtype))
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        fan_in = w[0].numel()
        # A tensor gain is divided in its own dtype (float16 for released weights), as EDM2 does.
        w = (normalize(w) * (gain / math.sqrt(fan_in))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)


class EDM2Block(torch.nn.Module):
    """Encoder or decoder block of the EDM2 U-Net (paper Figure 21): optional 2x resampling, a
    residual branch of two 3x3 convolutions modulated by the embedding, optional multi-head
    self-attention with pixel-normalised queries, keys and values, and clipping.

    forward(x (B, in_channels, H, W), emb (B or 1, emb_channels)) -> (B, out_channels, H', W'),
    H' = H / 2 ('down'), 2H ('up') or H ('keep').

    An encoder block maps the input to `out_channels` (1x1 convolution) and pixel-normalises it
    before the residual branch; a decoder block runs the branch on its (wider) input and maps the
    main path to `out_channels` only where the branches join.
    """

    def __init__(self,
                 in_channels: int,                          # Input channels.
                 out_channels: int,                         # Output channels.
                 emb_channels: int,                         # Embedding channels.
                 flavor: str = "enc",                       # 'enc' or 'dec'.
                 resample_mode: str = "keep",               # 'keep', 'up' or 'down'.
                 resample_filter: Sequence[float] = (1, 1),  # Separable resampling filter taps (even length).
                 attention: bool = False,                   # Self-attention after the residual branch?
                 channels_per_head: int = 64,               # Channels per attention head.
                 dropout: float = 0,                        # Dropout probability in the residual branch.
                 res_balance: float = 0.3,                  # Share of the residual branch in the sum (0 = none).
                 attn_balance: float = 0.3,                 # Share of the attention branch in the sum.
                 clip_act: float | None = 256,              # Clip outputs to [-clip_act, clip_act]; None = no clipping.
                 ) -> None:
        if flavor not in ("enc", "dec"):
            raise ValueError(f"EDM2Block: flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"EDM2Block: resample_mode must be 'keep', 'up' or 'down', got {resample_mode!r}")
        if len(resample_filter) % 2:
            raise ValueError(f"EDM2Block: resample_filter needs an even number of taps, got {resample_filter!r}")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act

        # Registration order follows EDM2's, so state dicts list the same keys in the same order.
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

        # The 2D filter (1, 1, k, k), normalised to unit gain: not part of EDM2's state dict.
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        filter_2d = (torch.outer(taps, taps) / taps.sum().square()).reshape(1, 1, len(taps), len(taps))
        self.register_buffer("resample_kernel", filter_2d if resample_mode != "keep" else None, persistent=False)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """2x down- (filter, stride 2) or upsampling (transposed, 4x the filter to keep the mean)
        of each channel, or x itself."""
        if self.resample_mode == "keep":
            return x
        channels = x.shape[1]
        kernel = self.resample_kernel.to(x.dtype)
        padding = (kernel.shape[-1] - 1) // 2
        if self.resample_mode == "down":
            return torch.nn.functional.conv2d(x, kernel.tile([channels, 1, 1, 1]), groups=channels, stride=2,
                                              padding=padding)
        return torch.nn.functional.conv_transpose2d(x, (kernel * 4).tile([channels, 1, 1, 1]), groups=channels,
                                                    stride=2, padding=padding)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, plan: BlockPlan | None = None) -> torch.Tensor:
        """`plan` may bypass the residual branch (`block_id`: the main path alone, i.e. resampled,
        projected and, in the encoder, pixel-normalised x; no `mp_sum`, which balances two
        branches) and the attention (`attention_id`), each independently."""
        bypass_residual = is_bypassed(plan, getattr(self, "block_id", -1))
        # Main path.
        x = self.resample(x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: unit rms over channels at each pixel
        if bypass_residual:
            if self.flavor == "dec" and self.conv_skip is not None:
                x = self.conv_skip(x)
            return self._attend_and_clip(x, plan)

        # Residual branch, modulated per channel by 1 + gain * (linear map of the embedding).
        y = self.conv_res0(mp_silu(x))
        modulation = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B or 1, out_channels)
        y = mp_silu(y * modulation.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        return self._attend_and_clip(x, plan)

    def _attend_and_clip(self, x: torch.Tensor, plan: BlockPlan | None) -> torch.Tensor:
        if self.num_heads and not is_bypassed(plan, getattr(self, "attention_id", -1)):
            batch, channels, height, width = x.shape
            # qkv channels are laid out (head, channel in head, q/k/v): (B, heads, C / heads, 3, H * W).
            qkv = self.attn_qkv(x).reshape(batch, self.num_heads, -1, 3, height * width)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # each (B, heads, C / heads, H * W)
            weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", weights, v)
            y = self.attn_proj(y.reshape(batch, channels, height, width))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(torch.nn.Module):
    """The EDM2 U-Net (paper Figure 21): magnitude-preserving encoder and decoder over
    len(channel_mult) resolutions, with a concatenated constant channel at the input and skip
    connections joined by `mp_cat`.

    forward(x (B, img_channels, R, R), noise_labels (B,) or (1,), class_labels (B or 1,
    label_dim) or None) -> (B, img_channels, R, R) in x's dtype. The embedding is computed in
    the labels' dtype (float32 when the preconditioner runs the U-Net in float16).
    """

    @_records_init_kwargs
    def __init__(self,
                 img_resolution: int,                            # Image resolution R at input and output.
                 img_channels: int,                              # Image channels at input and output.
                 label_dim: int,                                 # Class label dimensionality, 0 = unconditional.
                 model_channels: int = 192,                      # Base multiplier for the number of channels.
                 channel_mult: Sequence[int] = (1, 2, 3, 4),     # Per-resolution channel multipliers.
                 channel_mult_noise: int | None = None,          # Noise embedding width / model_channels, or mult[0].
                 channel_mult_emb: int | None = None,            # Embedding width / model_channels, or max(mult).
                 num_blocks: int = 3,                            # Encoder blocks per resolution (decoder: one more).
                 attn_resolutions: Sequence[int] = (16, 8),      # Resolutions with self-attention.
                 label_balance: float = 0.5,                     # Share of the class embedding (0 = noise only).
                 concat_balance: float = 0.5,                    # Share of the skip connection in each concatenation.
                 dropout: float = 0,                             # Dropout probability in residual branches.
                 channels_per_head: int = 64,                    # Channels per attention head.
                 res_balance: float = 0.3,                       # Share of the residual branch in each block.
                 attn_balance: float = 0.3,                      # Share of the attention branch in each block.
                 clip_act: float | None = 256,                   # Clip block outputs; None = no clipping.
                 resample_filter: Sequence[float] = (1, 1),      # Resampling filter taps.
                 ) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        level_channels = [model_channels * mult for mult in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else level_channels[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(level_channels)
        block_kwargs = dict(resample_filter=resample_filter, channels_per_head=channels_per_head, dropout=dropout,
                            res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=())
        self.emb_label = MPConv(label_dim, emb_channels, kernel=()) if label_dim else None

        # Encoder: block names carry the resolution; every output is kept as a skip connection.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # the constant channel
        for level, channels in enumerate(level_channels):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = EDM2Block(cout, cout, emb_channels, flavor="enc", resample_mode="down",
                                                          **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, emb_channels, flavor="enc",
                                                                attention=res in attn_resolutions, **block_kwargs)

        # Decoder: each `block{idx}` takes one skip connection, last in first out.
        self.dec = torch.nn.ModuleDict()
        skips = [module.out_channels for module in self.enc.values()]
        for level, channels in reversed(list(enumerate(level_channels))):
            res = img_resolution >> level
            if level == len(level_channels) - 1:
                self.dec[f"{res}x{res}_in0"] = EDM2Block(cout, cout, emb_channels, flavor="dec", attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = EDM2Block(cout, cout, emb_channels, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = EDM2Block(cout, cout, emb_channels, flavor="dec", resample_mode="up",
                                                        **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, emb_channels, flavor="dec",
                                                                attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=(3, 3))
        self._block_names = assign_block_ids(
            (f"{part}.{name}", block, bool(block.num_heads)) for part, blocks in (("enc", self.enc), ("dec", self.dec))
            for name, block in blocks.items() if isinstance(block, EDM2Block))
        self.cache_points = len(self.dec)

    def block_names(self) -> tuple[str, ...]:
        """The name of each block id (`models.block_plan`)."""
        return self._block_names

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                block_plan: BlockPlan | None = None, block_cache: BlockCache | None = None) -> torch.Tensor:
        """`block_plan` bypasses blocks and stores or reuses decoder block k's output in
        `block_cache` (`models.block_plan`); None runs every block."""
        cached = None
        if block_plan is not None:
            check_plan(block_plan, self._block_names, self.cache_points, "this EDM2 U-Net")
            cached = cached_output(block_plan, block_cache)
        emb = self.emb_noise(self.emb_fourier(noise_labels))  # (B or 1, emb_channels)
        if self.emb_label is not None:
            # Scaled so that one-hot labels have unit magnitude.
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, img_channels + 1, R, R)
        names = list(self.dec)
        # With decoder block k's output reused, only the encoder outputs the `block` entries after
        # k pop run (the first ones: the skips are a stack).
        needed = len(self.enc) if cached is None else sum("block" in name for name in names[block_plan.reuse + 1:])
        skips = []
        for block in itertools.islice(self.enc.values(), needed):
            x = block(x) if isinstance(block, MPConv) else block(x, emb, block_plan)
            skips.append(x)

        first = 0
        if cached is not None:
            x, first = cached, block_plan.reuse + 1
        for point in range(first, len(names)):
            if "block" in names[point]:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = self.dec[names[point]](x, emb, block_plan)
            store_output(block_plan, block_cache, point, x)
        return self.out_conv(x, gain=self.out_gain)


class EDM2Precond(torch.nn.Module):
    """EDM2's denoiser: EDM's preconditioning (Karras et al. 2022, Table 1)

        D(x; sigma) = c_skip x + c_out F(c_in x; log(sigma) / 4)

    around the EDM2 U-Net F (`self.unet`), and the log-variance u(sigma) of the loss weighting
    (paper Eq. 21), a linear map of Fourier features of c_noise.
    """

    sigma_min = 0
    sigma_max = float("inf")

    @_records_init_kwargs
    def __init__(self,
                 img_resolution: int,          # Image (or latent) resolution.
                 img_channels: int,            # Image channels: 3 for pixels, 4 for SD-VAE latents.
                 label_dim: int,               # Class label dimensionality, 0 = unconditional.
                 use_fp16: bool = True,        # Run the U-Net in float16 (on CUDA)?
                 sigma_data: float = 0.5,      # Expected standard deviation of the training data.
                 logvar_channels: int = 128,   # Fourier features of the uncertainty estimate.
                 **unet_kwargs: Any,           # Keyword arguments of EDM2UNet.
                 ) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                             **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=())

    @classmethod
    def from_config(cls, name: str, **overrides: Any) -> EDM2Precond:
        """A network of a published configuration (`EDM2_CONFIGS`), random weights; `overrides`
        replace constructor arguments (e.g. `label_dim=0`, `use_fp16=False`)."""
        return cls(**{**edm2_config(name), **overrides})

    def block_names(self) -> tuple[str, ...]:
        """The U-Net's block names by id (`models.block_plan`)."""
        return self.unet.block_names()

    @property
    def cache_points(self) -> int:
        return self.unet.cache_points

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, return_logvar: bool = False, block_plan: BlockPlan | None = None,
                block_cache: BlockCache | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Denoised estimate D(x; sigma) (B, C, R, R), float32 (float64 for float64 weights), and
        with `return_logvar` also u(sigma) (B or 1, 1, 1, 1).

        Args:
            x: noisy images (B, img_channels, R, R), any float dtype.
            sigma: noise level: a Python float, a 0-d tensor or a (B,) tensor.
            class_labels: (B, label_dim) or (label_dim,) one-hot labels; None gives all-zero
                labels for a conditional network and is required for an unconditional one.
            force_fp32: run the U-Net in float32 even when `use_fp16` is set.
            return_logvar: also return the uncertainty u(sigma).
        """
        dtype = torch.float64 if self.logvar_linear.weight.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], dtype=dtype, device=x.device)
        else:
            class_labels = class_labels.to(dtype).reshape(-1, self.label_dim)
        # float16 only on CUDA: CPU half-precision kernels are slow or missing.
        use_fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda" and dtype == torch.float32
        unet_dtype = torch.float16 if use_fp16 else dtype

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(unet_dtype), c_noise, class_labels, block_plan, block_cache)
        D_x = c_skip * x + c_out * F_x.to(dtype)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The noise level(s) the network supports nearest to `sigma`; any sigma here."""
        return torch.as_tensor(sigma)


def _published(img_channels: int, model_channels: int, dropout: float, label_dim: int = 1000) -> Mapping[str, Any]:
    # The training script fills in the rest from the dataset (64x64 images or 64x64x4 latents,
    # 1000 ImageNet classes) and leaves every other argument at its default.
    return MappingProxyType(dict(img_resolution=64, img_channels=img_channels, label_dim=label_dim,
                                 model_channels=model_channels, dropout=dropout, use_fp16=True))


#: Constructor arguments of EDM2's configurations (`train_edm2.py` presets, the arguments its
#: pickles record): ImageNet-512 models work on 4-channel 64x64 SD-VAE latents. Released
#: pickles exist for every one but img512-xxs; "-uncond" ones are the unconditional guides.
EDM2_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "img512-xxs": _published(4, 64, 0.0),
    "img512-xs": _published(4, 128, 0.0),
    "img512-s": _published(4, 192, 0.0),
    "img512-m": _published(4, 256, 0.1),
    "img512-l": _published(4, 320, 0.1),
    "img512-xl": _published(4, 384, 0.1),
    "img512-xxl": _published(4, 448, 0.1),
    "img512-xs-uncond": _published(4, 128, 0.0, label_dim=0),
    "img512-s-uncond": _published(4, 192, 0.0, label_dim=0),
    "img64-xs": _published(3, 128, 0.0),
    "img64-s": _published(3, 192, 0.0),
    "img64-m": _published(3, 256, 0.1),
    "img64-l": _published(3, 320, 0.1),
    "img64-xl": _published(3, 384, 0.1),
})


def edm2_config(name: str) -> dict[str, Any]:
    """The constructor arguments of the configuration `name` (a key of `EDM2_CONFIGS`; an
    "edm2-" prefix is accepted) as a new dict."""
    key = name.removeprefix("edm2-")
    if key not in EDM2_CONFIGS:
        raise ValueError(f"unknown EDM2 configuration {name!r}; expected one of {sorted(EDM2_CONFIGS)}")
    return dict(EDM2_CONFIGS[key])


#: EDM2's class names (of `training/networks_edm2.py`, as its pickles name them) -> ours.
EDM2_PICKLE_CLASSES: Mapping[str, type[torch.nn.Module]] = MappingProxyType({
    "Precond": EDM2Precond, "UNet": EDM2UNet, "Block": EDM2Block, "MPConv": MPConv, "MPFourier": MPFourier,
})
