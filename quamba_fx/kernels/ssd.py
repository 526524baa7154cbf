"""Mamba-2's scan (SSD) on Triton: the chunks computed in parallel, the state carried between them.

Semantics are those of `quamba_fx.ssd_reference.ssd_scan_reference` (the `quamba::ssd_scan` op):
per head h, `S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T` and `y_t = S_t C_t + D_h x_t`, with
`dt = clamp(softplus(dt + dt_bias), dt_min, dt_max)`; states and sums in fp32.

The sequence is cut into chunks of `chunk_size` steps (the model's, as the reference and mamba_ssm
do). With `cum` the running sum of `dt A` from a chunk's start, five launches:

1. `_chunk_dt_kernel`: dt discretised, and `cum`, per (batch, chunk, heads).
2. `_chunk_cb_kernel`: `C B^T` inside each chunk, per B/C group (heads of a group share it).
3. `_chunk_state_kernel`: the state each chunk adds on its own, `sum_s exp(cum_end - cum_s) dt_s x_s B_s^T`.
4. `_state_passing_kernel`: the only sequential part: walks the chunks, turning what each added into
   the state entering each chunk (in the products' dtype), and the final state. It moves `[P, N]`
   per chunk and head, a small fraction of the work.
5. `_chunk_scan_kernel`: `y_l = exp(cum_l) C_l S_in^T + sum_{s <= l} (C_l B_s) exp(cum_l - cum_s) dt_s x_s + D x_l`.

Launches 2, 3 and 5 are matrix products. Their operands are rounded to a chosen dtype: fp16/bf16
run on tensor cores with fp32 accumulation, as mamba_ssm's kernels do (a graph lowered to fp16
asks for fp16, the precision an fp16 model's scan reads); fp32 runs in IEEE fp32 and matches the
reference to fp32 rounding. A decode step is `ssd_state_update`, one launch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InputError
from ..ssd_reference import check_ssd_inputs, ssd_scan_reference
from .dispatch import INTERPRET, cdiv, fp_fusion, graph_op, next_pow2
from .dispatch import use_triton as _use_triton
from .rounding import int8_to_f32

__all__ = ["ssd_scan", "ssd_scan_cached_op", "ssd_scan_op", "ssd_state_update", "tiles"]


@triton.jit
def _widen(x, DTYPE: tl.constexpr):
    # x in DTYPE. int8 codes go through integer adds and a bitcast instead of I2F, which sm_90 runs
    # at a quarter of the integer rate: with 0x6400 the bits of fp16 1024.0 (an ulp of 1 up to
    # 2048), bits 0x6480 + x are the fp16 1152 + x for x in [-128, 127], and subtracting 1152 is
    # exact; fp32 the same from 2**23 (0x4B000000, ulp 1). bf16 (8 significant bits, too few
    # for the trick) rounds the exact fp32 value, exactly: the interpreter's int8 -> bf16 is wrong.
    # For DTYPE fp32 the final .to is a no-op, so one branch serves fp32 and bf16.
    if x.dtype == tl.int8 and DTYPE == tl.float16:
        return (x.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    elif x.dtype == tl.int8:
        return int8_to_f32(x).to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr, IEEE: tl.constexpr):
    # Operands in DOT: fp32 ones in IEEE fp32 (tf32 would lose the reference's precision), 16-bit
    # ones on tensor cores; fp32 accumulation either way.
    if IEEE:
        acc = tl.dot(_widen(a, DOT), _widen(b, DOT), acc, input_precision="ieee")
    else:
        acc = tl.dot(_widen(a, DOT), _widen(b, DOT), acc)
    return acc


@triton.jit
def _discretize(dt, dt_min, dt_max, SOFTPLUS: tl.constexpr, CLAMP_MAX: tl.constexpr):
    if SOFTPLUS:
        # torch's softplus: linear above 20. log(1 + e^x) is not log1p: below about -17 it gives
        # 0 where the reference gives e^x < 4e-8, a step that then adds almost nothing anyway.
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    dt = tl.maximum(dt, dt_min)
    if CLAMP_MAX:
        dt = tl.minimum(dt, dt_max)
    return dt


# Int8 inputs come with their scales in one fp32 tensor: dt's, then B's and C's per group (G
# each; a per-tensor scale repeated), then x's, one or per channel (heads x head_dim). These read
# them at their offsets:
@triton.jit
def _b_scale(scales_ptr, g):
    return tl.load(scales_ptr + 1 + g)


@triton.jit
def _c_scale(scales_ptr, g, G):
    return tl.load(scales_ptr + 1 + G + g)


@triton.jit
def _x_scale(scales_ptr, G, h, P, rp, p_ok, PER_CHANNEL_X: tl.constexpr):
    """x's scale: one value, or `[BLOCK_P]` for channels `rp` of head h."""
    if PER_CHANNEL_X:
        scale = tl.load(scales_ptr + 1 + 2 * G + h * P + rp, mask=p_ok, other=0.0)
    else:
        scale = tl.load(scales_ptr + 1 + 2 * G)
    return scale

