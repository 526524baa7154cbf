"""int8 GEMV for one-row problems (batch-1 decode steps): the weight streamed through the CUDA cores.

Same semantics, arguments and epilogue as `gemm.int8_gemm` (which calls `launch` and owns the
validation); its numerical contract holds unchanged, since the accumulation is exact in int32.

Why a second kernel: at one row a tensor-core tile is 1/16 useful and routes every weight byte
through shared memory. Here the weight and the activation row are read as packed int32 words
(four int8 each) and multiplied with the GPU's 4-way byte dot product (`dp4a`): one instruction
per word, where unpacking bytes cost three per byte (sm_90 SASS of the byte-wise loop: 48 PRMT +
32 IMAD per 32 weight bytes), so the loop is the weight loads and little else. Each thread keeps
a per-word running sum, reduced over K once after the loop, and the next weight tile is loaded
before the current one is used (two tiles in flight a thread). K may be split across programs
(split_k.py) so that few output columns still spread over every SM.

Launched with programmatic dependent launch where the GPU has it (pdl.py), a program loads
its first weight tile before it waits for the kernel before it: the weights do not depend on it,
so the launch and the first loads overlap that kernel's tail; the first programs also ask L2 for the
weight's first rows (`pdl.prefetch_to_l2`). Nothing is written, and the activations are not read,
before the wait.

`gemm.int8_gemm` runs it for every one-row problem whose operands are whole words (`supported`),
with one config by rule (`gpu_config`, which says why no tuner). Under the Triton interpreter the
dot product is the same sum written with shifts (`_dot4`), which the tests check against the
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import split_k
from .dispatch import INTERPRET as _INTERPRET
from .dispatch import INTERPRETER_WIDE_N
from .dispatch import cdiv, chosen_config, next_pow2, sm_count, tuned_configs
from .conv1d import conv_update_step
from .gemm_epilogue import epilogue, store_tile
from .pdl import launch_options, prefetch_options, prefetch_to_l2, wait_for_previous

__all__ = ["GEMV_MAX_M", "launch", "supported"]

# Problems with at most this many rows run here: with several, the rows' broadcast products need
# layout exchanges through shared memory every step, and a few rows are the tensor-core kernel's.
GEMV_MAX_M = 1

# int8 values in an int32 word.
_PACK = 4
_WARPS = 4
_WIDE_WARPS = 8


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `x [1, K]` and `w [N, K]` (unit K stride) can be read as int32 words: K, the
    weight's row stride and both addresses a multiple of four bytes."""
    k = x.shape[-1]
    return (k % _PACK == 0 and w.stride(0) % _PACK == 0
            and x.data_ptr() % _PACK == 0 and w.data_ptr() % _PACK == 0)


def _cfg(bn: int, bk: int, split: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_stages=stages, num_warps=warps)


def gpu_config(n: int, k_words: int, sms: int) -> triton.Config:
    """The GPU config of an `n x k_words` problem: 16 columns a program, K steps of up to 128 words
    (512 bytes) a weight row, and K split until the programs reach four per SM (or K runs out of
    steps); 8 warps for full 128-word steps, else 4. A rule, not a tuner: Triton's autotuner times
    single launches between L2 flushes, which ranks configs unlike a decode step, where launches
    run back to back on weights that do not fit in L2. Timed that way (docs/benchmarks.md, sessions
    20 and 28), this rule was the best of 20-26 configs on the 2.8b in_proj, x_proj and out_proj
    (the same tiles on 4 warps were 8-16% slower: a warp's loads wait on L1TEX, so twice the warps
    keep twice the rows in flight), and 4 warps the best on dt_proj's 40-word rows."""
    bk = min(128, max(8, next_pow2(k_words)))
    split = split_k.split_counts(cdiv(n, 16), cdiv(k_words, bk), 4 * sms)[-1]
    return _cfg(16, bk, split, 1, _WIDE_WARPS if bk == 128 else _WARPS)


def _config(n: int, k_words: int) -> dict:
    if _INTERPRET:
        if n >= INTERPRETER_WIDE_N:
            # A model's projection: the interpreter pays per operation, not per element, so one
            # wide tile runs a 3072 x 768 GEMV about 100x faster than the small one.
            return _cfg(256, 128, 1, 1, 1).all_kwargs()
        # Small tiles; problems with three or more K steps split K in two, so both paths run.
        return _cfg(16, 8, 2 if k_words > 16 else 1, 1, 1).all_kwargs()
    return gpu_config(n, k_words, sm_count()).all_kwargs()


