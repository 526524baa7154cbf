"""Mamba-1 selective scan in Triton: prefill (`selective_scan`) and one decode step (`selective_state_update`).

One kernel serves both input kinds, chosen per input by a compile-time flag: the W8A8 path (int8
activations, each with a per-tensor fp32 scale) and the float baseline (fp16 / bf16 / fp32, no scale).
The pure-PyTorch references (`selective_scan_int8_reference`, `selective_state_update_reference`)
dequantize and call `quamba_fx.scan_reference.selective_scan_reference`, the project's scan oracle, so the
dequantization contract lives in `_dequantize` alone.

Numerics (what the kernels compute, per batch b, channel d, state n, step t)
---------------------------------------------------------------------------
All arithmetic is fp32, and the state `h` is fp32 in registers. The state in memory (a prefill's
initial and final state, the decode step's state, i.e. what is kept between prefill and decode) is
float16, bfloat16 or float32: it is loaded in its dtype and converted to fp32 (exact), and stored
rounded to nearest even in its dtype. The chunked prefill's chunk states (below) stay fp32. With
an fp32 state nothing is rounded; with fp16 each decode step rounds every state element once
(relative 2**-11; bf16 2**-8), and since the scan is contractive those errors decay by
exp(dt * A) per step rather than add up without bound (mamba_ssm keeps its decode state in the
model's dtype, fp16, the same way).

1. dequantize: an int8 input `q` with scale `s` is `float32(q) * s` (the int8 -> fp32 conversion is
   exact); float inputs are upcast to fp32.
2. `dt = delta (+ delta_bias[d])`; with `delta_softplus`, `dt = dt if dt > 20 else log1p(exp(dt))`
   (torch's threshold rule), log1p(e) evaluated by its series to e^7 below e = 1/8 and as
   `log(w) + (e - (w - 1)) / w` with `w = 1 + e` above (a few ulps either way; with `FAST_MATH`
   on CUDA the log, exp and division are MUFU's approximations: relative error below 2^-20).
3. step: `h = exp(dt * A[d, n]) * h + (dt * u) * B[n]`; `y = sum_n h * C[n] + D[d] * u`.
4. gate: `y = y * (z / (1 + exp(-z)))` (SiLU); then `y` is rounded to the output dtype (fp16 by
   default for int8 inputs, else u's dtype).

The kernels reassociate a few products, each a change of an ulp or so, to save work per element:
`exp(dt * A)` is `exp2(dt * (A * log2(e)))` (one multiply fewer per element, `A * log2(e)` is
formed once per program); B's scale is folded into the per-channel `dt * u` and C's into the
per-channel sum (`(dt*u*sB) * qB` and `sC * sum_n h * qC`), so the per-step vectors B and C, which
every thread of a program holds in full, are only converted, never scaled. Steps past the end of
the chunk inside the last unrolled group run with dt = 0 and dt*u = 0, an exact identity on h.
Prefill and decode run the same per-step `@triton.jit` helpers, so chaining decode steps after a
prefill's final state reproduces the prefill bit for bit under TRITON_INTERPRET=1 with an fp32
state (a narrower one is rounded after every decode step, the prefill's only at its end). On
CUDA it agrees to rounding: the two kernels may get different register layouts from the
compiler, hence a different order of the sum over d_state, and different FMA contraction.

Against the reference (fp32, torch.exp / log1p / silu, no reassociation) the kernel is not
bit-exact: exp/log implementations differ (numpy's under the interpreter, approximate hardware
exp2/lg2/rcp on CUDA, relative errors ~2**-22 to 2**-20), and the reassociations above add a few
ulps. Each step's error is a few fp32 ulps of the terms, and the scan is contractive
(`exp(dt * A) <= 1` for `A <= 0`), so errors do not grow with L; the tests use rtol 1e-4 of the
magnitude of the summed terms plus the output dtype's rounding (see tests/test_kernel_scan.py).
Non-finite inputs are outside the contract.

Chunked prefill (when batch * d_inner < PARALLEL_CHANNELS)
----------------------------------------------------------
A sequence of few channels gives one program per channel block too little parallel work: the
time is then each step's dependent chain, L times over. So the prefill splits L into chunks of
`_chunk_len` steps (enough (sequence, channel, chunk) triples to fill the GPU) and runs:

1. pass 1, every chunk but the last: the scan of the chunk from a zero state, storing its end
   state `hloc[c]` and its sum of dt `S[c]` (fp32);
2. pass 2 (`_selective_scan_carry_kernel`): per (sequence, channel, state), an associative scan
   over the chunks of the pairs `(exp2(S[c] * A * log2(e)), hloc[c])` under
   `(a1, b1) . (a2, b2) = (a1 * a2, a2 * b1 + b2)`, plus h0: the true state at each chunk's end;
3. pass 3, every chunk: the scan from the state entering the chunk (h0 or zero for the first),
   writing y, and the final state from the last chunk.

Numerics: pass 3 does exactly the per-step arithmetic above; only the state entering a chunk is
computed another way, as a sum of the same terms grouped by chunk, with the decay over a chunk as
one `exp2(A2 * sum dt)` instead of a product of per-step exps. Summing dt over a chunk of T steps
costs at most ~T ulps of the sum, so the decay is off by a relative `|A * S| * T * 2**-24`, which
is largest (about 0.37 * T * 2**-24) where the decay `exp(-|A * S|)` is e**-1 and negligible where
it is small, i.e. below 1e-5 for T <= 128; the regrouped sums add a few ulps of the summed terms.
So the tolerance of the tests (1e-4 of the magnitude of the summed terms, module tests) holds for
chunked and unchunked prefill alike; bit-exactness holds only within one chunk (the interpreter's
chunks are INTERPRET_CHUNK_LEN = 16 steps, so the decode-chain test, L <= 16, stays bit-exact).

One launch (`ONE_LAUNCH`, up to 32 chunks of up to 64 steps)
------------------------------------------------------------
Passes 1 to 3 are three launches, each waiting for the whole of the one before, and at 1 x 128
their work is a few microseconds a chunk. So one launch (PASS 0) runs them there: each
program takes a ticket (its place in the order programs start), does pass 1's part for its chunk
(all but the last) and publishes it with a bit in a flag word of its channel block; then it waits
until the chunks before it have published and folds their local states into h0 in chunk order,
`h = exp2(S[j] * A2) * h + hloc[j]` (pass 2's pairs, combined sequentially instead of as a tree:
the same terms, another rounding order, so within the same tolerance); then pass 3's part. A
program waits only for smaller tickets, which are running or done and publish without waiting,
so no schedule of the programs can deadlock. The scratch (tickets, flags, counters) returns to
zero at the end of every launch, so CUDA graphs replay it unchanged. Under the interpreter the
programs run one after another in ticket order, so the waits pass at once; the arithmetic is the
same.

Kernel design (d_inner 5120, d_state 16, L 2048)
------------------------------------------------
A program owns `BLOCK_D` channels of one sequence (and one chunk) and keeps their
`[d_state, BLOCK_D]` fp32 state tile in registers (d_state padded to a power of two, masked). It
walks its steps in groups of `UNROLL`: the next group's loads (u, delta, z: contiguous vectors
along d_inner in the graph's `[B, L, D]` memory; B, C: d_state-vectors) are issued before the
current group's math, since Triton keeps memory operations in program order; the steps of a group
are independent but for one FMA per state element, so their softplus / exp / reduction / gate
chains overlap. Rows past the chunk's end are not masked: the row pointers stop at its last row.
Scales, A, D and delta_bias are loaded once per program; int8 is converted with integer/float bit
tricks rather than the slow I2F unit (every thread converts its part of B and C). The decode
kernel is one program per (batch, channel block): one step, state updated in place; given a
`DeltaProjection` (int8 weights) or a `DeltaProjectionW4` (4-bit ones) it also computes delta
from dt_proj's input row and weight (decode graphs fold dt_proj in this way,
passes/lowering/scan.py and gemm_w4.py), sparing a GEMM launch a block. Up to DT_PROJ_MAX_BATCH
sequences; above it, up to DT_PROJ_ROWS_MAX_BATCH, an int8 projection runs in a second decode
kernel (`_state_update_rows_kernel`) whose programs take 16 sequences each, their deltas one int8
MMA, so that dt_proj's weight is not read again for every sequence; above that, as its GEMM.

The tiled walk (`_walk_tiles`, configs with TILE_T > 0) is the autotuner's other candidate: a
program takes TILE_T steps at a time, computes their per-channel terms as one `[TILE_T, BLOCK_D]`
block and their state updates as one `[TILE_T, NS, BLOCK_D]` block, scanned along time with
`tl.associative_scan` (the state entering the tile folded into the first step's input, so the
scan's results are the states). In the layouts Triton picks for it (the tile's steps in each
thread's registers) the scan is the per-step recurrence itself, and the layout exchanges happen
once a tile instead of once a step: about 30% fewer instructions a channel-step, at twice the
registers. It wins where the channels alone fill the GPU (8 x 5120 channels); with chunks
(batch 1) the per-step walk stays faster.

Triton chooses the tile's register layout itself; in the configs inspected it spread d_state over
threads (following the d_state-contiguous accesses to A, B and C), so each step reduces over
d_state with shuffles and moves dt, dt*u and y through shared memory. The autotuner picks BLOCK_D,
num_warps and UNROLL per (d_inner, d_state, batch bucket, chunk length, pass); after a key's first
call the launch goes straight to the JIT function. The per-channel vectors take the layout of the
per-channel loads that feed them, which is why the kernels always load a dt bias
(`_bias_or_zeros`). Timings and the variants tried: docs/benchmarks.md.

Layouts: every input may have any strides. The output `y` is allocated as `[batch, L, d_inner]`
contiguous and returned transposed (`[batch, d_inner, L]` view), the layout out_proj's GEMM reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import split_k
from .dispatch import AUTOTUNE_DO_BENCH, cdiv, next_pow2
from .dispatch import INTERPRET as _INTERPRET
from .dispatch import as_scalar, graph_op, launch_tuned, precompile, tuned_configs
from .dispatch import use_triton as _use_triton
from .pdl import launch_options, prefill_launch_options, wait_for_previous
from .gemm import int8_gemm, int8_gemm_reference
from .gemm_epilogue import requant_int8
from .gemm_w4 import w4a16_gemm
from .rounding import approx_f32, f32_to_bf16_rne, int8_to_f32, mul_rn

from ..quant.int4 import _check_w4, w4a16_linear
from ..scan_reference import selective_scan_reference

__all__ = [
    "DeltaProjection",
    "DeltaProjectionW4",
    "selective_scan",
    "selective_scan_int8_reference",
    "selective_state_update",
    "selective_state_update_reference",
]


# The state tile is [next_power_of_2(d_state), BLOCK_D] fp32 registers per program.
MAX_D_STATE = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

ScanResult = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Triton helpers (shared by the prefill and the decode kernel, so both do identical arithmetic)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _to_f32(x, IS_INT8: tl.constexpr):
    if IS_INT8:
        # Not I2F: every thread converts the whole B and C vectors each step.
        return int8_to_f32(x)
    else:
        return x.to(tl.float32)


@triton.jit
def _exp(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        return approx_f32(x * 1.4426950408889634, "ex2")
    else:
        return tl.exp(x)


@triton.jit
def _softplus(x, FAST_MATH: tl.constexpr):
    # torch's rule: x above 20, else log1p(exp(x)). The exp argument is clamped so that nothing
    # overflows in lanes whose result is discarded (numpy, under the interpreter, would warn).
    e = _exp(tl.minimum(x, 20.0), FAST_MATH)
    # log1p(e) for e < 1/8 (x < -2.08, where dt_proj's biases put most channels) by its series to
    # e^7: the omitted terms are under e^8 / 8, below an ulp of the sum at e = 1/8, and no log or
    # division enters. From 1/8 up, log(w) for w = 1 + e plus (e - (w - 1)) / w, the first-order
    # correction for the rounding of w (w - 1 is exact below 2). On CUDA the log is MUFU's lg2
    # (absolute error about 2^-22.6: relative to log1p below 2^-20 at e = 1/8, 2^-22 from e = 1
    # up) and the division MUFU's rcp: about 20 instructions against ~50 for libdevice's log and
    # an IEEE division (sm_90 SASS).
    es = tl.minimum(e, 0.125)  # the series is only kept below 1/8: no overflow where it is not
    series = es * (1.0 + es * (-0.5 + es * (0.3333333333333333 + es * (-0.25 + es * (0.2 + es * (
        -0.16666666666666666 + es * 0.14285714285714285))))))
    w = 1.0 + e
    lost = e - (w - 1.0)
    if FAST_MATH:
        log_w = approx_f32(w, "lg2") * 0.6931471805599453 + lost * approx_f32(w, "rcp")
    else:
        log_w = tl.log(w) + lost / w
    lp = tl.where(e < 0.125, series, log_w)
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _silu(z, FAST_MATH: tl.constexpr):
    # Clamped so exp cannot overflow (for z < -80 the gate is ~z * 2e-35, i.e. 0 in fp16 and
    # within an ulp of torch's silu in fp32).
    if FAST_MATH:
        return z * approx_f32(1.0 + _exp(tl.minimum(-z, 80.0), FAST_MATH), "rcp")
    else:
        return z / (1.0 + tl.exp(tl.minimum(-z, 80.0)))


@triton.jit
def _channel_terms(u_raw, dt_raw, z_raw, u_scale, dt_scale, B_scale, z_scale, bias, Dv,
                   U_Q: tl.constexpr, DT_Q: tl.constexpr, B_Q: tl.constexpr, Z_Q: tl.constexpr,
                   SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, FAST_MATH: tl.constexpr):
    """Per-channel vectors of one step: dt, dt*u (times B's scale), the skip D*u and the SiLU gate."""
    u = _to_f32(u_raw, U_Q)
    if U_Q:
        u = u * u_scale
    dt = _to_f32(dt_raw, DT_Q)
    if DT_Q:
        dt = dt * dt_scale
    dt = dt + bias
    if SOFTPLUS:
        dt = _softplus(dt, FAST_MATH)
    dtu = dt * u
    if B_Q:
        dtu = dtu * B_scale
    if HAS_D:
        skip = Dv * u
    else:
        skip = tl.zeros_like(u)
    if HAS_Z:
        z = _to_f32(z_raw, Z_Q)
        if Z_Q:
            z = z * z_scale
        gate = _silu(z, FAST_MATH)
    else:
        gate = tl.zeros_like(u)
    return dt, dtu, skip, gate


@triton.jit
def _state_step(h, A2, dt, dtu, B_raw, C_raw, C_scale, skip, gate,
                B_Q: tl.constexpr, C_Q: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """One recurrence step on the [NS, BLOCK_D] tile; returns the new state and y (fp32 [BLOCK_D])."""
    Bv = _to_f32(B_raw, B_Q)
    Cv = _to_f32(C_raw, C_Q)
    # A2 = A * log2(e): exp(dt * A) as one multiply and one exp2 (MUFU ex2) per element.
    dA = tl.exp2(dt[None, :] * A2)
    h = dA * h + dtu[None, :] * Bv[:, None]
    y = tl.sum(h * Cv[:, None], axis=0)
    if C_Q:
        y = y * C_scale
    if HAS_D:
        y = y + skip
    if HAS_Z:
        y = y * gate
    return h, y


@triton.jit
def _to_out(y, OUT: tl.constexpr):
    """y (fp32; an output or a state) rounded to nearest-even in the dtype it is stored in."""
    if OUT == tl.bfloat16:
        return f32_to_bf16_rne(y)
    return y.to(OUT)


@triton.jit
def _load_scale(ptr, IS_Q: tl.constexpr):
    if IS_Q:
        return tl.load(ptr)
    else:
        return 1.0


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_step(u_t, t_t, z_t, B_t, C_t, u_o, t_o, z_o, B_o, C_o, mask_d, mask_n,
               HAS_Z: tl.constexpr, HAS_C: tl.constexpr):
    """The raw (unconverted) inputs of one time step from its row pointers: u, delta, z along
    channels ([BLOCK_D]) and B, C along states ([NS])."""
    u = tl.load(u_t + u_o, mask=mask_d, other=0)
    d = tl.load(t_t + t_o, mask=mask_d, other=0)
    if HAS_Z:
        z = tl.load(z_t + z_o, mask=mask_d, other=0)
    else:
        z = u
    B = tl.load(B_t + B_o, mask=mask_n, other=0)
    if HAS_C:
        C = tl.load(C_t + C_o, mask=mask_n, other=0)
    else:
        C = B
    return u, d, z, B, C


@triton.jit
def _next_row(adv, u_t, t_t, z_t, B_t, C_t, stride_ul, stride_tl, stride_zl, stride_Bl, stride_Cl,
              u_o, t_o, z_o, B_o, C_o, mask_d, mask_n, HAS_Z: tl.constexpr, HAS_C: tl.constexpr):
    """The row pointers moved on by `adv` rows (1, or 0 to stay on the chunk's last row), and the
    raw inputs of the row they then point at (`_load_step`)."""
    u_t += adv * stride_ul
    t_t += adv * stride_tl
    z_t += adv * stride_zl
    B_t += adv * stride_Bl
    C_t += adv * stride_Cl
    return u_t, t_t, z_t, B_t, C_t, _load_step(u_t, t_t, z_t, B_t, C_t, u_o, t_o, z_o, B_o, C_o, mask_d, mask_n,
                                               HAS_Z, HAS_C)


@triton.jit
def _scan_step(h, A2, u_r, d_r, z_r, B_r, C_r, valid, u_scale, dt_scale, B_scale, C_scale, z_scale, bias, Dv,
               U_Q: tl.constexpr, DT_Q: tl.constexpr, B_Q: tl.constexpr, C_Q: tl.constexpr, Z_Q: tl.constexpr,
               SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, FAST_MATH: tl.constexpr):
    """One prefill step from raw inputs. A step that is not `valid` (past the end of its chunk, in
    the last unrolled iteration) runs with dt = 0 and dt*u = 0: h = exp(0) * h + 0 = h exactly."""
    dt, dtu, skip, gate = _channel_terms(u_r, d_r, z_r, u_scale, dt_scale, B_scale, z_scale, bias, Dv,
                                         U_Q, DT_Q, B_Q, Z_Q, SOFTPLUS, HAS_D, HAS_Z, FAST_MATH)
    dt = tl.where(valid, dt, 0.0)
    dtu = tl.where(valid, dtu, 0.0)
    h, y = _state_step(h, A2, dt, dtu, B_r, C_r, C_scale, skip, gate, B_Q, C_Q, HAS_D, HAS_Z)
    return h, y, dt


@triton.jit
def _local_step(h, A2, u_r, d_r, B_r, valid, u_scale, dt_scale, B_scale, bias,
                U_Q: tl.constexpr, DT_Q: tl.constexpr, B_Q: tl.constexpr,
                SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr):
    """Pass 1's step: the state update alone (no C, D, z, y); also returns dt for the chunk's sum."""
    dt, dtu, _skip, _gate = _channel_terms(u_r, d_r, u_r, u_scale, dt_scale, B_scale, 1.0, bias, bias,
                                           U_Q, DT_Q, B_Q, False, SOFTPLUS, False, False, FAST_MATH)
    dt = tl.where(valid, dt, 0.0)
    dtu = tl.where(valid, dtu, 0.0)
    dA = tl.exp2(dt[None, :] * A2)
    h = dA * h + dtu[None, :] * _to_f32(B_r, B_Q)[:, None]
    return h, dt


@triton.jit
def _walk_chunk(
    h, A2, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr, pid_b, t0, n_steps, offs_d64, mask_d, mask_n, B_o, C_o,
    u_scale, dt_scale, B_scale, C_scale, z_scale, bias, Dv,
    stride_ub, stride_ud, stride_ul, stride_tb, stride_td, stride_tl, stride_zb, stride_zd, stride_zl,
    stride_Bb, stride_Bl, stride_Cb, stride_Cl, stride_yb, stride_yd, stride_yl,
    U_Q: tl.constexpr, DT_Q: tl.constexpr, B_Q: tl.constexpr, C_Q: tl.constexpr, Z_Q: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr,
    LOCAL: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
):
    """Steps t0 .. t0 + n_steps - 1 of sequence pid_b from state `h` ([NS, BLOCK_D] fp32): with
    LOCAL the state update alone (pass 1), else the whole step, storing y. Returns the state after
    the last step and the sum of dt over the steps (only LOCAL sums it; else zeros)."""
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)

    # Row pointers (scalars, 64-bit: t * stride can pass 2**31 for long sequences), advanced one row
    # at a time, plus loop-invariant per-lane offsets.
    t064 = t0.to(tl.int64)
    u_t = u_ptr + pid_b * stride_ub + t064 * stride_ul
    t_t = dt_ptr + pid_b * stride_tb + t064 * stride_tl
    z_t = z_ptr + pid_b * stride_zb + t064 * stride_zl
    B_t = B_ptr + pid_b * stride_Bb + t064 * stride_Bl
    C_t = C_ptr + pid_b * stride_Cb + t064 * stride_Cl
    y_t = y_ptr + pid_b * stride_yb + t064 * stride_yl
    u_o = offs_d64 * stride_ud
    t_o = offs_d64 * stride_td
    z_o = offs_d64 * stride_zd
    y_o = offs_d64 * stride_yd
    zero_d = tl.zeros([BLOCK_D], dtype=tl.int32)
    LOAD_Z: tl.constexpr = HAS_Z and not LOCAL
    LOAD_C: tl.constexpr = not LOCAL

    # Slots 0..UNROLL-1 hold the raw inputs of the current iteration's steps; the row pointers point
    # at the newest loaded row. Rows past the chunk's end are not masked (that would put predicates
    # on every load): the pointers stop at the chunk's last row, which is re-read, and those steps
    # are identities (see `_scan_step`). Unused slots alias slot 0 and are never read.
    u0, d0, z0, B0, C0 = _load_step(u_t, t_t, z_t, B_t, C_t, u_o, t_o, z_o, B_o, C_o, mask_d, mask_n,
                                    LOAD_Z, LOAD_C)
    u1, d1, z1, B1, C1 = u0, d0, z0, B0, C0
    u2, d2, z2, B2, C2 = u0, d0, z0, B0, C0
    u3, d3, z3, B3, C3 = u0, d0, z0, B0, C0
    for k in tl.static_range(1, UNROLL):
        u_t, t_t, z_t, B_t, C_t, ld = _next_row((k < n_steps).to(tl.int32), u_t, t_t, z_t, B_t, C_t,
                                                stride_ul, stride_tl, stride_zl, stride_Bl, stride_Cl,
                                                u_o, t_o, z_o, B_o, C_o, mask_d, mask_n, LOAD_Z, LOAD_C)
        if k == 1:
            u1, d1, z1, B1, C1 = ld
        elif k == 2:
            u2, d2, z2, B2, C2 = ld
        else:
            u3, d3, z3, B3, C3 = ld

    for t in range(0, n_steps, UNROLL):
        # The next iteration's loads first: Triton keeps memory operations in program order, so
        # loads placed after this iteration's stores would only start once those are done.
        n0u, n0d, n0z, n0B, n0C = u0, d0, z0, B0, C0
        n1u, n1d, n1z, n1B, n1C = u0, d0, z0, B0, C0
        n2u, n2d, n2z, n2B, n2C = u0, d0, z0, B0, C0
        n3u, n3d, n3z, n3B, n3C = u0, d0, z0, B0, C0
        for k in tl.static_range(UNROLL):
            u_t, t_t, z_t, B_t, C_t, ld = _next_row((t + UNROLL + k < n_steps).to(tl.int32), u_t, t_t, z_t, B_t,
                                                    C_t, stride_ul, stride_tl, stride_zl, stride_Bl, stride_Cl,
                                                    u_o, t_o, z_o, B_o, C_o, mask_d, mask_n, LOAD_Z, LOAD_C)
            if k == 0:
                n0u, n0d, n0z, n0B, n0C = ld
            elif k == 1:
                n1u, n1d, n1z, n1B, n1C = ld
            elif k == 2:
                n2u, n2d, n2z, n2B, n2C = ld
            else:
                n3u, n3d, n3z, n3B, n3C = ld

        for k in tl.static_range(UNROLL):
            if k == 0:
                su, sd, sz, sB, sC = u0, d0, z0, B0, C0
            elif k == 1:
                su, sd, sz, sB, sC = u1, d1, z1, B1, C1
            elif k == 2:
                su, sd, sz, sB, sC = u2, d2, z2, B2, C2
            else:
                su, sd, sz, sB, sC = u3, d3, z3, B3, C3
            valid = (zero_d + (t + k)) < n_steps
            if LOCAL:
                h, dt = _local_step(h, A2, su, sd, sB, valid, u_scale, dt_scale, B_scale, bias,
                                    U_Q, DT_Q, B_Q, SOFTPLUS, FAST_MATH)
                dt_sum += dt
            else:
                h, y, dt = _scan_step(h, A2, su, sd, sz, sB, sC, valid, u_scale, dt_scale, B_scale, C_scale,
                                      z_scale, bias, Dv, U_Q, DT_Q, B_Q, C_Q, Z_Q, SOFTPLUS, HAS_D,
                                      HAS_Z, FAST_MATH)
                tl.store(y_t + k * stride_yl + y_o, _to_out(y, y_ptr.dtype.element_ty), mask=mask_d & valid)
        y_t += UNROLL * stride_yl

        u0, d0, z0, B0, C0 = n0u, n0d, n0z, n0B, n0C
        u1, d1, z1, B1, C1 = n1u, n1d, n1z, n1B, n1C
        u2, d2, z2, B2, C2 = n2u, n2d, n2z, n2B, n2C
        u3, d3, z3, B3, C3 = n3u, n3d, n3z, n3B, n3C
    return h, dt_sum


@triton.jit
def _walk_tiles(
    h, A2, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr, pid_b, t0, n_steps, offs_d64, mask_d, mask_n, B_o, C_o,
    u_scale, dt_scale, B_scale, C_scale, z_scale, bias, Dv,
    stride_ub, stride_ud, stride_ul, stride_tb, stride_td, stride_tl, stride_zb, stride_zd, stride_zl,
    stride_Bb, stride_Bl, stride_Cb, stride_Cl, stride_yb, stride_yd, stride_yl,
    U_Q: tl.constexpr, DT_Q: tl.constexpr, B_Q: tl.constexpr, C_Q: tl.constexpr, Z_Q: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr,
    LOCAL: tl.constexpr, BLOCK_D: tl.constexpr, TILE_T: tl.constexpr,
):
    """`_walk_chunk` in tiles of TILE_T steps: each tile's per-channel terms as one [TILE_T, BLOCK_D]
    block, its state updates as a [TILE_T, NS, BLOCK_D] block scanned along time
    (`tl.associative_scan` of the pairs (exp(dt * A), dt * u * B) under `_carry_combine`), the
    state entering the tile folded into the first pair (`exp(dt_0 * A) * h + dt_0 * u_0 * B_0`), so
    that the scan's second output is the state after each step. Same arguments and results as
    `_walk_chunk`. Where a tile's steps lie in one thread's registers the scan runs them in order,
    the per-step walk's arithmetic; across threads it combines them as a tree, which agrees to
    rounding, not bit for bit."""
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_t = tl.arange(0, TILE_T)
    rows = (t0 + offs_t).to(tl.int64)[:, None]
    u_t = u_ptr + pid_b * stride_ub + rows * stride_ul + offs_d64[None, :] * stride_ud
    t_t = dt_ptr + pid_b * stride_tb + rows * stride_tl + offs_d64[None, :] * stride_td
    z_t = z_ptr + pid_b * stride_zb + rows * stride_zl + offs_d64[None, :] * stride_zd
    y_t = y_ptr + pid_b * stride_yb + rows * stride_yl + offs_d64[None, :] * stride_yd
    B_t = B_ptr + pid_b * stride_Bb + rows * stride_Bl + B_o[None, :]
    C_t = C_ptr + pid_b * stride_Cb + rows * stride_Cl + C_o[None, :]
    first = (offs_t == 0)[:, None, None]
    last = (offs_t == TILE_T - 1)[:, None, None]
    # Pass 1's local walk needs neither the gate nor the skip.
    GATED: tl.constexpr = HAS_Z and not LOCAL
    SKIP: tl.constexpr = HAS_D and not LOCAL
    for s0 in range(0, n_steps, TILE_T):
        live = (s0 + offs_t < n_steps)[:, None]
        m_td = live & mask_d[None, :]
        m_tn = live & mask_n[None, :]
        u_r = tl.load(u_t + s0 * stride_ul, mask=m_td, other=0)
        d_r = tl.load(t_t + s0 * stride_tl, mask=m_td, other=0)
        B_r = tl.load(B_t + s0 * stride_Bl, mask=m_tn, other=0)
        if GATED:
            z_r = tl.load(z_t + s0 * stride_zl, mask=m_td, other=0)
        else:
            z_r = u_r
        dt, dtu, skip, gate = _channel_terms(u_r, d_r, z_r, u_scale, dt_scale, B_scale, z_scale, bias, Dv,
                                             U_Q, DT_Q, B_Q, Z_Q and GATED, SOFTPLUS, SKIP, GATED, FAST_MATH)
        # Steps past the chunk's end: dt = 0 and dt*u = 0, the identity (1, 0) of the scan.
        dt = tl.where(live, dt, 0.0)
        dtu = tl.where(live, dtu, 0.0)
        decay = tl.exp2(dt[:, None, :] * A2[None, :, :])
        push = dtu[:, None, :] * _to_f32(B_r, B_Q)[:, :, None]
        # The state entering the tile joins its first step's push, so the scan yields the states
        # themselves: nothing reads its products of decays, which the compiler then drops where the
        # tile's steps are a thread's own registers (and the scan is the per-step recurrence).
        push = tl.where(first, decay * h[None, :, :] + push, push)
        _prods, hs = tl.associative_scan((decay, push), 0, _carry_combine)
        if LOCAL:
            dt_sum += tl.sum(dt, axis=0)
        else:
            C_r = tl.load(C_t + s0 * stride_Cl, mask=m_tn, other=0)
            y = tl.sum(hs * _to_f32(C_r, C_Q)[:, :, None], axis=1)
            if C_Q:
                y = y * C_scale
            if SKIP:
                y = y + skip
            if GATED:
                y = y * gate
            tl.store(y_t + s0 * stride_yl, _to_out(y, y_ptr.dtype.element_ty), mask=m_td)
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)
    return h, dt_sum