# Each kernel takes the batch index as int64: the offsets of a long batch's tensors (8 x 65536 x
# 5120 elements of x) pass 2**31.


@triton.jit
def _unravel(tiles, heads, n_chunks):
    # The product kernels' one grid axis, tiles fastest, then heads (or groups), then chunks and
    # batch: a head's tiles re-read its chunk's x and state, and a group's heads its C, B and
    # C B^T, while those are still in L2. (Batch and chunks on the fastest axis and tiles on the
    # slowest, as before, put a head's tiles thousands of programs apart.)
    pid = tl.program_id(0)
    tile = pid % tiles
    rest = pid // tiles
    head = rest % heads
    rest = rest // heads
    return tile, head, (rest // n_chunks).to(tl.int64), rest % n_chunks


@triton.jit
def _chunk_dt_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, cum_ptr, scales_ptr,
    L, H, chunk, n_chunks, dt_min, dt_max, stride_dtb, stride_dtl,
    HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP_MAX: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rh = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    rq = tl.arange(0, BLOCK_Q)
    t = c * chunk + rq
    h_ok = rh < H
    q_ok = rq < chunk
    step_ok = q_ok & (t < L)
    dt = tl.load(dt_ptr + b * stride_dtb + t[None, :] * stride_dtl + rh[:, None],
                 mask=h_ok[:, None] & step_ok[None, :], other=0.0).to(tl.float32)
    if SCALED:
        dt *= tl.load(scales_ptr)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + rh, mask=h_ok, other=0.0).to(tl.float32)[:, None]
    dt = _discretize(dt, dt_min, dt_max, SOFTPLUS, CLAMP_MAX)
    # Steps past L (the last chunk's tail) neither decay nor add: cum stays at the last real step's.
    dt = tl.where(step_ok[None, :], dt, 0.0)
    a = tl.load(A_ptr + rh, mask=h_ok, other=0.0).to(tl.float32)
    cum = tl.cumsum(dt * a[:, None], axis=1)
    offsets = ((b * H + rh[:, None]) * n_chunks + c) * chunk + rq[None, :]
    out_ok = h_ok[:, None] & q_ok[None, :]
    tl.store(dt_out_ptr + offsets, dt, mask=out_ok)
    tl.store(cum_ptr + offsets, cum, mask=out_ok)


