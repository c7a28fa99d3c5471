"""Guidance updates that normalise the classifier gradient by its rms (EDM's Algorithm 2, DiT's
rule 2 of Algorithm 3) and EDM's classifier-input normalisation (SPEC §4-5).

Per sample b, with the sample's elements as one row of N values:

    r_b   = rms(x_b)                                       # sqrt(mean of squares over the row)
    out_b = x_b + noise_scale * z_b + g_b / max(rms(g_b), tiny) * r_b * w_b      # guidance_update
    d'_b  = d_b - g_b / max(rms(g_b), tiny) * (gamma * rms(d_b))          # dit_guided_difference
    xc_b  = x_b / r_b if r_b > 1 else x_b                                         # classifier_input

DiT's update is EDM's displacement with w = -gamma, no noise, and x the CFG difference
d = eps_c - eps_u, so both run the same two kernels. DiT's also stores rms(g) (the sampler
reports it) and reads g as a channel slice of the whole latent gradient: rows one stride apart.

Why fuse. Written as PyTorch ops, guidance_update makes about 16 passes over rows of N values:
square, mean for rms(x) (3), the same for rms(g) (3), noise_scale * z (2), x + that (3),
g * scale (2), the final add (3). The fused version makes two: a reduction pass reading x and g,
then one pass reading x, g, z and writing out. In float32 that is 6 x 4 = 24 bytes per element
instead of about 64, and on a GPU the second read of a (64, 3, 64, 64) batch's x and g (6 MB)
comes from L2. dit_guided_difference: 20 bytes instead of about 52; classifier_input drops
from 5 passes (square, mean, where, divide, cast) to 2.

Why `g / max(rms(g), tiny)` before multiplying by `r * w`: the quotient is bounded by sqrt(N)
and exactly 0 where g is 0, so an all-zero gradient gives a guidance term of exactly 0. Grouping
as `g * (r * w / max(rms(g), tiny))` would compute 0 * inf = NaN once r * w exceeds about 4
(float32's tiny is 1.2e-38).

Parallel layout. A batch is a handful of rows of thousands of values, too few rows to fill a GPU
with one program each. Each row is split into chunks: pass 1 writes one partial sum of squares per
(row, chunk); pass 2 runs one program per (row, chunk), each adding its row's few partials in a
fixed order (deterministic, no atomics) before updating its chunk.

All reductions and arithmetic run in float32 (float64 for float64 x); outputs are in x's dtype.
"""
from __future__ import annotations

import torch

from elucd_fast.kernels import OP_NAMESPACE, device_scalar, triton_compute_dtype
from elucd_fast.numerics import working_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # the launchers below need triton; importing this module does not
    triton = None

__all__ = ["guidance_update", "classifier_input", "dit_guided_difference"]

FLOAT32_TINY = torch.finfo(torch.float32).tiny
BLOCK = 1024  # elements per loop step of a program: 4 KiB of float32, a few registers per thread
MAX_CHUNKS_PER_ROW = 256  # pass 2 reads all partials of a row in one vector of this length at most


