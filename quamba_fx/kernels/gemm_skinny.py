"""int8 GEMM for a few rows (decode batches of 2-64): the weight streamed through the tensor cores
with the operands' roles swapped.

Same semantics, arguments and epilogue as `gemm.int8_gemm` (which calls `launch` and owns the
validation); the accumulation is exact in int32, so its numerical contract holds unchanged.

Why a third kernel: with 16-64 rows a decode GEMM is bound by streaming the weight, and its time
is mostly the ramp (first bytes in flight) and the tail, not the MMAs. The pointer kernel of
gemm.py puts the rows on the MMA's M side (16-row `mma.sync` tiles) and waits for the kernel ahead
before its first load. Here:

* a program owns `BLOCK_N` weight rows, which are the MMA's M side (`w [BN, BK] @ x.T [BK, BM]`):
  64 rows on M and the padded batch on N, the shape Hopper's wgmma takes, and both operands stay
  K-major (the int8 wgmma layout) without any copy, since `w` and `x` are both K-contiguous;
* two loop forms. `EARLY`: the weight tile of the first K step is loaded before the wait for the
  kernel ahead (weights are never written by the kernels of a step, pdl.py), and each step loads
  the next weight tile into registers before it multiplies the current one. Otherwise Triton's
  software pipeliner keeps `num_stages` tiles in flight through shared memory, after the wait.
  Measured, the early fetch won only where K is one or two steps (dt_proj, run 7), and since
  the pipeliner runs six 128-byte stages it wins there too (run 14): the rule keeps the early
  fetch for K of a single step, where there is nothing to pipeline; on long K one tile in flight
  a program is too little to stream the weight;
* in both forms the first programs ask L2 for the weight's first rows before the wait
  (`pdl.prefetch_to_l2`);
* K may be split across programs (split_k.py) so that a projection with few output rows (x_proj's
  192, out_proj's 2560) still spreads over every SM.

Configs are chosen by rule (`gpu_config`), not by Triton's autotuner, for the GEMV's reason: the
autotuner times single launches between L2 flushes, unlike a decode step, whose launches run back
to back on weights that do not fit in L2. `benchmarks/decode_gemm.py` times the candidates
(`candidates`) the way a step runs them; docs/benchmarks.md has the figures behind the rule.
"""

from __future__ import annotations

from typing import List

import triton
import triton.language as tl

from . import split_k
from .dispatch import INTERPRET as _INTERPRET
from .dispatch import INTERPRETER_WIDE_N, cdiv, chosen_config, next_pow2, sm_count, tuned_configs
from .gemm_epilogue import store_tile
from .pdl import launch_options, prefetch_options, prefetch_to_l2, wait_for_previous

__all__ = ["BLOCK_K", "MAX_M", "MIN_M", "NARROW_MAX_M", "STAGES", "block_m", "candidates", "gpu_config", "launch",
           "launch_call", "use_for"]

# Row counts this kernel runs: one row is the GEMV's (gemv.py), more than MAX_M the pointer
# kernel's, whose tiles then fill the MMA's M side with rows.
MIN_M = 2
MAX_M = 64


def block_m(m: int) -> int:
    """The padded row count of an `m`-row problem: `tl.dot` needs every dim >= 16."""
    return max(16, next_pow2(m))


def _cfg(bn: int, bk: int, split: int, early: bool, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "EARLY": early},
                         num_stages=stages, num_warps=warps)


def _clip(bn: int, bk: int, n: int, k: int) -> tuple:
    # tl.dot needs every dim >= 16, and int8 MMA steps K by 32.
    return min(bn, max(16, next_pow2(n))), min(bk, max(32, next_pow2(k)))


# Shared memory a pipelined candidate may hold across its stages: under the 227 KiB an H100 / H200
# CTA may take, with room for Triton's own scratch.
_SWEEP_SMEM = 200 * 1024


def candidates(m: int, n: int, k: int, sms: int) -> List[triton.Config]:
    """The configs `benchmarks/decode_gemm.py` times for an `m x n x k` problem: 64 or 128 weight
    rows, K steps of 128-512 bytes, the early-fetch loop and the pipelined one at 3, 4 or 6 stages
    (those whose stages fit `_SWEEP_SMEM`), and for each the K splits that take the programs
    towards one, two, four and eight per SM."""
    out, seen = [], set()
    for bn0 in (64, 128):
        for bk0 in (128, 256, 512):
            bn, bk = _clip(bn0, bk0, n, k)
            k_tiles = cdiv(k, bk)
            for split in split_k.split_counts(cdiv(n, bn), k_tiles, 8 * sms):
                for early, stages in ((True, 1), (False, 3), (False, 4), (False, 6)):
                    if not early and stages * (bn + block_m(m)) * bk > _SWEEP_SMEM:
                        continue
                    for warps in (4, 8):
                        if warps == 8 and bn < 128:
                            continue  # a 64-row tile is one warpgroup's wgmma
                        c = (bn, bk, split, early, stages, warps)
                        if c not in seen:
                            seen.add(c)
                            out.append(_cfg(*c))
    return out