@triton.jit
def _chunk_cb_kernel(
    B_ptr, C_ptr, cb_ptr, scales_ptr,
    L, G, N, chunk, n_chunks,
    stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
    SCALED: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    s_tiles = tl.cdiv(chunk, BLOCK_S)
    tile, g, b, c = _unravel(tl.cdiv(chunk, BLOCK_M) * s_tiles, G, n_chunks)
    m = tile // s_tiles
    sb = tile % s_tiles
    if sb * BLOCK_S > m * BLOCK_M + BLOCK_M - 1:
        return  # every (l, s) of the tile has s > l: the scan masks them without reading
    rl = m * BLOCK_M + tl.arange(0, BLOCK_M)
    rs = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    rk = tl.arange(0, BLOCK_K)
    l_ok = (rl < chunk) & (c * chunk + rl < L)
    s_ok = (rs < chunk) & (c * chunk + rs < L)
    c_rows = C_ptr + b * stride_cb + (c * chunk + rl)[:, None] * stride_cl + g * stride_cg
    b_cols = B_ptr + b * stride_bb + (c * chunk + rs)[None, :] * stride_bl + g * stride_bg
    acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        k = k0 + rk
        cq = tl.load(c_rows + k[None, :], mask=l_ok[:, None] & (k < N)[None, :], other=0.0)
        bq = tl.load(b_cols + k[:, None], mask=(k < N)[:, None] & s_ok[None, :], other=0.0)
        acc = _dot(cq, bq, acc, DOT, IEEE)
    if SCALED:  # int8 codes are exact in any product dtype: the scales apply once, to the sums
        acc *= _c_scale(scales_ptr, g, G) * _b_scale(scales_ptr, g)
    offsets = ((b * n_chunks + c) * G + g) * chunk * chunk + rl[:, None] * chunk + rs[None, :]
    tl.store(cb_ptr + offsets, acc, mask=(rl < chunk)[:, None] & (rs < chunk)[None, :])


@triton.jit
def _chunk_state_kernel(
    x_ptr, B_ptr, dt_ptr, cum_ptr, states_ptr, scales_ptr,
    L, H, P, N, chunk, n_chunks, heads_per_group,
    stride_xb, stride_xl, stride_xh, stride_bb, stride_bl, stride_bg,
    SCALED: tl.constexpr, PER_CHANNEL_X: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile, h, b, c = _unravel(tl.cdiv(P, BLOCK_P) * n_tiles, H, n_chunks)
    g = h // heads_per_group
    rp = (tile // n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = (tile % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_S)
    p_ok = rp < P
    n_ok = rn < N
    dt_row = ((b * H + h) * n_chunks + c) * chunk
    end = tl.load(cum_ptr + dt_row + chunk - 1)
    x_base = x_ptr + b * stride_xb + h * stride_xh
    b_base = B_ptr + b * stride_bb + g * stride_bg
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, chunk, BLOCK_S):
        s = s0 + rs
        t = c * chunk + s
        s_ok = (s < chunk) & (t < L)
        cum = tl.load(cum_ptr + dt_row + s, mask=s < chunk, other=0.0)
        dt = tl.load(dt_ptr + dt_row + s, mask=s < chunk, other=0.0)
        # What step s adds, decayed to the chunk's end (<= 1: cum only falls as A < 0 and dt >= 0).
        weight = tl.where(s_ok, dt * tl.exp(end - cum), 0.0)
        xt = tl.load(x_base + t[None, :] * stride_xl + rp[:, None], mask=p_ok[:, None] & s_ok[None, :], other=0.0)
        bq = tl.load(b_base + t[:, None] * stride_bl + rn[None, :], mask=s_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(xt, _widen(bq, tl.float32) * weight[:, None], acc, DOT, IEEE)
    if SCALED:  # x's channels are rows of the tile: its scales apply to the sums too
        x_scale = _x_scale(scales_ptr, H // heads_per_group, h, P, rp, p_ok, PER_CHANNEL_X)
        if PER_CHANNEL_X:
            x_scale = x_scale[:, None]
        acc *= x_scale * _b_scale(scales_ptr, g)
    offsets = (((b * n_chunks + c) * H + h) * P + rp[:, None]) * N + rn[None, :]
    tl.store(states_ptr + offsets, acc, mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def _state_passing_kernel(
    states_ptr, cum_ptr, state_in_ptr, entering_ptr, state_out_ptr,
    H, PN, chunk, n_chunks,
    HAS_STATE_IN: tl.constexpr, HAS_STATE_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < PN
    if HAS_STATE_IN:
        state = tl.load(state_in_ptr + (b * H + h) * PN + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, n_chunks):
        slot = ((b * n_chunks + c) * H + h) * PN + offs
        added = tl.load(states_ptr + slot, mask=ok, other=0.0)
        # The state entering chunk c, in the scan's product dtype (the scan rounds it to that
        # anyway): 16-bit halves what the scan reads. entering may be states itself (fp32).
        tl.store(entering_ptr + slot, state.to(entering_ptr.dtype.element_ty), mask=ok)
        decay = tl.exp(tl.load(cum_ptr + ((b * H + h) * n_chunks + c) * chunk + chunk - 1))
        state = state * decay + added
    if HAS_STATE_OUT:
        tl.store(state_out_ptr + (b * H + h) * PN + offs, state, mask=ok)


@triton.jit
def _chunk_scan_kernel(
    x_ptr, C_ptr, cb_ptr, dt_ptr, cum_ptr, entering_ptr, D_ptr, y_ptr, scales_ptr,
    L, H, P, N, G, chunk, n_chunks, heads_per_group,
    stride_xb, stride_xl, stride_xh, stride_cb, stride_cl, stride_cg, stride_yb, stride_yl, stride_yh,
    HAS_D: tl.constexpr, SCALED: tl.constexpr, PER_CHANNEL_X: tl.constexpr, DOT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    p_tiles = tl.cdiv(P, BLOCK_P)
    tile, h, b, c = _unravel(tl.cdiv(chunk, BLOCK_M) * p_tiles, H, n_chunks)
    g = h // heads_per_group
    m = tile // p_tiles
    rl = m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = (tile % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    rk = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_S)
    t_l = c * chunk + rl
    l_in = rl < chunk
    l_ok = l_in & (t_l < L)
    p_ok = rp < P
    dt_row = ((b * H + h) * n_chunks + c) * chunk
    cum_l = tl.load(cum_ptr + dt_row + rl, mask=l_in, other=0.0)
    x_base = x_ptr + b * stride_xb + h * stride_xh

    # The chunk's own steps s <= l, through the decayed C B^T, first; the state's part is then
    # added into the same accumulator. A per-tensor x scale multiplies their sums. Per-channel
    # ones (columns of the tile) scale each x tile before its product instead: applied to the sums
    # they cost a second accumulator (196 registers a thread, sm_90), or a [1, BLOCK_P] vector
    # whose loads stalled the epilogue (0.57 ms against 0.45 per tensor, mamba2-2.7b at 8 x 2048
    # on an H100); scaled tiles take 0.50 ms (docs/benchmarks.md, session 41). The scaled x is
    # rounded to the product dtype.
    if PER_CHANNEL_X:
        x_scale = _x_scale(scales_ptr, G, h, P, rp, p_ok, PER_CHANNEL_X)[None, :]
    cb_rows = cb_ptr + ((b * n_chunks + c) * G + g) * chunk * chunk + rl[:, None] * chunk
    s_end = tl.minimum((m + 1) * BLOCK_M, chunk)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for s0 in range(0, s_end, BLOCK_S):
        s = s0 + rs
        s_in = s < chunk
        cum_s = tl.load(cum_ptr + dt_row + s, mask=s_in, other=0.0)
        dt_s = tl.load(dt_ptr + dt_row + s, mask=s_in, other=0.0)
        # The load's mask is constant along s in runs of 16 (vector loads); a causal one varies
        # at every s, which made every load scalar. Entries s > l (C B^T may never have written
        # them) are dropped by the where; min(., 0) keeps their exp finite (cum only falls).
        cb = tl.load(cb_rows + s[None, :], mask=l_in[:, None] & s_in[None, :], other=0.0)
        decay = tl.exp(tl.minimum(cum_l[:, None] - cum_s[None, :], 0.0))
        weights = tl.where(rl[:, None] >= s[None, :], cb * decay * dt_s[None, :], 0.0)
        xs = tl.load(x_base + (c * chunk + s)[:, None] * stride_xl + rp[None, :],
                     mask=(s_in & (c * chunk + s < L))[:, None] & p_ok[None, :], other=0.0)
        if PER_CHANNEL_X:
            xs = _widen(xs, tl.float32) * x_scale
        acc = _dot(weights, xs, acc, DOT, IEEE)
    if SCALED:
        if not PER_CHANNEL_X:
            x_scale = _x_scale(scales_ptr, G, h, P, rp, p_ok, PER_CHANNEL_X)
            acc *= x_scale
        c_scale = _c_scale(scales_ptr, g, G)
    else:
        x_scale = 1.0
        c_scale = 1.0

    # The state entering the chunk, read through C with each step's decay (and C's scale) on its
    # rows before the product, so that it adds into acc.
    row_scale = (tl.exp(cum_l) * c_scale)[:, None]
    c_rows = C_ptr + b * stride_cb + t_l[:, None] * stride_cl + g * stride_cg
    state = entering_ptr + (((b * n_chunks + c) * H + h) * P + rp[None, :]) * N
    for k0 in range(0, N, BLOCK_K):
        k = k0 + rk
        cq = tl.load(c_rows + k[None, :], mask=l_ok[:, None] & (k < N)[None, :], other=0.0)
        st = tl.load(state + k[:, None], mask=(k < N)[:, None] & p_ok[None, :], other=0.0)
        acc = _dot(_widen(cq, tl.float32) * row_scale, st, acc, DOT, IEEE)

    if HAS_D:
        x_l = tl.load(x_base + t_l[:, None] * stride_xl + rp[None, :], mask=l_ok[:, None] & p_ok[None, :], other=0.0)
        acc += _widen(x_l, tl.float32) * (x_scale * tl.load(D_ptr + h).to(tl.float32))
    y = y_ptr + b * stride_yb + t_l[:, None] * stride_yl + h * stride_yh + rp[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=l_ok[:, None] & p_ok[None, :])


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr, scales_ptr,
    L, H, P, N, heads_per_group, dt_min, dt_max,
    stride_xb, stride_xl, stride_xh, stride_dtb, stride_dtl, stride_bb, stride_bl, stride_bg,
    stride_cb, stride_cl, stride_cg, stride_yb, stride_yl, stride_yh,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP_MAX: tl.constexpr,
    SCALED: tl.constexpr, PER_CHANNEL_X: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    g = h // heads_per_group
    rp = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    p_ok = rp < P
    n_ok = rn < N
    cells = state_ptr + ((b * H + h) * P + rp[:, None]) * N + rn[None, :]
    cell_ok = p_ok[:, None] & n_ok[None, :]
    state = tl.load(cells, mask=cell_ok, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + h).to(tl.float32)
    bias = tl.load(dt_bias_ptr + h).to(tl.float32) if HAS_DT_BIAS else 0.0
    d = tl.load(D_ptr + h).to(tl.float32) if HAS_D else 0.0
    G = H // heads_per_group
    s_x = _x_scale(scales_ptr, G, h, P, rp, p_ok, PER_CHANNEL_X) if SCALED else 1.0
    s_dt = tl.load(scales_ptr) if SCALED else 1.0
    s_b = _b_scale(scales_ptr, g) if SCALED else 1.0
    s_c = _c_scale(scales_ptr, g, G) if SCALED else 1.0
    for t in range(0, L):  # a decode step is one token; a few more run the same recurrence
        dt = _discretize(tl.load(dt_ptr + b * stride_dtb + t * stride_dtl + h).to(tl.float32) * s_dt + bias,
                         dt_min, dt_max, SOFTPLUS, CLAMP_MAX)
        x = tl.load(x_ptr + b * stride_xb + t * stride_xl + h * stride_xh + rp, mask=p_ok, other=0.0).to(tl.float32)
        x *= s_x
        bv = tl.load(B_ptr + b * stride_bb + t * stride_bl + g * stride_bg + rn, mask=n_ok, other=0.0).to(tl.float32)
        bv *= s_b
        cv = tl.load(C_ptr + b * stride_cb + t * stride_cl + g * stride_cg + rn, mask=n_ok, other=0.0).to(tl.float32)
        cv *= s_c
        state = state * tl.exp(dt * a) + (dt * x)[:, None] * bv[None, :]
        y = tl.sum(state * cv[None, :], axis=1)
        if HAS_D:
            y += d * x
        tl.store(y_ptr + b * stride_yb + t * stride_yl + h * stride_yh + rp, y.to(y_ptr.dtype.element_ty), mask=p_ok)
    tl.store(cells, state.to(state_ptr.dtype.element_ty), mask=cell_ok)


_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_float(fn: str, name: str, dtype: torch.dtype) -> None:
    if dtype not in _DOT_DTYPES:
        raise InputError(f"{fn}: {name} must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")


def _stacked_scales(x: Tensor, dt: Tensor, B: Tensor, C: Tensor,
                    input_scales: Optional[tuple[Tensor, Tensor, Tensor, Tensor]]) -> tuple[Optional[Tensor], bool]:
    """The scales as one fp32 tensor (the kernels' `scales_ptr`: dt's, B's and C's per group, x's)
    and whether x's are one a channel (the kernels' PER_CHANNEL_X), after checking that int8
    inputs come with them and float inputs without. x's scale is per tensor or per channel
    (`[heads, head_dim]` or flat), B's and C's per tensor or per group (`[groups]`: a per-channel
    one along the state would not factor out of `C B^T`), dt's per tensor."""
    int8 = [t.dtype == torch.int8 for t in (x, dt, B, C)]
    if input_scales is None:
        if any(int8):
            raise InputError("ssd_scan: int8 x, dt, B, C need their input_scales (x, dt, B, C)")
        return None, False
    if not all(int8) or len(input_scales) != 4:
        raise InputError("ssd_scan: input_scales are four scales, for int8 x, dt, B and C")
    x_scale, dt_scale, B_scale, C_scale = input_scales
    heads, head_dim, groups = x.shape[-2], x.shape[-1], B.shape[-2]
    for name, scale, per, count in (("x", x_scale, "channel", heads * head_dim), ("dt", dt_scale, None, 1),
                                    ("B", B_scale, "group", groups), ("C", C_scale, "group", groups)):
        if scale.numel() not in (1, count):
            allowed = "one value" + (f" or one per {per} ({count})" if per else "")
            raise InputError(f"ssd_scan: {name}'s scale must be {allowed}, got shape {list(scale.shape)}")
    per_group = [s.reshape(-1).float().expand(groups) for s in (B_scale, C_scale)]
    stacked = torch.cat([dt_scale.reshape(1).float(), *per_group, x_scale.reshape(-1).float()])
    return stacked, x_scale.numel() > 1


def _dequantized(x: Tensor, dt: Tensor, B: Tensor, C: Tensor,
                 input_scales: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`q.float() * scale` of each input, each scale broadcast along its channels."""
    x_scale, dt_scale, B_scale, C_scale = (s.float() for s in input_scales)
    heads, head_dim = x.shape[-2:]
    x_scale = x_scale.reshape(heads, head_dim) if x_scale.numel() > 1 else x_scale.reshape(())
    B_scale, C_scale = (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()) for s in (B_scale, C_scale))
    return x.float() * x_scale, dt.float() * dt_scale.reshape(()), B.float() * B_scale, C.float() * C_scale


def _block(n: int, cap: int) -> int:
    # tl.dot needs every tile dim >= 16; masks cover the rest.
    return max(16, min(cap, next_pow2(n)))


# The product kernels' launch settings: tile caps (BLOCK_*), warps and pipeline stages. `tiles`
# sizes each launch's blocks from them; benchmarks/ssd.py --launch sweeps them on a GPU.
LAUNCH: dict[str, dict[str, int]] = {
    "cb": dict(BLOCK_M=64, BLOCK_S=64, BLOCK_K=64, num_warps=4, num_stages=2),
    "state": dict(BLOCK_P=64, BLOCK_N=64, BLOCK_S=64, num_warps=4, num_stages=2),
    # docs/benchmarks.md (session 32) has the sweeps that chose these.
    "scan": dict(BLOCK_M=64, BLOCK_P=64, BLOCK_K=64, BLOCK_S=32, num_warps=4, num_stages=1),
}
# Which problem dim each block tiles: M and S the chunk's steps, P head_dim, N and K the state.
_TILED_DIM = {"BLOCK_M": "chunk", "BLOCK_S": "chunk", "BLOCK_P": "head_dim", "BLOCK_N": "state", "BLOCK_K": "state"}
# IEEE fp32 operands take twice the registers of 16-bit ones: 64-wide tiles spilled in offline
# sm_90 builds, 32 did not.
_IEEE_CAP = 32


def tiles(chunk: int, head_dim: int, state: int, ieee: bool = False) -> dict[str, dict[str, int]]:
    """Each product kernel's launch keywords ("cb", "state", "scan") for a chunk length, head_dim
    and state size: `LAUNCH`'s settings with every block the tiled dim's next power of two, capped
    by `LAUNCH` (and at 32 for IEEE fp32 products), 16 at least (tl.dot's minimum)."""
    dims = {"chunk": chunk, "head_dim": head_dim, "state": state}
    launches = {}
    for kernel, settings in LAUNCH.items():
        launch = dict(settings)
        for key in settings:
            if key.startswith("BLOCK_"):
                cap = min(settings[key], _IEEE_CAP) if ieee else settings[key]
                launch[key] = _block(dims[_TILED_DIM[key]], cap)
        launches[kernel] = launch
    return launches


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
             dt_bias: Optional[Tensor] = None, dt_softplus: bool = True, dt_min: float = 0.0,
             dt_max: float = math.inf, chunk_size: int = 256, initial_state: Optional[Tensor] = None,
             return_final_state: bool = False, product_dtype: Optional[torch.dtype] = None,
             input_scales: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
             out_dtype: torch.dtype = torch.float32) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2's scan on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1), else the reference.

    Arguments and layouts as `quamba_fx.ssd_reference.ssd_scan_reference`, which also validates them.
    `x`, `B` and `C` may be strided views (in_proj's and the conv's outputs) with unit stride in their
    last dim. With `input_scales` (the scales of x, dt, B and C: x's per tensor or per channel, B's
    and C's per tensor or per group, dt's per tensor), x, dt, B and C are int8 codes, dequantized
    as `q.float() * scale` inside the kernels. The matrix products' operands are
    rounded to `product_dtype` (default: x's dtype, fp32 for int8 codes): fp16/bf16 run on tensor
    cores, fp32 in IEEE fp32; sums and the carried state stay fp32. Returns y `[batch, L, heads,
    head_dim]` in `out_dtype` (fp32, fp16 or bf16: the sums rounded once), and with
    `return_final_state` also the fp32 state `[batch, heads, head_dim, state]`.
    """
    scales, per_channel_x = _stacked_scales(x, dt, B, C, input_scales)
    product_dtype = (torch.float32 if scales is not None else x.dtype) if product_dtype is None else product_dtype
    _check_float("ssd_scan", "product_dtype", product_dtype)
    _check_float("ssd_scan", "out_dtype", out_dtype)
    if scales is not None and not _use_triton(x):
        x, dt, B, C = _dequantized(x, dt, B, C, input_scales)
    if not _use_triton(x) or x.numel() == 0 or B.numel() == 0:
        y, final = ssd_scan_reference(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size,
                                      initial_state=initial_state)
        y = y.to(out_dtype)
        return (y, final) if return_final_state else y
    check_ssd_inputs(x, dt, A, B, C, D, dt_bias, chunk_size)
    if INTERPRET and not x.is_cuda and product_dtype == torch.bfloat16:
        # The interpreter's bf16 tl.dot returns garbage (a 16 x 16 product is off by 1e10).
        product_dtype = torch.float32
    batch, length, heads, head_dim = x.shape
    groups, state = B.shape[2], B.shape[3]
    x, B, C, dt = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C, dt))
    ieee = product_dtype == torch.float32
    chunk = min(chunk_size, length)  # a chunk longer than the sequence is the sequence
    n_chunks = cdiv(length, chunk)
    f32 = dict(dtype=torch.float32, device=x.device)
    dt_out = torch.empty((batch, heads, n_chunks, chunk), **f32)
    cum = torch.empty((batch, heads, n_chunks, chunk), **f32)
    cb_products = torch.empty((batch, n_chunks, groups, chunk, chunk), **f32)
    states = torch.empty((batch, n_chunks, heads, head_dim, state), **f32)
    # The states entering each chunk: in place of what each chunk adds when the products are fp32.
    entering = states if ieee else torch.empty_like(states, dtype=product_dtype)
    y = torch.empty((batch, length, heads, head_dim), dtype=out_dtype, device=x.device)
    final = torch.empty((batch, heads, head_dim, state), **f32) if return_final_state else None
    start = None if initial_state is None else initial_state.float().contiguous()
    launch = tiles(chunk, head_dim, state, ieee)
    scaled = scales is not None
    scales = scales if scaled else cum  # a dummy pointer when unscaled, never read
    products = dict(SCALED=scaled, DOT=_DOT_DTYPES[product_dtype], IEEE=ieee, **fp_fusion())

    block_h = min(16, next_pow2(heads))
    _chunk_dt_kernel[(batch, n_chunks, cdiv(heads, block_h))](
        dt, A.float().contiguous(), dt_bias.float().contiguous() if dt_bias is not None else cum, dt_out, cum,
        scales, length, heads, chunk, n_chunks, float(dt_min), 0.0 if math.isinf(dt_max) else float(dt_max),
        dt.stride(0), dt.stride(1),
        HAS_DT_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), CLAMP_MAX=not math.isinf(dt_max), SCALED=scaled,
        BLOCK_H=block_h, BLOCK_Q=next_pow2(chunk), **fp_fusion(),
    )
    # The product kernels' one grid axis: tiles x heads (groups for C B^T) x chunks x batch.
    cb = launch["cb"]
    _chunk_cb_kernel[(cdiv(chunk, cb["BLOCK_M"]) * cdiv(chunk, cb["BLOCK_S"]) * groups
                      * batch * n_chunks,)](
        B, C, cb_products, scales, length, groups, state, chunk, n_chunks,
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2), **products, **cb,
    )
    st = launch["state"]
    _chunk_state_kernel[(cdiv(head_dim, st["BLOCK_P"]) * cdiv(state, st["BLOCK_N"]) * heads
                         * batch * n_chunks,)](
        x, B, dt_out, cum, states, scales, length, heads, head_dim, state, chunk, n_chunks, heads // groups,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2), PER_CHANNEL_X=per_channel_x,
        **products, **st,
    )
    pn = head_dim * state
    pass_block = min(1024, next_pow2(pn))
    _state_passing_kernel[(batch, heads, cdiv(pn, pass_block))](
        states, cum, start if start is not None else states, entering, final if final is not None else states,
        heads, pn, chunk, n_chunks,
        HAS_STATE_IN=start is not None, HAS_STATE_OUT=final is not None, BLOCK=pass_block, **fp_fusion(),
    )
    sc = launch["scan"]
    _chunk_scan_kernel[(cdiv(chunk, sc["BLOCK_M"]) * cdiv(head_dim, sc["BLOCK_P"]) * heads
                        * batch * n_chunks,)](
        x, C, cb_products, dt_out, cum, entering, D.float().contiguous() if D is not None else cum, y, scales,
        length, heads, head_dim, state, groups, chunk, n_chunks, heads // groups,
        x.stride(0), x.stride(1), x.stride(2), C.stride(0), C.stride(1), C.stride(2),
        y.stride(0), y.stride(1), y.stride(2), HAS_D=D is not None, PER_CHANNEL_X=per_channel_x, **products, **sc,
    )
    return (y, final) if return_final_state else y


def ssd_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     D: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = True,
                     dt_min: float = 0.0, dt_max: float = math.inf,
                     input_scales: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
                     out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Advance `state` (`[batch, heads, head_dim, state]`, contiguous, any float dtype; updated in
    place, rounded to its dtype once at the end) by the L steps of `x`, `dt`, `B`, `C` (layouts and
    `input_scales` as `ssd_scan`; a decode step has L = 1), one launch. Returns y `[batch, L,
    heads, head_dim]` in `out_dtype`.
    """
    _check_float("ssd_state_update", "out_dtype", out_dtype)
    scales, per_channel_x = _stacked_scales(x, dt, B, C, input_scales)
    if scales is not None and not _use_triton(x):
        x, dt, B, C = _dequantized(x, dt, B, C, input_scales)
    check_ssd_inputs(x, dt, A, B, C, D, dt_bias, 1)
    batch, length, heads, head_dim = x.shape
    n_states = B.shape[3]
    if tuple(state.shape) != (batch, heads, head_dim, n_states) or not state.is_contiguous():
        raise InputError(f"ssd_state_update: the state must be a contiguous [batch, heads, head_dim, state] = "
                         f"{[batch, heads, head_dim, n_states]}, got {list(state.shape)}")
    if not _use_triton(x) or x.numel() == 0:
        y, final = ssd_scan_reference(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, max(1, length),
                                      initial_state=state)
        state.copy_(final)
        return y.to(out_dtype)
    x, B, C, dt = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C, dt))
    y = torch.empty((batch, length, heads, head_dim), dtype=out_dtype, device=x.device)
    # 2048 state cells a program (16 a thread): a [64, 128] tile spilled in offline sm_90 builds,
    # and smaller tiles give a batch-1 step more programs than 80 heads alone.
    block_n = next_pow2(n_states)
    block_p = max(1, min(next_pow2(head_dim), 2048 // block_n))
    _state_update_kernel[(batch, heads, cdiv(head_dim, block_p))](
        state, x, dt, A.float().contiguous(), B, C, D.float().contiguous() if D is not None else y,
        dt_bias.float().contiguous() if dt_bias is not None else y, y, scales if scales is not None else y,
        length, heads, head_dim, n_states, heads // B.shape[2], float(dt_min),
        0.0 if math.isinf(dt_max) else float(dt_max),
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2), y.stride(0), y.stride(1), y.stride(2),
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        CLAMP_MAX=not math.isinf(dt_max), SCALED=scales is not None,
        PER_CHANNEL_X=per_channel_x, BLOCK_P=block_p, BLOCK_N=block_n, **fp_fusion(),
    )
    return y


# --- graph ops: what the lowering rule (passes/lowering/scan.py) puts in place of `quamba::ssd_scan` ---


def _scales_of(x_scale: Optional[Tensor], dt_scale: Optional[Tensor], B_scale: Optional[Tensor],
               C_scale: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor]]:
    scales = (x_scale, dt_scale, B_scale, C_scale)
    return None if all(s is None for s in scales) else scales


@graph_op("quamba::ssd_scan_triton")
def ssd_scan_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                dt_bias: Optional[Tensor], dt_softplus: bool, dt_min: float, dt_max: float,
                chunk_size: int, product_dtype: Optional[torch.dtype], x_scale: Optional[Tensor] = None,
                dt_scale: Optional[Tensor] = None, B_scale: Optional[Tensor] = None,
                C_scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """`quamba::ssd_scan` (its arguments and result) on this module's kernels, the matrix
    products' operands rounded to `product_dtype` (None: x's dtype), y in `out_dtype` (None:
    fp32, as the reference op's). With the four scales, x, dt, B and C are the int8 codes whose
    dequantize the kernels fold in."""
    return ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size, product_dtype=product_dtype,
                    input_scales=_scales_of(x_scale, dt_scale, B_scale, C_scale), out_dtype=out_dtype or torch.float32)


@ssd_scan_op.register_fake
def _ssd_scan_fake(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size, product_dtype,
                   x_scale=None, dt_scale=None, B_scale=None, C_scale=None, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or torch.float32)


@graph_op("quamba::ssd_scan_triton_cached", mutates_args=("ssm_state",))
def ssd_scan_cached_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       dt_bias: Optional[Tensor], dt_softplus: bool, dt_min: float, dt_max: float,
                       chunk_size: int, product_dtype: Optional[torch.dtype], x_scale: Optional[Tensor],
                       dt_scale: Optional[Tensor], B_scale: Optional[Tensor], C_scale: Optional[Tensor],
                       out_dtype: Optional[torch.dtype], ssm_state: Tensor, decode: bool) -> Tensor:
    """`ssd_scan_triton` with a cache: a prompt through the chunked scan, its final state into
    `ssm_state`; a decode step through `ssd_state_update`, in place."""
    scales = _scales_of(x_scale, dt_scale, B_scale, C_scale)
    out_dtype = out_dtype or torch.float32
    if decode:
        return ssd_state_update(ssm_state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, scales,
                                out_dtype=out_dtype)
    y, final = ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size, return_final_state=True,
                        product_dtype=product_dtype, input_scales=scales, out_dtype=out_dtype)
    ssm_state.copy_(final)
    return y


@ssd_scan_cached_op.register_fake
def _ssd_scan_cached_fake(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size, product_dtype,
                          x_scale, dt_scale, B_scale, C_scale, out_dtype, ssm_state, decode):
    return x.new_empty(x.shape, dtype=out_dtype or torch.float32)
