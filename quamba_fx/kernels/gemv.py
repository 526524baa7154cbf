"""int8 GEMV for one-row problems (batch-1 decode steps): the weight streamed through the CUDA cores.

Same semantics, arguments and epilogue as `gemm.int8_gemm` (which calls `launch` and owns the
validation); its numerical contract holds unchanged, since the accumulation is exact in int32.

Why a second kernel: at one row a tensor-core tile is 1/16 useful and routes every weight byte
through shared memory; here each thread loads 16-byte vectors of the weight, multiplies them
with the matching activations in int32 and keeps a per-element running sum, reduced over K once
at the end. One row only: with several, the rows' broadcast products need layout exchanges
through shared memory every step (compiled for sm_90: 4 barriers and ~27 shared-memory accesses
an iteration at 1 x 16 x 256 when written for up to 4 rows), and a few rows are the tensor-core
kernel's anyway. The work is a small fraction of the time it takes to stream the weight, and light
programs let several share an SM, keeping more loads in flight. K may be split across programs
(split_k.py) so that few output columns still spread over every SM. `gemm.int8_gemm` times this
kernel against its tensor-core kernel on a problem's first call and keeps the faster.
"""

from __future__ import annotations

from typing import List

import triton
import triton.language as tl

from . import split_k
from .dispatch import AUTOTUNE_DO_BENCH
from .dispatch import INTERPRET as _INTERPRET
from .dispatch import precompile, sm_count
from .gemm_epilogue import store_tile

__all__ = ["GEMV_MAX_M", "launch"]

# Problems with at most this many rows run here (see the module docstring for why one).
GEMV_MAX_M = 1

# Elements of the running sum each thread holds (BLOCK_N * BLOCK_K / threads).
_ELEMENTS_PER_THREAD = (32, 64)
_WARPS = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _cfg(bn: int, bk: int, split: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_stages=stages, num_warps=warps)



