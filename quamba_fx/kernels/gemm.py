"""W8A8 GEMM: int8 x int8 -> int32 accumulation with the dequantize / bias / requantize epilogue fused.

One entry point, `int8_gemm`, with the semantics and argument rules of `torch.ops.quamba.int8_linear`
(`quamba_fx/quant/qops.py`), which is also its reference (`int8_gemm_reference` calls it).

Numerics (the contract; int8_linear's docstring fixes it, restated here for the kernel)
----------------------------------------------------------------------------------------
For each output element (m, n):

1. `acc = sum_k x_q[m, k] * w_q[n, k]` in int32. Exact whatever the summation order, since
   |acc| <= K * 2**14 < 2**31 for K <= MAX_INT8_LINEAR_K (checked).
2. `a = fp32(acc)`, round to nearest even (`cvt.rn.f32.s32` on the GPU).
3. `s = x_scale * w_scale[n]`, one fp32 multiply (w_scale per channel or per tensor).
4. `y = a * s`, then `y = y + bias[n]`: two roundings, not an FMA.
5. int8 output (`out_scale` given): `q = round_half_even(clamp(y / out_scale, -128, 127))` with
   the IEEE quotient. Otherwise `y` cast to `out_dtype` with round-to-nearest-even: fp32 as is,
   fp16 by the native conversion, bf16 by an integer rounding of the fp32 bits (the interpreter's
   own fp32 -> bf16 cast truncates, and its "rtne" mode rounds ties away from zero).
   Non-finite scales, NaN bias, and NaN results are outside the contract.

How the kernels (both share `gemm_epilogue.epilogue`) keep it bit for bit: steps 2-4 are single
fp32 operations, compiled with `enable_fp_fusion=False` so step 4 is not contracted into an FMA
(the GEMM itself is integer, so nothing else is affected). Step 5 does no division per value:
y and out_scale are first multiplied by the power of two that brings out_scale to [1, 2) (exact,
and the quotient is unchanged), then `rounding.quantize_rn` forms the quotient from the
reciprocal and one FMA correction (correctly rounded by Markstein's theorem), and rounds by the
1.5 * 2**23 float-bit trick. Under TRITON_INTERPRET=1 the FMA is emulated exactly, so the tests
there compare bit for bit, also at near-ties and extreme scales; on CUDA the tests allow one int8
step (the documented tolerance for our kernels) and benchmarks/gemm.py checks every output of the
Mamba shapes bit for bit.

Scales and bias are read from memory by the kernels, so updating a scale buffer in place changes
the next call without recompiling or re-tuning.

Design
------
Both operands are K-contiguous (x `[M, K]` rows, w in nn.Linear's `[N, K]` layout): Hopper's int8
wgmma only takes K-major operands, so the weight tile is loaded as `[BLOCK_N, BLOCK_K]` and handed
to `tl.dot` transposed, which Triton lowers to a K-major shared-memory view, not a shuffle. Tiles
are numbered in a GROUP_M-swizzled order so that programs running together share weight columns
in L2. Three kernels, chosen per call:

* prefill (M bucket >= `_TMA_MIN_M`) with 16-byte aligned row strides and bases: the persistent
  TMA kernel of gemm_tma.py (descriptors for x, w and the output, one program per SM walking
  tiles, the next tile's loads overlapping this tile's epilogue; see there), unless the pointer
  kernel timed faster on the problem's first call (both tuned, then compared by CUDA-graph
  replays; on an H200 the pointer kernel keeps out_proj at 2048 rows and x_proj / dt_proj at 2048
  are a tie).
* everything else (decode, short prompts, unaligned layouts): the pointer kernel here. Rows and
  columns past the edges are wrapped (`% M`, `% N`) instead of masked, so the main loop only masks
  K, and not at all when every split's K range is whole tiles (EVEN_K). Up to SKINNY_MAX_M rows the
  problem is bound by streaming the weight: one M tile holds every row (at 65-128 rows also two
  tiles of half the rows), and K may be split across SPLIT_K programs (`_skinny_family`), so that a
  decode GEMM with few output columns still keeps every SM loading (the last split to finish a tile
  sums the partials and runs the epilogue, in the same launch: split_k.py). Larger M takes
  wgmma-sized tiles, split over K too where its tiles leave SMs idle (`_large_family`: x_proj's 192
  columns, out_proj's last wave at 2048 rows). At one row (K and the addresses whole int32 words)
  the GEMV of gemv.py runs instead: CUDA cores, no tensor-core tile; at 2-64 rows, on the weights
  where it measured faster (`gemm_skinny.use_for`), the kernel of gemm_skinny.py, whose MMA takes
  the weight rows on its M side and the batch on its N side.
  Tiles are clipped to the problem (BLOCK_N <= next_pow2(N), BLOCK_K <= next_pow2(K), num_stages
  <= a split's K tiles).

Both tune per (N, K, M bucket), the bucket = next_power_of_2(M) capped at `_M_BUCKET_CAP`, and
record the winner: later calls launch the bare JIT function, skipping the autotuner's Python.
Measured speeds are in docs/benchmarks.md ("int8 GEMM").

Layouts: `x_q` is `[..., K]` with unit stride along K; leading dims that merge into one row stride
(e.g. `x[..., :rank]`, a slice of a wider row) are read in place, others are copied once. `w_q` is
read with its row stride (a copy only if its K stride is not 1). The output is a new contiguous
`[..., N]` tensor.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import AUTOTUNE_DO_BENCH
from .dispatch import INTERPRET as _INTERPRET
from .dispatch import INTERPRETER_WIDE_N, cdiv, launch_tuned, next_pow2, precompile, sm_count, tuned_configs
from .dispatch import graph_op
from .dispatch import use_triton as _use_triton
from . import gemm_skinny, gemm_tma, gemv, split_k
from .conv1d import _validate_update as _validate_conv_step
from .conv1d import _conv_params, as_out_scale, causal_conv1d_update_silu_int8
from .pdl import launch_options, wait_for_previous
from .gemm_epilogue import OUT_MODES as _OUT_MODES
from .gemm_epilogue import store_tile
from torch import Tensor

from ..quant import qops  # noqa: F401  (registers torch.ops.quamba.int8_linear, the reference)
from ..quant.qops import _check_linear, _linear_out_dtype

__all__ = ["ConvStep", "int8_gemm", "int8_gemm_conv_step", "int8_gemm_reference"]


# Tuning is per power-of-two bucket of M, not per exact M: prefill lengths vary per request and
# re-tuning each would dominate. The cap lets 8 x 2048-token prefill tune apart from 2048 tokens:
# on an H200 their best tiles differ (out_proj: 128x128 at 2048 rows, 128x256 at 16384).
_M_BUCKET_CAP = 16384

# From this M bucket on, problems TMA can address run the persistent kernel of gemm_tma.py.
_TMA_MIN_M = 256


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, bk: int, group_m: int, stages: int, warps: int, split_k: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SPLIT_K": split_k},
                         num_stages=stages, num_warps=warps)


def _config_sig(c: triton.Config) -> tuple:
    kw = c.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], c.num_stages, c.num_warps, kw["SPLIT_K"])


# Problems with at most this many rows (decode steps, short prompts) are bandwidth bound: one M
# tile covers every row, so each weight byte is read once (or two tiles share each weight tile
# through L2), and K may be split across programs (`_skinny_family`).
SKINNY_MAX_M = 128

# Shared memory one skinny config may use across its pipeline stages (the H100/H200 have 227 KiB a
# CTA); staying under it leaves room for two CTAs an SM with the smaller tiles.
_SKINNY_SMEM = 160 * 1024

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps). int8 tiles are 1 byte a value, so
# a 128x256x128 stage is 48 KiB of shared memory: 3-4 stages fit in the H100's 227 KiB.
_LARGE_CONFIGS = [  # prefill: compute bound, wgmma tiles
    (128, 256, 128, 8, 3, 8),
    (128, 256, 64, 8, 4, 8),
    (256, 128, 128, 8, 3, 8),
    (128, 128, 128, 8, 4, 8),
    (128, 128, 128, 8, 4, 4),
    (128, 128, 64, 8, 5, 4),
    (128, 64, 128, 8, 4, 4),
    (64, 128, 128, 8, 4, 4),
    (64, 64, 128, 8, 5, 4),
    # Short K (dt_proj: K = 48 / 160): few K steps, so the epilogue dominates; small stage counts
    # (see _prune_configs) let several CTAs share an SM and overlap one's epilogue with another's
    # loads, and 8 warps spread the epilogue's per-element work.
    (128, 128, 64, 8, 3, 8),
    (128, 128, 32, 8, 3, 4),
]


# From this M bucket on, the skinny family also has row tiles of half the bucket.
_SKINNY_HALF_ROWS_MIN_M = 128


def _skinny_family(m_bucket: int, n: int, k: int, sms: int) -> List[tuple]:
    """Configs for M <= SKINNY_MAX_M: one M tile, tiles clipped to the problem, and for each tile
    the K splits that bring the program count towards two per SM (a decode GEMM with few output
    columns, such as out_proj's 2560 or x_proj's 192, has fewer column tiles than SMs; split K,
    every SM streams its share of the weight).

    At 128 rows, also two row tiles of 64 (GROUP_M 2: the pair of one weight tile run side by
    side, so the second reads it from L2). There the activation, not the weight, is most of what
    an SM streams (128 rows against a 32-64 column weight tile each K step), and an SM streams
    about 65 GB/s: with them the autotuner made 2.8b's x_proj 1.34x and out_proj 1.06x faster at
    128 rows launched back to back on the H100, and the 1 x 128 prefill 7% faster
    (docs/benchmarks.md, session 47)."""
    cap_n = max(16, next_pow2(n))
    cap_k = max(32, next_pow2(k))
    rows = max(16, m_bucket)
    row_tiles = [rows] + ([m_bucket // 2] if m_bucket >= _SKINNY_HALF_ROWS_MIN_M else [])
    family = []
    for bm in row_tiles:
        group_m = rows // bm
        for bn in (32, 64, 128):
            for bk in (128, 256):
                bn_, bk_ = min(bn, cap_n), min(bk, cap_k)
                stage_bytes = (bm + bn_) * bk_
                k_tiles = cdiv(k, bk_)
                stages = max(2, min(4, k_tiles, _SKINNY_SMEM // stage_bytes))
                warps = 8 if bm * bn_ >= 128 * 128 else 4
                tiles = group_m * cdiv(n, bn_)
                # Splits until the programs fill the SMs twice; `_prune_configs` clips the stages
                # to each split's K steps.
                family += [(bm, bn_, bk_, group_m, stages, warps, split)
                           for split in split_k.split_counts(tiles, k_tiles, 2 * sms)]
    return family


# A prefill split keeps at least this many K steps: fewer, and the partial tiles' traffic and the
# final sum outweigh the SMs it brings in.
_MIN_SPLIT_STEPS = 4


def _wave_fill(programs: int, sms: int) -> float:
    """The share of SM time a grid of equal programs uses, one program an SM at a time."""
    return programs / (cdiv(programs, sms) * sms)


def _split_helps(tiles: int, split: int, sms: int) -> bool:
    """Whether K split `split` ways is worth timing for a tiling of `tiles` tiles: programs stay
    within four an SM, and either the tiles leave SMs idle and the splits reach every SM, or the
    splits fill the last wave better by at least 15 points."""
    programs = tiles * split
    if programs > 4 * sms:
        return False
    if tiles < sms:
        return programs >= sms
    return _wave_fill(programs, sms) >= _wave_fill(tiles, sms) + 0.15


def _large_family(m_bucket: int, n: int, k: int, sms: int) -> List[tuple]:
    """Configs for M > SKINNY_MAX_M: the wgmma tiles, and where a tiling leaves SMs idle also its
    K splits that help (`_split_helps`). x_proj at 2048 rows (N = 192, K = 5120) has at most 96
    tiles of 64 x 64 for 132 SMs, each a 40-step K loop: unsplit, a third of the SMs idle for all
    of it. out_proj at 2048 rows has 160 tiles of 128 x 256: two waves, the second 21% full."""
    cap_n = max(16, next_pow2(n))
    cap_k = max(32, next_pow2(k))
    family = []
    for bm, bn, bk, group_m, stages, warps in _LARGE_CONFIGS:
        tiles = cdiv(m_bucket, bm) * cdiv(n, min(bn, cap_n))
        k_tiles = cdiv(k, min(bk, cap_k))
        family += [(bm, bn, bk, group_m, stages, warps, split) for split in (1, 2, 4, 8)
                   if split == 1 or (_split_helps(tiles, split, sms) and k_tiles >= _MIN_SPLIT_STEPS * split)]
    return family


def _configs() -> List[triton.Config]:
    if _INTERPRET:
        # Small tiles keep the numpy blocks cheap, and test shapes still span several M, N and K
        # tiles (ragged edges, K tails, the GROUP_M swizzle's short last group, K split in two).
        # Model-sized problems take a wide tile: the interpreter pays per operation, not per
        # element. `_interpreter_pick` leaves one config per problem: no tuning.
        return [_cfg(16, 32, 32, 4, 1, 1), _cfg(16, 32, 32, 1, 1, 1, 2), _cfg(16, 128, 128, 1, 1, 1),
                _cfg(64, 64, 64, 4, 1, 1)]
    return [_cfg(*c) for c in _LARGE_CONFIGS]


def _prune_configs(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    """The config family for this M bucket, each tile clipped to the problem, duplicates dropped.

    `configs` is ignored: Triton's early_config_prune hook may return new configs, and the skinny
    family depends on the problem.
    """
    m_bucket, n, k = named_args["M_BUCKET"], named_args["N"], named_args["K"]
    if m_bucket <= SKINNY_MAX_M:
        family = _skinny_family(m_bucket, n, k, sm_count())
    else:
        family = _large_family(m_bucket, n, k, sm_count())
    # tl.dot needs every dim >= 16, and int8 MMA steps K by 32.
    cap_n = max(16, next_pow2(n))
    cap_k = max(32, next_pow2(k))
    out, seen = [], set()
    for bm, bn, bk, group_m, stages, warps, split in family:
        bn, bk = min(bn, cap_n), min(bk, cap_k)
        # More stages than K tiles only hold shared memory that could host another CTA.
        stages = max(2, min(stages, cdiv(cdiv(k, bk), split)))
        sig = (bm, bn, bk, group_m, stages, warps, split)
        if sig not in seen:
            seen.add(sig)
            out.append(_cfg(*sig))
    return out


def _even_k(k: int, meta: dict) -> bool:
    """Whether every split's K range is whole BLOCK_K tiles inside K (no K mask in the loop)."""
    return k % (meta["BLOCK_K"] * meta["SPLIT_K"]) == 0


