"""Faster equivalents of two of EDM's layers, swapped into the engine's copy of an EDM U-Net
(`fast_edm_backbone`); the plain networks in `models/edm_networks.py` are never changed.

- Self-attention. EDM's `UNetBlock.attention` materialises the (HW x HW) attention weights of
  every head (einsum, softmax, einsum): at 32 x 32 that is 4 MiB per head in float32, written and
  read back several times. `scaled_dot_product_attention` computes the same softmax(q k / sqrt(d)) v
  blockwise with float32 accumulation (PyTorch's flash kernel on CPU). Its qkv projection's output
  channels are stored here in (q|k|v, head, channel) order, so that with a channels-last input q, k
  and v are strided views with unit channel stride and the kernel's output is already the
  channels-last layout the output projection reads: no copies around the kernel.
- 2x upsampling. EDM upsamples by a depthwise transposed convolution with the box filter (1, 1)
  (weights exactly 1 after EDM's x4 gain): nearest-neighbour upsampling, which
  `interpolate(mode="nearest")` gives bit for bit. PyTorch's CPU transposed convolution is slow for
  bf16 channels-last inputs (30 ms vs 0.1 ms at (8, 384, 16, 16), measured).

Measured on the issue's reference network (EDM's ImageNet-64 ADM U-Net at 32 x 32, batch 8, one
CPU thread): attention is a quarter of a float32 forward and a third of a bf16 one; see
bench/RESULTS.md.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from ..models.edm_networks import Conv2d, UNetBlock


class FusedAttentionUNetBlock(UNetBlock):
    """A `UNetBlock` whose attention runs through `scaled_dot_product_attention`. Its `qkv`
    projection's output channels are in (q|k|v, head, channel) order (`from_block` permutes
    them); everything else is the block's own."""

    @classmethod
    def from_block(cls, block: UNetBlock) -> FusedAttentionUNetBlock:
        """`block` turned into this class in place (its qkv weights permuted); `block` must be
        the engine's own copy."""
        heads, channels = block.num_heads, block.out_channels
        # EDM splits the 3C qkv channels as (head, channel, q|k|v); reorder to (q|k|v, head, channel).
        order = torch.arange(3 * channels).reshape(heads, channels // heads, 3).permute(2, 0, 1).reshape(-1)
        for name, p in list(block.qkv.named_parameters(recurse=False)):
            setattr(block.qkv, name, nn.Parameter(p.detach()[order], requires_grad=False))
        block.__class__ = cls
        return block

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        heads = self.num_heads
        # (B, 3C, H, W) -> (B, HW, 3, heads, C / heads): a view when x is channels-last, else one
        # copy (the kernel needs unit stride along the channels).
        qkv = self.qkv(self.norm2(x)).permute(0, 2, 3, 1).contiguous()
        qkv = qkv.reshape(batch, height * width, 3, heads, channels // heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, heads, HW, C / heads)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C / heads)
        a = a.transpose(1, 2).reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)
        # Channels-last already; a contiguous (NCHW) network gets its own layout back.
        a = a.contiguous(memory_format=_memory_format(x))
        x = self.proj(a).add_(x)
        return x * self.skip_scale


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class NearestUpsampledConv2d(nn.Module):
    """EDM's `Conv2d` with `up=True` and the box filter (1, 1), unfused: nearest-neighbour 2x
    upsampling, then the layer's own convolution and bias (`conv`, the layer without `up`)."""

    def __init__(self, conv: Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


def _is_box_upsampling(module: nn.Module) -> bool:
    f = getattr(module, "resample_filter", None)
    return (isinstance(module, Conv2d) and module.up and not module.fused_resample and f is not None
            and f.shape[-2:] == (2, 2) and bool((f == f.flatten()[0]).all()))


def _without_upsampling(conv: Conv2d) -> Conv2d:
    plain = copy.copy(conv)
    plain._buffers = dict(conv._buffers, resample_filter=None)
    plain.up = False
    return plain


def _weights_copy(backbone: nn.Module, weight_dtype: torch.dtype | None,
                  memory_format: torch.memory_format) -> nn.Module:
    """A copy of `backbone`'s modules. With a `weight_dtype`, its convolution weights become new
    tensors of that dtype in `memory_format` (each layer would cast them to its input's dtype on
    every call); every other parameter and buffer, and all of them without a dtype, are shared
    with `backbone`, which is left untouched. The linear layers stay float32: they compute the
    noise and class embeddings, which stay float32 (as in EDM's fp16 mode)."""
    matrices = {id(m.weight) for m in backbone.modules() if isinstance(m, Conv2d) and m.weight is not None}
    memo = {}
    for t in itertools.chain(backbone.parameters(), backbone.buffers()):
        if weight_dtype is not None and id(t) in matrices:
            cast = t.detach().to(weight_dtype)
            memo[id(t)] = nn.Parameter(cast.contiguous(memory_format=memory_format) if cast.ndim == 4 else cast,
                                       requires_grad=False)
        else:
            memo[id(t)] = t
    return copy.deepcopy(backbone, memo)


def fast_edm_backbone(backbone: nn.Module, weight_dtype: torch.dtype | None = None,
                      memory_format: torch.memory_format = torch.preserve_format) -> nn.Module:
    """The engine's copy of an EDM U-Net (`DhariwalUNet`, `SongUNet`): its convolution weights in
    `weight_dtype` (shared with `backbone` when None), attention blocks as
    `FusedAttentionUNetBlock`, box-filter upsampling layers as `NearestUpsampledConv2d`."""
    fast = _weights_copy(backbone, weight_dtype, memory_format)
    for parent in list(fast.modules()):
        for name, child in list(parent.named_children()):
            if _is_box_upsampling(child):
                setattr(parent, name, NearestUpsampledConv2d(_without_upsampling(child)))
            elif isinstance(child, UNetBlock) and type(child) is UNetBlock and child.num_heads:
                FusedAttentionUNetBlock.from_block(child)
    return fast


def is_edm_backbone(module: nn.Module) -> bool:
    """Whether `module` is built of EDM's layers (its UNetBlocks follow their input's dtype)."""
    return any(isinstance(m, UNetBlock) for m in module.modules())
