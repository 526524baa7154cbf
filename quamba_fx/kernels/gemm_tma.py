"""Persistent W8A8 GEMM through TMA tensor descriptors: the prefill path of gemm.py (int8) and
gemm_fp8.py (e4m3) on Hopper.

Same numerics and epilogue as those modules' pointer kernels (`gemm_epilogue.epilogue`; an fp8
problem accumulates in fp32, its partial sums promoted into it as often as gemm_fp8.py asks);
different data movement:

* Operands and output move through host-side TMA descriptors (`TensorDescriptor`): one bulk copy
  per tile instead of per-thread address arithmetic, zero-filled past the edges (so K tails and
  ragged M / N tiles need no masks, and the output store clips to the tensor by itself). Both
  operands are K-major (`x [M, K]`, `w [N, K]`), the layout Hopper's int8 wgmma needs.
* Persistent grid: one program per SM (or two, `per_sm`) walks tiles `pid, pid + P, ...` in the
  GROUP_M-swizzled order. With `flatten`, Triton's pipeliner sees the tile and K loops as one loop
  and issues the next tile's loads while this tile's epilogue runs.
* `split` stores the epilogue as two [BM, BN / 2] halves: half the registers live at once and
  half the shared memory for the store's staging tile.

TMA needs 16-byte aligned bases and row strides (`supported`); other layouts stay on gemm.py's
kernel. Tiles are tuned here per (N, K, M bucket, flags) by timing each candidate from CUDA-graph
replays (`_tune`: a short prefill kernel takes less time than its host launch, which plain event
timing would measure), and the winner is recorded: later calls only build three descriptors and
launch. `warp_specialize` is kept as a knob for newer Tritons; Triton 3.6 does not apply it to
this loop on sm_90 (same registers and shared memory), so no candidate sets it.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .dispatch import INTERPRET, chosen_config, next_pow2, precompile_calls, sm_count, tuned_configs
from .gemm_epilogue import epilogue
from .pdl import prefill_launch_options, wait_for_previous

__all__ = ["TmaConfig", "candidates", "fp8_flags", "launch", "launch_config", "promotion_constexprs", "supported"]


class TmaConfig(NamedTuple):
    """One tile config: block sizes, GROUP_M, pipeline stages, warps, and the loop options."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    stages: int
    warps: int
    flatten: bool = True
    split: bool = False
    per_sm: int = 1
    warp_specialize: bool = False


# Prefill candidates. int8 tiles are a byte a value: a 128x256x128 stage is 48 KiB.
_PREFILL = [
    TmaConfig(128, 256, 128, 8, 3, 8),
    TmaConfig(128, 256, 128, 8, 3, 8, split=True),
    TmaConfig(128, 256, 128, 8, 4, 8, split=True),
    TmaConfig(128, 256, 64, 8, 4, 8),
    TmaConfig(256, 128, 128, 8, 3, 8),
    TmaConfig(256, 128, 128, 8, 3, 8, split=True),
    TmaConfig(128, 128, 128, 8, 4, 8),
    TmaConfig(128, 128, 128, 8, 4, 4),
    TmaConfig(64, 256, 128, 8, 4, 8),
    # Short K (dt_proj, K = 160) is epilogue-bound: two programs per SM overlap one's epilogue
    # with the other's loads and MMAs.
    TmaConfig(128, 128, 32, 8, 4, 4, per_sm=2),
    # Narrow N, long K (x_proj: N = 192, K = 5120): small tiles give enough programs at M = 2048.
    TmaConfig(64, 64, 128, 8, 6, 4, per_sm=2),
]
# fp8 prefill candidates. The promoted accumulation keeps a second accumulator tile live (the
# tensor cores' partial sum), so the 128 x 256 tiles int8 prefers would spill: tiles of 128 x 128
# per two warpgroups, and the 256 x 128 the pointer kernel found fastest (docs/benchmarks.md, run 8).
# None of these spills in the sm_90 build, promoted or not; 128 x 256 x 64 with a split epilogue did.
_FP8_PREFILL = [
    TmaConfig(128, 128, 128, 8, 4, 8),
    TmaConfig(128, 128, 128, 8, 3, 8, split=True),
    TmaConfig(256, 128, 128, 8, 3, 8),
    TmaConfig(128, 128, 64, 8, 4, 8),
    # One warpgroup a program, two programs an SM (167 registers a thread in the sm_90 build): while
    # one waits for its MMAs to add them into fp32, the other's can run, the overlap cuBLAS gets
    # from two consumer warpgroups (the promotion waits for the tensor cores within each K step).
    TmaConfig(64, 128, 128, 8, 4, 4, per_sm=2),
    TmaConfig(64, 128, 128, 8, 3, 4, per_sm=2),
    TmaConfig(64, 64, 128, 8, 6, 4, per_sm=2),
]
# Not promoted, an e4m3 tile keeps one fp32 accumulator, as int8's int32 one: int8's 128 x 256
# tiles build without spills then (254 and 233 registers; promoted, both spill).
_FP8_PREFILL_UNPROMOTED = _FP8_PREFILL + [
    TmaConfig(128, 256, 128, 8, 3, 8),
    TmaConfig(128, 256, 128, 8, 3, 8, split=True),
]
# The interpreter runs one config: a small tile, and few programs, so that tests walk several
# tiles per program (the persistent loop), ragged edges and K tails; model-sized problems (a
# lowered model's prefill in the interpreter) a wide one, since the interpreter pays per
# operation, not per element.
_INTERPRETER_CONFIG = TmaConfig(16, 32, 32, 2, 1, 1)
_INTERPRETER_WIDE_CONFIG = TmaConfig(64, 64, 64, 2, 1, 1)
_INTERPRETER_PROGRAMS = 3