# M changes with every prefill length: keep it (and its bucket, only an autotune key) out of the
# specialisation so a new M never recompiles. N, K and the strides stay specialised (% 16 lets
# the loads be 16-byte vectors).
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _int8_gemm_jit(
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr, partial_ptr, count_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_om,
    W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
    OUT_PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    # SPLIT_K consecutive programs share one output tile, each summing one range of K tiles.
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid = pid // SPLIT_K
    # Flat grid in GROUP_M-swizzled order: GROUP_M row tiles sweep all column tiles together, so
    # a weight tile loaded into L2 serves GROUP_M programs that run at about the same time.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_first = pid_k * k_tiles * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k_first + tl.arange(0, BLOCK_K)
    # Rows past M and columns past N wrap onto valid ones (their results are never stored), so
    # the loads need no M / N masks; row offsets in int64 (M * stride may pass 2**31).
    rows = (offs_m % M).to(tl.int64)
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]

    wait_for_previous(USE_PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, k_tiles):
        a, b = split_k.load_k_step(x_ptrs, w_ptrs, offs_k, K, kt, EVEN_K)
        # b is [BLOCK_N, BLOCK_K], K-contiguous: the transposed view keeps both dot operands
        # K-major, the only int8 layout Hopper's wgmma accepts. out_dtype must be spelled out:
        # Triton 3.6 defaults it to fp32 and rejects an int32 accumulator otherwise.
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT_K == 1:
        store_tile(acc, offs_m, offs_n, cols, M, N, stride_om, x_scale_ptr, w_scale_ptr, bias_ptr,
                   out_scale_ptr, out_ptr, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)
    elif split_k.arrive(acc, partial_ptr, count_ptr, pid_m * num_pid_n + pid_n, pid_k, SPLIT_K, BLOCK_M, BLOCK_N):
        # The last split to finish this tile: every split's partial is in, sum them and store.
        acc = split_k.total(partial_ptr, count_ptr, pid_m * num_pid_n + pid_n, SPLIT_K, BLOCK_M, BLOCK_N)
        store_tile(acc, offs_m, offs_n, cols, M, N, stride_om, x_scale_ptr, w_scale_ptr, bias_ptr,
                   out_scale_ptr, out_ptr, W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)


