"""W4A16 GEMV for one activation row (batch-1 decode): packed int4 weights streamed through the
CUDA cores, two codes a byte, one fp16 scale per (output row, group of columns).

Why it is written the way it is: a decode step is bound by how fast the weight bytes stream, and
at 4 bits a weight byte meets four activation bytes, so the loads and instructions spent around
each weight byte decide whether the loop keeps up with memory:

* the unit is a chunk: 32 columns of one row, four int32 weight words (one 16-byte load) and the
  64 bytes of activations they meet (four 16-byte loads, from L1 after the first program). A
  program's threads lie over THREAD_ROWS rows and CHUNKS chunks, and each takes ROWS rows,
  THREAD_ROWS apart: a weight tile a row, each of the activation tile's shape and layout, so
  that the rows share the activations' loads and pairs in registers and one PTX block takes their
  products. (One `[ROWS, THREAD_ROWS, CHUNKS]` tile took another layout than the activations,
  converted through shared memory in the loop, and was slower in the model: docs/benchmarks.md,
  sessions 35 and 53.) The rule's tile gives each thread one row; more rows a thread this way are
  untimed (session 54);
* a word's codes come out two at a time, columns (j, j + 4) of its eight in the two halves of one
  fp16x2 register: one three-input logic op (`lop3`) masks two nibbles, sets an fp16 exponent
  above them and flips the codes' sign bits, and one fp16x2 multiply-add makes `code / 128` of
  both exactly. The activations are paired the same way (columns j and j + 4, `_pairs`), so one
  fp16x2 multiply-add takes two products: twelve instructions a weight word and one shift, in
  one inline-PTX block for the chunk of a thread's rows (`_dot32_ptx`).

Numerics: each product `code / 128 * x` rounds to fp16 and a chunk's sixteen products a half are
summed in fp16 before fp32 takes over with the row's group scale; the reference
(`quant/int4.w4a16_linear`) is fp32 throughout. The 1/128 keeps sixteen products of the largest
fp16 activation inside fp16's range (16 x 8/128 x 65504 = 65504); a power of two, it is exact, and
`128 * scale` undoes it (products below fp16's normal range, 2^-14, keep fewer bits: an absolute
error under 2^-24 * 128 a product). Under the Triton interpreter (no PTX) the same loop computes
the products in fp32 from the same pairs (`_word_reference`): the tests check that path against
the reference, and on the GPU the same tests check the PTX.

K may be split over programs (narrow weights such as x_proj's 192 rows would otherwise leave
most SMs idle); the last split of a row tile to finish adds the others' fp32 partials in split
order (split_k.py), in the same launch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import split_k
from .conv1d_float import conv_silu_step
from .dispatch import INTERPRET, cdiv, next_pow2
from .pdl import launch_options, wait_for_previous

__all__ = ["Config", "ConvStep", "default_config", "launch", "supported"]

# A launch config: (BLOCK_N rows, BLOCK_K columns, warps, splits of K). The threads of a
# program lie over BLOCK_K / 32 chunks and as many rows as that leaves (THREAD_ROWS); each
# thread takes BLOCK_N / THREAD_ROWS rows.
Config = tuple[int, int, int, int]

# Programs a GEMV should have to keep every SM of a large GPU streaming (8 per SM of the H200's 132).
# At 40 registers a thread only six 256-thread programs fit an SM; capping the registers at 32 to
# fit eight, or halving this, changed nothing on an H100 (docs/benchmarks.md, session 55).
_PROGRAMS = 1056
# The rule's tile: rows a program, columns a block, warps.
_BLOCK_N = 16
_BLOCK_K = 512
_WARPS = 8
# Columns a chunk: four int32 words of eight codes.
_CHUNK = 32


@triton.constexpr_function
def _word_ptx(word: int, pairs: int, first: bool) -> str:
    """Weight word `$word` against its activation pairs `$pairs` to `$pairs + 3` (columns (0, 4),
    (1, 5), (2, 6) and (3, 7)), added to `h`; a chunk's `first` word starts `h`."""
    low, high = "0x000F000F, 0x64086408", "0x00F000F0, 0x64806480"
    steps = ((f"${word}", low, "kl, bl"), (f"${word}", high, "kh, bh"), ("t", low, "kl, bl"), ("t", high, "kh, bh"))
    lines = []
    for j, step in enumerate(steps):  # (no nested unpacking: Triton's dependency finder refuses it)
        source, masks, constants = step
        if j == 2:
            lines.append(f"shr.b32 t, ${word}, 8;")
        lines.append(f"lop3.b32 c, {source}, {masks}, 0x6a;")
        lines.append(f"fma.rn.f16x2 c, c, {constants};")
        lines.append(f"mul.rn.f16x2 h, c, ${pairs};" if first and j == 0 else f"fma.rn.f16x2 h, c, ${pairs + j}, h;")
    return "\n".join(lines)