@triton.jit
def _walk(
    h, A2, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr, pid_b, t0, n_steps, offs_d64, mask_d, mask_n, B_o, C_o,
    u_scale, dt_scale, B_scale, C_scale, z_scale, bias, Dv,
    stride_ub, stride_ud, stride_ul, stride_tb, stride_td, stride_tl, stride_zb, stride_zd, stride_zl,
    stride_Bb, stride_Bl, stride_Cb, stride_Cl, stride_yb, stride_yd, stride_yl,
    U_Q: tl.constexpr, DT_Q: tl.constexpr, B_Q: tl.constexpr, C_Q: tl.constexpr, Z_Q: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr,
    LOCAL: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, TILE_T: tl.constexpr,
):
    """The config's walk over a chunk: tiled (`_walk_tiles`) when TILE_T > 0, else per step
    (`_walk_chunk`); same arguments and results."""
    if TILE_T > 0:
        return _walk_tiles(
            h, A2, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr, pid_b, t0, n_steps, offs_d64, mask_d, mask_n, B_o, C_o,
            u_scale, dt_scale, B_scale, C_scale, z_scale, bias, Dv,
            stride_ub, stride_ud, stride_ul, stride_tb, stride_td, stride_tl, stride_zb, stride_zd, stride_zl,
            stride_Bb, stride_Bl, stride_Cb, stride_Cl, stride_yb, stride_yd, stride_yl,
            U_Q, DT_Q, B_Q, C_Q, Z_Q, HAS_D, HAS_Z, SOFTPLUS, FAST_MATH, LOCAL, BLOCK_D, TILE_T)
    else:
        return _walk_chunk(
            h, A2, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr, pid_b, t0, n_steps, offs_d64, mask_d, mask_n, B_o, C_o,
            u_scale, dt_scale, B_scale, C_scale, z_scale, bias, Dv,
            stride_ub, stride_ud, stride_ul, stride_tb, stride_td, stride_tl, stride_zb, stride_zd, stride_zl,
            stride_Bb, stride_Bl, stride_Cb, stride_Cl, stride_yb, stride_yd, stride_yl,
            U_Q, DT_Q, B_Q, C_Q, Z_Q, HAS_D, HAS_Z, SOFTPLUS, FAST_MATH, LOCAL, BLOCK_D, UNROLL)