# Problems another kernel could run, the TMA kernel (prefill) or the GEMV (a few rows): ("tma" or
# "gemv", problem key) -> whether it beat the tuned pointer kernel. The TMA kernel mostly does,
# not e.g. on out_proj at 2048 rows on an H200.
_USES_ALTERNATIVE: dict = {}


def _alternative_is_faster(alternative, pointer) -> bool:
    """Tune both kernels (each call tunes on first sight) and compare their GPU times. Under the
    interpreter there is nothing to time: the alternative, which the tests are there to check. An
    alternative that fails to compile or run on this device is not chosen (with a warning): the
    pointer kernel runs every problem."""
    if _INTERPRET:
        return True
    try:
        alternative_ms = gemm_tma.gpu_time_ms(alternative)
    except Exception as exc:  # noqa: BLE001 - reported, and the pointer kernel is always there
        _warn_alternative_failed(alternative, exc)
        return False
    return alternative_ms <= gemm_tma.gpu_time_ms(pointer)


def _alternative_runs(alternative) -> bool:
    """Launch `alternative` once; False (with a warning) if it fails to compile or run here."""
    try:
        alternative()
    except Exception as exc:  # noqa: BLE001 - reported, and the pointer kernel is always there
        _warn_alternative_failed(alternative, exc)
        return False
    return True