_SMEM_LIMIT = 227 * 1024 - 2048  # H100 / H200 per-block limit, less barriers and slack
# What the programs sharing an SM (per_sm) split, each also taking the driver's 1 KiB and the
# barriers and slack allowed for above.
_SMEM_PER_SM = 228 * 1024
_SMEM_PER_PROGRAM_EXTRA = 1024 + 2048


def _smem_bytes(c: TmaConfig, out_bytes: int) -> int:
    stage = (c.block_m + c.block_n) * c.block_k
    staging = c.block_m * (c.block_n // 2 if c.split else c.block_n) * out_bytes
    return c.stages * stage + staging


def candidates(n: int, k: int, out_bytes: int, fp8: bool = False, promote_k: Optional[int] = None) -> List[TmaConfig]:
    """The configs to time for an `[N, K]` weight (int8, or e4m3 with `fp8`, its partial sums
    promoted every `promote_k` products or never) and `out_bytes`-wide outputs."""
    if INTERPRET:
        return [_INTERPRETER_WIDE_CONFIG if min(n, k) >= 128 else _INTERPRETER_CONFIG]
    if not fp8:
        return _clip_candidates(_PREFILL, n, k, out_bytes)
    return _clip_candidates(_FP8_PREFILL if promote_k is not None else _FP8_PREFILL_UNPROMOTED, n, k, out_bytes)


def fp8_flags(promote_k: Optional[int]) -> Dict:
    """The kernel flags that make it an e4m3 GEMM: fp32 accumulation, the tensor cores' partial sums
    added into it every `promote_k` products (None: never; at most once a K step: a longer
    interval promotes every BLOCK_K). Merged into `launch`'s `flags`."""
    return dict(FP8=True, PROMOTE_K=promote_k)


def _clip_candidates(configs: List[TmaConfig], n: int, k: int, out_bytes: int) -> List[TmaConfig]:
    """`configs` clipped to the problem (BLOCK_N <= next_pow2(N), BLOCK_K <= next_pow2(K)), within
    shared memory, without duplicates."""
    cap_n, cap_k = max(16, next_pow2(n)), max(32, next_pow2(k))
    out, seen = [], set()
    for c in configs:
        c = c._replace(block_n=min(c.block_n, cap_n), block_k=min(c.block_k, cap_k))
        if c.split and c.block_n < 32:
            c = c._replace(split=False)
        smem = _smem_bytes(c, out_bytes)
        if c not in seen and smem <= _SMEM_LIMIT and c.per_sm * (smem + _SMEM_PER_PROGRAM_EXTRA) <= _SMEM_PER_SM:
            seen.add(c)
            out.append(c)
    return out


def supported(x2: Tensor, w: Tensor, out: Tensor) -> bool:
    """Whether TMA can address the three matrices: 16-byte aligned bases and row strides."""
    if not INTERPRET and (not x2.is_cuda or torch.cuda.get_device_capability(x2.device)[0] < 9):
        return False
    for t in (x2, w, out):
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16 or t.stride(1) != 1:
            return False
    return True


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_in_group, GROUP_M: tl.constexpr):
    # GROUP_M row tiles sweep all column tiles together, so a weight tile in L2 serves GROUP_M
    # programs running at about the same time.
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _store_tile(acc, off_m, off_n, N, out_desc, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
                W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
                OUT_PER_CHANNEL: tl.constexpr):
    # Columns past N wrap onto valid ones for the scale / bias loads; the TMA store drops them.
    cols = (off_n + tl.arange(0, acc.shape[1])) % N
    out = epilogue(acc, cols, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_desc.dtype,
                   W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)
    out_desc.store([off_m, off_n], out)