@triton.constexpr_function
def _dot32_ptx(rows: int) -> str:
    """The PTX of a chunk of `rows` weight rows that share their activations: the sums $0 to
    $rows - 1; then the rows' four weight words each (row r's at $rows + 4r), the sixteen
    activation pairs (word i's at $5rows + 4i), the rows' group scales (fp32, already times 128:
    $6rows + 16 on) and their running sums ($6rows + 16 + rows on). For one row: $1-$4 the words,
    $5-$20 the pairs, $21 the scale, $22 the sum.

    Columns (j, j + 4) of a word sit in bits (4j, 4j + 16) (j < 2; `shr 8` brings j = 2, 3 there).
    The constants: kl, bl = 1/128, -8.0625 and kh, bh = 1/2048, -0.5625, in fp16 pairs;
    `lop3 ..., 0x6a` is (a & b) ^ c: the two nibbles masked, the exponent of 1024 ORed in and each
    code's top bit flipped, so a low nibble reads `1024 + (code ^ 8)` and a high one
    `1024 + 16 (code ^ 8)`, and `(1024 + (code ^ 8)) / 128 - 8.0625 = code / 128` (likewise for
    the high one); all exact in fp16."""
    pairs, scales, sums = 5 * rows, 5 * rows + 16, 6 * rows + 16
    lines = ["{", ".reg .b32 t, c, h, kl, bl, kh, bh;", ".reg .f16 lo, hi;", ".reg .f32 flo, fhi;",
             "mov.b32 kl, 0x20002000;", "mov.b32 bl, 0xC808C808;", "mov.b32 kh, 0x10001000;",
             "mov.b32 bh, 0xB880B880;"]
    for r in range(rows):
        lines += [_word_ptx(rows + 4 * r + i, pairs + 4 * i, i == 0) for i in range(4)]
        lines += ["mov.b32 {lo, hi}, h;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 flo, flo, fhi;",
                  f"fma.rn.f32 ${r}, flo, ${scales + r}, ${sums + r};"]
    return "\n".join(lines + ["}"])


@triton.constexpr_function
def _dot32_constraints(rows: int) -> str:
    """`_dot32_ptx(rows)`'s operands: `rows` fp32 sums out; four words a row, sixteen pairs, and a
    scale and a running sum a row in."""
    return ",".join(["=r"] * rows + ["r"] * (6 * rows + 16))


def supported(x: Tensor, w_packed: Tensor, group_size: int) -> bool:
    """Whether the GEMV can run this problem: one fp16 row whose column pairs can be read as one
    32-bit word each, weight rows whose bytes can be read four at a time, and groups of whole
    chunks (a multiple of 32 columns)."""
    k = x.shape[-1]
    return (x.dtype == torch.float16 and x.numel() == k and k % 8 == 0 and group_size % _CHUNK == 0
            and x.data_ptr() % 4 == 0 and w_packed.data_ptr() % 4 == 0 and w_packed.stride(0) % 4 == 0)