def _warn_alternative_failed(alternative, exc: Exception) -> None:
    warnings.warn(f"quamba_fx: int8_gemm's {getattr(alternative, '__name__', 'alternative')} failed on this "
                  f"device ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                  "using the pointer kernel for this problem", RuntimeWarning, stacklevel=4)


def _ran_alternative(kind: str, key: tuple, alternative, pointer, timed: bool = True) -> bool:
    """Launch `alternative` if it runs this problem and say whether it did; if not, the caller
    launches `pointer`. On first sight the choice is made and recorded: timed against `pointer`,
    or untimed, whether the alternative runs at all. An untimed first launch is this call's own,
    not a trial to be repeated."""
    chosen = _USES_ALTERNATIVE.get((kind, key))
    if chosen is None:
        if not timed and not _INTERPRET:
            chosen = _USES_ALTERNATIVE[(kind, key)] = _alternative_runs(alternative)
            return chosen
        chosen = _USES_ALTERNATIVE[(kind, key)] = _alternative_is_faster(alternative, pointer)
    if chosen:
        alternative()
    return chosen


def _interpreter_pick(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    m_bucket, n, k = named_args["M_BUCKET"], named_args["N"], named_args["K"]
    if min(m_bucket, n, k) >= 128:
        want = (64, 64, 1)
    elif n >= INTERPRETER_WIDE_N:
        want = (16, 128, 1)  # a model's projection on a few rows (see gemv._config)
    else:
        # Skinny problems with three or more K tiles split K in two (a ragged last split included),
        # so the split-K path runs under the interpreter on most test shapes.
        want = (16, 32, 2 if m_bucket <= SKINNY_MAX_M and k > 64 else 1)
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]) == want] or configs