# M changes with every prefill length: it only enters through the descriptors' shapes and the tile
# count, so it stays out of the specialisation (no recompile per M).
@triton.jit(do_not_specialize=["M"])
def _gemm_tma_jit(
    x_desc, w_desc, out_desc, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
    M, N, K,
    W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
    OUT_PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, SPLIT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    FP8: tl.constexpr = False, PROMOTE_K: tl.constexpr = None, USE_PDL: tl.constexpr = False,
):
    # x is the kernel ahead's output: under PDL only the launch overlaps that kernel.
    wait_for_previous(USE_PDL)
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile's coordinates from its own counter rather than carrying
    # them from the top of the iteration: with FLATTEN the pipeliner overlaps the two.
    tile_out = start - NUM_PROGRAMS
    for tile in tl.range(start, num_tiles, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_in_group, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
        for kt in range(k_tiles):
            off_k = kt * BLOCK_K
            a = x_desc.load([off_m, off_k])
            b = w_desc.load([off_n, off_k])
            # The transposed view keeps both operands K-major. out_dtype must be spelled out:
            # Triton 3.6 defaults it to fp32 and rejects an int32 accumulator otherwise.
            # PROMOTE_K (fp8): Triton adds the tensor cores' partial sum into fp32 that often.
            acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype, max_num_imprecise_acc=PROMOTE_K)

        tile_out += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(tile_out, num_pid_m, num_pid_in_group, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if SPLIT:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            _store_tile(acc0, off_m, off_n, N, out_desc, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
                        W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)
            _store_tile(acc1, off_m, off_n + BLOCK_N // 2, N, out_desc, x_scale_ptr, w_scale_ptr, bias_ptr,
                        out_scale_ptr, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)
        else:
            _store_tile(acc, off_m, off_n, N, out_desc, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
                        W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------

def promotion_constexprs(flags: Dict, block_k: int) -> Dict:
    """`flags` with an fp8 problem's PROMOTE_K (products) capped at one K step: Triton promotes
    at most once a dot. (Promoting every few steps by the kernel's own loop was measured slower
    than both once a step and never: docs/benchmarks.md, session 40.)"""
    promote_k = flags.get("PROMOTE_K")
    return flags if promote_k is None else dict(flags, PROMOTE_K=min(promote_k, block_k))


def _programs(c: TmaConfig, device: torch.device) -> int:
    if INTERPRET:
        return _INTERPRETER_PROGRAMS
    return sm_count(device) * c.per_sm


def _call(c: TmaConfig, tensors: Tuple, m: int, n: int, k: int, flags: Dict) -> Tuple[Tuple, Dict, int]:
    """The kernel's positional args, keyword args and grid size for config `c`."""
    x2, w, xs, ws, b, os_, out = tensors
    bn_out = c.block_n // 2 if c.split else c.block_n
    x_desc = TensorDescriptor(x2, [m, k], [x2.stride(0), 1], [c.block_m, c.block_k])
    w_desc = TensorDescriptor(w, [n, k], [w.stride(0), 1], [c.block_n, c.block_k])
    out_desc = TensorDescriptor(out, [m, n], [out.stride(0), 1], [c.block_m, bn_out])
    programs = _programs(c, x2.device)
    args = (x_desc, w_desc, out_desc, xs, ws, b, os_, m, n, k)
    kwargs = dict(promotion_constexprs(flags, c.block_k),
                  BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
                  NUM_PROGRAMS=programs, FLATTEN=c.flatten, SPLIT=c.split, WARP_SPECIALIZE=c.warp_specialize,
                  num_stages=c.stages, num_warps=c.warps,
                  # fuse_fp=False keeps `a * s + bias` two roundings on the GPU (gemm.py's contract).
                  **prefill_launch_options(x2.device, fuse_fp=False))
    tiles = -(-m // c.block_m) * -(-n // c.block_n)
    return args, kwargs, min(programs, tiles)


def launch_config(c: TmaConfig, tensors: Tuple, m: int, n: int, k: int, flags: Dict) -> None:
    """Launch with config `c`: `tensors` = (x2 [M, K], w [N, K], x_scale, w_scale, bias or a
    placeholder, out_scale or a placeholder, out [M, N]); `flags` = the kernel's W_PER_CHANNEL,
    HAS_BIAS, OUT_MODE and OUT_PER_CHANNEL, plus `fp8_flags(...)` for e4m3 operands."""
    args, kwargs, grid = _call(c, tensors, m, n, k, flags)
    _gemm_tma_jit[(grid,)](*args, **kwargs)


def gpu_time_ms(fn) -> float:
    """GPU time of one call of `fn`, replayed from a CUDA graph: a prefill-sized kernel can take
    less time than its host launch, which plain event timing would measure instead."""
    # do_bench_cudagraph runs `fn` on a stream of its own, which does not wait for the caller's:
    # without this, the timed launches can run while earlier work on the caller's stream still
    # uses the memory `fn`'s output was just allocated from (seen: a reference computed before the
    # first call came out corrupted).
    torch.cuda.synchronize()
    try:
        fn()  # compiles if the parallel precompile did not
        return float(triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median"))
    except triton.runtime.errors.OutOfResources:
        return float("inf")  # e.g. a tile the device's shared memory cannot hold
    finally:
        torch.cuda.synchronize()


# (N, K, M bucket, out dtype, flags, device) -> the config timed fastest.
_TUNED: Dict[tuple, TmaConfig] = tuned_configs("gemm_tma")


def _tune(cands: List[TmaConfig], tensors: Tuple, m: int, n: int, k: int, flags: Dict) -> TmaConfig:
    if len(cands) == 1:
        return cands[0]
    calls = []
    for c in cands:
        args, kwargs, _ = _call(c, tensors, m, n, k, flags)
        calls.append((args, kwargs))
    precompile_calls(_gemm_tma_jit, calls)
    times = {c: gpu_time_ms(lambda c=c: launch_config(c, tensors, m, n, k, flags)) for c in cands}
    best = min(times, key=times.get)
    if times[best] == float("inf"):
        kind = "fp8_gemm" if flags.get("FP8") else "int8_gemm"
        raise RuntimeError(f"{kind}: no TMA config fits this device for N={n}, K={k}")
    return best


def launch(tensors: Tuple, m: int, n: int, k: int, m_bucket: int, flags: Dict,
           configs: Optional[List[TmaConfig]] = None) -> TmaConfig:
    """Launch the tuned kernel for this problem (tuning it on first sight); returns the config."""
    out = tensors[-1]
    key = (n, k, m_bucket, out.dtype, tuple(sorted(flags.items())), out.device)
    fp8, promote_k = bool(flags.get("FP8")), flags.get("PROMOTE_K")
    c = chosen_config(_TUNED, key, lambda: _tune(configs or candidates(n, k, out.element_size(), fp8, promote_k),
                                                  tensors, m, n, k, flags))
    launch_config(c, tensors, m, n, k, flags)
    return c