@triton.jit
def _split4(t):
    """The four elements of `t`'s last dimension (of 4) as four tensors."""
    even, odd = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2)))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _pairs(words):
    """The activation pairs of one weight word from its four activation words (`words [..., 4]`:
    columns 0-1, 2-3, 4-5 and 6-7 of its eight): columns (0, 4), (1, 5), (2, 6) and (3, 7), as the
    PTX takes its codes."""
    q0, q1, q2, q3 = _split4(words)
    return ((q0 & 0xFFFF) | (q2 << 16), ((q0 >> 16) & 0xFFFF) | (q2 & -65536),
            (q1 & 0xFFFF) | (q3 << 16), ((q1 >> 16) & 0xFFFF) | (q3 & -65536))


@triton.jit
def _half(pair, HIGH: tl.constexpr):
    """One fp16 half of a pair word, as fp32."""
    bits = (pair >> 16) if HIGH else pair
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_reference(word, p0, p1, p2, p3):
    """One weight word against its pairs, in fp32: column j's code (bits 4j to 4j + 3, two's
    complement) meets the low half of pair j and column j + 4's the high half. The four j at once
    on a new last axis: the interpreter pays per operation, not per element."""
    # Pair j at index j of the new axis.
    pairs = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), p0.shape + [4])
    shift = 4 * tl.arange(0, 4)
    w = tl.expand_dims(word, len(word.shape))
    low = ((((w >> shift) & 0xF) ^ 8) - 8).to(tl.float32)
    high = ((((w >> (shift + 16)) & 0xF) ^ 8) - 8).to(tl.float32)
    return tl.sum(low * _half(pairs, False) + high * _half(pairs, True), axis=-1)


@triton.jit
def _dot32(w, a, b, c, d, group_scale, acc, ROWS: tl.constexpr, PTX: tl.constexpr):
    """`acc` plus a chunk's sums times their rows' group scales, for each of a thread's ROWS rows
    (`w`, `group_scale` and `acc` are tuples of a tensor a row): a row's four weight words
    (`w[r] [..., 4]`) against the activation pairs (`a`-`d`: each word's four, from `_pairs`),
    which the rows share: one PTX block takes them all."""
    words = ()
    scales = ()
    for r in tl.static_range(ROWS):
        words = words + _split4(w[r])
        scales = scales + (group_scale[r].to(tl.float32) * 128.0,)
    if PTX:
        return tl.inline_asm_elementwise(_dot32_ptx(ROWS), _dot32_constraints(ROWS),
                                         words + a + b + c + d + scales + acc, dtype=(tl.float32,) * ROWS,
                                         is_pure=True, pack=1)
    else:  # the interpreter's path: the same pairs, in fp32
        sums = ()
        for r in tl.static_range(ROWS):
            total = (_word_reference(words[4 * r], a[0], a[1], a[2], a[3])
                     + _word_reference(words[4 * r + 1], b[0], b[1], b[2], b[3])
                     + _word_reference(words[4 * r + 2], c[0], c[1], c[2], c[3])
                     + _word_reference(words[4 * r + 3], d[0], d[1], d[2], d[3]))
            sums = sums + (acc[r] + total * (scales[r] / 128.0),)
        return sums


