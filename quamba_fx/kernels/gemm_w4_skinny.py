"""W4A8 GEMM for decode batches (up to 64 rows): the 4-bit weight streamed through the tensor
cores with the operands' roles swapped, as gemm_skinny.py does for int8 weights.

Same semantics and numerics as `gemm_w4.w4a8_gemm` (which validates and calls `launch`): per K
step of one scale group, an exact int32 dot of the codes with the int8 activations, scaled by the
group's scale in fp32 and summed; then `* x_scale (+ bias)` and the requantize or cast.

Why a second W4A8 kernel: gemm_w4.py's kernel puts the rows on the MMA's M side, so at 64 rows
its programs are one per 128-column tile (80 on mamba-2.8b's in_proj, for 132 SMs), and it waits
for nothing (no programmatic dependent launch), so its launch and first loads never overlap the
kernel ahead. Here:

* a program owns `BLOCK_N` weight rows, the MMA's M side, and the padded batch is the N side: the
  codes are made in registers (times 16, int4_codes.py), where Hopper's wgmma takes its A operand,
  and `x` stays K-major for the B side, as the int8 wgmma wants. A K step is one MMA over its columns
  reordered, even (the low nibbles) then odd, in the codes and the activations alike
  (`ONE_DOT_A_STEP`; else two MMAs, the even columns' and the odd columns');
* Triton's software pipeliner keeps `num_stages` K steps of both operands in flight;
* the first programs ask L2 for the weight's first bytes before they wait for the kernel ahead
  (`pdl.prefetch_to_l2`), and the kernel launches with PDL;
* K may be split across programs (split_k.py, fp32 partials) so that narrow projections (x_proj's
  192 rows, out_proj's 2560) still spread over the SMs.

Configs come by rule (`gpu_config`), not the autotuner, for gemm_skinny.py's reason (a decode
step's launches run back to back on weights that do not fit in L2); `candidates` is the grid
`benchmarks/gemm_w4.py --sweep` times.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import gemm_skinny, split_k
from .dispatch import INTERPRET, INTERPRETER_WIDE_N, cdiv, next_pow2, sm_count
from .gemm_epilogue import store_w4_tile
from .int4_codes import nibbles_x16
from .pdl import launch_options, prefetch_options, prefetch_to_l2, wait_for_previous

__all__ = ["MAX_M", "STAGES", "candidates", "gpu_config", "launch", "supported"]

# Rows this kernel runs (gemm_w4.w4a8_gemm): decode batches. A problem of more rows is a prefill,
# whose MMAs fill the M side with rows.
MAX_M = 64
# K steps it takes, in codes: one scale group or a part of one. A step makes two dots of half its
# length (even and odd columns), and an int8 MMA steps K by 32.
_BLOCK_KS = (128, 64)


def supported(group_size: int) -> bool:
    """Whether the kernel takes weights in groups of `group_size` (a multiple of 64 columns)."""
    return group_size % _BLOCK_KS[-1] == 0


@triton.jit(do_not_specialize=["M"])
def _w4a8_skinny_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, x_scale_ptr, out_scale_ptr, out_ptr, partial_ptr, count_ptr,
    M, N, K, K_BYTES, GROUPS,
    stride_xm, stride_wn, stride_sn, stride_om,
    PF_BYTES, PF_PROGRAMS,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr,
    PTX: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, ONE_DOT: tl.constexpr,
):
    # SPLIT_K consecutive programs share one tile of BLOCK_N weight rows (output columns).
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid_n = pid // SPLIT_K
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    first_step = pid_k * k_tiles
    offs_k = first_step * BLOCK_K + tl.arange(0, BLOCK_K)  # activation columns
    offs_b = first_step * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # packed weight bytes
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    # Rows past M and columns past N wrap onto valid ones (never stored): only K is masked.
    cols = offs_n % N
    rows = (offs_m % M).to(tl.int64)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + offs_b[None, :]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    s_ptrs = s_ptr + cols * stride_sn

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    prefetch_to_l2(w_ptr, PF_BYTES, PF_PROGRAMS, PREFETCH)
    wait_for_previous(USE_PDL)  # x and the output belong to the kernels ahead
    for kt in range(0, k_tiles):
        packed = split_k.load_step(w_ptrs + kt * (BLOCK_K // 2), offs_b, K_BYTES, kt, EVEN_K)
        x = split_k.load_step(x_ptrs + kt * BLOCK_K, offs_k, K, kt, EVEN_K)
        # The packed bytes hold columns 2i (low nibble) and 2i+1 (high). Putting the codes back in
        # column order (gemm_w4.py's tl.join) made the compiler load the bytes two at a time and
        # shuffle them (253 instructions a step at 16 rows, against 164 with the activations
        # reordered instead, sm_90 SASS, benchmarks/sass_loop.py), so the activations follow the
        # codes' order.
        # The codes times 16 (each nibble at the top of its byte): three instructions for eight
        # codes against seven sign-extended (sm_90 SASS at 64 rows: 193 a step against 223; 16
        # rows 122 against 152). The sum is 16 times the codes', exact in int32 (|sum| < 2^22) and
        # in fp32, and the scale takes the 1/16, so every product and sum below is the same.
        even, odd = nibbles_x16(packed, PTX)  # [BN, BK/2] int8: 16 x the codes of columns 2i, 2i+1
        if ONE_DOT:
            # One dot over the step's columns reordered, the even then the odd, in the codes and
            # the activations alike: the same int32 sum (exact in any order). Its four wgmmas
            # issue as one group with one wait, where two dots wait twice a step.
            codes = tl.reshape(tl.permute(tl.join(even, odd), (0, 2, 1)), (BLOCK_N, BLOCK_K))
            x_cols = tl.reshape(tl.permute(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)), (0, 2, 1)),
                                (BLOCK_M, BLOCK_K))
            # Weight rows on the MMA's M side, the batch on its N side; x.T is a K-major view.
            part = tl.dot(codes, tl.trans(x_cols), out_dtype=tl.int32)
        else:
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            part = tl.dot(even, tl.trans(x_even), out_dtype=tl.int32)
            part = tl.dot(odd, tl.trans(x_odd), part, out_dtype=tl.int32)
        # A step lies in one group (BLOCK_K divides GROUP). The last split's steps past K read
        # the last group's scale: their codes and activations are zero.
        group = tl.minimum((first_step + kt) * BLOCK_K // GROUP, GROUPS - 1)
        scale = tl.load(s_ptrs + group).to(tl.float32) * 0.0625  # a power of two: exact
        acc += part.to(tl.float32) * scale[:, None]
    acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]: the output tile's shape

    if SPLIT_K == 1:
        store_w4_tile(acc, offs_m, offs_n, cols, M, N, stride_om, x_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                      True, HAS_BIAS, REQUANT)
    elif split_k.arrive(acc, partial_ptr, count_ptr, pid_n, pid_k, SPLIT_K, BLOCK_M, BLOCK_N):
        # The last split to finish this tile: every split's partial is in; sum them in split order.
        acc = split_k.total(partial_ptr, count_ptr, pid_n, SPLIT_K, BLOCK_M, BLOCK_N)
        store_w4_tile(acc, offs_m, offs_n, cols, M, N, stride_om, x_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                      True, HAS_BIAS, REQUANT)


# A launch config: (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages).
Config = tuple[int, int, int, int, int]

# The rule's pipeline depth, and the K steps a split keeps at least (gemm_skinny.py's values for
# int8 weights, whose 128-byte steps measured fastest six deep; a 4-bit step of 128 codes is 64
# bytes of weight). Settings, so that benchmarks/decode_settings.py can time a model under others.
STAGES = 6
_MIN_SPLIT_STEPS = 5
# A K step as one dot over reordered columns (True) or two, even and odd columns. One dot's sm_90
# SASS (Tritons 3.6, 3.8, 3.9) has one wgmma wait a step instead of two and 3-13 instructions
# fewer; with Triton 3.8 at 64 rows the codes also skip a store to shared memory and reload. Not
# yet timed: a setting so that benchmarks/decode_settings.py can (docs/benchmarks.md, session 42).
ONE_DOT_A_STEP = True


def _block_k(group_size: int, k: int) -> int:
    """The K step: the longest of `_BLOCK_KS` that divides the group (a step has one scale) and is
    not longer than K needs."""
    return next(bk for bk in _BLOCK_KS if group_size % bk == 0 and (bk <= next_pow2(k) or bk == _BLOCK_KS[-1]))


def gpu_config(m: int, n: int, k: int, group_size: int, sms: int) -> Config:
    """The GPU config of an `m x n x k` problem: 64 weight rows a program on 4 warps (one
    warpgroup's wgmma), K steps of a whole group up to 128 codes, `STAGES` deep, and K split until
    the programs cover the SMs (half of them above 16 rows) while each split keeps
    `_MIN_SPLIT_STEPS` steps. gemm_skinny.py's rule for int8 weights, a starting point until this
    kernel's own sweep on the H200 (`benchmarks/gemm_w4.py --m 16 64 --sweep`)."""
    bn = min(64, max(16, next_pow2(n)))
    bk = _block_k(group_size, k)
    steps = cdiv(k, bk)
    target = sms if m <= 16 else sms // 2
    split = 1
    while cdiv(n, bn) * split < target and steps // (split * 2) >= _MIN_SPLIT_STEPS and split < split_k.MAX_SPLIT_K:
        split *= 2
    return bn, bk, split, 4, STAGES


def candidates(m: int, n: int, k: int, group_size: int, sms: int) -> List[Config]:
    """The configs `benchmarks/gemm_w4.py --sweep` times: 64 weight rows on 4 warps or 128 on 8
    (one warpgroup's wgmma each 64 rows), K steps of 64 or 128 codes (dividing the group), 4 or 8
    stages, and the K splits that take the programs towards one, two, four and eight per SM. Few
    enough that a sweep of the 2.8b projections compiles and times in a few minutes."""
    out = []
    for bn, warps in sorted({(min(b, max(16, next_pow2(n))), w) for b, w in ((64, 4), (128, 8))}):
        for bk in (bk for bk in _BLOCK_KS if group_size % bk == 0):
            for split in split_k.split_counts(cdiv(n, bn), cdiv(k, bk), 8 * sms):
                for stages in (4, 8):
                    out.append((bn, bk, split, warps, stages))
    return out


def _interpreter_config(m: int, n: int, k: int, group_size: int) -> Config:
    """Small tiles under the interpreter, so the property tests cross tile edges; problems of three
    or more K steps split K in two, so both paths run. Wide weights (the slow model tests') take
    one wide tile: the interpreter's cost is per operation."""
    bk = _BLOCK_KS[-1]
    if n >= INTERPRETER_WIDE_N:
        return min(128, next_pow2(n)), bk, 1, 1, 1
    return 32, bk, 2 if k > 2 * bk else 1, 1, 1


def launch(x_q: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor],
           x_scale: Tensor, out_scale: Optional[Tensor], out: Tensor, config: Optional[Config] = None) -> Tensor:
    """Run the kernel on `x_q [M, K]` int8 (1 <= M <= MAX_M, contiguous rows), the packed weight
    `[N, ceil(K/2)]`, its scales `[N, ceil(K/group)]`, fp32 `bias [N]`, fp32 one-element scales, into
    `out [M, N]` (int8 where `out_scale` is given), all validated by `gemm_w4.w4a8_gemm`. `config`
    forces a config (benchmarks), else the rule's (`gpu_config`) is used. Returns `out`."""
    m, k = x_q.shape
    n = w_packed.shape[0]
    if config is None:
        config = (_interpreter_config(m, n, k, group_size) if INTERPRET
                  else gpu_config(m, n, k, group_size, sm_count(x_q.device)))
    block_n, block_k, splits, warps, stages = config
    if block_k not in _BLOCK_KS or group_size % block_k:
        raise ValueError(f"gemm_w4_skinny: BLOCK_K={block_k} must be one of {_BLOCK_KS} and divide the group "
                         f"size {group_size}")
    block_m = gemm_skinny.block_m(m)
    programs = cdiv(n, block_n) * splits
    if splits > 1:
        partials, counters = split_k.scratch(x_q.device, *split_k.scratch_need(
            m, n, ({"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": splits},)))
        partials = partials.view(torch.float32)
    else:
        partials = counters = w_scale  # placeholders, never read
    dummy = w_scale  # a pointer for absent operands; never read (constexpr flags)
    _w4a8_skinny_kernel[(programs,)](
        x_q, w_packed, w_scale, dummy if bias is None else bias, x_scale, dummy if out_scale is None else out_scale,
        out, partials, counters, m, n, k, w_packed.shape[1], w_scale.shape[1],
        x_q.stride(0), w_packed.stride(0), w_scale.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=splits,
        EVEN_K=k % (block_k * splits) == 0, HAS_BIAS=bias is not None, REQUANT=out_scale is not None,
        PTX=not INTERPRET, ONE_DOT=ONE_DOT_A_STEP, num_warps=warps, num_stages=stages,
        **prefetch_options(w_packed, programs), **launch_options(x_q.device),
    )
    return out