def _even_k(k_words: int, meta: dict) -> bool:
    return k_words % (meta["BLOCK_K"] * meta["SPLIT_K"]) == 0


@triton.jit
def _dot4(a, b, acc, DP4A: tl.constexpr):
    """`acc` plus the dot products of the four signed bytes of each int32 word of `a` and `b`."""
    if DP4A:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        # Byte i sign-extended: shifted to the top, then arithmetically back down.
        for i in tl.static_range(4):
            acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def _finish(acc, offs_n, cols, N, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
            cs_ptr, cw_ptr, cb_ptr, cu_scale_ptr, u_ptr, D_CONV, CONV_START, stride_csd, stride_csk, stride_cwd,
            stride_cwk, W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
            OUT_PER_CHANNEL: tl.constexpr, CONV: tl.constexpr, CONV_W: tl.constexpr,
            CONV_HAS_BIAS: tl.constexpr, CONV_PER_CHANNEL: tl.constexpr, FAST_MATH: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """The epilogue of a column tile, then (CONV) the decode conv step of its columns CONV_START to
    CONV_START + D_CONV (Mamba-1's x half from 0, Mamba-2's xBC after z), one channel a column
    (conv1d.conv_update_step; CONV_PER_CHANNEL: the conv output's scale is one a channel)."""
    row = tl.arange(0, 1)
    if CONV:
        out = epilogue(acc, cols, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr.dtype.element_ty,
                       W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)
        tl.store(out_ptr + offs_n[None, :], out, mask=(offs_n < N)[None, :])
        channel = offs_n - CONV_START
        mask_c = (channel >= 0) & (channel < D_CONV)
        channel = tl.where(mask_c, channel, 0)  # masked columns point at channel 0, never read
        # The GEMM's int8 output is the conv's input, at the GEMM's out_scale.
        u = conv_update_step(tl.reshape(out, [BLOCK_N]), cs_ptr, out_scale_ptr, cw_ptr, cb_ptr, cu_scale_ptr,
                             channel, mask_c, stride_csd, stride_csk, stride_cwd, stride_cwk,
                             CONV_W, CONV_HAS_BIAS, FAST_MATH, CONV_PER_CHANNEL)
        tl.store(u_ptr + channel, u, mask=mask_c)
    else:
        store_tile(acc, row, offs_n, cols, 1, N, 0, x_scale_ptr, w_scale_ptr, bias_ptr,
                   out_scale_ptr, out_ptr, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)


@triton.jit
def _int8_gemv_jit(
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr, partial_ptr, count_ptr,
    cs_ptr, cw_ptr, cb_ptr, cu_scale_ptr, u_ptr,
    N, K,
    stride_wn,
    D_CONV, CONV_START, stride_csd, stride_csk, stride_cwd, stride_cwk,
    PF_BYTES, PF_PROGRAMS,
    W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
    OUT_PER_CHANNEL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    DP4A: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
    CONV: tl.constexpr, CONV_W: tl.constexpr, CONV_HAS_BIAS: tl.constexpr, CONV_PER_CHANNEL: tl.constexpr,
    FAST_MATH: tl.constexpr,
):
    # CONV: also the decode conv step of D_CONV columns from CONV_START (see _finish), its state
    # `cs` [D, W-1] rolled in place, its output written to u.
    # x and w are int32 words (four int8 each): K and stride_wn count words.
    # SPLIT_K consecutive programs share one column tile. x comes from the kernel ahead: a norm or
    # rotation prologue computing it in every program (one launch fewer) was measured slower, W8A8
    # and W4A16 (docs/benchmarks.md, session 53).
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid_n = pid // SPLIT_K
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
    # Columns past N wrap onto valid ones (never stored): no N mask on the loads.
    cols = offs_n % N
    # x is loaded as a [BLOCK_N, BLOCK_K] tile of repeated rows, in the layout of the weight tile
    # it multiplies: each thread reads the words it needs (from L1 after the first). Loaded as a
    # [BLOCK_K] vector it went through shared memory every step (4 barriers an iteration, sm_90).
    x_ptrs = x_ptr + (offs_k[None, :] + tl.zeros((BLOCK_N, 1), dtype=tl.int32))
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]

    prefetch_to_l2(w_ptr, PF_BYTES, PF_PROGRAMS, PREFETCH)
    b = split_k.load_step(w_ptrs, offs_k, K, 0, EVEN_K)
    wait_for_previous(USE_PDL)  # x, the scratch and the output belong to the kernels ahead

    # Element-wise running sums, reduced over K once after the loop: a reduction every step would
    # put a chain of shuffles between each load and the next.
    sums = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for kt in range(0, k_tiles):
        a = split_k.load_step(x_ptrs + kt * BLOCK_K, offs_k, K, kt, EVEN_K)
        # The next step's weight (the last again on the last step: cached, and unused).
        nxt = tl.minimum(kt + 1, k_tiles - 1)
        b_next = split_k.load_step(w_ptrs + nxt * BLOCK_K, offs_k, K, nxt, EVEN_K)
        sums = _dot4(a, b, sums, DP4A)
        b = b_next
    acc = tl.sum(sums, axis=1)[None, :]  # [1, BLOCK_N]: the epilogue's tile shape

    if SPLIT_K == 1:
        _finish(acc, offs_n, cols, N, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                cs_ptr, cw_ptr, cb_ptr, cu_scale_ptr, u_ptr, D_CONV, CONV_START, stride_csd, stride_csk, stride_cwd,
                stride_cwk, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL, CONV, CONV_W, CONV_HAS_BIAS,
                CONV_PER_CHANNEL, FAST_MATH, BLOCK_N)
    elif split_k.arrive(acc, partial_ptr, count_ptr, pid_n, pid_k, SPLIT_K, 1, BLOCK_N):
        acc = split_k.total(partial_ptr, count_ptr, pid_n, SPLIT_K, 1, BLOCK_N)
        _finish(acc, offs_n, cols, N, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                cs_ptr, cw_ptr, cb_ptr, cu_scale_ptr, u_ptr, D_CONV, CONV_START, stride_csd, stride_csk, stride_cwd,
                stride_cwk, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL, CONV, CONV_W, CONV_HAS_BIAS,
                CONV_PER_CHANNEL, FAST_MATH, BLOCK_N)