def gpu_configs(n: int, k: int, sms: int) -> List[triton.Config]:
    """Candidates: tiles of 32 or 64 sum elements a thread, K steps of 128-512 bytes a weight row,
    and for each the K splits that bring the programs towards four per SM. One stage: compiled for
    sm_90 by Triton 3.6 the loop came out the same with three, and the light programs hide load
    latency by sharing an SM instead."""
    threads = 32 * _WARPS
    cap_n, cap_k = max(16, _next_pow2(n)), max(32, _next_pow2(k))
    out, seen = [], set()
    for per_thread in _ELEMENTS_PER_THREAD:
        for bk in (128, 256, 512):
            bk_ = min(bk, cap_k)
            bn = min(max(16, per_thread * threads // bk_), cap_n)
            for split in split_k.split_counts(_cdiv(n, bn), _cdiv(k, bk_), 4 * sms):
                sig = (bn, bk_, split, 1, _WARPS)
                if sig not in seen:
                    seen.add(sig)
                    out.append(_cfg(*sig))
    return out


def _configs() -> List[triton.Config]:
    if _INTERPRET:
        # Small tiles; problems with three or more K tiles split K in two (`_interpreter_pick`).
        return [_cfg(16, 32, split, 1, 1) for split in (1, 2)]
    return [_cfg(64, 256, 1, 1, _WARPS)]  # placeholder list: `_prune` builds the real ones


def _interpreter_pick(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    want = 2 if named_args["K"] > 64 else 1
    return [c for c in configs if c.kwargs["SPLIT_K"] == want]


def _gpu_prune(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    return gpu_configs(named_args["N"], named_args["K"], sm_count())


_prune = _interpreter_pick if _INTERPRET else _gpu_prune


def _even_k(k: int, meta: dict) -> bool:
    return k % (meta["BLOCK_K"] * meta["SPLIT_K"]) == 0


@triton.jit
def _int8_gemv_jit(
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr, partial_ptr, count_ptr,
    N, K,
    stride_wn,
    W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
    OUT_PER_CHANNEL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # SPLIT_K consecutive programs share one column tile.
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid_n = pid // SPLIT_K
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
    # Columns past N wrap onto valid ones (never stored): no N mask on the loads.
    cols = offs_n % N
    # x is loaded as a [BLOCK_N, BLOCK_K] tile of repeated rows, in the layout of the weight tile
    # it multiplies: each thread reads the 16 bytes it needs (from L1 after the first). Loaded as a
    # [BLOCK_K] vector or a [1, BLOCK_K] row, it went through shared memory every step (4 barriers
    # an iteration, compiled for sm_90).
    x_ptrs = x_ptr + (offs_k[None, :] + tl.zeros((BLOCK_N, 1), dtype=tl.int32))
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]

    # Element-wise running sums, reduced over K once after the loop: a reduction every step would
    # put a chain of shuffles between each load and the next.
    sums = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for kt in range(0, k_tiles):
        a, b = split_k.load_k_step(x_ptrs, w_ptrs, offs_k, K, kt, EVEN_K)
        sums += a.to(tl.int32) * b.to(tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = tl.sum(sums, axis=1)[None, :]  # [1, BLOCK_N]: the epilogue's tile shape

    row = tl.arange(0, 1)
    if SPLIT_K == 1:
        store_tile(acc, row, offs_n, cols, 1, N, 0, x_scale_ptr, w_scale_ptr, bias_ptr,
                   out_scale_ptr, out_ptr, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)
    elif split_k.arrive(acc, partial_ptr, count_ptr, pid_n, pid_k, SPLIT_K, 1, BLOCK_N):
        acc = split_k.total(partial_ptr, count_ptr, pid_n, SPLIT_K, 1, BLOCK_N)
        store_tile(acc, row, offs_n, cols, 1, N, 0, x_scale_ptr, w_scale_ptr, bias_ptr,
                   out_scale_ptr, out_ptr, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)


_int8_gemv_kernel = triton.autotune(
    configs=_configs(), key=["N", "K"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=AUTOTUNE_DO_BENCH,
)(triton.heuristics({"EVEN_K": lambda args: _even_k(args["K"], args)})(_int8_gemv_jit))

# (N, K, out dtype, flags, device) -> the tuned config: later calls skip the autotuner.
_TUNED: dict = {}


def _grid(n: int):
    def grid(meta):
        return (_cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_K"],)
    return grid


def launch(tensors: tuple, n: int, k: int, key: tuple, flags: dict) -> None:
    """Run the GEMV on `tensors = (x [1, K], w [N, K], x_scale, w_scale, bias, out_scale, out
    [1, N])` (placeholders for absent bias / out_scale), validated by `gemm.int8_gemm`. `key`
    names everything that selects a config or a compiled variant; `flags` are the epilogue's."""
    x, w = tensors[0], tensors[1]
    m = 1
    tail = (n, k, w.stride(0))
    meta = _TUNED.get(key)
    if meta is not None:
        scratch = (split_k.scratch(x.device, *split_k.scratch_need(m, n, (meta,))) if meta["SPLIT_K"] > 1
                   else (tensors[2], tensors[2]))
        _int8_gemv_jit[_grid(n)](*tensors, *scratch, *tail, **flags, **meta, EVEN_K=_even_k(k, meta),
                                 enable_fp_fusion=False)
        return
    named = dict(zip(_int8_gemv_jit.arg_names, tensors + (None, None) + tail))
    candidates = [c.all_kwargs() for c in _prune(_int8_gemv_kernel.configs, named)]
    args = tensors + split_k.scratch(x.device, *split_k.scratch_need(m, n, candidates)) + tail
    precompile(_int8_gemv_jit, args, ({**flags, **c, "EVEN_K": _even_k(k, c), "enable_fp_fusion": False}
                                      for c in candidates))
    # Keeps `a * s + bias` two roundings on the GPU (gemm.py's contract).
    _int8_gemv_kernel[_grid(n)](*args, **flags, enable_fp_fusion=False)
    best = getattr(_int8_gemv_kernel, "best_config", None)
    if best is not None:
        _TUNED[key] = best.all_kwargs()