# dt_proj inside the prefill scan (`DeltaProjection` with a `[batch, L, R]` x): a chunk's delta is
# computed in tiles of PROJECT_STEPS steps x BLOCK_D channels, PROJECT_R ranks a tensor-core dot.
PROJECT_STEPS = tl.constexpr(16)
PROJECT_R = tl.constexpr(32)


@triton.jit
def _projection_scale(x_scale_ptr, w_scale_ptr, offs_d, mask_d, W_PER_CHANNEL: tl.constexpr):
    """dt_proj's GEMM epilogue scale `x_scale * w_scale` for the channels `offs_d` (fp32 [BLOCK_D];
    1 * x_scale on masked-off channels)."""
    if W_PER_CHANNEL:
        return tl.load(x_scale_ptr) * tl.load(w_scale_ptr + offs_d, mask=mask_d, other=1.0)
    else:
        return tl.load(x_scale_ptr) * tl.load(w_scale_ptr) + tl.zeros([offs_d.shape[0]], dtype=tl.float32)


@triton.jit
def _project_chunk(px_ptr, px_scale_ptr, pw_ptr, pw_scale_ptr, pb_ptr, dt_ptr, dt_scale_ptr, pid_b, t0, n_steps,
                   offs_d64, mask_d, R: tl.constexpr, stride_pxb, stride_pxl, stride_pwd, stride_tb, stride_td, stride_tl,
                   PW_PER_CHANNEL: tl.constexpr, PW_HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dt_proj's int8 output for steps t0 .. t0 + n_steps - 1 of sequence pid_b and the channels
    `offs_d64`, stored into the delta buffer `dt_ptr`, where the walk that follows reads it: the
    int32 sums of `int8_gemm(x, w)` (exact in any order) and its epilogue, so the same bits as the
    GEMM it replaces. The barrier makes every thread's stores visible to the whole program."""
    cols = tl.where(mask_d, offs_d64, 0)
    s = _projection_scale(px_scale_ptr, pw_scale_ptr, cols, mask_d, PW_PER_CHANNEL)
    if PW_HAS_BIAS:
        bias = tl.load(pb_ptr + cols)
    out_scale = tl.load(dt_scale_ptr)
    offs_s = tl.arange(0, PROJECT_STEPS)
    offs_r = tl.arange(0, PROJECT_R)
    x_rows = px_ptr + pid_b * stride_pxb + (t0 + offs_s).to(tl.int64)[:, None] * stride_pxl + offs_r[None, :]
    # The weight as [PROJECT_R, BLOCK_D] with R contiguous: both dot operands K-major.
    w_cols = pw_ptr + cols[None, :] * stride_pwd + offs_r[:, None]
    d_rows = dt_ptr + pid_b * stride_tb + (t0 + offs_s).to(tl.int64)[:, None] * stride_tl + offs_d64[None, :] * stride_td
    for s0 in range(0, n_steps, PROJECT_STEPS):
        mask_s = (s0 + offs_s < n_steps)[:, None]
        acc = tl.zeros([PROJECT_STEPS, BLOCK_D], dtype=tl.int32)
        for r0 in tl.static_range(0, R, PROJECT_R):
            mask_r = r0 + offs_r < R
            x = tl.load(x_rows + s0 * stride_pxl + r0, mask=mask_s & mask_r[None, :], other=0)
            w = tl.load(w_cols + r0, mask=mask_r[:, None], other=0)
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        # Compiled with fp fusion (the walk wants its FMAs): `mul_rn` keeps the GEMM epilogue's
        # product rounded before the bias is added.
        y = mul_rn(acc.to(tl.float32), s[None, :])
        if PW_HAS_BIAS:
            y = y + bias[None, :]
        tl.store(d_rows + s0 * stride_tl, requant_int8(y, out_scale), mask=mask_s & mask_d[None, :])
    tl.debug_barrier()


# One launch for the chunked scan (PASS 0). `sync` is int32 scratch, zero between launches:
# [0] the next program's ticket, [1] programs finished, then per (sequence, channel block) `bd`:
# [2 + bd] a bit per chunk that has published its local state, [2 + n_bd + bd] chunks finished.


@triton.jit
def _ticket(sync_ptr):
    """This program's place in the launch, in the order programs start (not their grid ids): a
    program only ever waits for programs with a smaller ticket, which are running or done and
    publish without waiting for anything, so the waits cannot deadlock whatever the GPU schedules."""
    return tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")


@triton.jit
def _publish(sync_ptr, bd, chunk):
    """Tell the later chunks of `bd` that `chunk`'s local state and dt sum are stored."""
    # Every thread's stores are issued before the flag moves; the release orders them before it.
    tl.debug_barrier()
    tl.atomic_or(sync_ptr + 2 + bd, tl.full([], 1, tl.int32) << chunk, sem="release", scope="gpu")


@triton.jit
def _wait_for_chunks(sync_ptr, bd, chunk):
    """Spin until chunks 0 .. chunk-1 of `bd` have published (n_chunks <= 32: one bit each)."""
    need = (tl.full([], 1, tl.int32) << chunk) - 1
    seen = tl.atomic_or(sync_ptr + 2 + bd, 0, sem="acquire", scope="gpu")
    while (seen & need) != need:
        seen = tl.atomic_or(sync_ptr + 2 + bd, 0, sem="acquire", scope="gpu")


@triton.jit
def _enter_chunk(h, A2, hc_base, sc_base, chunk, stride_hc, stride_sc, mask_nd, mask_d):
    """The state entering `chunk` from `h` (h0 or zeros): the earlier chunks' local states folded in
    order, `h = exp2(S[j] * A2) * h + hloc[j]` (pass 2's arithmetic, as a sequential scan). Two
    chunks' loads go out together: one L2 round trip per two chunks (four in flight took the
    kernel from 96 to 160 registers a thread on sm_90, two to 112)."""
    zero_d = tl.zeros(mask_d.shape, dtype=tl.int32)
    for j0 in tl.range(0, chunk, 2, num_stages=1):
        j1 = j0 + 1
        # Past `chunk`, zeros: exp2(0) * h + 0 is h exactly. `.cg`: other programs' stores, via L2.
        # 32-bit offsets: j < 32 and the chunked scan's batch * d_inner < 2**15, so j * stride < 2**31
        # for d_state up to 1024.
        s0 = tl.load(sc_base + j0 * stride_sc, mask=mask_d, other=0.0, cache_modifier=".cg")
        l0 = tl.load(hc_base + j0 * stride_hc, mask=mask_nd, other=0.0, cache_modifier=".cg")
        s1 = tl.load(sc_base + j1 * stride_sc, mask=mask_d & (zero_d + j1 < chunk), other=0.0,
                     cache_modifier=".cg")
        l1 = tl.load(hc_base + j1 * stride_hc, mask=mask_nd & (zero_d + j1 < chunk)[None, :],
                     other=0.0, cache_modifier=".cg")
        h = tl.exp2(s0[None, :] * A2) * h + l0
        h = tl.exp2(s1[None, :] * A2) * h + l1
    return h


@triton.jit
def _finish(sync_ptr, bd, n_chunks, n_programs):
    """Count this program out; the last chunk of `bd` to finish clears bd's flags (every chunk of
    bd has read them by then) and the last program of the launch the ticket, so the scratch is
    zero again for the next launch."""
    n_bd = n_programs // n_chunks
    if tl.atomic_add(sync_ptr + 2 + n_bd + bd, 1, sem="acq_rel", scope="gpu") == n_chunks - 1:
        tl.atomic_xchg(sync_ptr + 2 + bd, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 2 + n_bd + bd, 0, sem="relaxed", scope="gpu")
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == n_programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


# Autotune candidates on GPUs: (BLOCK_D, num_warps, UNROLL) for the per-step walk (`_walk_chunk`).
# * BLOCK_D / num_warps: batch * n_chunks * d_inner / BLOCK_D programs, each owning a
#   [d_state, BLOCK_D] tile.
# * UNROLL: time steps per loop iteration. A step's own work is a long dependent chain (softplus,
#   exp, the state update, the sum over d_state, the gate) with fixed costs per iteration (layout
#   exchanges through shared memory, the loads' round trip) that unrolled steps overlap: the steps
#   of an iteration are independent except for one FMA per state element, and the next
#   iteration's loads are issued before the current one's math.
GPU_CONFIGS = [
    (8, 1, 4), (16, 1, 2), (16, 1, 4), (32, 1, 2), (32, 1, 4), (64, 2, 2), (128, 4, 2), (128, 4, 4), (256, 8, 2),
]
# * The tiled walk (`_walk_tiles`): (BLOCK_D, num_warps, 1, TILE_T). Fewer instructions a
#   channel-step than the per-step walk (sm_90, Triton 3.8, benchmarks/sass_loop.py: pass 3's
#   loop 166-189 against 254, pass 1's 124-129 against 154) at 168-255 registers a thread in pass 3
#   against 80-97, so it wins where the channels fill the GPU without chunks: on an H100, 8 x 5120 x 2048
#   1.03 ms against 1.12, but 1 x 5120 x 2048 (chunks of 128) 0.236 against 0.207
#   (docs/benchmarks.md, session 48). Wider tiles and more warps timed slower everywhere.
TILED_GPU_CONFIGS = [(16, 1, 1, 16), (16, 1, 1, 8), (8, 1, 1, 16)]


def _config(block_d: int, num_warps: int, unroll: int, tile_t: int = 0) -> triton.Config:
    return triton.Config({"BLOCK_D": block_d, "UNROLL": unroll, "TILE_T": tile_t}, num_warps=num_warps)


def _scan_configs():
    if _INTERPRET:
        # Small tiles keep the numpy blocks cheap, and the test shapes (d_inner up to 40) still span
        # several channel blocks; 2 steps per iteration exercise the partial last iteration. A real
        # model's d_inner (512 and up) takes the wide tile: the interpreter pays per operation, not
        # per element, so 32 narrow programs cost ~30x one wide one. No tiled walk: the interpreter
        # runs tl.associative_scan one element at a time in Python (its tests pin it).
        return [_config(16, 1, 2), _config(512, 1, 2)]
    return [_config(*c) for c in GPU_CONFIGS + TILED_GPU_CONFIGS]


def _fits(config: triton.Config, flags: dict) -> bool:
    """Whether a config can run a launch with these flags: dt_proj's tensor-core dot (DT_PROJ)
    needs at least 16 channels a program."""
    return not flags.get("DT_PROJ") or config.kwargs["BLOCK_D"] >= 16


def _interpreter_pick(configs, named_args, **kwargs):
    configs = [c for c in configs if _fits(c, kwargs)]
    # One config per shape under the interpreter, so the autotuner never times numpy runs.
    if not _INTERPRET:
        return configs
    wide = named_args["d_inner"] > 64
    # Tests that pin one config (kernel.configs = [...]) get it whatever the shape.
    return [c for c in configs if (c.kwargs["BLOCK_D"] == 512) == wide] or configs


# Autotune keys (plus dtypes and flags) whose candidate configs were already compiled in parallel,
# and the tuned launch parameters per key: after a shape's first call, launches go straight to
# the JIT function, skipping the autotuner's per-call host work.
_PRECOMPILED: set = set()
_TUNED: dict = tuned_configs("scan")


@triton.autotune(configs=_scan_configs(), key=["d_inner", "d_state", "batch_bucket", "chunk_len", "PASS"],
                 prune_configs_by={"early_config_prune": _interpreter_pick}, do_bench=AUTOTUNE_DO_BENCH)
# L == 1 would otherwise become a compile-time constant (and each new L % 16 class a new variant).
@triton.jit(do_not_specialize=["L"])
def _selective_scan_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    u_scale_ptr, dt_scale_ptr, B_scale_ptr, C_scale_ptr, z_scale_ptr,
    h0_ptr, y_ptr, hT_ptr, hc_ptr, sc_ptr, sync_ptr,
    px_ptr, px_scale_ptr, pw_ptr, pw_scale_ptr, pb_ptr,
    batch_bucket, d_inner, d_state, L, chunk_len, n_chunks,
    stride_ub, stride_ud, stride_ul,
    stride_tb, stride_td, stride_tl,
    stride_zb, stride_zd, stride_zl,
    stride_Bb, stride_Bn, stride_Bl,
    stride_Cb, stride_Cn, stride_Cl,
    stride_Ad, stride_An,
    stride_hb, stride_hd, stride_hn,
    stride_yb, stride_yd, stride_yl,
    stride_fb, stride_fd, stride_fn,
    stride_cc, stride_cb,
    stride_pxb, stride_pxl, stride_pwd,
    U_Q: tl.constexpr, DT_Q: tl.constexpr, B_Q: tl.constexpr, C_Q: tl.constexpr, Z_Q: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr,
    HAS_H0: tl.constexpr, WRITE_FINAL: tl.constexpr, PASS: tl.constexpr, USE_PDL: tl.constexpr,
    DT_PROJ: tl.constexpr, PW_PER_CHANNEL: tl.constexpr, PW_HAS_BIAS: tl.constexpr, R: tl.constexpr,
    NS: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, TILE_T: tl.constexpr,
):
    """Passes 1 and 3 of the chunked scan over one chunk of `chunk_len` steps of BLOCK_D channels.

    PASS 1 (chunks 0 .. n_chunks-2): the chunk's state from zero, stored into `hc[chunk]`
    ([n_chunks-1, batch, d_inner, NS] fp32), and the chunk's sum of dt into `sc[chunk]`.
    PASS 3 (every chunk): the scan from the state entering the chunk (h0 or zero for chunk 0,
    `hc[chunk-1]` after pass 2 otherwise), writing y, and the final state from the last chunk.
    PASS 0 (every chunk, one launch for the whole scan): pass 1's part, published to the later
    chunks of its channels through `sync_ptr`; then, once every earlier chunk has published, the
    entering state from theirs (`_enter_chunk`), and pass 3's part. See "One launch" above.
    DT_PROJ: delta is dt_proj's output, computed by the program that walks a chunk first (pass 1's
    part, or pass 3's on the last chunk) into the delta buffer `dt_ptr` (`_project_chunk`).
    """
    tl.static_assert(UNROLL == 1 or UNROLL == 2 or UNROLL == 4)
    # Everything this kernel reads may come from the kernel ahead (the chunk states from pass 2,
    # delta from dt_proj, dt_proj's input from x_proj): under PDL only its launch overlaps that kernel.
    wait_for_previous(USE_PDL)
    # A flat grid, channel blocks fastest: no 65535 limit on grid axis 1, and programs running
    # side by side read neighbouring bytes of the same [B, L, D] rows.
    if PASS == 0:
        pid = _ticket(sync_ptr)
    else:
        pid = tl.program_id(0)
    n_d = tl.cdiv(d_inner, BLOCK_D)
    pid_d = pid % n_d
    rest = pid // n_d
    chunk = rest % n_chunks
    pid_b = (rest // n_chunks).to(tl.int64)
    t0 = chunk * chunk_len
    n_steps = tl.minimum(chunk_len, L - t0)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NS)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    offs_d64 = offs_d.to(tl.int64)
    B_o = offs_n * stride_Bn
    C_o = offs_n * stride_Cn
    # The chunk-state buffer: [chunk, batch, d_inner, NS] with NS innermost.
    hc_o = offs_d64[None, :] * NS + offs_n[:, None]

    # Loaded once per program. Scales come from memory so that updating them in place needs no
    # recompilation.
    u_scale = _load_scale(u_scale_ptr, U_Q)
    dt_scale = _load_scale(dt_scale_ptr, DT_Q)
    B_scale = _load_scale(B_scale_ptr, B_Q)
    C_scale = _load_scale(C_scale_ptr, C_Q)
    z_scale = _load_scale(z_scale_ptr, Z_Q)
    A2 = tl.load(A_ptr + offs_d64[None, :] * stride_Ad + offs_n[:, None] * stride_An, mask=mask_nd,
                 other=0.0) * 1.4426950408889634
    # Always a loaded vector (zeros when the caller has no bias): see `_bias_or_zeros`.
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    zero_h = tl.zeros([NS, BLOCK_D], dtype=tl.float32)
    c64 = chunk.to(tl.int64)
    # This sequence's chunk states and dt sums; chunk c's are c * stride_cc (c * stride_cc // NS) on.
    hc_seq = hc_ptr + pid_b * stride_cb + hc_o
    sc_seq = sc_ptr + pid_b * (stride_cb // NS) + offs_d64
    hc_this = hc_seq + c64 * stride_cc
    sc_this = sc_seq + c64 * (stride_cc // NS)
    if PASS != 3:  # pass 1's part: the chunk's local state and sum of dt, for the chunks after it
        # PASS 1 runs on the chunks but the last (n_chunks counts those); PASS 0 on every chunk.
        n_local = n_chunks
        if PASS == 0:
            n_local = n_chunks - 1
        if chunk < n_local:
            if DT_PROJ:
                _project_chunk(px_ptr, px_scale_ptr, pw_ptr, pw_scale_ptr, pb_ptr, dt_ptr, dt_scale_ptr, pid_b, t0,
                               n_steps, offs_d64, mask_d, R, stride_pxb, stride_pxl, stride_pwd, stride_tb,
                               stride_td, stride_tl, PW_PER_CHANNEL, PW_HAS_BIAS, BLOCK_D)
            hloc, dt_sum = _walk(
                zero_h, A2, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr, pid_b, t0, n_steps, offs_d64, mask_d,
                mask_n, B_o, C_o, u_scale, dt_scale, B_scale, C_scale, z_scale, bias, Dv,
                stride_ub, stride_ud, stride_ul, stride_tb, stride_td, stride_tl, stride_zb, stride_zd, stride_zl,
                stride_Bb, stride_Bl, stride_Cb, stride_Cl, stride_yb, stride_yd, stride_yl,
                U_Q, DT_Q, B_Q, C_Q, Z_Q, HAS_D, HAS_Z, SOFTPLUS, FAST_MATH, True, BLOCK_D, UNROLL, TILE_T)
            tl.store(hc_this, hloc, mask=mask_nd)
            tl.store(sc_this, dt_sum, mask=mask_d)
            if PASS == 0:
                _publish(sync_ptr, pid_b * n_d + pid_d, chunk)
    if PASS != 1:  # pass 3's part: the scan from the state entering the chunk, writing y
        if DT_PROJ:
            # The last chunk had no local walk: its delta is computed here, before any wait for
            # the chunks ahead.
            if chunk == n_chunks - 1:
                _project_chunk(px_ptr, px_scale_ptr, pw_ptr, pw_scale_ptr, pb_ptr, dt_ptr, dt_scale_ptr, pid_b, t0,
                               n_steps, offs_d64, mask_d, R, stride_pxb, stride_pxl, stride_pwd, stride_tb,
                               stride_td, stride_tl, PW_PER_CHANNEL, PW_HAS_BIAS, BLOCK_D)
        h0_tile = h0_ptr + pid_b * stride_hb + offs_d64[None, :] * stride_hd + offs_n[:, None] * stride_hn
        h = zero_h
        if PASS == 3:
            # h0 for chunk 0, else the state pass 2 left at the end of the chunk before.
            if HAS_H0:
                h = tl.load(h0_tile, mask=mask_nd & (chunk == 0), other=0.0).to(tl.float32)
            prev = tl.maximum(chunk - 1, 0).to(tl.int64)
            h += tl.load(hc_seq + prev * stride_cc, mask=mask_nd & (chunk > 0), other=0.0)
        else:
            # h0 carried through the chunks before this one, once they have published.
            if HAS_H0:
                h = tl.load(h0_tile, mask=mask_nd, other=0.0).to(tl.float32)
            if chunk > 0:
                _wait_for_chunks(sync_ptr, pid_b * n_d + pid_d, chunk)
                h = _enter_chunk(h, A2, hc_seq, sc_seq, chunk, stride_cc, stride_cc // NS, mask_nd, mask_d)
        h, _unused = _walk(
            h, A2, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr, pid_b, t0, n_steps, offs_d64, mask_d,
            mask_n, B_o, C_o, u_scale, dt_scale, B_scale, C_scale, z_scale, bias, Dv,
            stride_ub, stride_ud, stride_ul, stride_tb, stride_td, stride_tl, stride_zb, stride_zd, stride_zl,
            stride_Bb, stride_Bl, stride_Cb, stride_Cl, stride_yb, stride_yd, stride_yl,
            U_Q, DT_Q, B_Q, C_Q, Z_Q, HAS_D, HAS_Z, SOFTPLUS, FAST_MATH, False, BLOCK_D, UNROLL, TILE_T)
        if WRITE_FINAL:
            f = hT_ptr + pid_b * stride_fb + offs_d64[None, :] * stride_fd + offs_n[:, None] * stride_fn
            tl.store(f, _to_out(h, hT_ptr.dtype.element_ty), mask=mask_nd & (chunk == n_chunks - 1))
    if PASS == 0:
        _finish(sync_ptr, pid_b * n_d + pid_d, n_chunks, tl.num_programs(0))


@triton.jit
def _carry_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _selective_scan_carry_kernel(
    A_ptr, h0_ptr, hc_ptr, sc_ptr,
    d_inner, d_state, n_prev,
    stride_Ad, stride_An,
    stride_hb, stride_hd, stride_hn,
    stride_cc, stride_cb,
    HAS_H0: tl.constexpr, NS: tl.constexpr, NCP: tl.constexpr, BLOCK_DN: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Pass 2: turns the chunks' local end states `hc[c]` (from zero) into the true states at the
    end of each chunk, `prod decay * h0 + ...`, in place: a scan over chunks of the pairs
    (decay = exp(A * sum dt), local state), for BLOCK_DN (channel, state) pairs of one sequence."""
    wait_for_previous(USE_PDL)  # pass 1 wrote hc and sc
    pid = tl.program_id(0)
    n_dn = tl.cdiv(d_inner * NS, BLOCK_DN)
    pid_dn = pid % n_dn
    pid_b = (pid // n_dn).to(tl.int64)
    offs_c = tl.arange(0, NCP)
    offs_dn = pid_dn * BLOCK_DN + tl.arange(0, BLOCK_DN)
    d = offs_dn // NS
    n = offs_dn % NS
    mask_dn = (d < d_inner) & (n < d_state)
    mask = (offs_c[:, None] < n_prev) & mask_dn[None, :]
    c64 = offs_c.to(tl.int64)[:, None]
    d64 = d.to(tl.int64)
    hloc = tl.load(hc_ptr + c64 * stride_cc + pid_b * stride_cb + offs_dn[None, :], mask=mask, other=0.0)
    s = tl.load(sc_ptr + c64 * (stride_cc // NS) + pid_b * (stride_cb // NS) + d64[None, :], mask=mask, other=0.0)
    A2 = tl.load(A_ptr + d64 * stride_Ad + n * stride_An, mask=mask_dn, other=0.0) * 1.4426950408889634
    decay = tl.exp2(s * A2[None, :])
    a, b = tl.associative_scan((decay, hloc), 0, _carry_combine)
    if HAS_H0:
        h0 = tl.load(h0_ptr + pid_b * stride_hb + d64 * stride_hd + n * stride_hn, mask=mask_dn,
                     other=0.0).to(tl.float32)
        b = a * h0[None, :] + b
    tl.store(hc_ptr + c64 * stride_cc + pid_b * stride_cb + offs_dn[None, :], b, mask=mask)


@triton.jit
def _load_projection_rows(w_ptr, offs_d, mask_d, r0, R, stride_wd, BLOCK_R: tl.constexpr):
    """dt_proj's weight `[BLOCK_D, BLOCK_R]` (columns r0..) for the channels `offs_d`, as int32."""
    r = r0 + tl.arange(0, BLOCK_R)
    w_rows = w_ptr + offs_d.to(tl.int64)[:, None] * stride_wd
    return tl.load(w_rows + r[None, :], mask=mask_d[:, None] & (r < R)[None, :], other=0).to(tl.int32)


@triton.jit
def _project_delta(w_first, x_row, w_ptr, x_scale_ptr, w_scale_ptr, wb_ptr, out_scale_ptr, offs_d, mask_d, R,
                   stride_wd, W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    """dt_proj's int8 output for the channels `offs_d`: `int8_gemm(x, w)` of one row, the same
    int32 sum and epilogue (gemm_epilogue.py), so the same bits as the GEMM that it replaces.
    `w_first` is the weight's first BLOCK_R columns, loaded by the caller before it waited."""
    offs_r = tl.arange(0, BLOCK_R)
    x = tl.load(x_row + offs_r, mask=offs_r < R, other=0).to(tl.int32)
    acc = tl.sum(w_first * x[None, :], axis=1)
    for r0 in range(BLOCK_R, R, BLOCK_R):  # ranks above BLOCK_R (256): none in Mamba's shapes
        x = tl.load(x_row + r0 + offs_r, mask=r0 + offs_r < R, other=0).to(tl.int32)
        acc += tl.sum(_load_projection_rows(w_ptr, offs_d, mask_d, r0, R, stride_wd, BLOCK_R) * x[None, :], axis=1)
    s = _projection_scale(x_scale_ptr, w_scale_ptr, offs_d, mask_d, W_PER_CHANNEL)
    # This kernel is compiled with fp fusion (the state update wants its FMAs): `mul_rn` keeps the
    # GEMM epilogue's product rounded before the bias is added.
    y = mul_rn(acc.to(tl.float32), s)
    if HAS_BIAS:
        y = y + tl.load(wb_ptr + offs_d, mask=mask_d, other=0.0)
    return requant_int8(y, tl.load(out_scale_ptr))


@triton.jit
def _load_projection_w4(w_ptr, s_ptr, offs_d, mask_d, r0, R, stride_wd, stride_sd, GROUP: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """dt_proj's 4-bit weight for the channels `offs_d`, columns r0 to r0 + BLOCK_R: the packed
    bytes `[BLOCK_D, BLOCK_R / 2]` as int32 and each byte's group scale as fp32, zero past R."""
    byte = tl.arange(0, BLOCK_R // 2)
    even = r0 + 2 * byte  # each byte's first column
    live = mask_d[:, None] & (even < R)[None, :]
    offs_d64 = offs_d.to(tl.int64)[:, None]
    packed = tl.load(w_ptr + offs_d64 * stride_wd + r0 // 2 + byte[None, :], mask=live, other=0).to(tl.int32)
    scale = tl.load(s_ptr + offs_d64 * stride_sd + (even // GROUP)[None, :], mask=live, other=0).to(tl.float32)
    return packed, scale


@triton.jit
def _w4_block_sums(packed, scale, x_row, r0, R, BLOCK_R: tl.constexpr):
    """Each channel's sum over columns r0 to r0 + BLOCK_R of code * scale * x, in fp32 (the even
    column in a byte's low nibble, the odd in its high one)."""
    even = r0 + 2 * tl.arange(0, BLOCK_R // 2)
    x_even = tl.load(x_row + even, mask=even < R, other=0).to(tl.float32)
    x_odd = tl.load(x_row + even + 1, mask=even + 1 < R, other=0).to(tl.float32)
    low = (((packed & 0xF) ^ 8) - 8).to(tl.float32) * scale
    high = ((((packed >> 4) & 0xF) ^ 8) - 8).to(tl.float32) * scale
    return tl.sum(low * x_even[None, :] + high * x_odd[None, :], axis=1)


@triton.jit
def _project_delta_w4(w_first, s_first, x_row, w_ptr, s_ptr, b_ptr, offs_d, mask_d, R, stride_wd, stride_sd,
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    """dt_proj's output for the channels `offs_d` from its 4-bit weight (two codes a byte, the
    even column in the low nibble; one fp16 scale a group of GROUP columns): `w4a16_linear` of one
    row, summed in fp32 and rounded to the row's dtype as the GEMM's output is, so the delta the
    scan reads is what the separate GEMM would have written, up to the order of the fp32 sums.
    `w_first`, `s_first` are the first BLOCK_R columns' (`_load_projection_w4`), loaded by the
    caller before it waited."""
    acc = _w4_block_sums(w_first, s_first, x_row, 0, R, BLOCK_R)
    for r0 in range(BLOCK_R, R, BLOCK_R):  # ranks above BLOCK_R (256): none in Mamba's shapes
        packed, scale = _load_projection_w4(w_ptr, s_ptr, offs_d, mask_d, r0, R, stride_wd, stride_sd, GROUP,
                                            BLOCK_R)
        acc += _w4_block_sums(packed, scale, x_row, r0, R, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0)
    return acc.to(x_row.dtype.element_ty)


@triton.jit
def _selective_state_update_kernel(
    h_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    u_scale_ptr, dt_scale_ptr, B_scale_ptr, C_scale_ptr, z_scale_ptr,
    y_ptr,
    px_ptr, pw_ptr, px_scale_ptr, pw_scale_ptr, pb_ptr, R, stride_pxb, stride_pwd, stride_pws,
    d_inner, d_state,
    stride_hb, stride_hd, stride_hn,
    stride_ub, stride_ud,
    stride_tb, stride_td,
    stride_zb, stride_zd,
    stride_Bb, stride_Bn,
    stride_Cb, stride_Cn,
    stride_Ad, stride_An,
    stride_yb, stride_yd,
    U_Q: tl.constexpr, DT_Q: tl.constexpr, B_Q: tl.constexpr, C_Q: tl.constexpr, Z_Q: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr,
    NS: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
    DT_PROJ: tl.constexpr, PW_PER_CHANNEL: tl.constexpr, PW_HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    PW_4BIT: tl.constexpr, PW_GROUP: tl.constexpr,
):
    # DT_PROJ: delta is dt_proj's output, computed here from its input row `px` [batch, R] and
    # weight `pw` instead of read from dt_ptr: int8 codes `[d_inner, R]` (`DeltaProjection`) or,
    # PW_4BIT, packed 4-bit ones `[d_inner, ceil(R / 2)]` with fp16 scales `[d_inner, groups]`
    # of row stride stride_pws (`DeltaProjectionW4`).
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NS)
    mask_d = offs_d < d_inner
    # The weight does not depend on the kernels ahead: its first tile's load overlaps their tail.
    if DT_PROJ and PW_4BIT:
        w_first, s_first = _load_projection_w4(pw_ptr, pw_scale_ptr, offs_d, mask_d, 0, R, stride_pwd, stride_pws,
                                               PW_GROUP, BLOCK_R)
    elif DT_PROJ:
        w_first = _load_projection_rows(pw_ptr, offs_d, mask_d, 0, R, stride_pwd, BLOCK_R)
    wait_for_previous(USE_PDL)
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    offs_d64 = offs_d.to(tl.int64)

    # All loads first (one round trip of latency), then the same step as the prefill kernel.
    h_p = h_ptr + pid_b * stride_hb + offs_d64[None, :] * stride_hd + offs_n[:, None] * stride_hn
    h = tl.load(h_p, mask=mask_nd, other=0.0).to(tl.float32)
    u_r = tl.load(u_ptr + pid_b * stride_ub + offs_d64 * stride_ud, mask=mask_d, other=0)
    if DT_PROJ and PW_4BIT:
        t_r = _project_delta_w4(w_first, s_first, px_ptr + pid_b * stride_pxb, pw_ptr, pw_scale_ptr, pb_ptr, offs_d,
                                mask_d, R, stride_pwd, stride_pws, PW_GROUP, PW_HAS_BIAS, BLOCK_R)
    elif DT_PROJ:
        t_r = _project_delta(w_first, px_ptr + pid_b * stride_pxb, pw_ptr, px_scale_ptr, pw_scale_ptr, pb_ptr,
                             dt_scale_ptr, offs_d, mask_d, R, stride_pwd, PW_PER_CHANNEL, PW_HAS_BIAS, BLOCK_R)
    else:
        t_r = tl.load(dt_ptr + pid_b * stride_tb + offs_d64 * stride_td, mask=mask_d, other=0)
    if HAS_Z:
        z_r = tl.load(z_ptr + pid_b * stride_zb + offs_d64 * stride_zd, mask=mask_d, other=0)
    else:
        z_r = u_r
    B_r = tl.load(B_ptr + pid_b * stride_Bb + offs_n * stride_Bn, mask=mask_n, other=0)
    C_r = tl.load(C_ptr + pid_b * stride_Cb + offs_n * stride_Cn, mask=mask_n, other=0)
    u_scale = _load_scale(u_scale_ptr, U_Q)
    dt_scale = _load_scale(dt_scale_ptr, DT_Q)
    B_scale = _load_scale(B_scale_ptr, B_Q)
    C_scale = _load_scale(C_scale_ptr, C_Q)
    z_scale = _load_scale(z_scale_ptr, Z_Q)
    A2 = tl.load(A_ptr + offs_d64[None, :] * stride_Ad + offs_n[:, None] * stride_An, mask=mask_nd,
                 other=0.0) * 1.4426950408889634
    # Always a loaded vector (zeros when the caller has no bias): see `_bias_or_zeros`.
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)

    dt, dtu, skip, gate = _channel_terms(u_r, t_r, z_r, u_scale, dt_scale, B_scale, z_scale, bias, Dv,
                                         U_Q, DT_Q, B_Q, Z_Q, SOFTPLUS, HAS_D, HAS_Z, FAST_MATH)
    h, y = _state_step(h, A2, dt, dtu, B_r, C_r, C_scale, skip, gate, B_Q, C_Q, HAS_D, HAS_Z)
    # In place: each program reads and writes only its own channels.
    tl.store(h_p, _to_out(h, h_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(y_ptr + pid_b * stride_yb + offs_d64 * stride_yd, _to_out(y, y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _state_update_rows_kernel(
    h_ptr, u_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    u_scale_ptr, dt_scale_ptr, B_scale_ptr, C_scale_ptr, z_scale_ptr,
    y_ptr,
    px_ptr, pw_ptr, px_scale_ptr, pw_scale_ptr, pb_ptr,
    batch, d_inner, d_state, R,
    stride_hb, stride_hd, stride_hn,
    stride_ub, stride_ud,
    stride_zb, stride_zd,
    stride_Bb, stride_Bn,
    stride_Cb, stride_Cn,
    stride_Ad, stride_An,
    stride_yb, stride_yd,
    stride_pxb, stride_pwd,
    U_Q: tl.constexpr, B_Q: tl.constexpr, C_Q: tl.constexpr, Z_Q: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr,
    PW_PER_CHANNEL: tl.constexpr, PW_HAS_BIAS: tl.constexpr,
    NS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr,
):
    # The decode step with dt_proj inside for BLOCK_B sequences at once: their deltas for the
    # program's BLOCK_D channels are one int8 MMA ([BLOCK_B, R] x [R, BLOCK_D], the GEMM's int32
    # sums and epilogue, so the same bits as `_project_delta`), so dt_proj's weight is read once
    # per BLOCK_B sequences instead of once per sequence.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_d = offs_d < d_inner
    w = tl.load(pw_ptr + offs_d.to(tl.int64)[:, None] * stride_pwd + offs_r[None, :],
                mask=mask_d[:, None] & (offs_r < R)[None, :], other=0)
    wait_for_previous(USE_PDL)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    x = tl.load(px_ptr + offs_b.to(tl.int64)[:, None] * stride_pxb + offs_r[None, :],
                mask=(offs_b < batch)[:, None] & (offs_r < R)[None, :], other=0)
    acc = tl.dot(x, tl.trans(w), out_dtype=tl.int32)
    ws = _projection_scale(px_scale_ptr, pw_scale_ptr, offs_d, mask_d, PW_PER_CHANNEL)
    t = mul_rn(acc.to(tl.float32), ws[None, :])
    if PW_HAS_BIAS:
        t = t + tl.load(pb_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    t_r = requant_int8(t, tl.load(dt_scale_ptr))  # [BLOCK_B, BLOCK_D]

    # The state tile is [BLOCK_B, NS, BLOCK_D]; what a sequence or a channel shares is loaded once
    # as a 2-D tile and broadcast (per-element pointer tiles for B, C and A took 255 registers a
    # thread and spilled). 32-bit offsets within the state: the host checks that they fit.
    offs_n = tl.arange(0, NS)
    mask_b = offs_b < batch
    mask_n = offs_n < d_state
    mask_bd = mask_b[:, None] & mask_d[None, :]
    mask_h = mask_bd[:, None, :] & mask_n[None, :, None]
    h_off = (offs_b[:, None, None] * stride_hb + offs_n[None, :, None] * stride_hn
             + offs_d[None, None, :] * stride_hd)
    h = tl.load(h_ptr + h_off, mask=mask_h, other=0.0).to(tl.float32)
    row64 = offs_b.to(tl.int64)[:, None]
    u_r = tl.load(u_ptr + row64 * stride_ub + offs_d[None, :] * stride_ud, mask=mask_bd, other=0)
    if HAS_Z:
        z_r = tl.load(z_ptr + row64 * stride_zb + offs_d[None, :] * stride_zd, mask=mask_bd, other=0)
    else:
        z_r = u_r
    mask_bn = mask_b[:, None] & mask_n[None, :]
    B_r = tl.load(B_ptr + row64 * stride_Bb + offs_n[None, :] * stride_Bn, mask=mask_bn, other=0)
    C_r = tl.load(C_ptr + row64 * stride_Cb + offs_n[None, :] * stride_Cn, mask=mask_bn, other=0)
    A2 = tl.load(A_ptr + offs_d[None, :].to(tl.int64) * stride_Ad + offs_n[:, None] * stride_An,
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0) * 1.4426950408889634
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    else:
        Dv = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    dt, dtu, skip, gate = _channel_terms(u_r, t_r, z_r, _load_scale(u_scale_ptr, U_Q), tl.load(dt_scale_ptr),
                                         _load_scale(B_scale_ptr, B_Q), _load_scale(z_scale_ptr, Z_Q), bias, Dv,
                                         U_Q, True, B_Q, Z_Q, SOFTPLUS, HAS_D, HAS_Z, FAST_MATH)
    # _state_step's arithmetic (the same operations in the same order), a sequence per leading index.
    Bv = _to_f32(B_r, B_Q)[:, :, None]
    Cv = _to_f32(C_r, C_Q)[:, :, None]
    h = tl.exp2(dt[:, None, :] * A2[None, :, :]) * h + dtu[:, None, :] * Bv
    y = tl.sum(h * Cv, axis=1)
    if C_Q:
        y = y * tl.load(C_scale_ptr)
    if HAS_D:
        y = y + skip
    if HAS_Z:
        y = y * gate
    tl.store(h_ptr + h_off, _to_out(h, h_ptr.dtype.element_ty), mask=mask_h)
    tl.store(y_ptr + row64 * stride_yb + offs_d[None, :] * stride_yd, _to_out(y, y_ptr.dtype.element_ty),
             mask=mask_bd)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__


def _check_activation(name: str, t: object, shape: tuple, scale: object, device: torch.device) -> bool:
    """Checks one activation and its scale; returns whether it is int8 (quantized)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but u is on {device}")
    scale_name = f"{name}_scale"
    if t.dtype == torch.int8:
        if scale is None:
            raise ValueError(f"{name} is int8, so {scale_name} (its per-tensor fp32 scale) is required")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
            raise ValueError(
                f"{scale_name} must be a 0-dim or 1-element float32 tensor (read by the kernel at run time), "
                f"got {_describe(scale)}"
            )
        if scale.device != device:
            raise ValueError(f"{scale_name} is on {scale.device} but u is on {device}")
        return True
    if t.dtype in _FLOAT_DTYPES:
        if scale is not None:
            raise ValueError(f"{name} is {t.dtype}, not int8, so {scale_name} must be None")
        return False
    raise ValueError(f"{name} must be int8 (with {scale_name}) or float16/bfloat16/float32, got {t.dtype}")


def _check_param(name: str, t: object, shape: tuple, device: torch.device, optional: bool) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
        what = "None or a" if optional else "a"
        raise ValueError(f"{name} must be {what} float32 tensor of shape {tuple(shape)}, got {_describe(t)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but u is on {device}")


def _check_out_dtype(out_dtype: object, any_int8: bool, u_dtype: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return torch.float16 if any_int8 or u_dtype == torch.int8 else u_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be None, float16, bfloat16 or float32, got {out_dtype}")
    return out_dtype


def _validate(u, delta, A, B, C, D, z, delta_bias, scales: dict, state_dims: int) -> dict:
    """Shared by prefill (`state_dims` 3: [batch, d, L]) and decode (2: [batch, d]) inputs."""
    if not isinstance(u, torch.Tensor):
        raise ValueError(f"u must be a torch.Tensor, got {type(u).__name__}")
    if u.dim() != state_dims:
        layout = "[batch, d_inner, L]" if state_dims == 3 else "[batch, d_inner]"
        raise ValueError(f"u must be {layout}, got shape {tuple(u.shape)}")
    device = u.device
    if not isinstance(A, torch.Tensor) or A.dim() != 2:
        raise ValueError(f"A must be a float32 [d_inner, d_state] tensor, got {_describe(A)}")
    batch, d_inner = u.shape[0], u.shape[1]
    d_state = A.shape[1]
    _check_param("A", A, (d_inner, d_state), device, optional=False)
    if not 1 <= d_state <= MAX_D_STATE:
        raise ValueError(f"d_state (A.shape[1]) must be in 1..{MAX_D_STATE}, got {d_state}")
    tail = tuple(u.shape[2:])
    quant = {
        "u": _check_activation("u", u, u.shape, scales["u"], device),
        "delta": _check_activation("delta", delta, (batch, d_inner) + tail, scales["delta"], device),
        "B": _check_activation("B", B, (batch, d_state) + tail, scales["B"], device),
        "C": _check_activation("C", C, (batch, d_state) + tail, scales["C"], device),
    }
    if z is not None:
        quant["z"] = _check_activation("z", z, (batch, d_inner) + tail, scales["z"], device)
    elif scales["z"] is not None:
        raise ValueError("z_scale was given but z is None")
    _check_param("D", D, (d_inner,), device, optional=True)
    _check_param("delta_bias", delta_bias, (d_inner,), device, optional=True)
    return dict(batch=batch, d_inner=d_inner, d_state=d_state, quant=quant)


# ---------------------------------------------------------------------------------------------
# References (the dequantization contract, then quamba_fx.scan_reference.selective_scan_reference)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaProjection:
    """dt_proj as the decode step's delta: `delta = int8_gemm(x, x_scale, weight, weight_scale, bias,
    out_scale)`, an int8 `[batch, d_inner]` with scale `out_scale` (`quamba_fx.kernels.gemm`).

    x: int8 `[batch, R]` (x_proj's dt slice); weight: int8 `[d_inner, R]`; both with unit stride
    along R. weight_scale: fp32 `[d_inner]` or one element; bias: fp32 `[d_inner]` or None;
    x_scale, out_scale: one-element fp32. `selective_state_update(..., delta_proj=...)` computes it
    inside the scan kernel: no GEMM launch, no delta round trip through memory, the same delta
    bits (the GEMM's int32 sum and epilogue), so the same step (bit for bit under the interpreter;
    on CUDA up to how the two compiled kernels contract the state update into FMAs).
    """

    x: torch.Tensor
    x_scale: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: Optional[torch.Tensor]
    out_scale: torch.Tensor

    def delta(self) -> torch.Tensor:
        """The projection as its own W8A8 GEMM: int8 `[batch, d_inner]`."""
        return int8_gemm(self.x, self.x_scale, self.weight, self.weight_scale, self.bias, self.out_scale)

    def delta_like(self) -> torch.Tensor:
        """A zero-copy int8 `[batch, d_inner]` view standing for the delta in shape checks."""
        return self.weight[:, 0].expand(self.x.shape[0], self.weight.shape[0])


@dataclass(frozen=True)
class DeltaProjectionW4:
    """dt_proj with 4-bit weights (the W4A16 recipe) as the decode step's delta: `delta =
    w4a16_gemm(x, weight, weight_scale, group_size, bias)`, a float `[batch, d_inner]` in x's
    dtype (`quamba_fx.kernels.gemm_w4`).

    x: float `[batch, R]` (x_proj's dt slice), unit stride along R; weight: uint8 `[d_inner,
    ceil(R / 2)]` (two codes a byte, `quant/int4.py`); weight_scale: fp16 `[d_inner, ceil(R /
    group_size)]`; bias: fp32 `[d_inner]` or None. `selective_state_update(..., delta_proj=...)`
    computes it inside the scan kernel: no GEMV launch and no delta round trip through memory. The
    kernel sums in fp32 in another order than the GEMV (whose products are fp16), so the delta
    matches the GEMV's to its rounding, not bit for bit.
    """

    x: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    group_size: int
    bias: Optional[torch.Tensor]

    def delta(self) -> torch.Tensor:
        """The projection as its own W4A16 GEMM: `[batch, d_inner]` in x's dtype."""
        return w4a16_gemm(self.x, self.weight, self.weight_scale, self.group_size, self.bias)

    def delta_like(self) -> torch.Tensor:
        """A zero-copy `[batch, d_inner]` view in x's dtype standing for the delta in shape checks."""
        return self.x[:, :1].expand(self.x.shape[0], self.weight.shape[0])


def _shape_info(u: object) -> dict:
    if not isinstance(u, torch.Tensor) or u.dim() != 2:
        raise ValueError(f"u must be a [batch, d_inner] tensor, got {_describe(u)}")
    return dict(batch=u.shape[0], d_inner=u.shape[1])


def _check_projection(p: object, delta: object, delta_scale: object, info: dict, device: torch.device) -> None:
    if not isinstance(p, (DeltaProjection, DeltaProjectionW4)):
        raise ValueError(f"delta_proj must be a DeltaProjection or DeltaProjectionW4, got {type(p).__name__}")
    if delta is not None or delta_scale is not None:
        raise ValueError("with delta_proj, delta and delta_scale must be None (the projection computes them)")
    if isinstance(p, DeltaProjectionW4):
        _check_projection_w4(p, info, device)
        return
    batch, d_inner = info["batch"], info["d_inner"]
    x, w = p.x, p.weight
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.int8 and x.dim() == 2 and x.shape[0] == batch
            and x.shape[1] >= 1 and (x.shape[1] == 1 or x.stride(1) == 1)):
        raise ValueError(f"delta_proj.x must be int8 [batch={batch}, R >= 1] with unit stride along R, "
                         f"got {_describe(x)}")
    rank = x.shape[1]
    if not (isinstance(w, torch.Tensor) and w.dtype == torch.int8 and tuple(w.shape) == (d_inner, rank)
            and (rank == 1 or w.stride(1) == 1)):
        raise ValueError(f"delta_proj.weight must be int8 [d_inner, R] = {(d_inner, rank)} with unit stride "
                         f"along R, got {_describe(w)}")
    for name in ("x_scale", "out_scale"):
        t = getattr(p, name)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != 1:
            raise ValueError(f"delta_proj.{name} must be a one-element float32 tensor, got {_describe(t)}")
    ws = p.weight_scale
    if not isinstance(ws, torch.Tensor) or ws.dtype != torch.float32 or ws.numel() not in (1, d_inner):
        raise ValueError(f"delta_proj.weight_scale must be float32 with 1 or d_inner = {d_inner} elements, "
                         f"got {_describe(ws)}")
    _check_param("delta_proj.bias", p.bias, (d_inner,), device, optional=True)
    for name in ("x", "x_scale", "weight", "weight_scale", "out_scale"):
        if getattr(p, name).device != device:
            raise ValueError(f"delta_proj.{name} is on {getattr(p, name).device} but u is on {device}")


def _check_projection_w4(p: DeltaProjectionW4, info: dict, device: torch.device) -> None:
    batch, d_inner = info["batch"], info["d_inner"]
    x = p.x
    if not (isinstance(x, torch.Tensor) and x.dtype in _FLOAT_DTYPES and x.dim() == 2 and x.shape[0] == batch
            and x.shape[1] >= 1 and (x.shape[1] == 1 or x.stride(1) == 1)):
        raise ValueError(f"delta_proj.x must be float [batch={batch}, R >= 1] with unit stride along R, "
                         f"got {_describe(x)}")
    n, _ = _check_w4("delta_proj", x, p.weight, p.weight_scale, p.group_size, p.bias)
    if n != d_inner or p.weight.stride(1) != 1:
        raise ValueError(f"delta_proj.weight must be [d_inner={d_inner}, ceil(R / 2)] with unit stride along "
                         f"its bytes, got {_describe(p.weight)}")
    if p.weight_scale.dtype != torch.float16:
        raise ValueError(f"delta_proj.weight_scale must be float16, got {_describe(p.weight_scale)}")
    _check_param("delta_proj.bias", p.bias, (d_inner,), device, optional=True)
    for name in ("x", "weight", "weight_scale"):
        if getattr(p, name).device != device:
            raise ValueError(f"delta_proj.{name} is on {getattr(p, name).device} but u is on {device}")


def _dequantize(x: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Step 1 of the contract: int8 `q` -> `float32(q) * scale`; float inputs -> fp32."""
    if x is None:
        return None
    if scale is not None:
        return x.float() * scale.reshape(())
    return x.float()


def selective_scan_int8_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    *,
    u_scale: Optional[torch.Tensor] = None,
    delta_scale: Optional[torch.Tensor] = None,
    B_scale: Optional[torch.Tensor] = None,
    C_scale: Optional[torch.Tensor] = None,
    z_scale: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    state_dtype: Optional[torch.dtype] = None,
) -> ScanResult:
    """PyTorch reference of `selective_scan` (int8 or float inputs): same arguments, layouts and dtypes.

    Dequantizes (`q.float() * scale`), runs `quamba_fx.scan_reference.selective_scan_reference` in fp32
    (from `initial_state.float()`) and rounds y to the output dtype and the final state to
    `state_dtype`, to nearest even.
    """
    scales = dict(u=u_scale, delta=delta_scale, B=B_scale, C=C_scale, z=z_scale)
    info = _validate(u, delta, A, B, C, D, z, delta_bias, scales, state_dims=3)
    out_dtype = _check_out_dtype(out_dtype, any(info["quant"].values()), u.dtype)
    _check_initial_state(initial_state, info, u.device)
    state_dtype = _check_state_dtype(state_dtype, initial_state)
    y32, final = selective_scan_reference(
        _dequantize(u, u_scale), _dequantize(delta, delta_scale), A, _dequantize(B, B_scale),
        _dequantize(C, C_scale), D, _dequantize(z, z_scale), delta_bias, delta_softplus, initial_state,
    )
    batch, d_inner, L = u.shape
    y = torch.empty(batch, L, d_inner, dtype=out_dtype, device=u.device).transpose(1, 2)
    y.copy_(y32)
    if return_final_state:
        return y, final.to(state_dtype).contiguous()
    return y


def selective_state_update_reference(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    *,
    u_scale: Optional[torch.Tensor] = None,
    delta_scale: Optional[torch.Tensor] = None,
    B_scale: Optional[torch.Tensor] = None,
    C_scale: Optional[torch.Tensor] = None,
    z_scale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    delta_proj: Union[DeltaProjection, DeltaProjectionW4, None] = None,
) -> torch.Tensor:
    """PyTorch reference of `selective_state_update`: a one-step scan from `state` (read as fp32),
    updated in place (the new state rounded to nearest even in state's dtype)."""
    if delta_proj is not None:
        _check_projection(delta_proj, delta, delta_scale, _shape_info(u), u.device)
        p = delta_proj
        if isinstance(p, DeltaProjectionW4):
            delta = w4a16_linear(p.x, p.weight, p.weight_scale, p.group_size, p.bias)
        else:
            delta = int8_gemm_reference(p.x, p.x_scale, p.weight, p.weight_scale, p.bias, p.out_scale)
            delta_scale = p.out_scale
    scales = dict(u=u_scale, delta=delta_scale, B=B_scale, C=C_scale, z=z_scale)
    info = _validate(u, delta, A, B, C, D, z, delta_bias, scales, state_dims=2)
    out_dtype = _check_out_dtype(out_dtype, any(info["quant"].values()), u.dtype)
    _check_state("state", state, info, u.device)

    def step(x):
        return None if x is None else x[..., None]

    y, final = selective_scan_int8_reference(
        step(u), step(delta), A, step(B), step(C), D, step(z), delta_bias, delta_softplus,
        u_scale=u_scale, delta_scale=delta_scale, B_scale=B_scale, C_scale=C_scale, z_scale=z_scale,
        initial_state=state, return_final_state=True, out_dtype=out_dtype,
    )
    state.copy_(final)
    return y[..., 0].contiguous()


def _check_state(name: str, s: object, info: dict, device: torch.device) -> None:
    shape = (info["batch"], info["d_inner"], info["d_state"])
    if not isinstance(s, torch.Tensor) or s.dtype not in _FLOAT_DTYPES or tuple(s.shape) != shape:
        raise ValueError(f"{name} must be a float16/bfloat16/float32 tensor of shape [batch, d_inner, d_state] = "
                         f"{shape}, got {_describe(s)}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device} but u is on {device}")


def _check_initial_state(s: object, info: dict, device: torch.device) -> None:
    if s is not None:
        _check_state("initial_state", s, info, device)


def _check_state_dtype(state_dtype: object, initial_state: Optional[torch.Tensor]) -> torch.dtype:
    """The final state's dtype: `state_dtype`, else initial_state's, else float32."""
    if state_dtype is None:
        return initial_state.dtype if initial_state is not None else torch.float32
    if state_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"state_dtype must be None, float16, bfloat16 or float32, got {state_dtype}")
    return state_dtype


# On CUDA, the per-channel softplus and SiLU gate with MUFU's approximate ex2 / lg2 / rcp and
# log1p's series below e = 1/8 (`_softplus`): sm_90 SASS of a chunked prefill's loops (Triton
# 3.6, two steps an iteration, BLOCK_D 128 on 4 warps, benchmarks/sass_loop.py) 353 -> 307
# instructions in pass 1 and 567 -> 509 in pass 3 (docs/benchmarks.md, session 42; session 28 put
# this kernel's 1 x 2048 time near its issue floor).
# The interpreter runs the same formulas with numpy's exp / log: the tests check the series and
# its switch there. Timed on an H100 (session 43, the scan alone): faster at every shape tried,
# 1 x 5120 x 2048 0.2178 -> 0.2093 ms, 8 x 5120 x 2048 1.2424 -> 1.1227 ms.
FAST_MATH = True
# Chunk length of the prefill scan (tests and benchmarks may pin it; None: `_chunk_len`'s rule).
CHUNK_LEN: Optional[int] = None
# Under the interpreter: short chunks, so that the tests' sequences (up to 40 steps) span several.
INTERPRET_CHUNK_LEN = 16
# On GPUs: one chunk once batch * d_inner reaches PARALLEL_CHANNELS (the channels fill the device
# and passes 1-2 would only add work: measured on an H200, 8 x 5120 channels ran 1.16 ms in one
# chunk, 1.64-1.96 ms in 4); below it, enough (sequence, channel, chunk) threads to fill the
# device, chunks no shorter than MIN_CHUNK_LEN steps (each chunk costs a state write and read in
# passes 1-3), and at most MAX_CHUNKS chunks (pass 2 holds them all in one tile). Short prompts
# want short chunks: on an H200, 1 x 5120 x 128 ran 0.030 ms in chunks of 16, 0.045 in one; 1 x
# 5120 x 512 0.066 ms in chunks of 32, 0.115 in chunks of 64 (docs/benchmarks.md).
PARALLEL_CHANNELS = 32 * 1024
TARGET_THREADS = 128 * 1024
MIN_CHUNK_LEN = 16
MAX_CHUNKS = 256
# Fewer chunks than this run as one: with two, pass 1 over the first chunk and pass 3 over the
# second are as long a chain of steps as the unchunked scan, plus a carry pass and two launches.
MIN_CHUNKS = 3


# The chunked scan in one launch (PASS 0: each chunk's program publishes its local state and the
# later chunks fold the earlier ones in) instead of three (passes 1, 2 and 3), up to 32 chunks
# (one bit each in the flags) of at most ONE_LAUNCH_MAX_CHUNK_LEN steps. Measured on an H100
# (docs/benchmarks.md, session 43; kernel ms, three launches -> one): 1 x 5120 x 128 (chunks of
# 16) 0.0319 -> 0.0272, x 256 (16) 0.0427 -> 0.0398, x 512 (32) 0.0670 -> 0.0654, x 1024 (64)
# 0.1159 -> 0.1149, but x 2048 (128) 0.2093 -> 0.2147: long chunks leave the fold little to save
# and keep pass 1's part at pass 3's occupancy.
ONE_LAUNCH = True
ONE_LAUNCH_MAX_CHUNKS = 32
ONE_LAUNCH_MAX_CHUNK_LEN = 64
# Registers a thread of the one-launch kernel may use. ptxas gives it 119-122 in the two-step
# configs, where passes 1 and 3 take 80-97, though it fits in 96 with no spill (sm_90, Triton 3.6,
# BLOCK_D 32 to 256: the same loop, no local memory): at BLOCK_D 128 that is five programs an SM
# instead of four. The four-step configs spill under it; the autotuner weighs that.
ONE_LAUNCH_MAX_REGISTERS = 96


def _sync_words(batch: int, d_inner: int) -> int:
    """int32 words of PASS 0's scratch (see `_ticket`): two, plus two per (sequence, channel block),
    counted for blocks of one channel, so that any config fits (40 KB at 1 x 5120)."""
    return 2 + 2 * batch * d_inner


def _chunk_len(batch: int, d_inner: int, L: int) -> int:
    """Steps per chunk of the prefill scan (a power of two; >= L means one chunk, no passes 1-2)."""
    if CHUNK_LEN is not None:
        return CHUNK_LEN
    if _INTERPRET:
        return INTERPRET_CHUNK_LEN
    if batch * d_inner >= PARALLEL_CHANNELS:
        return max(next_pow2(L), MIN_CHUNK_LEN)
    want_chunks = cdiv(TARGET_THREADS, batch * d_inner)
    chunk = max(MIN_CHUNK_LEN, next_pow2(cdiv(L, want_chunks)),
                next_pow2(cdiv(L, MAX_CHUNKS)))
    if cdiv(L, chunk) < MIN_CHUNKS:
        return max(next_pow2(L), MIN_CHUNK_LEN)
    return chunk


def _launch_chunks(tune_base: tuple, pass_: int, batch: int, d_inner: int, n_run: int, args: tuple,
                   flags: dict) -> None:
    """Pass 1 or 3 over `n_run` chunks: autotuned on a key's first call, then launched directly."""
    key = tune_base + (pass_,)
    launch_tuned(_TUNED, key, _autotune_chunks, _launch_chunks_config, key, pass_, batch, d_inner, n_run, args, flags)


def _autotune_chunks(key: tuple, pass_: int, batch: int, d_inner: int, n_run: int, args: tuple,
                     flags: dict) -> Optional[dict]:
    def grid(meta):
        return (batch * n_run * cdiv(d_inner, meta["BLOCK_D"]),)

    if key not in _PRECOMPILED:
        _PRECOMPILED.add(key)
        precompile(_selective_scan_kernel.fn, args,
                   ({**flags, "PASS": pass_, **c.all_kwargs()} for c in _selective_scan_kernel.configs
                    if _fits(c, flags)))
    _selective_scan_kernel[grid](*args, **flags, PASS=pass_)
    # Interpreted, nothing is recorded: every call goes through the autotuner, whose pruning picks
    # the config, so a test that pins `kernel.configs` gets its config without clearing `_TUNED`.
    return None if _INTERPRET else dict(_selective_scan_kernel.best_config.all_kwargs())


def _launch_chunks_config(tuned: dict, key: tuple, pass_: int, batch: int, d_inner: int, n_run: int,
                          args: tuple, flags: dict) -> None:
    n_programs = batch * n_run * cdiv(d_inner, tuned["BLOCK_D"])
    _selective_scan_kernel.fn[(n_programs,)](*args, **flags, PASS=pass_, **tuned)



# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _flags(info: dict, D, z, delta_bias, delta_softplus: bool) -> dict:
    q = info["quant"]
    return dict(
        U_Q=q["u"], DT_Q=q["delta"], B_Q=q["B"], C_Q=q["C"], Z_Q=q.get("z", False),
        HAS_D=D is not None, HAS_Z=z is not None,
        SOFTPLUS=bool(delta_softplus), NS=next_pow2(info["d_state"]), FAST_MATH=FAST_MATH and not _INTERPRET,
    )


# Zero biases by (device, d_inner), for callers without delta_bias (a lowered W8A8 graph folds
# dt_proj's bias into its GEMM).
_ZERO_BIAS: dict = {}


def _bias_or_zeros(delta_bias: Optional[torch.Tensor], d_inner: int, device: torch.device) -> torch.Tensor:
    """`delta_bias`, or fp32 zeros in its place: the kernels always load and add a bias.

    Not for the arithmetic (adding 0.0 changes no value but the sign of a zero, which softplus and
    exp ignore) but for the compiled code: Triton places per-channel vectors in the layout of the
    loads that feed them, and without the bias load it computed dt, softplus and the gate once per
    state element instead of once per channel. Compiled for sm_90 with Triton 3.6, the int8
    prefill kernel's loop (BLOCK_D 128, 4 warps, 2 steps) had 2443 instructions without the load
    and 766 with it, the decode kernel 1624 against 768; a 2.8b model's scan ran 0.367 ms on its
    own inputs (no bias) against 0.213 ms with a bias (H200, one call, same config).
    """
    if delta_bias is not None:
        return delta_bias
    key = (device, d_inner)
    zeros = _ZERO_BIAS.get(key)
    if zeros is None:
        zeros = torch.zeros(d_inner, dtype=torch.float32, device=device)
        # Memory allocated while a CUDA graph is captured belongs to that graph: never cache it.
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _ZERO_BIAS[key] = zeros
    return zeros


def _prefill_delta_buffer(p: object, delta: object, delta_scale: object,
                          u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A prefill's `delta_proj` checked, and the int8 `[batch, d_inner, L]` buffer (laid out
    `[batch, L, d_inner]`, as the GEMM's output) the kernel computes delta into, with its scale."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError(f"u must be a [batch, d_inner, L] tensor, got {_describe(u)}")
    batch, d_inner, length = u.shape
    x = getattr(p, "x", None)
    if not (isinstance(p, DeltaProjection) and isinstance(x, torch.Tensor) and x.dim() == 3
            and tuple(x.shape[:2]) == (batch, length)):
        raise ValueError(f"a prefill's delta_proj must be a DeltaProjection whose x is int8 [batch={batch}, "
                         f"L={length}, R], got {type(p).__name__} with x {_describe(x)}")
    # One step's rows stand for the sequence in the decode step's checks (zeros for an empty one).
    step = x[:, 0] if length else x.new_zeros(batch, x.shape[-1])
    _check_projection(replace(p, x=step), delta, delta_scale, dict(batch=batch, d_inner=d_inner), u.device)
    buffer = torch.empty(batch, length, d_inner, dtype=torch.int8, device=u.device).transpose(1, 2)
    return buffer, p.out_scale


def _projection_flags(p: Optional[DeltaProjection]) -> dict:
    # The rank is a constant to the kernel: its dots unroll (a model has one rank), which took the
    # projection's loop from 593 to 340 instructions a tile (sm_90, R = 160, BLOCK_D 128).
    return dict(DT_PROJ=p is not None, PW_PER_CHANNEL=p is not None and p.weight_scale.numel() > 1,
                PW_HAS_BIAS=p is not None and p.bias is not None, R=p.x.shape[-1] if p is not None else 1)


def _scale_arg(scale: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    # Absent scales are never read (their flag is off); any tensor serves as the pointer.
    return scale if scale is not None else dummy


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    *,
    u_scale: Optional[torch.Tensor] = None,
    delta_scale: Optional[torch.Tensor] = None,
    B_scale: Optional[torch.Tensor] = None,
    C_scale: Optional[torch.Tensor] = None,
    z_scale: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    state_dtype: Optional[torch.dtype] = None,
    delta_proj: Optional[DeltaProjection] = None,
) -> ScanResult:
    """Mamba-1 selective scan over a whole sequence (prefill); see the module docstring for numerics.

    Args:
        u, delta, z: `[batch, d_inner, L]`, any strides (e.g. transposed views of `[batch, L, *]`
            GEMM outputs). Each is int8 with its `*_scale` (a 0-dim or 1-element fp32 tensor) or
            float16/bfloat16/float32 with scale None. z (the gate) is optional.
        B, C: `[batch, d_state, L]`, any strides (slices of x_proj's output), int8 + scale or float.
        A: fp32 `[d_inner, d_state]` (negative in Mamba: `-exp(A_log)`).
        D, delta_bias: optional fp32 `[d_inner]`.
        delta_softplus: apply softplus to `delta (+ delta_bias)`.
        initial_state: optional float16/bfloat16/float32 `[batch, d_inner, d_state]` (zeros when
            None), any strides; read as fp32.
        return_final_state: also return the state after the last step.
        out_dtype: dtype of y; default fp16 when any input is int8, else u's dtype.
        state_dtype: dtype of the final state (float16, bfloat16 or float32), rounded to nearest
            even from the fp32 state; default initial_state's dtype, float32 without one.
        delta_proj: dt_proj to compute delta from (a `DeltaProjection` whose x is `[batch, L, R]`),
            with `delta` and `delta_scale` None: the kernel computes dt_proj's int8 output itself,
            the same bits as the GEMM, one launch fewer.

    Returns:
        y `[batch, d_inner, L]` whose memory is `[batch, L, d_inner]` contiguous; with
        `return_final_state`, `(y, final_state)` with final_state `[batch, d_inner, d_state]`
        contiguous, of dtype `state_dtype`.

    CUDA tensors run the Triton kernel, as do CPU tensors under TRITON_INTERPRET=1; other CPU tensors
    run `selective_scan_int8_reference`.
    """
    if delta_proj is not None:
        delta, delta_scale = _prefill_delta_buffer(delta_proj, delta, delta_scale, u)
    scales = dict(u=u_scale, delta=delta_scale, B=B_scale, C=C_scale, z=z_scale)
    info = _validate(u, delta, A, B, C, D, z, delta_bias, scales, state_dims=3)
    out_dtype = _check_out_dtype(out_dtype, any(info["quant"].values()), u.dtype)
    _check_initial_state(initial_state, info, u.device)
    state_dtype = _check_state_dtype(state_dtype, initial_state)
    batch, d_inner, L = u.shape
    d_state = info["d_state"]
    if not _use_triton(u) or batch * d_inner * L == 0:
        if delta_proj is not None:
            delta = delta_proj.delta().transpose(1, 2)
        return selective_scan_int8_reference(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, u_scale=u_scale, delta_scale=delta_scale,
            B_scale=B_scale, C_scale=C_scale, z_scale=z_scale, initial_state=initial_state,
            return_final_state=return_final_state, out_dtype=out_dtype, state_dtype=state_dtype,
        )

    y = torch.empty(batch, L, d_inner, dtype=out_dtype, device=u.device).transpose(1, 2)
    final = (torch.empty(batch, d_inner, d_state, dtype=state_dtype, device=u.device)
             if return_final_state else A)  # dummy pointer when not written
    h0 = initial_state if initial_state is not None else A
    h0_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    zz = z if z is not None else u
    # Tune per batch bucket: batch 1 has d_inner / BLOCK_D programs and wants small blocks, large
    # batches fill the GPU anyway and want fewer, wider programs.
    batch_bucket = min(next_pow2(batch), 16)
    flags = dict(HAS_H0=initial_state is not None, WRITE_FINAL=return_final_state,
                 **_flags(info, D, z, delta_bias, delta_softplus), **_projection_flags(delta_proj),
                 **prefill_launch_options(u.device))
    proj = delta_proj or DeltaProjection(u, A, A, A, A, A)  # placeholders, never read without DT_PROJ
    proj_strides = (*proj.x.stride()[:2], proj.weight.stride(0)) if delta_proj is not None else (0, 0, 0)
    ns = flags["NS"]
    chunk_len = _chunk_len(batch, d_inner, L)
    n_chunks = cdiv(L, chunk_len)
    # Pass 1's outputs, pass 2 in place: per chunk but the last, the state at its end and its sum of
    # dt. (A 1-element dummy when there is one chunk: nothing reads or writes it.)
    n_prev = n_chunks - 1
    bias = _bias_or_zeros(delta_bias, d_inner, u.device)
    hc = torch.empty(max(n_prev, 1) * batch * d_inner * ns, dtype=torch.float32, device=u.device)
    sc = torch.empty(max(n_prev, 1) * batch * d_inner, dtype=torch.float32, device=u.device)

    def args_for(n_run: int, sync: torch.Tensor) -> tuple:
        return (
            u, delta, A, B, C, D if D is not None else A, zz, bias,
            _scale_arg(u_scale, A), _scale_arg(delta_scale, A), _scale_arg(B_scale, A), _scale_arg(C_scale, A),
            _scale_arg(z_scale, A),
            h0, y, final, hc, sc, sync,
            proj.x, proj.x_scale, proj.weight, proj.weight_scale, proj.bias if proj.bias is not None else A,
            batch_bucket, d_inner, d_state, L, chunk_len, n_run,
            *u.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(),
            *h0_strides, *y.stride(), d_inner * d_state, d_state, 1,
            batch * d_inner * ns, d_inner * ns, *proj_strides,
        )

    tune_base = (d_inner, d_state, batch_bucket, chunk_len, u.dtype, delta.dtype, B.dtype, C.dtype, zz.dtype,
                 y.dtype, h0.dtype, final.dtype, tuple(sorted(flags.items())))
    if n_prev > 0 and ONE_LAUNCH and n_chunks <= ONE_LAUNCH_MAX_CHUNKS and chunk_len <= ONE_LAUNCH_MAX_CHUNK_LEN:
        sync = split_k.scratch(u.device, 0, _sync_words(batch, d_inner))[1]
        _launch_chunks(tune_base, 0, batch, d_inner, n_chunks, args_for(n_chunks, sync),
                       dict(flags, maxnreg=ONE_LAUNCH_MAX_REGISTERS))
        return (y, final) if return_final_state else y
    no_sync = sc  # PASS 1 and 3 never touch it
    if n_prev > 0:
        _launch_chunks(tune_base, 1, batch, d_inner, n_prev, args_for(n_prev, no_sync), flags)
        ncp = next_pow2(n_prev)
        block_dn = max(16, 4096 // ncp)
        _selective_scan_carry_kernel[(batch * cdiv(d_inner * ns, block_dn),)](
            A, h0, hc, sc, d_inner, d_state, n_prev, *A.stride(), *h0_strides,
            batch * d_inner * ns, d_inner * ns,
            HAS_H0=initial_state is not None, NS=ns, NCP=ncp, BLOCK_DN=block_dn, num_warps=4,
            **prefill_launch_options(u.device),
        )
    _launch_chunks(tune_base, 3, batch, d_inner, n_chunks, args_for(n_chunks, no_sync), flags)
    if return_final_state:
        return y, final
    return y


# Decode steps with a DeltaProjection compute it inside the scan kernel up to this batch: each
# program reads its channels' dt_proj rows once per sequence. On the H200, 2.8b (session 21,
# docs/benchmarks.md run 6): at batch 1 fused 572 tokens/s against 542 with the GEMM; at batch 16
# within the runs' spread (5751 / 5731, 5764 / 5835 with other changes), but the fused scan's
# kernel time grew by 0.36 ms a step where the GEMM's fell by 0.27. The growth is per sequence, the
# saving fixed: on those two points they cross near batch 9.
DT_PROJ_MAX_BATCH = 8


# Above DT_PROJ_MAX_BATCH and up to this batch, a decode step with an int8 DeltaProjection runs it
# inside the kernel for ROWS_BLOCK_B sequences at a time (`_state_update_rows_kernel`): one MMA
# per program, dt_proj's weight read once per ROWS_BLOCK_B sequences. Above it dt_proj runs as its
# own GEMM; 0 turns the kernel off. mamba-2.8b W8A8 on an H100 (session 56, docs/benchmarks.md):
# batch 16 6867 tokens/s against 6765 with the GEMM (+1.5%), batch 64 18397 against 18890 (-2.6%);
# session 58, two rounds each: batch 16 6922 against 6830 (+1.3%), 32 11729 against 11654
# (+0.6%), 64 18624 against 19263 (-3.3%).
DT_PROJ_ROWS_MAX_BATCH = 32
ROWS_BLOCK_B = 16
# Channels and warps a program: 16 channels on 4 warps compile to 168 registers a thread, no
# spills (Triton 3.6, sm_90), so 3 programs an SM and batch 16's 320 programs (2.8b) in one wave;
# on 8 warps to 106 (2 programs an SM, two waves at batch 16, but half the tile a thread); 32
# channels on 8 warps to 209. Timed in the model (session 58, H100): 8 warps +0.4% at batch 16,
# -2.2% at 32, -3.7% at 64 against 4.
ROWS_BLOCK_D = 16
ROWS_WARPS = 4


def _rows_kernel_takes(proj: object, state: object) -> bool:
    """Whether `_state_update_rows_kernel` runs this step's projection (see DT_PROJ_ROWS_MAX_BATCH):
    an int8 one of a rank the MMA's K tile holds, above DT_PROJ_MAX_BATCH, on a state whose
    element offsets fit the kernel's 32-bit arithmetic."""
    if not (isinstance(proj, DeltaProjection) and isinstance(state, torch.Tensor) and state.dim() == 3):
        return False
    reach = sum((size - 1) * abs(stride) for size, stride in zip(state.shape, state.stride()))
    return DT_PROJ_MAX_BATCH < state.shape[0] <= DT_PROJ_ROWS_MAX_BATCH and proj.x.shape[1] <= 256 and reach < 2**31


def _state_update_rows(state, u, A, B, C, D, z, delta_bias, delta_softplus, proj: DeltaProjection, info: dict,
                       out_dtype: torch.dtype, u_scale, B_scale, C_scale, z_scale) -> torch.Tensor:
    """`selective_state_update` with dt_proj inside, on `_state_update_rows_kernel`."""
    batch, d_inner = u.shape
    y = torch.empty(batch, d_inner, dtype=out_dtype, device=u.device)
    zz = z if z is not None else u
    flags = _flags(info, D, z, delta_bias, delta_softplus)
    del flags["DT_Q"]  # the kernel's delta is the projection's int8 output
    # tl.dot's smallest int8 tiles: 16 rows, K a multiple of 32 (the rank, padded with zeros).
    block_r = max(32, next_pow2(proj.x.shape[1]))
    block_d = 16 if _INTERPRET else ROWS_BLOCK_D
    grid = (cdiv(d_inner, block_d), cdiv(batch, ROWS_BLOCK_B))
    _state_update_rows_kernel[grid](
        state, u, A, B, C, D if D is not None else A, zz, _bias_or_zeros(delta_bias, d_inner, u.device),
        _scale_arg(u_scale, A), proj.out_scale, _scale_arg(B_scale, A), _scale_arg(C_scale, A),
        _scale_arg(z_scale, A),
        y,
        proj.x, proj.weight, proj.x_scale, proj.weight_scale, proj.bias if proj.bias is not None else A,
        batch, d_inner, info["d_state"], proj.x.shape[1],
        *state.stride(), *u.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(), *y.stride(),
        proj.x.stride(0), proj.weight.stride(0),
        PW_PER_CHANNEL=proj.weight_scale.numel() > 1, PW_HAS_BIAS=proj.bias is not None,
        BLOCK_D=block_d, BLOCK_B=ROWS_BLOCK_B, BLOCK_R=block_r, num_warps=1 if _INTERPRET else ROWS_WARPS,
        **flags, **launch_options(u.device),
    )
    return y


def _projection_block_r(rank: int, four_bit: bool) -> int:
    """The columns of dt_proj's weight a decode program reads at a time: the rank rounded up to a
    power of two, in one tile up to 256 (the interpreter takes tiles of 8 so that its tests walk
    the loop over further tiles too). A 4-bit tile is BLOCK_R / 2 packed bytes, so at least 2."""
    cap = 8 if _INTERPRET else 256
    return max(min(next_pow2(max(rank, 1)), cap), 2 if four_bit else 1)


def selective_state_update(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    *,
    u_scale: Optional[torch.Tensor] = None,
    delta_scale: Optional[torch.Tensor] = None,
    B_scale: Optional[torch.Tensor] = None,
    C_scale: Optional[torch.Tensor] = None,
    z_scale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    delta_proj: Union[DeltaProjection, DeltaProjectionW4, None] = None,
) -> torch.Tensor:
    """One decode step of `selective_scan`, advancing `state` in place.

    Args:
        state: float16/bfloat16/float32 `[batch, d_inner, d_state]` (any strides), updated in
            place, so chained steps continue a prefill's final state (and reproduce its y; see the
            module docstring). It is read as fp32 and the new state is stored rounded to nearest
            even in its dtype.
        u, delta, z: `[batch, d_inner]`; B, C: `[batch, d_state]`; any strides, int8 + scale or
            float. The other arguments are as in `selective_scan`.
        delta_proj: dt_proj to compute delta from (`DeltaProjection`, `DeltaProjectionW4`), with `delta` and
            `delta_scale` None: at batch <= DT_PROJ_MAX_BATCH inside the kernel; above it, an int8
            one up to DT_PROJ_ROWS_MAX_BATCH inside the kernel for 16 sequences a program; else as
            a GEMM first (each program would re-read its channels' dt_proj rows once per sequence).

    Returns:
        y `[batch, d_inner]`, contiguous, dtype `out_dtype` (default as in `selective_scan`).
    """
    fused, rows_kernel = None, False
    if delta_proj is not None:
        _check_projection(delta_proj, delta, delta_scale, _shape_info(u), u.device)
        # An int8 delta comes with its scale; a 4-bit projection's is a float.
        proj_scale = delta_proj.out_scale if isinstance(delta_proj, DeltaProjection) else None
        # Decided once: the rows kernel (above DT_PROJ_MAX_BATCH) or the per-sequence one.
        rows_kernel = _use_triton(u) and _rows_kernel_takes(delta_proj, state)
        if _use_triton(u) and (u.shape[0] <= DT_PROJ_MAX_BATCH or rows_kernel):
            fused, delta, delta_scale = delta_proj, delta_proj.delta_like(), proj_scale
        else:
            delta, delta_scale = delta_proj.delta(), proj_scale
    scales = dict(u=u_scale, delta=delta_scale, B=B_scale, C=C_scale, z=z_scale)
    info = _validate(u, delta, A, B, C, D, z, delta_bias, scales, state_dims=2)
    out_dtype = _check_out_dtype(out_dtype, any(info["quant"].values()), u.dtype)
    _check_state("state", state, info, u.device)
    batch, d_inner = u.shape
    if not _use_triton(u) or batch * d_inner == 0:
        return selective_state_update_reference(
            state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, u_scale=u_scale,
            delta_scale=delta_scale, B_scale=B_scale, C_scale=C_scale, z_scale=z_scale, out_dtype=out_dtype,
        )
    if rows_kernel:
        return _state_update_rows(state, u, A, B, C, D, z, delta_bias, delta_softplus, fused, info, out_dtype,
                                  u_scale, B_scale, C_scale, z_scale)
    if isinstance(fused, DeltaProjectionW4):
        proj = (fused.x, fused.weight, A, fused.weight_scale, fused.bias if fused.bias is not None else A,
                fused.x.shape[1], fused.x.stride(0), fused.weight.stride(0), fused.weight_scale.stride(0))
        proj_flags = dict(DT_PROJ=True, PW_PER_CHANNEL=False, PW_HAS_BIAS=fused.bias is not None, PW_4BIT=True,
                          PW_GROUP=fused.group_size)
    elif fused is not None:
        proj = (fused.x, fused.weight, fused.x_scale, fused.weight_scale,
                fused.bias if fused.bias is not None else A, fused.x.shape[1], fused.x.stride(0),
                fused.weight.stride(0), 0)
        proj_flags = dict(DT_PROJ=True, PW_PER_CHANNEL=fused.weight_scale.numel() > 1,
                          PW_HAS_BIAS=fused.bias is not None, PW_4BIT=False, PW_GROUP=1)
    else:
        proj = (A, A, A, A, A, 0, 0, 0, 0)  # placeholders, never read
        proj_flags = dict(DT_PROJ=False, PW_PER_CHANNEL=False, PW_HAS_BIAS=False, PW_4BIT=False, PW_GROUP=1)

    y = torch.empty(batch, d_inner, dtype=out_dtype, device=u.device)
    zz = z if z is not None else u
    # Decode moves ~70 bytes of state per channel and does one step: a memory-bound kernel, so
    # 128-channel programs of 4 warps (d_state 16: 2048 states, 16 per thread) keep enough bytes in
    # flight; no autotuning, since the kernel updates state in place. With dt_proj inside, a
    # program also reads R bytes of weight a channel (160 on 2.8b) in one [BLOCK_D, BLOCK_R] tile:
    # 32 channels keep that tile at 64 registers a thread and give batch 1 160 programs, not 40.
    block_d = 16 if _INTERPRET else (32 if fused is not None else 128)
    block_r = _projection_block_r(proj[5], four_bit=proj_flags["PW_4BIT"])
    grid = (cdiv(d_inner, block_d), batch)
    _selective_state_update_kernel[grid](
        state, u, delta, A, B, C, D if D is not None else A, zz, _bias_or_zeros(delta_bias, d_inner, u.device),
        _scale_arg(u_scale, A), _scale_arg(delta_scale, A), _scale_arg(B_scale, A), _scale_arg(C_scale, A),
        _scale_arg(z_scale, A),
        y,
        *proj,
        d_inner, info["d_state"],
        *state.stride(), *u.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(),
        *y.stride(),
        BLOCK_D=block_d, num_warps=1 if _INTERPRET else 4, BLOCK_R=block_r,
        **_flags(info, D, z, delta_bias, delta_softplus), **proj_flags, **launch_options(u.device),
    )
    return y


# ---------------------------------------------------------------------------------------------
# Graph ops (torch.ops.quamba.*, see dispatch.graph_op)
# ---------------------------------------------------------------------------------------------


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # The scan kernels take A, D and delta_bias in fp32 (a no-op for the folded fp32 buffers).
    return None if t is None else t.float()


def _y_like(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fake op's y for the scan input `u [B, D, L]`: `[B, D, L]` laid out `[B, L, D]`, as the
    kernels return it."""
    batch, channels, length = u.shape
    return u.new_empty((batch, length, channels), dtype=dtype).transpose(1, 2)


def _scan_int8(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
               delta_bias, delta_softplus, out_dtype, **extra):
    A, D, delta_bias = _f32(A), _f32(D), _f32(delta_bias)
    return selective_scan(u_q, delta_q, A, B_q, C_q, D, z_q, delta_bias, delta_softplus,
                          u_scale=u_scale, delta_scale=delta_scale, B_scale=B_scale, C_scale=C_scale,
                          z_scale=z_scale, out_dtype=out_dtype, **extra)


@graph_op("quamba::selective_scan_int8", mutates_args=())
def selective_scan_int8_op(u_q: torch.Tensor, u_scale: torch.Tensor, delta_q: torch.Tensor,
                           delta_scale: torch.Tensor, A: torch.Tensor, B_q: torch.Tensor, B_scale: torch.Tensor,
                           C_q: torch.Tensor, C_scale: torch.Tensor, D: Optional[torch.Tensor],
                           z_q: Optional[torch.Tensor], z_scale: Optional[torch.Tensor],
                           delta_bias: Optional[torch.Tensor], delta_softplus: bool,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """The selective scan on int8 inputs dequantized in registers (`selective_scan`).

    Layouts as `torch.ops.quamba.selective_scan`; the result is `[B, D, L]` laid out `[B, L, D]`.
    """
    return _scan_int8(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
                      delta_bias, delta_softplus, out_dtype)


@selective_scan_int8_op.register_fake
def _selective_scan_int8_fake(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q,
                              z_scale, delta_bias, delta_softplus, out_dtype):
    return _y_like(u_q, out_dtype)


@graph_op("quamba::selective_scan_int8_cached", mutates_args=("ssm_state",))
def selective_scan_int8_cached_op(u_q: torch.Tensor, u_scale: torch.Tensor, delta_q: torch.Tensor,
                                  delta_scale: torch.Tensor, A: torch.Tensor, B_q: torch.Tensor,
                                  B_scale: torch.Tensor, C_q: torch.Tensor, C_scale: torch.Tensor,
                                  D: Optional[torch.Tensor], z_q: Optional[torch.Tensor],
                                  z_scale: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                                  delta_softplus: bool, out_dtype: torch.dtype, ssm_state: torch.Tensor,
                                  decode: bool) -> torch.Tensor:
    """`selective_scan_int8` with a cache: `ssm_state` float16, bfloat16 or float32 `[B, D, N]`.

    Prefill starts from a zero state and leaves the final one in `ssm_state`; decode (L = 1)
    advances `ssm_state` by one step. The scan computes in fp32 either way; the state is stored
    rounded to nearest even in `ssm_state`'s dtype.
    """
    if decode:
        y = selective_state_update(
            ssm_state, u_q[:, :, 0], delta_q[:, :, 0], _f32(A), B_q[:, :, 0], C_q[:, :, 0], _f32(D),
            None if z_q is None else z_q[:, :, 0], _f32(delta_bias), delta_softplus,
            u_scale=u_scale, delta_scale=delta_scale, B_scale=B_scale, C_scale=C_scale, z_scale=z_scale,
            out_dtype=out_dtype)
        return y[:, None, :].transpose(1, 2)
    y, final = _scan_int8(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
                          delta_bias, delta_softplus, out_dtype, return_final_state=True,
                          state_dtype=ssm_state.dtype)
    ssm_state.copy_(final)
    return y


@selective_scan_int8_cached_op.register_fake
def _selective_scan_int8_cached_fake(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q,
                                     z_scale, delta_bias, delta_softplus, out_dtype, ssm_state, decode):
    return _y_like(u_q, out_dtype)


def _dt_projection(dt_x_q: torch.Tensor, dt_x_scale: torch.Tensor, dt_weight: torch.Tensor,
                   dt_weight_scale: torch.Tensor, dt_bias: Optional[torch.Tensor],
                   delta_scale: torch.Tensor) -> DeltaProjection:
    """An op's dt_proj arguments (`w8a8_linear`'s) as the kernels' `DeltaProjection`."""
    return DeltaProjection(dt_x_q, as_scalar(dt_x_scale), dt_weight, dt_weight_scale.float().reshape(-1),
                           _f32(dt_bias), as_scalar(delta_scale))


@graph_op("quamba::selective_scan_int8_dt_proj", mutates_args=())
def selective_scan_int8_dt_proj_op(u_q: torch.Tensor, u_scale: torch.Tensor, dt_x_q: torch.Tensor,
                                   dt_x_scale: torch.Tensor, dt_weight: torch.Tensor, dt_weight_scale: torch.Tensor,
                                   dt_bias: Optional[torch.Tensor], delta_scale: torch.Tensor, A: torch.Tensor,
                                   B_q: torch.Tensor, B_scale: torch.Tensor, C_q: torch.Tensor,
                                   C_scale: torch.Tensor, D: Optional[torch.Tensor], z_q: Optional[torch.Tensor],
                                   z_scale: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                                   delta_softplus: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """`selective_scan_int8` whose delta is dt_proj's int8 output `w8a8_linear(dt_x_q, dt_x_scale,
    dt_weight, dt_weight_scale, dt_bias, delta_scale)`, computed inside the scan kernel
    (`DeltaProjection`): the same delta, one launch fewer. dt_x_q: `[B, L, R]`."""
    proj = _dt_projection(dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale)
    return _scan_int8(u_q, u_scale, None, None, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias,
                      delta_softplus, out_dtype, delta_proj=proj)


@selective_scan_int8_dt_proj_op.register_fake
def _selective_scan_int8_dt_proj_fake(u_q, u_scale, dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias,
                                      delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias,
                                      delta_softplus, out_dtype):
    return _y_like(u_q, out_dtype)


@graph_op("quamba::selective_scan_int8_dt_proj_cached", mutates_args=("ssm_state",))
def selective_scan_int8_dt_proj_cached_op(u_q: torch.Tensor, u_scale: torch.Tensor, dt_x_q: torch.Tensor,
                                          dt_x_scale: torch.Tensor, dt_weight: torch.Tensor,
                                          dt_weight_scale: torch.Tensor, dt_bias: Optional[torch.Tensor],
                                          delta_scale: torch.Tensor, A: torch.Tensor, B_q: torch.Tensor,
                                          B_scale: torch.Tensor, C_q: torch.Tensor, C_scale: torch.Tensor,
                                          D: Optional[torch.Tensor], z_q: Optional[torch.Tensor],
                                          z_scale: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                                          delta_softplus: bool, out_dtype: torch.dtype, ssm_state: torch.Tensor,
                                          decode: bool) -> torch.Tensor:
    """`selective_scan_int8_dt_proj` with a cache, as `selective_scan_int8_cached`: prefill leaves
    the final state in `ssm_state`, decode (L = 1) advances it by one step (`dt_proj_state_update`)."""
    if decode:
        return _dt_proj_state_update(u_q, u_scale, dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias,
                                     delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias,
                                     delta_softplus, out_dtype, ssm_state)
    proj = _dt_projection(dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale)
    y, final = _scan_int8(u_q, u_scale, None, None, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias,
                          delta_softplus, out_dtype, return_final_state=True, state_dtype=ssm_state.dtype,
                          delta_proj=proj)
    ssm_state.copy_(final)
    return y


@selective_scan_int8_dt_proj_cached_op.register_fake
def _selective_scan_int8_dt_proj_cached_fake(u_q, u_scale, dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias,
                                             delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias,
                                             delta_softplus, out_dtype, ssm_state, decode):
    return _y_like(u_q, out_dtype)


def _dt_proj_state_update(u_q, u_scale, dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale, A,
                          B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias, delta_softplus, out_dtype,
                          ssm_state) -> torch.Tensor:
    proj = _dt_projection(dt_x_q[:, 0], dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale)
    y = selective_state_update(
        ssm_state, u_q[:, :, 0], None, _f32(A), B_q[:, :, 0], C_q[:, :, 0], _f32(D),
        None if z_q is None else z_q[:, :, 0], _f32(delta_bias), delta_softplus,
        u_scale=u_scale, B_scale=B_scale, C_scale=C_scale, z_scale=z_scale, out_dtype=out_dtype, delta_proj=proj)
    return y[:, None, :].transpose(1, 2)


@graph_op("quamba::dt_proj_state_update", mutates_args=("ssm_state",))
def dt_proj_state_update_op(u_q: torch.Tensor, u_scale: torch.Tensor, dt_x_q: torch.Tensor,
                            dt_x_scale: torch.Tensor, dt_weight: torch.Tensor, dt_weight_scale: torch.Tensor,
                            dt_bias: Optional[torch.Tensor], delta_scale: torch.Tensor, A: torch.Tensor,
                            B_q: torch.Tensor, B_scale: torch.Tensor, C_q: torch.Tensor, C_scale: torch.Tensor,
                            D: Optional[torch.Tensor], z_q: Optional[torch.Tensor], z_scale: Optional[torch.Tensor],
                            delta_bias: Optional[torch.Tensor], delta_softplus: bool, out_dtype: torch.dtype,
                            ssm_state: torch.Tensor) -> torch.Tensor:
    """One decode step of `selective_scan_int8_cached` whose delta is dt_proj's int8 output
    `w8a8_linear(dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale)`, computed
    inside the scan kernel (`DeltaProjection`): the same delta, one launch fewer.

    u_q, z_q: `[B, D, 1]`; dt_x_q: `[B, 1, R]`; B_q, C_q: `[B, N, 1]`; returns y `[B, D, 1]` laid
    out `[B, 1, D]`, and advances `ssm_state` `[B, D, N]`.
    """
    return _dt_proj_state_update(u_q, u_scale, dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale,
                                 A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias, delta_softplus, out_dtype,
                                 ssm_state)


@dt_proj_state_update_op.register_fake
def _dt_proj_state_update_fake(u_q, u_scale, dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale,
                               A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias, delta_softplus,
                               out_dtype, ssm_state):
    return _y_like(u_q, out_dtype)


@graph_op("quamba::w4a16_dt_proj_state_update", mutates_args=("ssm_state",))
def w4a16_dt_proj_state_update_op(u: torch.Tensor, dt_x: torch.Tensor, dt_weight: torch.Tensor,
                                  dt_weight_scale: torch.Tensor, group_size: int, dt_bias: Optional[torch.Tensor],
                                  act_dtype: Optional[torch.dtype], A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                                  D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                                  delta_bias: Optional[torch.Tensor], delta_softplus: bool,
                                  ssm_state: torch.Tensor) -> torch.Tensor:
    """One decode step of `selective_scan_cached` whose delta is dt_proj's W4A16 output
    `w4a16_gemm(dt_x, dt_weight, dt_weight_scale, group_size, dt_bias, act_dtype)`, computed inside
    the scan kernel (`DeltaProjectionW4`): one launch fewer, the same delta up to the order of its
    sums.

    u, z: float `[B, D, 1]`; dt_x: `[B, 1, R]`; B, C: `[B, N, 1]`; returns y `[B, D, 1]` (as
    `selective_scan_cached` does) and advances `ssm_state` `[B, D, N]`.
    """
    x = dt_x[:, 0]
    if act_dtype is not None and act_dtype != x.dtype and x.dtype == torch.float32:
        x = x.to(act_dtype).to(x.dtype)  # the GEMM multiplies the row rounded to act_dtype
    proj = DeltaProjectionW4(x, dt_weight, dt_weight_scale, group_size, None if dt_bias is None else dt_bias.float())
    y = selective_state_update(ssm_state, u[..., 0], None, _f32(A), B[..., 0], C[..., 0], _f32(D),
                               None if z is None else z[..., 0], _f32(delta_bias), delta_softplus, delta_proj=proj)
    return y[..., None]


@w4a16_dt_proj_state_update_op.register_fake
def _w4a16_dt_proj_state_update_fake(u, dt_x, dt_weight, dt_weight_scale, group_size, dt_bias, act_dtype, A, B, C, D,
                                     z, delta_bias, delta_softplus, ssm_state):
    return u.new_empty(u.shape)