@triton.jit
def _weight_block(w_tiles, s_rows, k0, chunk, quad, word_end, ROWS: tl.constexpr, GROUP_CHUNKS: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """The weight words and group scales of the block from chunk `k0`, zero past `word_end`: a
    tuple of each, a tensor for each of a thread's rows."""
    words = ()
    scales = ()
    first = 4 * (k0 + chunk)
    for r in tl.static_range(ROWS):
        group = s_rows[r] + (k0 + chunk) // GROUP_CHUNKS
        if EVEN_K:
            words = words + (tl.load(w_tiles[r] + 4 * k0),)
            scales = scales + (tl.load(group),)
        else:
            words = words + (tl.load(w_tiles[r] + 4 * k0, mask=first[:, :, None] + quad < word_end, other=0),)
            scales = scales + (tl.load(group, mask=first < word_end, other=0),)
    return words, scales


@triton.jit
def _w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, partial_ptr, count_ptr,
                       cs_ptr, cw_ptr, cb_ptr, u_ptr, D_CONV, CONV_START, stride_csd, stride_csk, stride_cwd,
                       stride_cwk,
                       N, K_WORDS, SPLIT_CHUNKS, stride_wn, stride_sn, GROUP_CHUNKS: tl.constexpr,
                       ROWS: tl.constexpr, THREAD_ROWS: tl.constexpr, CHUNKS: tl.constexpr,
                       SPLITS: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, PTX: tl.constexpr,
                       USE_PDL: tl.constexpr, CONV: tl.constexpr, CONV_W: tl.constexpr, CONV_HAS_BIAS: tl.constexpr):
    # x_ptr: the fp16 activation row as 32-bit words of two columns; w_ptr: the packed weight as
    # 32-bit words of eight codes (K_WORDS a row, stride_wn counts words). Chunk c is weight words
    # 4c to 4c + 3 and activation words 16c to 16c + 15. Program (n, s) sums chunks [s *
    # SPLIT_CHUNKS, (s + 1) * SPLIT_CHUNKS) of rows n * BLOCK_N + r * THREAD_ROWS + t (r < ROWS,
    # t < THREAD_ROWS); with SPLITS > 1 the last split of a row tile to finish adds the others'
    # partials (split_k.py) and stores the tile. CONV: rows CONV_START to CONV_START + D_CONV are
    # the conv's input (Mamba-1's x half: from 0; Mamba-2's xBC: after z), and the tile's store
    # also runs their decode conv step (`_store_rows`).
    BLOCK_N: tl.constexpr = ROWS * THREAD_ROWS
    pid_n = tl.program_id(0)
    c_first = tl.program_id(1) * SPLIT_CHUNKS
    word_end = tl.minimum(4 * (c_first + SPLIT_CHUNKS), K_WORDS)
    chunk = tl.arange(0, CHUNKS)[None, :]
    quad = tl.arange(0, 4)[None, None, :]
    word = 4 * chunk[:, :, None] + quad  # [1, CHUNKS, 4]
    # The activations as [THREAD_ROWS, CHUNKS, 4] words (the rows repeated, so that they take the
    # weight tiles' layout): each thread loads its chunk's once a block.
    x_tile = x_ptr + 16 * chunk[:, :, None] + quad + tl.zeros((THREAD_ROWS, 1, 1), dtype=tl.int32)
    # A thread's ROWS rows, THREAD_ROWS apart: a weight tile and its scales a row (tuples), each of
    # the activation tile's shape, so that they meet the activations in registers (no layout
    # conversion: the module's docstring).
    w_tiles = ()
    s_rows = ()
    for r in tl.static_range(ROWS):
        # Rows past N wrap onto valid ones (never stored): no row masks on loads.
        row = (pid_n * BLOCK_N + r * THREAD_ROWS + tl.arange(0, THREAD_ROWS)[:, None]) % N
        w_tiles = w_tiles + (w_ptr + row.to(tl.int64)[:, :, None] * stride_wn + word,)
        s_rows = s_rows + (s_ptr + row * stride_sn,)
    acc = (tl.zeros((THREAD_ROWS, CHUNKS), dtype=tl.float32),) * ROWS
    c_end = tl.minimum(c_first + SPLIT_CHUNKS, tl.cdiv(K_WORDS, 4))
    last = c_first + (c_end - 1 - c_first) // CHUNKS * CHUNKS  # the first chunk of the split's last block
    # The weight and its scales are no kernel's output: the first block is on its way before the
    # wait for the kernel ahead.
    w, group_scale = _weight_block(w_tiles, s_rows, c_first, chunk, quad, word_end, ROWS, GROUP_CHUNKS, EVEN_K)
    wait_for_previous(USE_PDL)  # programmatic dependent launch (pdl.py)
    for k0 in range(c_first, c_end, CHUNKS):
        x_words = x_tile + 16 * k0
        if EVEN_K:
            xa, xb, xc, xd = tl.load(x_words), tl.load(x_words + 4), tl.load(x_words + 8), tl.load(x_words + 12)
        else:
            first = 4 * (k0 + chunk[:, :, None])
            xa = tl.load(x_words, mask=first < word_end, other=0)
            xb = tl.load(x_words + 4, mask=first + 1 < word_end, other=0)
            xc = tl.load(x_words + 8, mask=first + 2 < word_end, other=0)
            xd = tl.load(x_words + 12, mask=first + 3 < word_end, other=0)
        acc = _dot32(w, _pairs(xa), _pairs(xb), _pairs(xc), _pairs(xd), group_scale, acc, ROWS, PTX)
        # The next block's weights (the last block again on the last step: cached, unused). Loading
        # it before this block's products was 2% slower in the model (session 35); keeping two
        # blocks in flight 4% slower (session 37).
        w, group_scale = _weight_block(w_tiles, s_rows, tl.minimum(k0 + CHUNKS, last), chunk, quad, word_end, ROWS,
                                       GROUP_CHUNKS, EVEN_K)
    # The rows' sums as one [BLOCK_N] tile, row r * THREAD_ROWS + t at that index.
    row_of = tl.arange(0, ROWS)[:, None]
    y = tl.zeros((ROWS, THREAD_ROWS), dtype=tl.float32)
    for r in tl.static_range(ROWS):
        y = tl.where(row_of == r, tl.sum(acc[r], axis=1)[None, :], y)
    y = tl.reshape(y, (BLOCK_N,))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    if SPLITS == 1:
        _store_rows(y, offs_n, rows, N, bias_ptr, out_ptr, HAS_BIAS, cs_ptr, cw_ptr, cb_ptr, u_ptr, D_CONV,
                    CONV_START, stride_csd, stride_csk, stride_cwd, stride_cwk, CONV, CONV_W, CONV_HAS_BIAS)
    elif split_k.arrive(tl.reshape(y, (1, BLOCK_N)), partial_ptr, count_ptr, pid_n, tl.program_id(1), SPLITS, 1,
                        BLOCK_N):
        y = tl.reshape(split_k.total(partial_ptr, count_ptr, pid_n, SPLITS, 1, BLOCK_N), (BLOCK_N,))
        _store_rows(y, offs_n, rows, N, bias_ptr, out_ptr, HAS_BIAS, cs_ptr, cw_ptr, cb_ptr, u_ptr, D_CONV,
                    CONV_START, stride_csd, stride_csk, stride_cwd, stride_cwk, CONV, CONV_W, CONV_HAS_BIAS)


