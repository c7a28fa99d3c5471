"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"), able to load the public
checkpoints of facebookresearch/DiT, and the Stable Diffusion VAE that decodes its latents.

Module names and shapes follow the DiT repository's `models.py` (whose patch embedding, attention
and MLP come from timm), so `DiT-XL-2-256x256.pt` loads with `strict=True` without timm installed.
These modules exist to run trained weights: they keep PyTorch's default initialisation except for
the fixed sin-cos position embedding, and have no training-time label dropout.

Shapes: latents x are (B, 4, H/8, W/8) for (B, 3, H, W) images; t is (B,) timesteps of the
1000-step schedule; y is (B,) class ids, where id `num_classes` is the "no class" token used by
classifier-free guidance.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .adm_unet import timestep_embedding
from .block_plan import BlockCache, BlockPlan, check_plan, is_bypassed
from .checkpoint import CheckpointError, check_finite, existing_file, load_state_dict_strict, load_tensors

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

# The VAE of Stable Diffusion 1.x that DiT decodes with (`stabilityai/sd-vae-ft-ema` or `-mse`).
SD_VAE_CONFIG: dict[str, object] = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
# Images are 8x larger than latents with the SD VAE.
VAE_DOWNSAMPLE = 8


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (B, T, D) tokens scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens: (B, C, H, W) -> (B, (H/p) * (W/p), D), row-major."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over tokens, (B, T, D) -> (B, T, D), softmax scale head_dim**-0.5."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, T, head_dim)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Token-wise MLP with tanh-approximated GELU: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """(B,) timesteps -> (B, D): 256-dim sinusoidal features through a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The sinusoidal features are float32; the MLP may be fp16/bf16/fp64.
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """(B,) class ids -> (B, D). With `class_dropout_prob > 0` the table has an extra last row, the
    "no class" embedding used for classifier-free guidance (id `num_classes`)."""

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: the (B, D) condition gives a shift, scale and
    gate for the attention and the MLP branch. (B, T, D), (B, D) -> (B, T, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated projection of tokens to patches: (B, T, D), (B, D) -> (B, T, p * p * C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sines then cosines at dim/2 frequencies 10000**(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """DiT's fixed position embedding (from MAE): (grid_size**2, dim) float32 for row-major tokens.
    The first half of the channels encodes a token's column, the second half its row."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a hidden size divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1).float()