# Rows up to which narrow weights with long K (x_proj's 192 x 5120 on 2.8b) run this kernel: in
# the session-30 sweep it took them in 3.43-3.44 us at 2 and 16 rows against the pointer kernel's
# 3.90-3.94 (8 K splits), and lost at 64 (6.18 against 5.86). A setting, for decode_settings.py.
NARROW_MAX_M = 16


def use_for(m: int, n: int, k: int) -> bool:
    """Whether int8_gemm runs this kernel on an `m x n x k` problem (MIN_M <= m <= MAX_M) rather
    than the pointer kernel: where the decode_gemm sweeps on an H200 found it faster (figures in
    docs/benchmarks.md, runs 7 and 14). Short K (at most two 256-byte steps, e.g. dt_proj) at any
    row count; weights of at least 1024 output rows and 2048 input columns (in_proj, out_proj of
    the larger models), where the pointer kernel's autotuned configs also varied between processes
    while this kernel's rule gives one config; and narrower weights of 2048 input columns or more
    (x_proj) up to NARROW_MAX_M rows. The pointer kernel keeps the rest: the 130m projections and
    x_proj at more rows."""
    return k <= 512 or (k >= 2048 and (n >= 1024 or m <= NARROW_MAX_M))


# The rule's K step (bytes) and the pipelined loop's depth. The session-30 sweep on an H200 (2.8b
# shapes at 2, 16 and 64 rows, docs/benchmarks.md run 14) found 128-byte steps six deep fastest on
# in_proj, out_proj and dt_proj at every row count (in_proj at 16 rows 9.41 us against 9.75 for the
# earlier 256 x 3, out_proj 6.66 against 7.02, dt_proj 1.92 against 2.18). Settings, so that
# benchmarks/decode_settings.py can time a model under other values.
BLOCK_K = 128
STAGES = 6
# K steps a split keeps at least: fewer leave the pipeline little to overlap. x_proj (3 tiles of
# 64 rows, 40 steps) measured 3.43 us at 8 splits, 3.53 at 16 and 4.04 at 32 (16 rows, run 14).
_MIN_SPLIT_STEPS = 5


def gpu_config(m: int, n: int, k: int, sms: int) -> triton.Config:
    """The GPU config of an `m x n x k` problem (a rule, from the sweeps; see the module docstring
    for why not a tuner): 64 weight rows a program and K steps of `BLOCK_K` bytes. K of one step
    fetches its weight tile early (before the wait: there is nothing to pipeline); longer K
    leaves the loop to the pipeliner (`STAGES` deep), and past 512 bytes splits K until the
    programs cover the SMs, half of them above 16 rows, where a split's partial tile costs more,
    while each split keeps `_MIN_SPLIT_STEPS` K steps (short K is never split: its splits measured
    slower than one program a tile)."""
    bn, bk = _clip(64, BLOCK_K, n, k)
    if k <= bk:
        return _cfg(bn, bk, 1, True, 1, 4)
    split = 1
    if k > 512:
        target = sms if m <= 16 else sms // 2
        steps = cdiv(k, bk)
        while (cdiv(n, bn) * split < target and steps // (split * 2) >= _MIN_SPLIT_STEPS
               and split < split_k.MAX_SPLIT_K):
            split *= 2
    return _cfg(bn, bk, split, False, STAGES, 4)


def _config(m: int, n: int, k: int) -> dict:
    if _INTERPRET:
        if n >= INTERPRETER_WIDE_N:
            return _cfg(*_clip(128, 128, n, k), 1, True, 1, 1).all_kwargs()  # see gemv._config
        # Small tiles; problems with three or more K steps split K in two, so both paths run.
        return _cfg(32, 32, 2 if k > 64 else 1, True, 1, 1).all_kwargs()
    return gpu_config(m, n, k, sm_count()).all_kwargs()


def _even_k(k: int, meta: dict) -> bool:
    return k % (meta["BLOCK_K"] * meta["SPLIT_K"]) == 0


