"""Fused Hadamard rotation + per-tensor int8 or e4m3 quantization (Quamba's input to `out_proj`).

`hadamard_quantize(x, scale) = quantize(hadamard_transform(x.float()), scale)`: the scan output `y`
is rotated by the orthonormal Hadamard matrix `H = hadamard_matrix(n)` of `quamba_fx.quant.hadamard`
(`x @ H.T` along the last dim) and quantized to int8 with one fp32 scale, in one pass over memory.
`hadamard_quantize_fp8(x, scale) = quantize_fp8(hadamard_transform(x.float()), scale)` is the fp8
recipe's version (float8 e4m3 out, the same kernels with another last step).
`hadamard_transform_triton(x)` is the same kernel stopping before the quantization (fp32 out); it
exists to test the transform itself, and is a fast fp32 rotation in its own right.
`gated_rmsnorm_hadamard_quantize(y, z, ...)` is Mamba-2's gated norm (kernels/gated_norm.py) as
the packed kernel's prologue: each tile's rows are normed in registers, rounded to fp16 as the norm
kernel would store them, and rotated: one launch instead of two, and the normed rows never go to
memory and back. Decode steps use it; long prefills do not (see the function).
`gated_rmsnorm_hadamard_rotate` is the same without the quantization (the rotation before a
W4A16 out_proj, which multiplies in fp16).

Algorithm
---------
`H = kron(D, S) / sqrt(n)` with `D` the dense `M x M` Paley factor (+-1 entries, `M = 1` for powers
of two) and `S` the Sylvester matrix of order `P = 2**k`. Viewing a row as `X[b, p] = x[b * P + p]`,
`H x` is `D @ X @ S.T / sqrt(n)`, computed in this order:

1. dense factor `acc = D @ X`, every product exact (`D` is +-1), sums in fp32:
   * tensor cores (`_hadamard_packed_kernel`, when M_PAD = next_power_of_2(M) <= 64 and P >= 16,
     i.e. all of Mamba's sizes): R rows share one `[MP, P]` tile, their `R * M` row-blocks stacked
     (3 x 20 = 60 of 64 for n = 5120 and 2560, 5 x 12 for 1536), multiplied by `kron(I_R, D)`:
     the work after the MMA then runs on 4 dead tile rows of 64 instead of 12 of 32. D and X enter
     the MMA as 16-bit floats, which is exact: D is +-1, an fp16/bf16 x is itself, and an fp32 x is
     first split exactly into three bfloat16 parts `x = hi + mid + lo` (24 significant bits =
     3 x 8; three products accumulated; not TF32: no bit of x is dropped). Only the fp32
     accumulation rounds. Dead tile rows are loaded as zeros. Programs form a persistent grid and
     loop over blocks, the next blocks' tiles streaming into shared memory (Triton's software
     pipelining) while one is computed;
   * otherwise (one row per program, `_hadamard_kernel`) fp32 FMAs, M rank-1 updates
     `acc += D[:, b] (x) X[b, :]` in order b = 0..M-1;
2. Sylvester factor: a radix-2 fast Walsh-Hadamard transform of every tile row, `k` fp32 stages of
   `(u, v) -> (u + v, u - v)` written with reshape / split / join / permute (the stage order only
   changes the order of the same fp32 additions; see `_fwht_rows`);
3. `y = acc * fp32(1 / sqrt(n))`, the same fp32 constant the reference multiplies by;
4. (quantize) `q = clamp(round_half_even(y / scale), -128, 127)` with the correctly rounded fp32
   quotient, like `torch.ops.quamba.quantize` (`rounding.quantize_rn`: saturation by clamping y,
   a reciprocal product plus one exact FMA correction, rounding with the 1.5 * 2**23 trick; valid
   for scales in [2**-126, 2**120]). `hadamard_quantize_fp8` stores float8 e4m3 instead,
   `e4m3(clamp(y / scale, -448, 448))` like `quamba.quantize_fp8` (`rounding.quantize_e4m3_rn`:
   the same correctly rounded quotient, then rounding to nearest e4m3 in fp32 arithmetic; valid
   for scales in [2**-90, 2**118]).

Numerics versus the reference, and the test tolerances
------------------------------------------------------
The reference (`torch.ops.quamba.hadamard` then `torch.ops.quamba.quantize`) applies the butterfly
first and the dense factor second, with its own summation orders; both compute the same sums of
exact `+-x` terms with fp32 additions, so they differ only by rounding: each of the `k` butterfly
stages and each of the `M - 1` dense additions adds at most about an ulp of a partial sum, and an
orthogonal transform keeps partial sums at the scale of the row's RMS times a small factor. The
block-diagonal `kron(I_R, D)` adds only exact zero products from the other rows of a tile, which
changes no sum of finite values (a row holding inf or NaN, whose own output is meaningless, makes
0 * inf = NaN in the up to R - 1 rows sharing its tile). The observed difference is below 1e-6 of
the row's RMS (CPU interpreter, H100 and H200; fp16/bf16/fp32 inputs), so the fp32 transform is
tested at `|got - want| <= 1e-5 * (|want| + rms(row))`, a >10x margin that still catches any wrong
sign, order or scale (those give errors of order 1). The quantized result is the same function of
`y` (correctly rounded division on both sides, identical rounding), so it can only differ where
`y / scale` lies within a few ulps of a .5 boundary: for values up to 127 a window of ~127 * 2**-21
around each boundary, hit by a tiny fraction of elements. The tests allow `|diff| <= 1` on at most
0.1% of the elements (plus one), never more than one step. Bit equality is checked where every
partial sum is exact (small integer-valued inputs, on every kernel path), and the quantize step
alone is checked bit for bit against IEEE division. The e4m3 output is likewise the same function
of `y` as `quantize_fp8` (bit for bit, tests/test_kernel_rounding.py) and can only differ where
`y / scale` lies within a few ulps of a midpoint between e4m3 values, by one code (adjacent e4m3
values); its tests use the same budget.

On CUDA nothing else changes: no approximate division, no transcendental functions. Speed:
docs/benchmarks.md (benchmarks/hadamard_norm.py).

Layouts: `x` is `[..., n]` with stride 1 along the last dim (other last-dim strides are copied
first); leading dims may have any strides (e.g. a `[B, L, D]` view of a larger buffer), collapsed
to at most two (row index -> two strides) without a copy. The output is a new contiguous tensor.
Sizes: every `n` that `quamba_fx.quant.hadamard.is_hadamard_size` accepts; the kernel runs up to
`MAX_N`, wider rows run the reference (the same function, slower).
"""