@triton.jit
def _store_rows(y, offs_n, rows, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, cs_ptr, cw_ptr, cb_ptr, u_ptr, D_CONV,
                CONV_START, stride_csd, stride_csk, stride_cwd, stride_cwk, CONV: tl.constexpr, CONV_W: tl.constexpr,
                CONV_HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rows)
    out = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n, out, mask=offs_n < N)
    if CONV:
        # The conv reads in_proj's output as stored (rounded to its dtype), as the separate
        # conv kernel would read it back.
        channel = offs_n - CONV_START
        mask_c = (channel >= 0) & (channel < D_CONV)
        channel = tl.where(mask_c, channel, 0)  # masked rows point at channel 0, never read
        u = conv_silu_step(out, cs_ptr + channel * stride_csd, cw_ptr, cb_ptr, channel, mask_c, stride_csk,
                           stride_cwd, stride_cwk, CONV_W, CONV_HAS_BIAS)
        tl.store(u_ptr + channel, u.to(u_ptr.dtype.element_ty), mask=mask_c)


def default_config(n: int, k: int) -> Config:
    """By rule: `_BLOCK_N` weight rows a program, blocks of `_BLOCK_K` columns (fewer where K is
    shorter) on up to `_WARPS` warps but no more than the block's chunks x rows (more threads would
    repeat the same chunks: mamba-2.8b's dt_proj, 160 columns, ran 2.51 us on 8 warps and 1.91 on 4
    alone; the model's decode +3.5%, session 37), and K split until there are about `_PROGRAMS`
    programs: a decode step has no other work to hide a GEMV's memory latency behind, so more
    programs beat fewer (session 27's sweep on the H200, docs/benchmarks.md)."""
    block_k = min(_BLOCK_K, max(_CHUNK, next_pow2(k)))
    warps = max(1, min(_WARPS, _BLOCK_N * (block_k // _CHUNK) // 32))
    splits = min(cdiv(k, block_k), max(1, _PROGRAMS // cdiv(n, _BLOCK_N)))
    return _BLOCK_N, block_k, warps, splits


def _tile(config: Config) -> tuple[int, int, int]:
    """A config's (ROWS, THREAD_ROWS, CHUNKS): the warps' threads lie over the block's chunks
    first, then over rows; each thread takes the rest of the rows."""
    block_n, block_k, warps, splits = config
    if block_k % _CHUNK or block_k & (block_k - 1) or block_n & (block_n - 1) or min(warps, splits) < 1:
        raise ValueError(f"gemv_w4: BLOCK_K={block_k} must be a power of two of at least {_CHUNK} columns, "
                         f"BLOCK_N={block_n} a power of two, warps={warps} and splits={splits} positive")
    chunks = block_k // _CHUNK
    thread_rows = min(block_n, max(1, 32 * warps // chunks))
    return block_n // thread_rows, thread_rows, chunks


class ConvStep(NamedTuple):
    """A decode conv1d step for the GEMV's epilogue (one sequence) over output columns `start` to
    `start + D`: `state [1, D, W-1]` advanced in place, depthwise `weight [D, W]`, `bias [D]` or
    None, and `u [1, D]` for the SiLU output; start + D <= N, 2 <= W <=
    conv1d_float.MAX_UPDATE_WIDTH."""
    state: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    u: Tensor
    start: int = 0


def launch(x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor], out: Tensor,
           config: Optional[Config] = None, conv: Optional[ConvStep] = None) -> Tensor:
    """`out [1, N] = x [1, K] @ dequantized(w_packed)^T (+ bias, fp32)` for a problem `supported`
    takes (the caller validated shapes and dtypes), and with `conv` the conv step of its D columns
    from `conv.start` (`conv1d_float.conv_silu_step`). `config` overrides `default_config`."""
    k, n = x.shape[-1], w_packed.shape[0]
    block_n, block_k, warps, splits = config = config or default_config(n, k)
    rows, thread_rows, chunks = _tile(config)
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
        conv_args = (state[0], cw, conv.bias if conv.bias is not None else cw, conv.u, state.shape[1], conv.start,
                     state.stride(1), state.stride(2), cw.stride(0), cw.stride(1))
        conv_flags = dict(CONV=True, CONV_W=cw.shape[1], CONV_HAS_BIAS=conv.bias is not None)
    else:
        conv_args = (scales, scales, scales, scales, 0, 0, 0, 0, 0, 0)  # placeholders, never read
        conv_flags = dict(CONV=False, CONV_W=2, CONV_HAS_BIAS=False)
    _w4a16_gemv_kernel[(tiles, splits)](
        words, w_words, scales, bias if has_bias else scales, out, partials, counters, *conv_args, n, k // 8,
        k_split // _CHUNK, w_words.stride(0), scales.stride(0), GROUP_CHUNKS=group_size // _CHUNK, ROWS=rows,
        THREAD_ROWS=thread_rows, CHUNKS=chunks, SPLITS=splits, EVEN_K=k % k_split == 0, HAS_BIAS=has_bias,
        PTX=not INTERPRET, num_warps=warps, **conv_flags, **launch_options(x.device),
    )
    return out