_prune = _interpreter_pick if _INTERPRET else _prune_configs

# The tuned entry: picks a config per (N, K, M bucket, tensor dtypes), then EVEN_K from it.
_int8_gemm_kernel = triton.autotune(
    configs=_configs(), key=["N", "K", "M_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=AUTOTUNE_DO_BENCH,
)(triton.heuristics({"EVEN_K": lambda args: _even_k(args["K"], args)})(_int8_gemm_jit))

# Launch fast path: once the autotuner has chosen a config for a problem, later calls launch the
# bare JIT function with it, skipping the autotuner's and heuristics' per-call Python (about 25 us
# of a 70 us call in a cProfile on an H200 host, Triton 3.6; decode launches are host-bound).
# Keyed by everything that selects a config or a compiled variant.
_TUNED: dict = tuned_configs("gemm")


def _launch(grid, args: tuple, key: tuple, m: int, n: int, k: int, **flags) -> None:
    """Launch the pointer kernel on `args` (all but the split-K scratch, which is added here)."""
    launch_tuned(_TUNED, key, _autotune, _launch_config, grid, args, m, n, k, flags)


def _launch_config(meta: dict, grid, args: tuple, m: int, n: int, k: int, flags: dict) -> None:
    head, tail = args[:7], args[7:]
    scratch = (split_k.scratch(args[0].device, *split_k.scratch_need(m, n, (meta,))) if meta["SPLIT_K"] > 1
               else (args[2], args[2]))
    _int8_gemm_jit[grid](*head, *scratch, *tail, **flags, **meta, EVEN_K=_even_k(k, meta))


def _autotune(grid, args: tuple, m: int, n: int, k: int, flags: dict) -> Optional[dict]:
    head, tail = args[:7], args[7:]
    named = dict(zip(_int8_gemm_jit.arg_names, head + (None, None) + tail))
    candidates = [c.all_kwargs() for c in _prune(_int8_gemm_kernel.configs, named)]
    full = head + split_k.scratch(args[0].device, *split_k.scratch_need(m, n, candidates)) + tail
    precompile(_int8_gemm_jit, full, ({**flags, **c, "EVEN_K": _even_k(k, c)} for c in candidates))
    _int8_gemm_kernel[grid](*full, **flags)
    best = getattr(_int8_gemm_kernel, "best_config", None)
    return None if best is None else best.all_kwargs()


# ---------------------------------------------------------------------------------------------
# Validation and argument preparation
# ---------------------------------------------------------------------------------------------


def _check_types(x_q, x_scale, w_q, w_scale, bias, out_scale) -> None:
    # qops._check_linear assumes tensors; a Python float scale would fail there with an
    # AttributeError rather than a clear message.
    for name, t in (("x_q", x_q), ("x_scale", x_scale), ("w_q", w_q), ("w_scale", w_scale), ("bias", bias),
                    ("out_scale", out_scale)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"int8_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_devices(x_q, x_scale, w_q, w_scale, bias, out_scale) -> None:
    # The kernel dereferences every scale, so all must live on x_q's device (int8_linear would
    # accept a CPU scalar scale with CUDA activations; a kernel cannot).
    dev = x_q.device
    for name, t in (("x_scale", x_scale), ("w_q", w_q), ("w_scale", w_scale), ("bias", bias),
                    ("out_scale", out_scale)):
        if t is not None and t.device != dev:
            raise ValueError(f"int8_gemm: {name} is on {t.device} but x_q is on {dev}")


def _validate(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype) -> tuple:
    _check_types(x_q, x_scale, w_q, w_scale, bias, out_scale)
    n, k = _check_linear(x_q, x_scale, w_q, w_scale, bias, out_scale)
    dtype = _linear_out_dtype(out_scale, out_dtype)
    _check_devices(x_q, x_scale, w_q, w_scale, bias, out_scale)
    return n, k, dtype


def _as_rows(x_q: Tensor, m: int, k: int) -> Tensor:
    """`x_q [..., K]` as a 2-D `[M, K]` tensor with unit K stride, a view whenever one exists.

    `reshape` returns a view when the leading dims merge into one stride, which covers the
    contiguous case and slices of wider rows such as `x[..., :rank]` (row stride > K).
    """
    x2 = x_q.reshape(m, k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _f32_vector(t: Tensor) -> Tensor:
    """A scale / bias as fp32 with unit stride: itself in the usual case, else a fresh copy (made
    on every call, so in-place updates of the original still take effect)."""
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    if t.numel() > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def int8_gemm_reference(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    out_scale: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """The reference of `int8_gemm`: `torch.ops.quamba.int8_linear` with the same arguments."""
    return torch.ops.quamba.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)


def int8_gemm(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    out_scale: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """W8A8 linear layer: `x_q @ w_q.T` in int32, dequantized, biased and optionally requantized.

    Args:
        x_q: int8 `[..., K]`, unit stride along K (other strides free: `x[..., :rank]` is read in
            place; a layout whose leading dims do not merge into one row stride is copied).
        x_scale: per-tensor activation scale, a 0-dim or 1-element float tensor.
        w_q: int8 `[N, K]` (nn.Linear layout), unit stride along K.
        w_scale: float `[N]` (per output channel) or 1 element (per tensor).
        bias: float `[N]` or None.
        out_scale: float, 1 element or `[N]`: requantize to int8 with it; None for a float output.
        out_dtype: without `out_scale`, the float output dtype (default fp32); with it, None or
            int8.

    Returns:
        A new contiguous `[..., N]` tensor: int8 with `out_scale`, else `out_dtype`.

    Semantics, argument rules and error messages are those of `torch.ops.quamba.int8_linear`
    (ValueError on bad arguments), plus: every tensor must be on `x_q`'s device. CUDA tensors run
    the Triton kernel, as do CPU tensors under TRITON_INTERPRET=1 (bit-exact with the reference);
    other CPU tensors, and float output dtypes other than fp32 / fp16 / bf16, run the reference.
    Scales are read by the kernel at run time: in-place updates take effect on the next call.
    Non-fp32 scales or bias are converted (a small copy per call).
    """
    return _int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype, None)[0]


@dataclass(frozen=True)
class ConvStep:
    """A decode conv1d step fed by D int8 output columns of a GEMM from column `start` (Mamba-1's x
    half: 0; Mamba-2's xBC: after z) (`int8_gemm_conv_step`): `causal_conv1d_update_silu_int8(
    out[:, start:start + D], state, out_scale_of_the_gemm, weight, bias, out_scale)`.

    state: int8 `[M, D, W-1]`, advanced in place; weight: fp32 `[D, W]`; bias: fp32 `[D]` or None;
    out_scale: the conv output's fp32 scale, one element or one a channel (`[D]`).
    """

    state: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    out_scale: Tensor
    start: int = 0


def int8_gemm_conv_step(
    x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], out_scale: Tensor,
    conv: ConvStep,
) -> Tuple[Tensor, Tensor]:
    """`int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_scale)` (int8 out, one row per sequence) and
    the conv step of its `D = conv.state.shape[1]` columns from `conv.start`: returns `(out, u)`
    with u int8 `[M, D]`, and advances `conv.state`. A decode step's in_proj and conv1d.

    A one-row problem that the GEMV runs (batch-1 decode on the GPU) is one launch: the epilogue of
    each column tile does the conv step of its channels (`conv1d.conv_update_step`, the conv
    kernel's own arithmetic; on CUDA the GEMV is compiled without fp fusion, so where the conv
    kernel's `acc + w * x` contracts into an FMA this one rounds twice, as the reference does).
    Other problems run the GEMM, then the conv kernel: the step in the few-row GEMM's epilogue
    (2-64 rows) was tried twice and made decode 6-7% slower at batch 16 and 45% at batch 64 (its
    per-element loads on the MMA tile; docs/benchmarks.md, runs 8 and 14).
    """
    if not isinstance(conv, ConvStep):
        raise ValueError(f"conv must be a ConvStep, got {type(conv).__name__}")
    return _int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_scale, None, conv)


def _conv_after(out: Tensor, out_scale: Tensor, conv: ConvStep) -> Tensor:
    d = conv.state.shape[1]
    rows = out.reshape(-1, out.shape[-1])[:, conv.start:conv.start + d]
    return causal_conv1d_update_silu_int8(rows, conv.state, _f32_vector(out_scale).reshape(()), conv.weight,
                                          conv.bias, conv.out_scale)


def _check_conv_step(conv: ConvStep, out: Tensor, out_scale: Optional[Tensor]) -> None:
    if out.dtype != torch.int8 or out_scale is None or out_scale.numel() != 1:
        raise ValueError("a conv step needs the GEMM's int8 output with one per-tensor out_scale")
    state = conv.state
    if (not isinstance(state, Tensor) or state.dim() != 3 or state.shape[1] < 1
            or not 0 <= conv.start <= out.shape[-1] - state.shape[1]):
        raise ValueError(f"conv.state must be int8 [M, D, W-1] with start + D <= N = {out.shape[-1]}, got "
                         f"{tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__} "
                         f"from column {conv.start}")
    rows = out.reshape(-1, out.shape[-1])[:, conv.start:conv.start + state.shape[1]]
    _validate_conv_step(rows, state, _f32_vector(out_scale).reshape(()), conv.weight, conv.bias, conv.out_scale)


def _int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype, conv: Optional[ConvStep]):
    """int8_gemm's body: `(out, u)`, u the conv step's output when `conv` is given, else None."""
    n, k, dtype = _validate(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)
    out_mode = _OUT_MODES.get(dtype)
    lead = x_q.shape[:-1]
    m = math.prod(lead)
    # K == 0 (an all-zero accumulator) is left to the reference: empty operands may have null
    # data pointers, which a kernel launch can reject.
    if out_mode is None or k == 0 or not _use_triton(x_q) or m == 0 or n == 0:
        out = (int8_gemm_reference(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype) if m * n
               else torch.empty((*lead, n), dtype=dtype, device=x_q.device))
        if conv is None:
            return out, None
        _check_conv_step(conv, out, out_scale)
        return out, _conv_after(out, out_scale, conv)

    out = torch.empty((*lead, n), dtype=dtype, device=x_q.device)
    if conv is not None:
        _check_conv_step(conv, out, out_scale)

    x2 = _as_rows(x_q, m, k)
    w = w_q if k <= 1 or w_q.stride(1) == 1 else w_q.contiguous()
    xs = _f32_vector(x_scale)
    ws = _f32_vector(w_scale)
    b = _f32_vector(bias) if bias is not None else None
    os_ = _f32_vector(out_scale) if out_scale is not None else None
    m_bucket = min(next_pow2(m), _M_BUCKET_CAP)

    w_per_channel = ws.numel() > 1
    out_per_channel = os_ is not None and os_.numel() > 1
    flags = dict(W_PER_CHANNEL=w_per_channel, HAS_BIAS=b is not None, OUT_MODE=out_mode,
                 OUT_PER_CHANNEL=out_per_channel)
    # Unused pointers get a valid placeholder (x_scale): the kernels never read them.
    b_arg = b if b is not None else xs
    os_arg = os_ if os_ is not None else xs
    out2 = out.view(m, n)
    tensors = (x2, w, xs, ws, b_arg, os_arg, out2)
    key = (n, k, m_bucket, dtype, w_per_channel, b is not None, out_per_channel, x_q.device)

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_K"],)

    def pointer_kernel() -> None:
        _launch(
            grid,
            (x2, w, xs, ws, b_arg, os_arg, out, m, n, k, m_bucket, x2.stride(0), w.stride(0), n),
            key,
            m, n, k,
            **flags,
            # Keeps `a * s + bias` two roundings on the GPU (see the module docstring).
            **launch_options(x_q.device, fuse_fp=False),
        )

    if m_bucket >= _TMA_MIN_M and gemm_tma.supported(x2, w, out2):
        def tma_kernel() -> None:
            gemm_tma.launch(tensors, m, n, k, m_bucket, flags)

        if _ran_alternative("tma", key, tma_kernel, pointer_kernel):
            return out, None if conv is None else _conv_after(out, out_scale, conv)
    elif m <= gemv.GEMV_MAX_M and gemv.supported(x2, w):
        def gemv_kernel() -> None:
            gemv.launch(tensors, n, k, key, flags)

        if conv is not None:
            u = _gemv_conv_step(tensors, n, k, key, flags, conv)
            if u is not None:
                return out, u
        # Not timed: the graph-replayed timing keeps a one-row problem's weight in L2, unlike a
        # decode step; streamed from memory the GEMV was 1.3-1.7x faster than the pointer kernel
        # on every 2.8b projection (docs/benchmarks.md, session 20).
        if _ran_alternative("gemv", key, gemv_kernel, pointer_kernel, timed=False):
            return out, None if conv is None else _conv_after(out, out_scale, conv)
    elif gemm_skinny.MIN_M <= m <= gemm_skinny.MAX_M and gemm_skinny.use_for(m, n, k):
        def skinny_kernel() -> None:
            gemm_skinny.launch(tensors, m, n, k, key, flags)

        # Not timed, for the GEMV's reason (benchmarks/decode_gemm.py times it as a step runs it).
        if _ran_alternative("skinny", key, skinny_kernel, pointer_kernel, timed=False):
            return out, None if conv is None else _conv_after(out, out_scale, conv)
    pointer_kernel()
    return out, None if conv is None else _conv_after(out, out_scale, conv)