from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import INTERPRET as _INTERPRET
from .dispatch import as_scalar, cdiv, graph_op, next_pow2, sm_count
from .dispatch import use_triton as _use_triton
from .pdl import launch_options, wait_for_previous

from ..quant.fp8 import quantize_fp8 as _quantize_fp8  # torch.ops.quamba.quantize_fp8
from ..quant.qops import quantize as _quantize_int8  # torch.ops.quamba.quantize
from ..quant.hadamard import _check_size, _dense_int, is_hadamard_size  # and registers quamba.hadamard
from .gated_norm import check_gated_rmsnorm_args, gated_rmsnorm, gated_row
from .rounding import quantize_e4m3_rn, quantize_rn

__all__ = [
    "MAX_N",
    "gated_rmsnorm_hadamard_quantize",
    "gated_rmsnorm_hadamard_rotate",
    "hadamard_quantize",
    "hadamard_quantize_fp8",
    "hadamard_quantize_fp8_reference",
    "hadamard_quantize_reference",
    "hadamard_transform_reference",
    "hadamard_transform_triton",
    "packs_gated_norm",
]


# The kernel keeps a padded row of M_PAD * P <= 2 * n fp32 values in registers; beyond 32768 the
# tile would spill heavily (and compile slowly). Mamba's largest d_inner is 5120.
MAX_N = 32768
# The dense factor runs on tensor cores when tl.dot accepts the tile (every dim >= 16) and the
# [M_PAD, M_PAD] operand is small enough to stay in registers; otherwise on fp32 FMAs.
_MAX_DOT_M = 64
_MIN_DOT_DIM = 16
# Packed tensor-core tiles (R > 1 rows each): at most this many fp32 values (128 a thread with 4
# warps, the one warpgroup of a 64-row wgmma). Each program loops over blocks with loads _STAGES
# deep (the next blocks' tiles stream into shared memory while one is computed), on a persistent
# grid of _PROGRAMS_PER_SM programs per multiprocessor for tiles up to _SMALL_TILE values, 2 above
# (as many as fit: ~240 registers a thread and 112 KiB of shared memory for 64 x 256 at 3 stages;
# measured on H200 against 1-4 programs and 1-3 stages, docs/benchmarks.md). The stages' input
# tiles share _STAGE_BYTES of shared memory (a 64 x 256 fp16 tile, 32 KiB, gets 3 stages; fp32
# inputs, split into three bf16 operands in shared memory besides, get 1). 0 programs per SM:
# one program per block.
_PACKED_MAX_TILE = 16384
_SMALL_TILE = 8192
_PROGRAMS_PER_SM = 3
_STAGES = 3
_STAGE_BYTES = 96 * 1024