class DiT(nn.Module):
    """Diffusion transformer on latents: `model(x, t, y)` -> (B, out_channels, H, W).

    With `learn_sigma` the output stacks the noise prediction (in_channels) and the variance
    interpolation values (in_channels), as in guided-diffusion.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A frozen parameter rather than a buffer: that is how the checkpoints store it.
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(hidden_size, input_size // patch_size).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        # Block id i is transformer block i; a bypassed block is the identity (both its branches are
        # residual). No cache points: every block's output depends on this call's input, and no
        # shallow path survives a reused deep feature as in a U-Net.
        self.cache_points = 0
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p * p * C) patch tokens -> (B, C, sqrt(T) * p, sqrt(T) * p) image."""
        c, p = self.out_channels, self.patch_size
        h = w = math.isqrt(x.shape[1])
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def block_names(self) -> tuple[str, ...]:
        """The name of each block id (`models.block_plan`): "blocks.i"."""
        return tuple(f"blocks.{i}" for i in range(len(self.blocks)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, block_plan: BlockPlan | None = None,
                block_cache: BlockCache | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents; t: (B,) timesteps; y: (B,) class ids (num_classes =
        unconditional). Returns (B, out_channels, H, W). `block_plan` bypasses transformer blocks
        (`models.block_plan`; DiT has no cache points, so `block_cache` is never used)."""
        if block_plan is not None:
            check_plan(block_plan, self.block_names(), self.cache_points, "this DiT")
        tokens = self.x_embedder(x) + self.pos_embed  # (B, T, D), T = H * W / p**2
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for i, block in enumerate(self.blocks):
            if not is_bypassed(block_plan, i):
                tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))  # (B, out_channels, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, *,
                         guided_channels: int | None = 3, block_plan: BlockPlan | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batched pass, DiT's sampling convention.

        x is (2B, ...) whose first half is used for both halves; y holds the B class ids followed by
        B "no class" ids (`num_classes`). The first `guided_channels` output channels become
        eps_u + cfg_scale * (eps_c - eps_u), copied to both halves; the rest is returned as the
        model gave it. DiT's released sampler (reference FID 2.27) guides 3 of the 4 latent
        channels, hence the default; `guided_channels=None` (all `in_channels`) is standard CFG.
        """
        if guided_channels is None:
            guided_channels = self.in_channels
        if not 1 <= guided_channels <= self.in_channels:
            raise ValueError(f"guided_channels must be in 1..{self.in_channels}, got {guided_channels}")
        half = x[: len(x) // 2]
        plan = {"block_plan": block_plan} if block_plan is not None else {}  # a subclass may take none
        model_out = self.forward(torch.cat([half, half], dim=0), t, y, **plan)
        eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


_DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
# "DiT-XL/2" -> DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs), as in the DiT repo.
DiT_models = {
    f"DiT-{size}/{patch}": functools.partial(DiT, depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, (depth, hidden, heads) in _DIT_SIZES.items() for patch in (2, 4, 8)
}


class DiTWithVAE(NamedTuple):
    """A DiT and the VAE (diffusers `AutoencoderKL`) that decodes its latents:
    images = vae.decode(latents / vae.config.scaling_factor).sample."""
    dit: DiT
    vae: AutoencoderKL


def read_training_checkpoint(path: str | os.PathLike, what: str) -> object:
    """`load_tensors`, also accepting the argparse flags that training scripts (DiT's `train.py`)
    store next to the weights: a Namespace only holds attribute values, so it runs no code."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_tensors(path, what)


def dit_state_dict(obj: object, source: str) -> Mapping[str, torch.Tensor]:
    """The weights in a DiT file: the released files are plain state dicts; training checkpoints
    hold {"model", "ema", "opt", "args"} and, as DiT's own loader does, the EMA weights are used."""
    if isinstance(obj, Mapping) and isinstance(obj.get("ema"), Mapping):
        obj = obj["ema"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a DiT state dict, got {type(obj).__name__}")
    return obj


def load_dit(path: str | os.PathLike, *, model: str | Mapping[str, object] = "DiT-XL/2",
             image_size: int | None = None, vae: str | os.PathLike | None = None,
             num_classes: int = 1000) -> DiT | DiTWithVAE:
    """Loads a DiT checkpoint (e.g. `DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`) from a local
    file: tensors-only, exact fit, finite values. `model` is a `DiT_models` name or a dict of `DiT`
    arguments (depth, hidden_size, patch_size, num_heads, ...); `image_size` is in pixels (latents
    are image_size / 8: 32x32 at 256, 64x64 at 512), by default the size the file's position
    embedding is for. The file holds that embedding (DiT's fixed 2-D sin-cos table, a frozen
    parameter), so it is loaded like the weights.

    With `vae` (a local diffusers directory or `.safetensors` file, see `load_sd_vae`) returns
    `DiTWithVAE(dit, vae)`, else the DiT alone; both in eval mode with gradients disabled for
    their parameters, on the CPU.
    """
    if isinstance(model, str):
        if model not in DiT_models:
            raise ValueError(f"unknown DiT model {model!r}; choose one of {list(DiT_models)}")
        build = DiT_models[model]
    else:
        build = functools.partial(DiT, **model)
    source = str(path)
    state = dit_state_dict(read_training_checkpoint(path, "DiT checkpoint"), source)
    if image_size is None:
        if not is_dit_state_dict(state):
            raise CheckpointError(f"{source}: not a DiT state dict (no x_embedder/t_embedder/final_layer/pos_embed)")
        try:
            image_size = dit_config_from_state_dict(state)["image_size"]
        except CheckpointError as err:
            raise CheckpointError(f"{source}: {err}; pass image_size") from err
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image_size must be a multiple of {VAE_DOWNSAMPLE}, got {image_size}")
    dit = build(input_size=image_size // VAE_DOWNSAMPLE, num_classes=num_classes)
    try:
        load_state_dict_strict(dit, state, source)
    except CheckpointError as err:
        hint = ""
        if is_dit_state_dict(state):
            with contextlib.suppress(CheckpointError):
                hint = f". The file reads as {dit_config_from_state_dict(state)}"
        raise CheckpointError(f"{err} (as {model} at {image_size}x{image_size}){hint}") from err
    dit.eval().requires_grad_(False)
    if vae is None:
        return dit
    return DiTWithVAE(dit, load_sd_vae(vae))


def is_dit_state_dict(state: Mapping[str, object]) -> bool:
    """True when the keys look like a DiT."""
    return all(k in state for k in ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight",
                                    "pos_embed"))


def dit_config_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """The DiT configuration readable from a state dict's shapes: model name (when a standard one),
    depth, hidden size, patch size, latent and image size, classes, learn_sigma.
    Raises CheckpointError when the keys do not form a DiT."""
    try:
        return _read_dit_config(state)
    except (KeyError, ValueError, AttributeError, ZeroDivisionError) as err:
        raise CheckpointError(f"DiT keys in an unfamiliar arrangement ({type(err).__name__}: {err})") from err


def _read_dit_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    grid = math.isqrt(state["pos_embed"].shape[1])
    table_rows = state["y_embedder.embedding_table.weight"].shape[0] if "y_embedder.embedding_table.weight" in state else 0
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    name = next((n for n, f in DiT_models.items()
                 if (f.keywords["depth"], f.keywords["hidden_size"], f.keywords["patch_size"]) == (depth, hidden, patch)),
                None)
    return dict(model=name, depth=depth, hidden_size=hidden, patch_size=patch, in_channels=in_channels,
                input_size=grid * patch, image_size=grid * patch * VAE_DOWNSAMPLE,
                # The extra last row is the "no class" embedding of classifier-free guidance.
                num_classes=max(table_rows - 1, 0), learn_sigma=out_channels == 2 * in_channels)


def _require_diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("decoding DiT latents needs the diffusers package (pip install diffusers)") from err
    return diffusers


# diffusers renamed the VAE's attention projections; files saved before the rename (like the
# sd-vae-ft-* releases) still use the old names.
_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_attention(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_LEGACY_ATTENTION.sub(lambda m: f"{m.group(1)}{_LEGACY_ATTENTION_NAMES[m.group(2)]}.", k): v
            for k, v in state.items()}


def load_sd_vae(path: str | os.PathLike, *, config: Mapping[str, object] | None = None) -> AutoencoderKL:
    """Loads the Stable Diffusion VAE (diffusers `AutoencoderKL`) from local files only.

    `path` is a directory in diffusers layout (config.json + diffusion_pytorch_model.safetensors,
    or a pipeline directory with a `vae/` subfolder) or a single diffusers-layout `.safetensors`
    file, built with `config` (default `SD_VAE_CONFIG`, the sd-vae-ft-ema/mse configuration).
    Original LDM-layout files (`vae-ft-ema-560000-ema-pruned.safetensors`) are refused with a hint.
    Every weight must be present, fit, and be finite. Returns the VAE in eval mode with gradients
    disabled for its parameters.
    """
    diffusers = _require_diffusers()
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        existing_file(folder / "config.json", "VAE directory")
        try:
            vae, info = diffusers.AutoencoderKL.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True, low_cpu_mem_usage=False)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder}: cannot load a diffusers AutoencoderKL ({err})") from err
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise CheckpointError(f"{folder}: weights do not fit the AutoencoderKL of its config.json: {problems}")
        check_finite(vae.state_dict(), str(folder))
    else:
        state = load_tensors(p, "VAE weights")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{p}: expected a VAE state dict, got {type(state).__name__}")
        if any(k.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for k in state):
            raise CheckpointError(
                f"{p}: this is an original (LDM) layout VAE file; use the diffusers-layout release "
                "(e.g. the stabilityai/sd-vae-ft-ema directory or its diffusion_pytorch_model.safetensors)")
        vae = diffusers.AutoencoderKL(**dict(config or SD_VAE_CONFIG))
        load_state_dict_strict(vae, _rename_legacy_attention(state), str(p))
    return vae.eval().requires_grad_(False)