def fused_gemv_ran(kind: str, key: tuple, what: str, launch: Callable[[], object]) -> bool:
    """Run `launch()`, a GEMV with an epilogue of its own (`what`, for the warning), and say whether
    it ran: False, without trying, where it failed before on this problem (`kind`, `key`), and
    False with a warning, once a problem, when it fails to compile on this device, so that the
    caller runs the separate kernels. A failed launch fails before its kernel runs: no state is
    touched. Under the interpreter a failure is a bug and is raised."""
    if _USES_ALTERNATIVE.get((kind, key)) is False:
        return False
    try:
        launch()
    except Exception as exc:  # noqa: BLE001 - reported; the separate kernels run instead
        if (kind, key) in _USES_ALTERNATIVE or _INTERPRET:  # it ran before: a real error
            raise
        warnings.warn(f"quamba_fx: the GEMV with {what} failed on this device ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); running separate kernels instead",
                      RuntimeWarning, stacklevel=5)
        _USES_ALTERNATIVE[(kind, key)] = False
        return False
    _USES_ALTERNATIVE[(kind, key)] = True
    return True


def _gemv_conv_step(tensors: tuple, n: int, k: int, key: tuple, flags: dict, conv: ConvStep) -> Optional[Tensor]:
    """The GEMV with the conv step in its epilogue; None when it fails to compile here
    (`fused_gemv_ran`)."""
    u = torch.empty((1, conv.state.shape[1]), dtype=torch.int8, device=tensors[0].device)
    ran = fused_gemv_ran("gemv_conv", key, "a conv epilogue",
                         lambda: gemv.launch(tensors, n, k, key, flags,
                                             conv=(conv.state, conv.weight, conv.bias, conv.out_scale, u, conv.start)))
    return u if ran else None