# M changes with the batch: it only enters through BLOCK_M (a power of two) and the masks, so it
# stays out of the specialisation.
@triton.jit(do_not_specialize=["M"])
def _int8_gemm_skinny_jit(
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr, partial_ptr, count_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    PF_BYTES, PF_PROGRAMS,
    W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
    OUT_PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, EARLY: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    # SPLIT_K consecutive programs share one tile of BLOCK_N weight rows (output columns).
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid_n = pid // SPLIT_K
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    offs_k = pid_k * k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    # Rows past M and columns past N wrap onto valid ones (never stored): only K is masked.
    cols = offs_n % N
    rows = (offs_m % M).to(tl.int64)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    prefetch_to_l2(w_ptr, PF_BYTES, PF_PROGRAMS, PREFETCH)
    if EARLY:
        w = split_k.load_step(w_ptrs, offs_k, K, 0, EVEN_K)
        wait_for_previous(USE_PDL)  # x, the scratch and the output belong to the kernels ahead
        for kt in range(0, k_tiles):
            x = split_k.load_step(x_ptrs + kt * BLOCK_K, offs_k, K, kt, EVEN_K)
            # The next step's weight (the last again on the last step: cached, and unused).
            nxt = tl.minimum(kt + 1, k_tiles - 1)
            w_next = split_k.load_step(w_ptrs + nxt * BLOCK_K, offs_k, K, nxt, EVEN_K)
            # Weight rows on the MMA's M side, the batch on its N side; x.T is a K-major view.
            # out_dtype spelled out: Triton 3.6 defaults it to fp32 and rejects int32 otherwise.
            acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
            w = w_next
    else:
        wait_for_previous(USE_PDL)
        for kt in range(0, k_tiles):
            x, w = split_k.load_k_step(x_ptrs + kt * BLOCK_K, w_ptrs + kt * BLOCK_K, offs_k, K, kt, EVEN_K)
            acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
    acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]: the epilogue's tile shape

    if SPLIT_K == 1:
        store_tile(acc, offs_m, offs_n, cols, M, N, stride_om, x_scale_ptr, w_scale_ptr, bias_ptr,
                   out_scale_ptr, out_ptr, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)
    elif split_k.arrive(acc, partial_ptr, count_ptr, pid_n, pid_k, SPLIT_K, BLOCK_M, BLOCK_N):
        # The last split to finish this tile: every split's partial is in, sum them and store.
        acc = split_k.total(partial_ptr, count_ptr, pid_n, SPLIT_K, BLOCK_M, BLOCK_N)
        store_tile(acc, offs_m, offs_n, cols, M, N, stride_om, x_scale_ptr, w_scale_ptr, bias_ptr,
                   out_scale_ptr, out_ptr, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)


# gemm.py's problem key (N, K, M bucket, out dtype, flags, device) -> the config.
_TUNED: dict = tuned_configs("gemm_skinny")


def launch_call(tensors: tuple, m: int, n: int, k: int, flags: dict, meta: dict) -> tuple:
    """`(grid, args, kwargs)` of the launch of config `meta` on `tensors` (see `launch`)."""
    x, w = tensors[0], tensors[1]
    bm = block_m(m)
    scratch = (split_k.scratch(x.device, *split_k.scratch_need(bm, n, ({**meta, "BLOCK_M": bm},)))
               if meta["SPLIT_K"] > 1 else (tensors[2], tensors[2]))
    grid = (cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_K"],)
    args = (*tensors, *scratch, m, n, k, x.stride(0), w.stride(0), tensors[-1].stride(0))
    # No FP fusion (`fuse_fp=False`): `a * s + bias` stays two roundings on the GPU (gemm.py's
    # contract).
    # The first programs ask L2 for the weight's first rows (pdl.prefetch_to_l2).
    kwargs = dict(flags, **meta, BLOCK_M=bm, EVEN_K=_even_k(k, meta),
                  **prefetch_options(w, grid[0]), **launch_options(x.device, fuse_fp=False))
    return grid, args, kwargs


def launch(tensors: tuple, m: int, n: int, k: int, key: tuple, flags: dict, meta: dict | None = None) -> None:
    """Run the kernel on `tensors = (x [M, K], w [N, K], x_scale, w_scale, bias, out_scale, out
    [M, N])` (placeholders for absent bias / out_scale), validated by `gemm.int8_gemm`; MIN_M <= M
    <= MAX_M. `key` names everything that selects a config or a compiled variant, `flags` are the
    epilogue's; `meta` forces a config (benchmarks), else the rule's is used."""
    if meta is None:
        meta = chosen_config(_TUNED, key, _config, m, n, k)
    grid, args, kwargs = launch_call(tensors, m, n, k, flags, meta)
    _int8_gemm_skinny_jit[grid](*args, **kwargs)