# Warps of the gated norm's tiles (`gated_rmsnorm_hadamard_quantize`). The lowering runs that op
# in the decode graph only: 1-64 rows, one-row tiles of one program each (from 2048 rows up it is
# slower than the two kernels). mamba2-2.7b decode on the H200, against 4 warps: +1.8%, +1.1% and
# +1.0% at batch 1, 16 and 64 (docs/benchmarks.md, session 33). A setting decode_settings.py sweeps.
GATED_WARPS = 8

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernels' QUANT constexpr: index of the output dtype (0: the fp32 rotation, no quantization).
_OUT_DTYPES = (torch.float32, torch.int8, torch.float8_e4m3fn)
_ROTATE, _INT8, _FP8 = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _butterfly(acc, M_PAD: tl.constexpr, P: tl.constexpr, H: tl.constexpr):
    # One radix-2 stage on index bit log2(H) of every row: (u, v) -> (u + v, u - v) for the pairs
    # (i, i + H) inside each block of 2H columns. The size-2 axis is moved last for split/join.
    t = tl.permute(tl.reshape(acc, [M_PAD, P // (2 * H), 2, H]), (0, 1, 3, 2))
    u, v = tl.split(t)
    return tl.reshape(tl.permute(tl.join(u + v, u - v), (0, 1, 3, 2)), [M_PAD, P])


@triton.jit
def _fwht_rows(acc, M_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, PEASE: tl.constexpr):
    # Unnormalised Walsh-Hadamard transform of every row of acc [M_PAD, P], i.e. acc @ S.
    # The two forms compute the same sums in a different order. They differ in what Triton's
    # layouts make of them, and every stage whose bit is not held in one thread's registers costs
    # a pass of the tile through shared memory, the kernel's bottleneck (measured on H100):
    # * PEASE (constant geometry): every stage takes neighbours (2i, 2i+1) and writes u + v to i
    #   and u - v to i + P/2; after LOG_P stages the bits are back in order. Best on the blocked
    #   layout of a plain load (M == 1): 3 layout conversions for n = 4096;
    # * otherwise textbook stages from the highest bit down, best on the tensor-core output
    #   layout, whose high column bits are register bits: 2 conversions for n = 5120, against 8
    #   for the Pease form (1.3-1.5x faster overall).
    if PEASE:
        for _ in tl.static_range(LOG_P):
            pairs = tl.reshape(acc, [M_PAD, P // 2, 2])
            u, v = tl.split(pairs)
            acc = tl.reshape(tl.permute(tl.join(u + v, u - v), (0, 2, 1)), [M_PAD, P])
    else:
        for j in tl.static_range(LOG_P):
            acc = _butterfly(acc, M_PAD, P, 1 << (LOG_P - 1 - j))
    return acc


@triton.jit
def _dense_dot(dmat, x, acc, EMULATE: tl.constexpr):
    # acc + D @ X with operands exact in the MMA input type (+-1 and a 16-bit float), so the tensor
    # cores' products are exact and only the fp32 accumulation rounds. Under the interpreter,
    # whose dot mishandles bfloat16, the same exact values are multiplied in fp32.
    if EMULATE:
        return tl.dot(dmat.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(dmat, x, acc)


@triton.jit
def _quantize(y, scale, QUANT: tl.constexpr):
    # Step 4 of the module docstring, in the output format QUANT names (see _OUT_DTYPES).
    if QUANT == 1:
        return quantize_rn(y, scale)
    else:
        return quantize_e4m3_rn(y, scale)


@triton.jit
def _hadamard_kernel(
    x_ptr, d_ptr, scale_ptr, out_ptr,
    D1, stride_0, stride_1, inv_sqrt_n,
    M: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, QUANT: tl.constexpr,
    DENSE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    # Dense factors that tl.dot cannot take (DENSE == 2) and powers of two (DENSE == 0), one row
    # per program; the tensor-core path is _hadamard_packed_kernel.
    row = tl.program_id(0)
    # Rows are numbered over the (at most two, see _lead_layout) leading dims; 64-bit offsets so
    # that views of large buffers do not overflow.
    i0 = row // D1
    i1 = row - i0 * D1
    x_row = x_ptr + i0.to(tl.int64) * stride_0 + i1.to(tl.int64) * stride_1
    offs_a = tl.arange(0, M_PAD)
    offs_p = tl.arange(0, P)
    rows_ok = offs_a[:, None] < M

    # Step 1 of the module docstring: acc = D @ X, X[b, p] = x[b * P + p] (rows >= M are zero).
    if DENSE == 0:  # M == 1: no dense factor
        acc = tl.load(x_row + offs_a[:, None] * P + offs_p[None, :]).to(tl.float32)
    else:
        # fp32 FMAs (tiles too small for tl.dot, or a dense factor too large for one): M rank-1
        # updates acc += D[:, b] (x) X[b, :] in order b = 0, 1, ..., M-1, each row X[b, :] loaded
        # from memory (a register tile has no cheap row extraction). d_ptr holds D transposed and
        # zero-padded to [M, M_PAD] in fp32, so D[:, b] is one contiguous load and the padding
        # rows of acc stay zero without masks.
        acc = tl.zeros([M_PAD, P], dtype=tl.float32)
        for b in range(M):
            d = tl.load(d_ptr + b * M_PAD + offs_a)
            xb = tl.load(x_row + b * P + offs_p).to(tl.float32)
            acc += d[:, None] * xb[None, :]

    # Step 2: the Sylvester factor along every row.
    if LOG_P > 0:
        acc = _fwht_rows(acc, M_PAD, P, LOG_P, DENSE == 0)
    y = acc * inv_sqrt_n

    offs = row.to(tl.int64) * (M * P) + offs_a[:, None] * P + offs_p[None, :]
    if QUANT == 0:
        tl.store(out_ptr + offs, y, mask=rows_ok)
    else:
        tl.store(out_ptr + offs, _quantize(y, tl.load(scale_ptr), QUANT), mask=rows_ok)


@triton.jit
def _dense_dot_exact(dmat, x, EMULATE_DOT: tl.constexpr):
    # D @ X with every product exact: a 16-bit x enters the MMA as itself; an fp32 x is first split
    # exactly into three bfloat16 parts, x = hi + mid + lo (each residual is exact in fp32 and the
    # last one has at most 8 significant bits), so no bit of x is dropped (unlike TF32).
    acc = tl.zeros([dmat.shape[0], x.shape[1]], dtype=tl.float32)
    if x.dtype == tl.float32:
        hi = x.to(tl.bfloat16)
        rest = x - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        # Smallest parts first, accumulating in place.
        acc = _dense_dot(dmat, lo, acc, EMULATE_DOT)
        acc = _dense_dot(dmat, mid, acc, EMULATE_DOT)
        acc = _dense_dot(dmat, hi, acc, EMULATE_DOT)
    else:
        acc = _dense_dot(dmat, x, acc, EMULATE_DOT)
    return acc


@triton.jit
def _gated_norm_tile(y_rows, z_rows, w_rows, offs_p, live, z_scale, eps, offs_z,
                     Z_INT8: tl.constexpr, GROUP_ROWS: tl.constexpr, P: tl.constexpr, OUT: tl.constexpr):
    # gated_rmsnorm (kernels/gated_norm.py) of the tile's row-blocks, in OUT: the packed kernel's
    # input computed in registers instead of read back from memory. A norm group is GROUP_ROWS
    # consecutive tile rows (rows start at multiples of M, which GROUP_ROWS divides), so its sum
    # of squares is the sum of those rows' sums, gathered with a [MP, MP] mask.
    h = gated_row(y_rows, z_rows, offs_p[None, :], live[:, None], z_scale, Z_INT8)
    squares = tl.sum(h * h, axis=1)
    group = offs_z // GROUP_ROWS
    total = tl.sum(tl.where(group[:, None] == group[None, :], squares[None, :], 0.0), axis=1)
    rstd = tl.math.rsqrt(total / (GROUP_ROWS * P) + eps)
    w = tl.load(w_rows + offs_p[None, :]).to(tl.float32)
    return (w * (h * rstd[:, None])).to(OUT)


@triton.jit
def _hadamard_packed_kernel(
    x_ptr, d_ptr, scale_ptr, out_ptr,
    rows, n_blocks, D1, stride_0, stride_1,
    z_ptr, z_scale_ptr, w_ptr, stride_z0, stride_z1, eps,
    INV_SQRT_N: tl.constexpr, M: tl.constexpr, R: tl.constexpr, MP: tl.constexpr, P: tl.constexpr,
    LOG_P: tl.constexpr, QUANT: tl.constexpr, EMULATE_DOT: tl.constexpr, STAGES: tl.constexpr,
    USE_PDL: tl.constexpr, GATED: tl.constexpr, Z_INT8: tl.constexpr, GROUP_ROWS: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    # Tensor-core path: R rows per block, their R * M row-blocks X[b, :] = x[row, b * P : (b + 1) * P]
    # stacked into one [MP, P] tile (MP = next_power_of_2(R * M); e.g. 3 rows of 20 in 64 for
    # n = 5120), so that the per-element work after the MMA (butterflies, quantization) runs on
    # padding for MP - R * M tile rows only (4 of 64, against 12 of 32 with one row of 20 per tile).
    # d_ptr is kron(I_R, D) zero-padded to [MP, MP], in x's 16-bit type (bfloat16 for fp32 x).
    # Programs loop over blocks (a persistent grid on CUDA); STAGES > 1 lets Triton prefetch the
    # next blocks' tiles into shared memory while this one is computed.
    # GATED: x is y, and the rotation's input gated_rmsnorm(y, z) with the norm weight at w_ptr
    # (z's rows at their own strides, int8 at z_scale_ptr when Z_INT8), in d_ptr's dtype.
    offs_z = tl.arange(0, MP)
    offs_p = tl.arange(0, P)
    r_in = offs_z // M
    b = offs_z - r_in * M
    dmat = tl.load(d_ptr + offs_z[:, None] * MP + offs_z[None, :])
    if QUANT != 0:
        scale = tl.load(scale_ptr)
    if GATED and Z_INT8:
        z_scale = tl.load(z_scale_ptr).to(tl.float32)
    else:
        z_scale = 1.0
    for blk in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0), num_stages=STAGES):
        row = blk * R + r_in
        live = (offs_z < R * M) & (row < rows)
        # Rows are numbered over the (at most two, see _lead_layout) leading dims; 64-bit offsets
        # so that views of large buffers do not overflow.
        i0 = row // D1
        i1 = row - i0 * D1
        x_off = i0.to(tl.int64) * stride_0 + i1.to(tl.int64) * stride_1 + b * P
        # Dead tile rows load zeros (never other rows' data: 0 * inf would be NaN in the MMA).
        if GATED:
            z_off = i0.to(tl.int64) * stride_z0 + i1.to(tl.int64) * stride_z1 + b * P
            x = _gated_norm_tile(x_ptr + x_off[:, None], z_ptr + z_off[:, None], w_ptr + b[:, None] * P, offs_p,
                                 live, z_scale, eps, offs_z, Z_INT8, GROUP_ROWS, P, d_ptr.dtype.element_ty)
        else:
            x = tl.load(x_ptr + x_off[:, None] + offs_p[None, :], mask=live[:, None], other=0.0)
        # Step 1 of the module docstring, then step 2 on the MMA's output, then 3 and 4.
        acc = _dense_dot_exact(dmat, x, EMULATE_DOT)
        acc = _fwht_rows(acc, MP, P, LOG_P, False)
        y = acc * INV_SQRT_N
        out_off = row.to(tl.int64) * (M * P) + b * P
        out_ptrs = out_ptr + out_off[:, None] + offs_p[None, :]
        if QUANT == 0:
            tl.store(out_ptrs, y, mask=live[:, None])
        else:
            tl.store(out_ptrs, _quantize(y, scale, QUANT), mask=live[:, None])


# ---------------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------------


def _lead_layout(shape: Tuple[int, ...], strides: List[Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """Collapse leading dims shared by several tensors of the same `shape` into as few as possible.

    `strides` lists each tensor's leading-dim strides. Returns `[(size, stride_t0, stride_t1, ...),
    ...]`, outermost first, without size-1 dims; adjacent dims merge when they are collapsible in
    every tensor (`stride[i] == stride[i+1] * size[i+1]`). The caller copies when more than two
    dims remain.
    """
    dims: List[Tuple[int, ...]] = []
    for i, size in enumerate(shape):
        if size == 1:
            continue
        cur = tuple(s[i] for s in strides)
        if dims and all(prev == c * size for prev, c in zip(dims[-1][1:], cur)):
            dims[-1] = (dims[-1][0] * size,) + cur
        else:
            dims.append((size,) + cur)
    return dims


def _rows(*tensors: torch.Tensor) -> Tuple[List[torch.Tensor], int, int, List[Tuple[int, int]]]:
    """`(tensors', rows, D1, strides)` for tensors of one shape `[..., n]`: row r of tensor i
    starts at `(r // D1) * strides[i][0] + (r % D1) * strides[i][1]`; each tensor is itself
    unless the layouts needed a copy. One leading dim comes back as `D1 = 1` (Triton specializes
    on it, and the kernels' per-row division by D1 disappears)."""
    n = tensors[0].shape[-1]
    tensors = [t.contiguous() if n > 1 and t.stride(-1) != 1 else t for t in tensors]
    dims = _lead_layout(tuple(tensors[0].shape[:-1]), [t.stride()[:-1] for t in tensors])
    if len(dims) > 2:
        tensors = [t.contiguous() for t in tensors]
        dims = _lead_layout(tuple(tensors[0].shape[:-1]), [t.stride()[:-1] for t in tensors])
    if len(dims) == 1:
        (size, *strides), = dims
        return tensors, size, 1, [(s, 0) for s in strides]
    dims = [(1,) + (0,) * len(tensors)] * (2 - len(dims)) + dims
    (d0, *outer), (d1, *inner) = dims
    return tensors, d0 * d1, d1, list(zip(outer, inner))


@functools.lru_cache(maxsize=64)
def _dense_table(bases: Tuple[int, ...], pack: int, m_pad: int, dtype: torch.dtype, transpose: bool,
                 device: str) -> torch.Tensor:
    """The dense factor D zero-padded for the kernel, cached per (size, packing, dtype, device).

    `transpose=False`: `kron(I_pack, D)` as `[M_PAD, M_PAD]`, the tensor-core operand for `pack`
    rows per tile. `transpose=True`: `D^T` as `[M, M_PAD]`, whose row b is column b of D (the FMA
    path's rank-1 updates; `pack` must be 1).
    """
    d = _dense_int(bases)
    m = d.shape[0]
    if transpose:
        table = torch.zeros(m, m_pad, dtype=dtype)
        table[:, :m] = d.t().to(dtype)
    else:
        table = torch.zeros(m_pad, m_pad, dtype=dtype)
        table[: pack * m, : pack * m] = torch.kron(torch.eye(pack, dtype=torch.int8), d).to(dtype)
    return table.to(device)


def _config(n: int) -> Tuple[Tuple[int, ...], int, int, int]:
    bases, k = _check_size(n)
    m = math.prod(bases)
    return bases, m, next_pow2(m), k


def _dense_mode(m: int, m_pad: int, p: int) -> int:
    """0: no dense factor (M = 1); 1: tensor cores (tl.dot); 2: fp32 FMA rank-1 updates."""
    if m == 1:
        return 0
    if m_pad <= _MAX_DOT_M and min(m_pad, p) >= _MIN_DOT_DIM:
        return 1
    return 2


def _packing(m: int, p: int) -> Tuple[int, int]:
    """`(R, MP)` for the tensor-core kernel: R rows per tile of MP = next_power_of_2(R * M) rows,
    the R with the fewest dead tile rows (R * M / MP largest; the smallest R on ties) such that
    MP <= _MAX_DOT_M and the fp32 tile MP * P fits _PACKED_MAX_TILE; R = 1 when nothing packs."""
    best = (1, next_pow2(m))
    for r in range(2, _MAX_DOT_M // m + 1):
        mp = next_pow2(r * m)
        if mp <= _MAX_DOT_M and mp * p <= _PACKED_MAX_TILE and r * m * best[1] > best[0] * m * mp:
            best = (r, mp)
    return best


def _packing_for(rows: int, m: int, m_pad: int, p: int, programs: int) -> Tuple[int, int]:
    """`_packing(m, p)`, or one row per tile when a call has fewer rows than a packed tile holds,
    or when the packed tiles would not give every one of `programs` (the SM count on CUDA) a tile."""
    pack, mp = _packing(m, p)
    if rows < pack or cdiv(rows, pack) < programs:
        # A short call's time is one tile's latency, not the padding it transforms: with fewer
        # packed tiles than SMs, smaller one-row tiles on more SMs finish sooner. H200, 5120,
        # fp16 (docs/benchmarks.md, run 9): 16 rows 7.6 us against 9.9 packed, 128 rows 8.2
        # against 10.2; at 2048 rows (683 packed tiles) packing wins, 23.5 against 26.4 us.
        return 1, m_pad
    return pack, mp


def _schedule(pack: int, n_blocks: int, tile: int, itemsize: int, device: torch.device) -> Tuple[int, int]:
    """`(grid, stages)` of the packed kernel for `n_blocks` blocks of `pack` rows, `tile` inputs of
    `itemsize` bytes each. Packed tiles (measured: 64 x 256 and 64 x 128) get the persistent grid
    and the pipelined loop described at _PROGRAMS_PER_SM; unpacked ones (R = 1: large P, or M > 32)
    one program per row and no pipelining, like the one-row kernel. Under the interpreter a grid of
    3 makes the tests run each program's loop over several blocks."""
    if _INTERPRET:
        return min(n_blocks, 3), 1
    if pack == 1 or _PROGRAMS_PER_SM <= 0:
        return n_blocks, 1
    per_sm = _PROGRAMS_PER_SM if tile <= _SMALL_TILE else min(_PROGRAMS_PER_SM, 2)
    stages = 1 if itemsize > 2 else max(1, min(_STAGES, _STAGE_BYTES // (tile * itemsize)))
    return min(n_blocks, per_sm * sm_count(device)), stages


def _packed_num_warps(tile: int) -> int:
    """Warps of the tensor-core kernel: one warpgroup (the 64-row wgmma's) for its tiles of up to
    _PACKED_MAX_TILE values, packed or not. H200, 5120 (32 x 256 one-row tiles): 4 warps 7.4 /
    7.6 / 8.2 us at 1 / 16 / 128 rows against 7.5 / 7.9 / 8.5 with 8 (docs/benchmarks.md, run 9)."""
    if _INTERPRET:
        return 1
    return 4 if tile <= _PACKED_MAX_TILE else _num_warps(tile)


def _num_warps(tile: int) -> int:
    if _INTERPRET:
        return 1
    # Measured on H100 (fp16 in, 16384 rows): 4 warps for tiles of 1024..4096 values (n = 1536,
    # 2560, 4096), 8 from 8192 (n = 5120: 0.28 ms against 0.34 ms with 4); up to 64 values per
    # thread keeps the butterfly's two copies of the tile in registers without spills.
    if tile >= 8192:
        return 8 if tile <= 16384 else 16
    if tile >= 1024:
        return 4
    return max(1, tile // 256)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_rotation_args(fn: str, x: object) -> int:
    """The checks of a rotation's input `x [..., n]` (ValueErrors naming `fn`); returns n."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dim [..., n], got a 0-dim tensor")
    n = x.shape[-1]
    _check_size(n)  # ValueError naming the nearest supported sizes
    return n


def _check_quantize_args(fn: str, x: object, scale: object) -> int:
    """The checks of a rotation's input and of the per-tensor scale that quantizes it
    (ValueErrors naming `fn`); returns n."""
    n = _check_rotation_args(fn, x)
    _check_scale(fn, scale, x.device)
    return n


def _check_scale(fn: str, scale: object, device: torch.device) -> None:
    if not isinstance(scale, torch.Tensor):
        raise ValueError(
            f"{fn}: scale must be a 0-dim or 1-element float32 tensor (read by the kernel at run time), "
            f"got {type(scale).__name__}"
        )
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise ValueError(
            f"{fn}: scale must be a 0-dim or 1-element float32 tensor, got {scale.dtype} of shape {tuple(scale.shape)}"
        )
    if scale.device != device:
        raise ValueError(f"{fn}: scale is on {scale.device} but x is on {device}")


# ---------------------------------------------------------------------------------------------
# References (built from the graph's own ops)
# ---------------------------------------------------------------------------------------------


def hadamard_transform_reference(x: torch.Tensor) -> torch.Tensor:
    """fp32 `hadamard_transform(x.float())` through `torch.ops.quamba.hadamard`, contiguous."""
    _check_rotation_args("hadamard_transform_reference", x)
    return torch.ops.quamba.hadamard(x.to(torch.float32))


def hadamard_quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `hadamard_quantize_fp8`: `quamba.quantize_fp8(quamba.hadamard(x.float()), scale)`."""
    _check_quantize_args("hadamard_quantize_fp8_reference", x, scale)
    return _quantize_fp8(hadamard_transform_reference(x), scale)


def hadamard_quantize_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `hadamard_quantize`: `quamba.quantize(quamba.hadamard(x.float()), scale)`."""
    _check_quantize_args("hadamard_quantize_reference", x, scale)
    return _quantize_int8(hadamard_transform_reference(x), scale)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


class _Gate(NamedTuple):
    """gated_rmsnorm's arguments besides y, when the packed kernel computes its input itself."""

    z: torch.Tensor
    z_scale: Optional[torch.Tensor]
    weight: torch.Tensor
    eps: float
    group_size: int
    norm_dtype: torch.dtype


def _launch(x: torch.Tensor, scale: torch.Tensor, quant: int, rotation_dtype: torch.dtype = torch.float32,
            gate: Optional[_Gate] = None) -> torch.Tensor:
    n = x.shape[-1]
    bases, m, m_pad, k = _config(n)
    # The rotation (no quantization) is stored in `rotation_dtype`: the store rounds the fp32 result.
    out = torch.empty(x.shape, dtype=rotation_dtype if quant == _ROTATE else _OUT_DTYPES[quant], device=x.device)
    tensors, rows, d1, strides = _rows(x) if gate is None else _rows(x, gate.z)
    if rows == 0:
        return out
    xr, (s0, s1) = tensors[0], strides[0]
    p = 1 << k
    dense = _dense_mode(m, m_pad, p)
    if dense == 1:
        # The interpreter packs whenever a tile's worth of rows exists, so tests reach both paths.
        pack, mp = _packing_for(rows, m, m_pad, p, 1 if _INTERPRET else sm_count(x.device))
        operand = x.dtype if gate is None else gate.norm_dtype  # what enters the MMA
        table = _dense_table(bases, pack, mp, torch.float16 if operand == torch.float16 else torch.bfloat16,
                             False, str(x.device))
        n_blocks = cdiv(rows, pack)
        grid, stages = _schedule(pack, n_blocks, mp * p, x.element_size(), x.device)
        num_warps = _packed_num_warps(mp * p)
        # The gate's arguments (unused pointers and values without GATED).
        gated = dict(z_ptr=xr, z_scale_ptr=scale, w_ptr=xr, stride_z0=0, stride_z1=0, eps=0.0, Z_INT8=False,
                     GROUP_ROWS=1)
        if gate is not None:
            # The norm's loads and fp32 tile beside the rotation's: no room for a second stage.
            stages, num_warps = 1, (1 if _INTERPRET else GATED_WARPS)
            z_scale = gate.z_scale if gate.z_scale is not None else scale
            gated.update(z_ptr=tensors[1], z_scale_ptr=z_scale, w_ptr=gate.weight.contiguous(),
                         stride_z0=strides[1][0], stride_z1=strides[1][1], eps=gate.eps,
                         Z_INT8=gate.z_scale is not None, GROUP_ROWS=gate.group_size // p)
        _hadamard_packed_kernel[(grid,)](
            xr, table, scale, out,
            rows, n_blocks, d1, s0, s1,
            **gated,
            INV_SQRT_N=1.0 / math.sqrt(n), M=m, R=pack, MP=mp, P=p, LOG_P=k, QUANT=quant,
            EMULATE_DOT=_INTERPRET, STAGES=stages, GATED=gate is not None,
            num_warps=num_warps, **launch_options(x.device),
        )
        return out
    if gate is not None:
        raise AssertionError("the gated norm runs only on the packed kernel (see packs_gated_norm)")
    # dense 0 (no dense factor) needs no table: out is a dummy pointer, never read.
    table = out if dense == 0 else _dense_table(bases, 1, m_pad, torch.float32, True, str(x.device))
    _hadamard_kernel[(rows,)](
        xr, table, scale, out,
        d1, s0, s1, 1.0 / math.sqrt(n),
        M=m, M_PAD=m_pad, P=p, LOG_P=k, QUANT=quant, DENSE=dense,
        num_warps=_num_warps(m_pad << k), **launch_options(x.device),
    )
    return out


def _kernel_runs(x: torch.Tensor) -> bool:
    """Whether the kernel takes `x`: a Triton device (see dispatch.use_triton) and rows of at most
    MAX_N. Every entry point falls back to its reference otherwise, wider rows included: the
    kernel holds a row in registers, and no Mamba size (d_inner up to 5120) comes near the limit."""
    return _use_triton(x) and x.shape[-1] <= MAX_N


def hadamard_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of `x` by the orthonormal Hadamard matrix and quantize to int8, fused.

    Args:
        x: `[..., n]` float16, bfloat16 or float32; `n` any size `is_hadamard_size` accepts (the
            kernel's up to `MAX_N`), e.g. Mamba's d_inner 1536, 2048, 2560, 3072, 4096, 5120. The
            last dim should have stride 1 (else it is copied); leading dims may have any strides.
        scale: per-tensor scale, a 0-dim or 1-element float32 tensor on x's device, read by the
            kernel at run time (updating it in place needs no recompilation).

    Returns:
        int8 `[..., n]`, contiguous: `quantize(hadamard_transform(x.float()), scale)`, i.e.
        `clamp(round_half_even((x.float() @ H.T) / scale), -128, 127)` with the transform in fp32.

    CUDA tensors run the Triton kernel, as do CPU tensors under TRITON_INTERPRET=1; other CPU
    tensors and rows wider than `MAX_N` run `hadamard_quantize_reference`. Results may differ
    from the reference by one int8 step where the fp32 value sits at a rounding boundary (see the
    module docstring).
    """
    _check_quantize_args("hadamard_quantize", x, scale)
    if not _kernel_runs(x):
        return hadamard_quantize_reference(x, scale)
    return _launch(x, scale, quant=_INT8)


def hadamard_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`hadamard_quantize` with float8 e4m3 output: the fp8 recipe's input to `out_proj`.

    Same arguments, layouts, sizes and fallbacks as `hadamard_quantize` (the fallback is
    `hadamard_quantize_fp8_reference`); scales in [2**-90, 2**118].

    Returns:
        float8_e4m3fn `[..., n]`, contiguous: `quantize_fp8(hadamard_transform(x.float()), scale)`,
        i.e. `e4m3(clamp((x.float() @ H.T) / scale, -448, 448))`, the quotient correctly rounded in
        fp32, then rounded to nearest e4m3 (ties to even, subnormals included, -0.0 kept). Given
        the same fp32 `y`, the quantization is bit-identical to `quantize_fp8`; results may differ
        from the reference by one e4m3 step where `y / scale` sits at a rounding boundary (see the
        module docstring).
    """
    _check_quantize_args("hadamard_quantize_fp8", x, scale)
    if not _kernel_runs(x):
        return hadamard_quantize_fp8_reference(x, scale)
    return _launch(x, scale, quant=_FP8)


def hadamard_transform_triton(x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rotation of `hadamard_quantize` without the quantization: `x.float() @ H.T`, computed
    in fp32 and returned in `out_dtype` (float32, float16 or bfloat16; rounded once to nearest).

    Same arguments, layouts and sizes as `hadamard_quantize` (no scale); returns a contiguous
    tensor of x's shape. Runs the same kernel (CUDA, or CPU under TRITON_INTERPRET=1), else
    `hadamard_transform_reference`.
    """
    _check_rotation_args("hadamard_transform_triton", x)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hadamard_transform_triton: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if not _kernel_runs(x):
        return hadamard_transform_reference(x).to(out_dtype)
    if out_dtype == torch.bfloat16:
        # Triton's fp32 -> bf16 conversion is not round-to-nearest everywhere (the interpreter's
        # truncates): PyTorch rounds this one.
        return _launch(x, x, quant=_ROTATE).to(out_dtype)
    return _launch(x, x, quant=_ROTATE, rotation_dtype=out_dtype)  # scale pointer unused without QUANT


def packs_gated_norm(n: int, group_size: Optional[int], norm_dtype: torch.dtype) -> bool:
    """Whether `gated_rmsnorm_hadamard_quantize` (and `..._rotate`) runs as one kernel on rows of
    `n` normed over groups of `group_size` (None: the row) into `norm_dtype`: sizes the
    tensor-core kernel takes (every Mamba d_inner that is not a power of two), groups of whole
    tile rows (multiples of the Sylvester order P: 256 for 5120), fp16 normed values (fp32 ones
    would need the exact three-way split; bf16 is left to the two kernels because the
    interpreter, which the tests run, rounds fp32 to bf16 by truncation)."""
    if norm_dtype != torch.float16 or not is_hadamard_size(n) or n > MAX_N:
        return False
    _, m, m_pad, k = _config(n)
    group = group_size or n
    return _dense_mode(m, m_pad, 1 << k) == 1 and n % group == 0 and group % (1 << k) == 0


def gated_rmsnorm_hadamard_quantize(y: torch.Tensor, z: torch.Tensor, z_scale: Optional[torch.Tensor],
                                    weight: torch.Tensor, eps: float, group_size: Optional[int],
                                    norm_dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """Mamba-2's gated norm and out_proj's input rotation and quantization in one pass:
    `hadamard_quantize(gated_rmsnorm(y, z, z_scale, weight, eps, norm_dtype, group_size), scale)`.

    The normed rows are computed in the kernel's registers, rounded to `norm_dtype` as the two
    kernels would store them, and rotated, never written to memory. Arguments are those of
    `kernels.gated_norm.gated_rmsnorm` and `hadamard_quantize`; returns int8 of y's shape,
    contiguous. Where `packs_gated_norm` says no (or off a Triton device) it runs the two
    functions. The norm's sum of squares is added in another order than gated_rmsnorm's, which
    can move a normed value by one `norm_dtype` ulp, and so an int8 code by one step (rarely).
    Meant for decode steps (a few rows, one launch fewer): from 2048 rows up the two kernels are
    faster (the norm's arithmetic and synchronous loads stall the rotation's pipeline;
    docs/benchmarks.md, session 33).
    """
    check_gated_rmsnorm_args(y, z, z_scale, weight, norm_dtype, group_size)
    _check_quantize_args("gated_rmsnorm_hadamard_quantize", y, scale)
    n = y.shape[-1]
    if not (_kernel_runs(y) and packs_gated_norm(n, group_size, norm_dtype)):
        return hadamard_quantize(gated_rmsnorm(y, z, z_scale, weight, eps, norm_dtype, group_size), scale)
    return _launch(y, scale, quant=_INT8, gate=_Gate(z, z_scale, weight, float(eps), group_size or n, norm_dtype))


def gated_rmsnorm_hadamard_rotate(y: torch.Tensor, z: torch.Tensor, z_scale: Optional[torch.Tensor],
                                  weight: torch.Tensor, eps: float, group_size: Optional[int],
                                  norm_dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mamba-2's gated norm and the rotation before a W4A16 out_proj in one pass:
    `hadamard_transform_triton(gated_rmsnorm(y, z, z_scale, weight, eps, norm_dtype, group_size),
    out_dtype)` (None: `norm_dtype`), as `gated_rmsnorm_hadamard_quantize` is with the
    quantization. Same conditions (`packs_gated_norm`, else the two functions), numerics (the
    norm's sum of squares in another order: a normed value may move by one `norm_dtype` ulp) and
    use (decode steps); returns `out_dtype` of y's shape, contiguous."""
    check_gated_rmsnorm_args(y, z, z_scale, weight, norm_dtype, group_size)
    _check_rotation_args("gated_rmsnorm_hadamard_rotate", y)
    out_dtype = out_dtype or norm_dtype
    if out_dtype not in (torch.float16, torch.float32):
        # bf16 would need PyTorch's rounding after the kernel (see hadamard_transform_triton).
        raise ValueError(f"gated_rmsnorm_hadamard_rotate: out_dtype must be float16 or float32, got {out_dtype}")
    n = y.shape[-1]
    if not (_kernel_runs(y) and packs_gated_norm(n, group_size, norm_dtype)):
        return hadamard_transform_triton(gated_rmsnorm(y, z, z_scale, weight, eps, norm_dtype, group_size), out_dtype)
    # The scale pointer is unused without a quantization: y stands in.
    return _launch(y, y, quant=_ROTATE, rotation_dtype=out_dtype,
                   gate=_Gate(z, z_scale, weight, float(eps), group_size or n, norm_dtype))


# ---------------------------------------------------------------------------------------------
# Graph ops (torch.ops.quamba.*, see dispatch.graph_op)
# ---------------------------------------------------------------------------------------------


@graph_op("quamba::hadamard_quantize", mutates_args=())
def hadamard_quantize_op(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quantize(hadamard(x.float()), scale)` in one kernel; int8 of x's shape, contiguous."""
    return hadamard_quantize(x, as_scalar(scale))


@hadamard_quantize_op.register_fake
def _hadamard_quantize_fake(x, scale):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


@graph_op("quamba::hadamard_quantize_fp8", mutates_args=())
def hadamard_quantize_fp8_op(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quantize_fp8(hadamard(x.float()), scale)` in one kernel; float8_e4m3fn of x's shape, contiguous.

    The fp8 recipe's rotation before out_proj.
    """
    return hadamard_quantize_fp8(x, as_scalar(scale))


@hadamard_quantize_fp8_op.register_fake
def _hadamard_quantize_fp8_fake(x, scale):
    return torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)


@graph_op("quamba::hadamard_rotate", mutates_args=())
def hadamard_rotate_op(x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`quamba::hadamard` on the Hadamard kernel: rotated in fp32, returned in `out_dtype` (None:
    x's dtype), contiguous.

    For a rotation no quantize fuses with (e.g. one whose output has several users, or the one
    before a 4-bit-weight out_proj that multiplies in fp16).
    """
    return hadamard_transform_triton(x, out_dtype or x.dtype)


@hadamard_rotate_op.register_fake
def _hadamard_rotate_fake(x, out_dtype=None):
    return torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)


@graph_op("quamba::gated_rmsnorm_hadamard_quantize", mutates_args=())
def gated_rmsnorm_hadamard_quantize_op(y: torch.Tensor, z: torch.Tensor, z_scale: Optional[torch.Tensor],
                                       weight: torch.Tensor, eps: float, group_size: Optional[int],
                                       norm_dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """`hadamard_quantize(gated_rmsnorm(y, z, ...), scale)` in one kernel: a Mamba-2 block's norm
    and out_proj's input quantization; int8 of y's shape, contiguous."""
    return gated_rmsnorm_hadamard_quantize(y, z, None if z_scale is None else as_scalar(z_scale), weight, eps,
                                           group_size, norm_dtype, as_scalar(scale))


@gated_rmsnorm_hadamard_quantize_op.register_fake
def _gated_rmsnorm_hadamard_quantize_fake(y, z, z_scale, weight, eps, group_size, norm_dtype, scale):
    return torch.empty(y.shape, dtype=torch.int8, device=y.device)


@graph_op("quamba::gated_rmsnorm_hadamard_rotate", mutates_args=())
def gated_rmsnorm_hadamard_rotate_op(y: torch.Tensor, z: torch.Tensor, z_scale: Optional[torch.Tensor],
                                     weight: torch.Tensor, eps: float, group_size: Optional[int],
                                     norm_dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`hadamard_rotate(gated_rmsnorm(y, z, ...), out_dtype)` in one kernel: a Mamba-2 block's norm
    and the rotation of a W4A16 out_proj's input; `out_dtype` (None: `norm_dtype`) of y's shape."""
    return gated_rmsnorm_hadamard_rotate(y, z, None if z_scale is None else as_scalar(z_scale), weight, eps,
                                         group_size, norm_dtype, out_dtype)


@gated_rmsnorm_hadamard_rotate_op.register_fake
def _gated_rmsnorm_hadamard_rotate_fake(y, z, z_scale, weight, eps, group_size, norm_dtype, out_dtype=None):
    return torch.empty(y.shape, dtype=out_dtype or norm_dtype, device=y.device)