# ---------------------------------------------------------------------------------------------
# Graph ops (torch.ops.quamba.*, see dispatch.graph_op)
# ---------------------------------------------------------------------------------------------


@graph_op("quamba::w8a8_linear", mutates_args=())
def w8a8_linear_op(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                   out_scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The int8 GEMM kernel with its scale epilogue; numerics of `torch.ops.quamba.int8_linear`."""
    return int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)


@w8a8_linear_op.register_fake
def _w8a8_linear_fake(x_q, x_scale, w_q, w_scale, bias=None, out_scale=None, out_dtype=None):
    return torch.ops.quamba.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)


@graph_op("quamba::in_proj_conv_update", mutates_args=("conv_state",))
def in_proj_conv_update_op(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                           out_scale: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                           conv_out_scale: Tensor, conv_state: Tensor, conv_start: int = 0) -> tuple[Tensor, Tensor]:
    """A decode step's in_proj and conv1d: `xz = w8a8_linear(x_q, .., out_scale)` (int8) and
    `conv1d_silu_int8_cached(xz.transpose(1, 2)[:, conv_start:conv_start + D], out_scale, conv_weight,
    conv_bias, conv_out_scale, conv_state, decode=True)`, D = conv_state.shape[1]; returns `(xz, u)`, u
    `[B, D, 1]` laid out `[B, 1, D]`. At batch 1 on the GPU one GEMV launch computes both
    (`int8_gemm_conv_step`).
    """
    w, b = _conv_params(conv_weight, conv_bias)
    xz, u = int8_gemm_conv_step(x_q, x_scale, w_q, w_scale, bias, out_scale,
                                ConvStep(conv_state, w, b, as_out_scale(conv_out_scale), conv_start))
    return xz, u[:, None, :].transpose(1, 2)


@in_proj_conv_update_op.register_fake
def _in_proj_conv_update_fake(x_q, x_scale, w_q, w_scale, bias, out_scale, conv_weight, conv_bias, conv_out_scale,
                              conv_state, conv_start=0):
    xz = torch.ops.quamba.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale, None)
    batch, channels = conv_state.shape[:2]
    return xz, x_q.new_empty((batch, 1, channels)).transpose(1, 2)