# (N, K, out dtype, flags, device) -> the config.
_TUNED: dict = tuned_configs("gemv")


def launch(tensors: tuple, n: int, k: int, key: tuple, flags: dict, conv: tuple | None = None) -> None:
    """Run the GEMV on `tensors = (x [1, K], w [N, K], x_scale, w_scale, bias, out_scale, out
    [1, N])` (placeholders for absent bias / out_scale), validated by `gemm.int8_gemm` and
    `supported`. `key` names everything that selects a config or a compiled variant; `flags` are
    the epilogue's. `conv = (state [1, D, W-1], weight [D, W], bias or None, out_scale, u [1, D],
    start)` adds the decode conv step of the D columns from `start` (`gemm.int8_gemm_conv_step`
    validated it)."""
    x, w = tensors[0], tensors[1]
    k_words = k // _PACK
    meta = chosen_config(_TUNED, key, _config, n, k_words)
    scratch = (split_k.scratch(x.device, *split_k.scratch_need(1, n, (meta,))) if meta["SPLIT_K"] > 1
               else (tensors[2], tensors[2]))
    words = (x[0].view(torch.int32)[None], w.view(torch.int32)) + tuple(tensors[2:])
    if conv is not None:
        state, cw, cb, cu_scale, u, start = conv
        conv_args = (state[0], cw, cb if cb is not None else cw, cu_scale, u,
                     state.shape[1], start, state.stride(1), state.stride(2), cw.stride(0), cw.stride(1))
        conv_flags = dict(CONV=True, CONV_W=cw.shape[1], CONV_HAS_BIAS=cb is not None,
                          CONV_PER_CHANNEL=cu_scale.numel() > 1)
    else:
        conv_args = (x, x, x, x, x, 0, 0, 0, 0, 0, 0)  # placeholders, never read
        conv_flags = dict(CONV=False, CONV_W=2, CONV_HAS_BIAS=False, CONV_PER_CHANNEL=False)
    programs = cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_K"]
    # No FP fusion (`fuse_fp=False`): `a * s + bias` stays two roundings on the GPU (gemm.py's
    # contract).
    # The first programs ask L2 for the weight's first rows (pdl.prefetch_to_l2).
    _int8_gemv_jit[(programs,)](*words, *scratch, *conv_args[:5], n, k_words, w.stride(0) // _PACK, *conv_args[5:],
                                **prefetch_options(w, programs),
                                **flags, **meta, **conv_flags, FAST_MATH=not _INTERPRET,
                                EVEN_K=_even_k(k_words, meta), DP4A=not _INTERPRET,
                                **launch_options(x.device, fuse_fp=False))
