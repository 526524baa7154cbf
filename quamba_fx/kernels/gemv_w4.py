"""W4A16 GEMV for one activation row (batch-1 decode): packed int4 weights streamed through the
CUDA cores, two codes a byte, one fp16 scale per (output row, group of columns).

Why it is written the way it is: a decode step is bound by how fast the weight bytes stream, and
at 4 bits the instructions spent per byte decide whether the loop keeps up with memory. Triton's
own unpacking (nibble shifts, int-to-float conversions, fp16-to-fp32 conversions of the
activations) cost about 21 instructions a weight byte on sm_90; here one inline-PTX block turns
a weight word (four bytes) and its eight activations into one fp32 partial sum, and the loop costs
about 9 (counted in the loop's SASS, compiled offline for sm_90: `benchmarks/sass_loop.py gemv_w4`):

* a byte's two codes go into the two halves of one fp16x2 register with one byte permute and one
  three-input logic op (`lop3`): the low nibble becomes the fp16 `1024 + (code ^ 8)`, the high one
  `64 + (code ^ 8)` (0x6400 and 0x5400 are fp16 numbers whose last mantissa bit is worth 1 at
  those nibble positions), and one fp16x2 multiply-add turns both into `code / 128` exactly;
* the byte's two activations are already an fp16x2 pair (columns 2i and 2i + 1 are adjacent), so
  one fp16x2 multiply-add accumulates both products; four bytes a lane are summed that way, then
  the two lanes are converted and added in fp32 and scaled by the row's group scale.

Numerics: each product `code / 128 * x` rounds to fp16 and four of them are summed in fp16 before
fp32 takes over, so the result is within a few fp16 ulps of a partial sum of eight terms from the
reference (`quant/int4.w4a16_linear`, fp32 throughout). The 1/128 keeps four products of the
largest fp16 activation below fp16's range (4 x 8/128 x 65504 < 65504); a power of two, it is
exact, and `128 * scale` undoes it (products below fp16's normal range, 2^-14, keep fewer bits:
an absolute error under 2^-24 * 128 a product). Under the Triton
interpreter (no PTX) the same loop computes the eight products in fp32 instead: the tests check
that path against the reference, and benchmarks/gemm_w4.py checks the PTX path on the GPU.

A program owns `BLOCK_N` weight rows and walks K in blocks of `BLOCK_K` columns: a part of one
scale group or several whole ones, each with its row's scale. K may be split over programs
(narrow weights such as x_proj's 192 rows would otherwise leave most SMs idle); the last split of
a row tile to finish adds the others' fp32 partials in split order (split_k.py), in the same
launch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import split_k
from .conv1d_float import conv_silu_step
from .dispatch import INTERPRET, cdiv
from .pdl import launch_options, wait_for_previous

__all__ = ["Config", "ConvStep", "default_config", "launch", "supported"]

# A launch config: (BLOCK_N rows, BLOCK_K columns, warps, splits of K).
Config = tuple[int, int, int, int]

# Programs a GEMV should have to keep every SM of a large GPU streaming (8 per SM of the H200's 132).
_PROGRAMS = 1056
# The rule's tile: columns a block (128 weight bytes a row), rows a program, warps.
_BLOCK_K = 256
_BLOCK_N = 16
_WARPS = 8
# Weight bytes in a word, the unit the PTX block takes.
_PACK = 4

# One weight word ($1: four bytes, eight codes, columns 8i to 8i + 7), its four activation pairs
# ($2-$5, fp16x2 words), the row's group scale ($6, fp32, already times 128) and the running sum
# ($7). One element a call (pack 1): Triton may lay a tile's elements out across rows in any
# order, so each element must carry its whole sum (packing four int8 bytes a call summed them into
# one slot, which was only right where a thread's four bytes were one row's: wrong on the GPU for
# small tiles and unaligned rows).
_DOT8_PTX = tl.constexpr("""{
.reg .b32 t, c, h, k1, k2;
.reg .f16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 k1, 0x20002000;
mov.b32 k2, 0xB880C808;
prmt.b32 t, $1, 0, 0x4040;
lop3.b32 c, t, 0x00F0000F, 0x54806408, 0x6a;
fma.rn.f16x2 c, c, k1, k2;
mul.rn.f16x2 h, c, $2;
prmt.b32 t, $1, 0, 0x4141;
lop3.b32 c, t, 0x00F0000F, 0x54806408, 0x6a;
fma.rn.f16x2 c, c, k1, k2;
fma.rn.f16x2 h, c, $3, h;
prmt.b32 t, $1, 0, 0x4242;
lop3.b32 c, t, 0x00F0000F, 0x54806408, 0x6a;
fma.rn.f16x2 c, c, k1, k2;
fma.rn.f16x2 h, c, $4, h;
prmt.b32 t, $1, 0, 0x4343;
lop3.b32 c, t, 0x00F0000F, 0x54806408, 0x6a;
fma.rn.f16x2 c, c, k1, k2;
fma.rn.f16x2 h, c, $5, h;
mov.b32 {lo, hi}, h;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 flo, flo, fhi;
fma.rn.f32 $0, flo, $6, $7;
}""")
# What the constants are: k1 = (1/128, 1/128) and k2 = (-0.5625, -8.0625) in fp16 (high, low);
# `lop3 ..., 0x6a` is (a & b) ^ c: the nibbles masked, then the fp16 exponent ORed in and the sign
# bit of each code flipped (^ 8), so `(1024 + (code ^ 8)) / 128 - 8.0625 = code / 128` (and
# likewise from 64 with 0.5625 for the high nibble). `prmt ..., 0x4N4N` copies byte N into both
# halves of the word, so one mask keeps its low nibble in the low half and its high one in the high.


def supported(x: Tensor, w_packed: Tensor, group_size: int) -> bool:
    """Whether the GEMV can run this problem: one fp16 row whose column pairs can be read as one
    32-bit word each, weight rows whose bytes can be read four at a time, and a group of whole
    blocks (a multiple of 32 columns)."""
    k = x.shape[-1]
    return (x.dtype == torch.float16 and x.numel() == k and k % 8 == 0 and group_size % 32 == 0
            and x.data_ptr() % 4 == 0 and w_packed.data_ptr() % 4 == 0 and w_packed.stride(0) % 4 == 0)


@triton.jit
def _dot8_reference(word, x0, x1, x2, x3, scale, acc):
    """What the PTX computes, in fp32 (the interpreter's path): the eight codes of each weight
    word times their activations, times the row's scale (already times 128, hence the 1/128)."""
    total = tl.zeros_like(acc)
    for byte in tl.static_range(4):
        pair = x0 if byte == 0 else (x1 if byte == 1 else (x2 if byte == 2 else x3))
        x_even = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        x_odd = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        low = ((((word >> (8 * byte)) & 0xF) ^ 8) - 8).to(tl.float32)
        high = ((((word >> (8 * byte + 4)) & 0xF) ^ 8) - 8).to(tl.float32)
        total += low * x_even + high * x_odd
    return acc + total * (scale / 128.0)


@triton.jit
def _w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, partial_ptr, count_ptr,
                       cs_ptr, cw_ptr, cb_ptr, u_ptr, D_CONV, stride_csd, stride_csk, stride_cwd, stride_cwk,
                       N, K, K_SPLIT, stride_wn,
                       stride_sn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLITS: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, PTX: tl.constexpr,
                       USE_PDL: tl.constexpr, CONV: tl.constexpr, CONV_W: tl.constexpr, CONV_HAS_BIAS: tl.constexpr):
    # x_ptr: the fp16 activation row as 32-bit words of two columns, so weight word i (columns
    # 8i to 8i + 7) meets x words 4i to 4i + 3. w_ptr: the packed weight as 32-bit words
    # (stride_wn counts words). A block is SUBS sub-blocks of one scale group each, `[BLOCK_N,
    # SUBS, SUB_WORDS]` weight words. Program (n, s) sums columns [s * K_SPLIT, (s + 1) *
    # K_SPLIT); with SPLITS > 1 the last split of a row tile to finish adds the others' partials
    # (split_k.py) and stores the tile. CONV: rows below D_CONV are in_proj's x half, and the
    # tile's store also runs their decode conv step (`_store_rows`).
    SUB_K: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    SUBS: tl.constexpr = BLOCK_K // SUB_K
    SUB_WORDS: tl.constexpr = SUB_K // 8
    wait_for_previous(USE_PDL)  # programmatic dependent launch (pdl.py): only the launch overlaps
    pid_n = tl.program_id(0)
    k_first = tl.program_id(1) * (K_SPLIT // 8)  # in words, as every K offset below
    k_end = tl.minimum(k_first + K_SPLIT // 8, K // 8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N  # rows past N wrap onto valid ones (never stored): no row masks on loads
    sub = tl.arange(0, SUBS)
    # [1, SUBS, SUB_WORDS]; a thread's words never contiguous to the compiler, so the weight loads
    # take the layout of the activations' split (a word a thread at a time) instead of vectors that
    # would be exchanged through shared memory every block.
    word = tl.max_contiguous((sub[:, None] * SUB_WORDS + tl.arange(0, SUB_WORDS)[None, :])[None, :, :], [1, 1, 1])
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * stride_wn
    # Repeated rows: each thread reads the activations of its own weight words (from L1), the
    # four of a word as one vector, split in registers.
    x_tile = x_ptr + 4 * (word + tl.zeros((BLOCK_N, 1, 1), dtype=tl.int32))[:, :, :, None] + tl.arange(0, 4)
    s_rows = s_ptr + rows[:, None] * stride_sn
    acc = tl.zeros((BLOCK_N, SUBS, SUB_WORDS), dtype=tl.float32)
    for k0 in range(k_first, k_end, BLOCK_K // 8):
        if EVEN_K:
            packed = tl.load(w_rows + k0 + word)
            xw = tl.load(x_tile + 4 * k0)
            group_scale = tl.load(s_rows + (k0 * 8) // GROUP + sub[None, :])
        else:
            in_k = k0 + word < k_end
            packed = tl.load(w_rows + k0 + word, mask=in_k, other=0)
            xw = tl.load(x_tile + 4 * k0, mask=in_k[:, :, :, None], other=0)
            group_scale = tl.load(s_rows + (k0 * 8) // GROUP + sub[None, :],
                                  mask=(k0 + sub * SUB_WORDS < k_end)[None, :], other=0)
        x02, x13 = tl.split(tl.reshape(xw, (BLOCK_N, SUBS, SUB_WORDS, 2, 2)))
        x0, x2 = tl.split(x02)
        x1, x3 = tl.split(x13)
        scale = tl.broadcast_to((group_scale.to(tl.float32) * 128.0)[:, :, None], (BLOCK_N, SUBS, SUB_WORDS))
        if PTX:
            acc = tl.inline_asm_elementwise(_DOT8_PTX, "=r,r,r,r,r,r,r,r", [packed, x0, x1, x2, x3, scale, acc],
                                            dtype=tl.float32, is_pure=True, pack=1)
        else:
            acc = _dot8_reference(packed, x0, x1, x2, x3, scale, acc)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SPLITS == 1:
        _store_rows(y, offs_n, rows, N, bias_ptr, out_ptr, HAS_BIAS, cs_ptr, cw_ptr, cb_ptr, u_ptr, D_CONV,
                    stride_csd, stride_csk, stride_cwd, stride_cwk, CONV, CONV_W, CONV_HAS_BIAS)
    elif split_k.arrive(tl.reshape(y, (1, BLOCK_N)), partial_ptr, count_ptr, pid_n, tl.program_id(1), SPLITS, 1,
                        BLOCK_N):
        y = tl.reshape(split_k.total(partial_ptr, count_ptr, pid_n, SPLITS, 1, BLOCK_N), (BLOCK_N,))
        _store_rows(y, offs_n, rows, N, bias_ptr, out_ptr, HAS_BIAS, cs_ptr, cw_ptr, cb_ptr, u_ptr, D_CONV,
                    stride_csd, stride_csk, stride_cwd, stride_cwk, CONV, CONV_W, CONV_HAS_BIAS)


@triton.jit
def _store_rows(y, offs_n, rows, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, cs_ptr, cw_ptr, cb_ptr, u_ptr, D_CONV,
                stride_csd, stride_csk, stride_cwd, stride_cwk, CONV: tl.constexpr, CONV_W: tl.constexpr,
                CONV_HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rows)
    out = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n, out, mask=offs_n < N)
    if CONV:
        # The conv reads in_proj's output as stored (rounded to its dtype), as the separate
        # conv kernel would read it back.
        mask_c = offs_n < D_CONV
        u = conv_silu_step(out, cs_ptr + offs_n * stride_csd, cw_ptr, cb_ptr, offs_n, mask_c, stride_csk, stride_cwd,
                           stride_cwk, CONV_W, CONV_HAS_BIAS)
        tl.store(u_ptr + offs_n, u.to(u_ptr.dtype.element_ty), mask=mask_c)


def default_config(n: int, k: int, group_size: int) -> Config:
    """By rule: 16 weight rows a program, 8 warps, blocks of 256 columns (two groups of 128) where
    the group allows, and K split until there are about `_PROGRAMS` programs. In session 27's
    sweep on the H200 (docs/benchmarks.md) 16-row tiles and 8 warps won on every mamba-2.8b
    projection, and more programs beat fewer: a decode step has no other work to hide a GEMV's
    memory latency behind. Session 34 again in the model (mamba-2.8b W4A16, batch 1): 462 tokens/s
    against 435 with 512-column blocks and 293-300 with 32-row tiles."""
    block_k = _BLOCK_K if _BLOCK_K % group_size == 0 or group_size % _BLOCK_K == 0 else group_size & -group_size
    splits = min(cdiv(k, block_k), max(1, _PROGRAMS // cdiv(n, _BLOCK_N)))
    return _BLOCK_N, block_k, _WARPS, splits


class ConvStep(NamedTuple):
    """A decode conv1d step for the GEMV's epilogue (one sequence): `state [1, D, W-1]` advanced
    in place, depthwise `weight [D, W]`, `bias [D]` or None, and `u [1, D]` for the SiLU output;
    D <= N, 2 <= W <= conv1d_float.MAX_UPDATE_WIDTH."""
    state: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    u: Tensor


def launch(x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor], out: Tensor,
           config: Optional[Config] = None, conv: Optional[ConvStep] = None) -> Tensor:
    """`out [1, N] = x [1, K] @ dequantized(w_packed)^T (+ bias, fp32)` for a problem `supported`
    takes (the caller validated shapes and dtypes), and with `conv` the conv step of out's first D
    columns (`conv1d_float.conv_silu_step`). `config` overrides `default_config`."""
    k, n = x.shape[-1], w_packed.shape[0]
    block_n, block_k, warps, splits = config or default_config(n, k, group_size)
    if (group_size % block_k and block_k % group_size) or block_k % (2 * _PACK) or block_k & (block_k - 1):
        raise ValueError(f"gemv_w4: BLOCK_K={block_k} must be a power of two of at least 8 columns that divides "
                         f"the group size {group_size} or is a multiple of it")
    k_split = cdiv(cdiv(k, splits), block_k) * block_k  # whole blocks a split
    splits = cdiv(k, k_split)
    tiles = cdiv(n, block_n)
    has_bias = bias is not None
    if splits > 1:
        partials, counters = split_k.scratch(x.device, tiles * splits * block_n, tiles)
        partials = partials.view(torch.float32)
    else:
        partials = counters = w_scale  # placeholders, never read
    w, scales = w_packed.contiguous(), w_scale.contiguous()
    words = x.reshape(k).view(torch.int32)
    w_words = w.view(torch.int32)
    if conv is not None:
        state, cw = conv.state, conv.weight
        conv_args = (state[0], cw, conv.bias if conv.bias is not None else cw, conv.u, state.shape[1],
                     state.stride(1), state.stride(2), cw.stride(0), cw.stride(1))
        conv_flags = dict(CONV=True, CONV_W=cw.shape[1], CONV_HAS_BIAS=conv.bias is not None)
    else:
        conv_args = (scales, scales, scales, scales, 0, 0, 0, 0, 0)  # placeholders, never read
        conv_flags = dict(CONV=False, CONV_W=2, CONV_HAS_BIAS=False)
    _w4a16_gemv_kernel[(tiles, splits)](
        words, w_words, scales, bias if has_bias else scales, out, partials, counters, *conv_args, n, k, k_split,
        w_words.stride(0), scales.stride(0), GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=splits,
        EVEN_K=k % block_k == 0, HAS_BIAS=has_bias, PTX=not INTERPRET, num_warps=warps, **conv_flags,
        **launch_options(x.device),
    )
    return out