if triton is not None:

    @triton.jit
    def _row_sum_squares_kernel(src_ptr, partial_ptr, row_stride, row_length, chunk_length, chunks_per_row,
                                BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
        """Pass 1, program (row, chunk): partial[row, chunk] = sum of squares over the chunk."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        row_start = src_ptr + row * row_stride
        chunk_start = chunk * chunk_length
        # BLOCK running sums, added together once at the end: each sums chunk_length / BLOCK
        # terms, so float32 rounding grows with that count rather than with the row length.
        acc = tl.zeros([BLOCK], dtype=COMPUTE)
        for offset in range(0, chunk_length, BLOCK):
            cols = chunk_start + offset + tl.arange(0, BLOCK)
            values = tl.load(row_start + cols, mask=cols < row_length, other=0.0).to(COMPUTE)
            acc += values * values
        tl.store(partial_ptr + row * chunks_per_row + chunk, tl.sum(acc, axis=0))

    @triton.jit
    def _row_rms(partial_ptr, row, row_length, chunks_per_row, CHUNKS: tl.constexpr):
        """rms of a row from its chunk partials (CHUNKS: chunks_per_row rounded up to a power of 2)."""
        index = tl.arange(0, CHUNKS)
        partial = tl.load(partial_ptr + row * chunks_per_row + index, mask=index < chunks_per_row, other=0.0)
        return tl.sqrt(tl.sum(partial, axis=0) / row_length)

    @triton.jit
    def _normalised_update_kernel(x_ptr, g_ptr, z_ptr, out_ptr, x_partial_ptr, g_partial_ptr, g_rms_ptr,
                                  noise_scale_ptr, w_ptr, w_stride, g_row_stride, row_length, chunk_length,
                                  chunks_per_row, tiny,
                                  HAS_NOISE: tl.constexpr, W_SIGN: tl.constexpr, STORE_G_RMS: tl.constexpr,
                                  BLOCK: tl.constexpr, CHUNKS: tl.constexpr, COMPUTE: tl.constexpr):
        """Pass 2, program (row, chunk): out = x [+ noise_scale z] + g / max(rms(g), tiny) * rms(x) * W_SIGN w."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        x_rms = _row_rms(x_partial_ptr, row, row_length, chunks_per_row, CHUNKS)
        g_rms = _row_rms(g_partial_ptr, row, row_length, chunks_per_row, CHUNKS)
        if STORE_G_RMS:
            if chunk == 0:
                tl.store(g_rms_ptr + row, g_rms)
        # NaN-propagating, as torch.clamp_min: a NaN rms(g) must not become tiny.
        inv_g_rms = 1.0 / tl.maximum(g_rms, tiny, propagate_nan=tl.PropagateNan.ALL)
        step = x_rms * (tl.load(w_ptr + row * w_stride).to(COMPUTE) * W_SIGN)
        if HAS_NOISE:
            scale = tl.load(noise_scale_ptr).to(COMPUTE)
        row_offset = row * row_length
        g_row_offset = row * g_row_stride
        chunk_start = chunk * chunk_length
        for offset in range(0, chunk_length, BLOCK):
            cols = chunk_start + offset + tl.arange(0, BLOCK)
            mask = cols < row_length
            x = tl.load(x_ptr + row_offset + cols, mask=mask, other=0.0).to(COMPUTE)
            g = tl.load(g_ptr + g_row_offset + cols, mask=mask, other=0.0).to(COMPUTE)
            if HAS_NOISE:
                z = tl.load(z_ptr + row_offset + cols, mask=mask, other=0.0).to(COMPUTE)
                out = x + scale * z + (g * inv_g_rms) * step
            else:
                out = x + (g * inv_g_rms) * step
            tl.store(out_ptr + row_offset + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _classifier_input_kernel(x_ptr, xc_ptr, rms_ptr, x_partial_ptr, row_length, chunk_length, chunks_per_row,
                                 BLOCK: tl.constexpr, CHUNKS: tl.constexpr, COMPUTE: tl.constexpr):
        """Pass 2 of classifier_input, program (row, chunk); chunk 0 also stores the row's rms."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        x_rms = _row_rms(x_partial_ptr, row, row_length, chunks_per_row, CHUNKS)
        if chunk == 0:
            tl.store(rms_ptr + row, x_rms)
        divisor = tl.where(x_rms > 1.0, x_rms, 1.0)
        row_offset = row * row_length
        chunk_start = chunk * chunk_length
        for offset in range(0, chunk_length, BLOCK):
            cols = chunk_start + offset + tl.arange(0, BLOCK)
            mask = cols < row_length
            x = tl.load(x_ptr + row_offset + cols, mask=mask, other=0.0).to(COMPUTE)
            tl.store(xc_ptr + row_offset + cols, (x / divisor).to(xc_ptr.dtype.element_ty), mask=mask)


def _chunking(row_length: int, block: int) -> tuple[int, int]:
    """(chunk_length, chunks_per_row): chunks are whole blocks, at most MAX_CHUNKS_PER_ROW."""
    blocks = max(1, triton.cdiv(row_length, block))
    chunks_per_row = min(blocks, MAX_CHUNKS_PER_ROW)
    chunk_length = triton.cdiv(blocks, chunks_per_row) * block
    return chunk_length, triton.cdiv(max(row_length, 1), chunk_length)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) as (B, N) rows with unit stride inside each row: a view where the layout allows
    (a channel slice keeps its row stride), else a contiguous copy."""
    rows = t.reshape(t.shape[0], -1)
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else rows.contiguous()


def _row_sum_squares(rows: torch.Tensor, chunk_length: int, chunks_per_row: int, block: int) -> torch.Tensor:
    """Pass 1 launcher: (B, N) rows -> (B, chunks_per_row) partial sums of squares."""
    partial = torch.empty((rows.shape[0], chunks_per_row), dtype=working_dtype(rows.dtype), device=rows.device)
    _row_sum_squares_kernel[(rows.shape[0], chunks_per_row)](
        rows, partial, rows.stride(0), rows.shape[1], chunk_length, chunks_per_row,
        BLOCK=block, COMPUTE=triton_compute_dtype(rows.dtype))
    return partial


def _normalised_update(x: torch.Tensor, g: torch.Tensor, z: torch.Tensor | None, noise_scale: torch.Tensor | None,
                       w: torch.Tensor, w_sign: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both passes: (x + [noise_scale z] + g / max(rms(g), tiny) * rms(x) * w_sign w, rms(g))."""
    batch = x.shape[0]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    g_rms = torch.empty((batch,), dtype=working_dtype(x.dtype), device=x.device)
    if x.numel() == 0:
        return out, g_rms.fill_(float("nan"))
    x_rows, g_rows = x.contiguous().view(batch, -1), _rows(g)
    row_length = x_rows.shape[1]
    chunk_length, chunks_per_row = _chunking(row_length, block)
    x_partial = _row_sum_squares(x_rows, chunk_length, chunks_per_row, block)
    g_partial = _row_sum_squares(g_rows, chunk_length, chunks_per_row, block)
    has_noise = z is not None
    # One weight for all (a 0-d w_i, or one expanded to (B,)) is read in place with stride 0.
    w = w.reshape(-1)
    w_stride = 0 if w.numel() == 1 or w.stride(0) == 0 else 1
    _normalised_update_kernel[(batch, chunks_per_row)](
        x_rows, g_rows, z.contiguous() if has_noise else x_rows, out, x_partial, g_partial, g_rms,
        noise_scale if has_noise else w, w if w_stride == 0 else w.contiguous(), w_stride, g_rows.stride(0), row_length,
        chunk_length,
        chunks_per_row, FLOAT32_TINY, HAS_NOISE=has_noise, W_SIGN=w_sign, STORE_G_RMS=not has_noise,
        BLOCK=block, CHUNKS=triton.next_power_of_2(chunks_per_row), COMPUTE=triton_compute_dtype(x.dtype))
    return out, g_rms


if triton is not None:

    @torch.library.custom_op(f"{OP_NAMESPACE}::guidance_update", mutates_args=())
    def _guidance_update_op(x: torch.Tensor, g: torch.Tensor, z: torch.Tensor, noise_scale: torch.Tensor,
                            w: torch.Tensor, block: int) -> torch.Tensor:
        return _normalised_update(x, g, z, noise_scale, w, 1.0, block)[0]

    @_guidance_update_op.register_fake
    def _(x, g, z, noise_scale, w, block):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.custom_op(f"{OP_NAMESPACE}::dit_guided_difference", mutates_args=())
    def _dit_guided_difference_op(difference: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor,
                                  block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _normalised_update(difference, g, None, None, gamma, -1.0, block)

    @_dit_guided_difference_op.register_fake
    def _(difference, g, gamma, block):
        return (torch.empty_like(difference, memory_format=torch.contiguous_format),
                difference.new_empty((difference.shape[0],), dtype=working_dtype(difference.dtype)))

    @torch.library.custom_op(f"{OP_NAMESPACE}::classifier_input", mutates_args=())
    def _classifier_input_op(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        xc = torch.empty_like(x, memory_format=torch.contiguous_format)
        rms = torch.empty((batch,), dtype=working_dtype(x.dtype), device=x.device)
        if x.numel() == 0:
            return xc, rms.fill_(float("nan"))
        x_rows = x.contiguous().view(batch, -1)
        row_length = x_rows.shape[1]
        chunk_length, chunks_per_row = _chunking(row_length, block)
        x_partial = _row_sum_squares(x_rows, chunk_length, chunks_per_row, block)
        _classifier_input_kernel[(batch, chunks_per_row)](
            x_rows, xc, rms, x_partial, row_length, chunk_length, chunks_per_row,
            BLOCK=block, CHUNKS=triton.next_power_of_2(chunks_per_row), COMPUTE=triton_compute_dtype(x.dtype))
        return xc, rms

    @_classifier_input_op.register_fake
    def _(x, block):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                x.new_empty((x.shape[0],), dtype=working_dtype(x.dtype)))


def _check_weight(w: torch.Tensor, batch: int) -> None:
    if w.numel() not in (1, batch):
        raise ValueError(f"guidance_update: w must hold 1 or B={batch} values, got {w.numel()}")


def guidance_update(x: torch.Tensor, g: torch.Tensor, z: torch.Tensor, noise_scale: float | torch.Tensor,
                    w: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """Triton guidance_update; same contract as `elucd_fast.guidance.update.edm_guidance_update`.

    `noise_scale` (float or one-element tensor) and `w` ((B,) or one value) are read on the
    device. `block` (a power of 2) is the elements per loop step; smaller values exercise the
    chunking on small inputs."""
    if g.shape != x.shape or z.shape != x.shape:
        raise ValueError(f"guidance_update: x {tuple(x.shape)}, g {tuple(g.shape)}, z {tuple(z.shape)} must match")
    _check_weight(w, x.shape[0])
    return _guidance_update_op(x, g, z, device_scalar(noise_scale, x), w, block)


def dit_guided_difference(difference: torch.Tensor, g: torch.Tensor, gamma: float | torch.Tensor, *,
                          block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton dit_guided_difference; same contract as `elucd_fast.guidance.update.dit_guided_difference`:
    (d - g / max(rms(g), tiny) * (gamma * rms(d)), rms(g) (B,)). `g` may be a channel slice."""
    if g.shape != difference.shape:
        raise ValueError(f"dit_guided_difference: difference {tuple(difference.shape)} and g {tuple(g.shape)} "
                         "must match")
    return _dit_guided_difference_op(difference, g, device_scalar(gamma, difference), block)


def classifier_input(x: torch.Tensor, *, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton classifier_input; same contract as `elucd_fast.guidance.update.edm_classifier_input`."""
    return _classifier_input_op(x, block)
