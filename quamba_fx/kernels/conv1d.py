"""Fused int8 causal depthwise conv1d + SiLU (Mamba's short convolution), W8A8 Quamba-style.

Two entry points, each with a pure-PyTorch reference of identical numerics:

* prefill: `causal_conv1d_silu_int8` (`[B, D, L]` int8 in, int8 out whose memory is `[B, L, D]`);
* decode:  `causal_conv1d_update_silu_int8` (one token, rolls an int8 `[B, D, W-1]` state in place).

Numerics (the contract both the kernels and the references implement)
---------------------------------------------------------------------
Every step is an fp32 operation rounded to nearest-even (exp aside, see below), in this order, for each
(b, d, t), with `xin[j] = x_q[b, d, j]` for `j >= 0` and `initial_state[b, d, W-1+j]` (or 0) for `j < 0`:

1. fold the input scale into the taps: `ws[d, k] = weight[d, k] * x_scale` (one multiply per tap
   and channel, not per element: it saves W multiplies per output on the GPU);
2. accumulate: `acc = bias[d]` (or `+0.0`), then for k = 0, 1, ..., W-1 in this order:
   `acc = acc + ws[d, k] * float32(xin[t-(W-1)+k])` -- int8 -> fp32 is exact; a separate multiply
   and add, not an FMA;
3. SiLU: `y = acc / (1 + exp(-acc))` (negate, exp, add, divide);
4. requantise: `s = y * r` with `r = 1 / out_scale` (a correctly rounded fp32 reciprocal; the
   channel's own `out_scale[d]` when the scale is per channel);
5. saturate then round: `q = round_half_to_even(clamp(s, -128, 127))`, stored as int8.
   Clamping first is equivalent to clamping after rounding because the bounds are integers.
   Non-finite scales or inputs (NaN/inf) are outside the contract.

Why kernel and reference are bit-exact under TRITON_INTERPRET=1: steps 1, 2, 4, 5 are single
correctly rounded fp32 operations (numpy in the interpreter, ATen in the reference), and the kernel
rounds with the 1.5 * 2**23 trick (add, then read the low mantissa bits), which is exactly
round-half-to-even for |s| <= 2**22, like `torch.round`. The only transcendental is `exp`: the
interpreter evaluates `tl.exp` with `numpy.exp` on a float32 array, so for CPU tensors the reference
calls that same `numpy.exp` (numpy's float32 exp is an element-wise routine, so a value's result
does not depend on the array's shape or on the value's position in it). `torch.exp` and `numpy.exp`
differ by an ulp on a large fraction of float32 inputs (about 40% of random ones on the x86 machine
this was written on), which would flip the occasional rounding at a .5 boundary and make a
bit-exact test flaky; we never mix the two. The tests include inputs placed where one ulp of exp
decides the int8 result.

On CUDA the kernel is not bit-exact with the reference: it computes step 3-4 as
`(acc * r) * rcp(1 + ex2(-acc * log2 e))` with the one-instruction `ex2.approx.ftz` and
`rcp.approx.ftz` (FAST_MATH, on whenever the interpreter is off), and `acc + ws * f` contracts into
an FMA. These are errors of a few fp32 ulps, so outputs sitting at a rounding boundary may differ
by one int8 step; more would need |terms| / out_scale around 1e7, far outside any calibrated
model.

Performance design (H100 target: >= 70% of copy bandwidth): a program owns a block of channels
(D is the vectorised, coalesced axis of both the in_proj read and the [B, L, D] write) and walks a
block of time steps in order, keeping the last W-1 inputs in registers and prefetching 4 steps
ahead; int8 <-> fp32 conversions use float-bit tricks instead of the slow I2F/F2I units. Block
sizes are autotuned on (D, next_power_of_2(L), W); decode is one program per (batch, D block).

Layouts: `x_q` may have any strides. The prefill kernel reads the x half of in_proj's output,
`xz.transpose(1, 2)[:, :D]` (stride 1 along D, 2*D along L), with no copy; its output is allocated
as `[B, L, D]` and returned transposed, the layout x_proj's GEMM wants (the scan reads any strides).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
import triton
import triton.language as tl

from .dispatch import AUTOTUNE_DO_BENCH, cdiv, next_pow2
from .dispatch import INTERPRET as _INTERPRET
from .dispatch import as_scalar, graph_op, launch_tuned, precompile, tuned_configs
from .dispatch import use_triton as _use_triton
from .pdl import launch_options, prefill_launch_options, wait_for_previous
from .rounding import approx_f32, int8_to_f32

__all__ = [
    "causal_conv1d_silu_int8",
    "causal_conv1d_silu_int8_reference",
    "causal_conv1d_update_silu_int8",
    "causal_conv1d_update_silu_int8_reference",
]


PrefillResult = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _silu_requant(acc, inv_out_scale, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        # silu(acc) / out_scale as (acc * r) * rcp(1 + 2**(-acc * log2 e)): six instructions.
        # An overflowing exponent gives rcp(inf) = 0, i.e. silu -> -0, as the exact form does.
        # One MUFU instruction each (rounding.approx_f32): the fix-ups of tl.exp and `/` would take
        # several issue slots per output where the budget is ~35.
        e = approx_f32(acc * -1.4426950408889634, "ex2")
        s = (acc * inv_out_scale) * approx_f32(1.0 + e, "rcp")
    else:
        y = acc / (1.0 + tl.exp(-acc))
        s = y * inv_out_scale
    s = tl.minimum(tl.maximum(s, -128.0), 127.0)
    # Adding 1.5 * 2**23 leaves an fp32 whose ulp is 1, so the add itself rounds s half-to-even
    # and the bits become 0x4B400000 + round(s), whose low byte is round(s) as int8: the cast
    # truncates. No F2I (also 1/8 rate) and no dependence on how a backend implements rint.
    return (s + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def inverse_out_scale(out_scale_ptr, offs_d, mask_d, PER_CHANNEL: tl.constexpr):
    """`1 / out_scale` (correctly rounded): one value, or with PER_CHANNEL `[BLOCK_D]` for channels
    `offs_d` (Quamba2's Mamba-2 conv output: a scale per channel of x, per group of B and C)."""
    if PER_CHANNEL:
        scale = tl.load(out_scale_ptr + offs_d, mask=mask_d, other=1.0)
    else:
        scale = tl.load(out_scale_ptr)
    return tl.math.div_rn(1.0, scale)


@triton.jit
def _load_step(x_base, s_base, offs_d, mask_d, pos, L, stride_xd, stride_xl, stride_sd, stride_sk,
               W: tl.constexpr, HAS_STATE: tl.constexpr):
    # The int8 inputs at time `pos` (may be negative) of the sequence [initial_state, x], for the
    # channels offs_d. `pos` is broadcast per lane so the masks are vectors even for a Python int;
    # pos * stride_xl can pass 2**31 on long sequences, hence int64.
    pos = tl.zeros_like(offs_d) + pos
    v = tl.load(x_base + offs_d * stride_xd + pos.to(tl.int64) * stride_xl, mask=mask_d & (pos >= 0) & (pos < L),
                other=0)
    if HAS_STATE:
        s = tl.load(s_base + offs_d * stride_sd + (pos + W - 1) * stride_sk, mask=mask_d & (pos < 0), other=0)
        v = tl.where(pos < 0, s, v)
    return v


@triton.jit
def _tap_scale(w_ptr, offs_d, mask_d, stride_wd, stride_wk, x_scale, k: tl.constexpr):
    # Step 1 of the contract: weight[:, k] * x_scale, or a dummy for the taps a narrow W lacks.
    if k >= 0:
        ws = tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=mask_d, other=0.0) * x_scale
    else:
        ws = tl.zeros(offs_d.shape, dtype=tl.float32)
    return ws


def _prefill_configs():
    if _INTERPRET:
        # Small tiles keep the numpy blocks cheap, and the test shapes still span several D and
        # L tiles, so halos across tiles and ragged edges are exercised. Model-sized inputs take a
        # wide tile (the interpreter pays per operation, not per element); `_interpreter_pick`
        # leaves one config per shape: no tuning.
        return [triton.Config({"BLOCK_D": 64, "BLOCK_L": 8}, num_warps=1),
                triton.Config({"BLOCK_D": 512, "BLOCK_L": 16}, num_warps=1)]
    # BLOCK_D / (32 * num_warps) channels per thread (4..16 bytes per access); BLOCK_L steps per
    # program trade the W-1 halo rows re-read per tile against the number of programs; PREFETCH
    # 8 keeps twice as many loads in flight per warp for the large, bandwidth-bound shapes. Short
    # prompts are latency-bound: 64 channels a warp and 8 or 16 steps give them more programs
    # (H200, 2.8b's 5120 channels, docs/benchmarks.md run 9: 1 x 128 7.5 us against 8.6 with the
    # best of the larger tiles, 1 x 2048 19.2 against 20.1).
    return [
        triton.Config({"BLOCK_D": bd, "BLOCK_L": bl, "PREFETCH": pf}, num_warps=nw)
        for bd, bl, nw, pf in [
            (64, 8, 1, 4),
            (64, 16, 1, 4),
            (128, 8, 1, 4),
            (128, 16, 1, 4),
            (256, 16, 2, 4),
            (256, 32, 1, 4),
            (256, 64, 1, 4),
            (512, 32, 2, 4),
            (512, 64, 4, 4),
            (1024, 32, 4, 4),
            (256, 64, 1, 8),
            (512, 32, 2, 8),
            (512, 64, 2, 8),
            (512, 64, 4, 8),
            (1024, 32, 4, 8),
            (1024, 64, 4, 8),
        ]
    ]


def _interpreter_pick(configs, named_args, **kwargs):
    if not _INTERPRET:
        return configs
    wide = named_args["D"] >= 512 and named_args["L"] >= 64
    return [c for c in configs if (c.kwargs["BLOCK_D"] == 512) == wide] or configs


@triton.autotune(configs=_prefill_configs(), key=["D", "L_BUCKET", "W"],
                 prune_configs_by={"early_config_prune": _interpreter_pick}, do_bench=AUTOTUNE_DO_BENCH)
# L == 1 would otherwise become a compile-time constant (and every new L % 16 class a new
# specialisation); D stays specialised: D % 16 == 0 lets the D mask keep wide vector accesses.
@triton.jit(do_not_specialize=["L", "L_BUCKET"])
def _causal_conv1d_silu_int8_kernel(
    x_ptr, x_scale_ptr, w_ptr, bias_ptr, out_scale_ptr, state_ptr, out_ptr, final_ptr,
    D, L, L_BUCKET,
    stride_xb, stride_xd, stride_xl,
    stride_wd, stride_wk,
    stride_sb, stride_sd, stride_sk,
    stride_ob, stride_od, stride_ol,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, WRITE_FINAL: tl.constexpr,
    FAST_MATH: tl.constexpr, PER_CHANNEL_OUT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr = 4,
):
    # Each program owns BLOCK_D channels (the vectorised axis: contiguous in both the in_proj
    # read and the [B, L, D] write) over BLOCK_L time steps, and walks the steps in order with
    # the last W-1 inputs kept in registers, already converted to fp32. At copy bandwidth an H100
    # has only ~35 issue slots per output, so instruction count matters: a 2-D [L, D] tile with W
    # shifted loads converts every input W times and compiled (sm_90) to ~37 SASS instructions
    # per output; this walk needs ~26, most of them in the exp/divide epilogue.
    tl.static_assert(BLOCK_L >= PREFETCH)
    # The input is in_proj's output, the kernel ahead: under PDL only the launch overlaps it.
    wait_for_previous(USE_PDL)
    # A flat grid (D tiles fastest, then L tiles, then batch): no 65535 limit on grid axes 1/2,
    # and neighbouring programs touch neighbouring bytes of the same rows.
    pid = tl.program_id(0)
    n_d = tl.cdiv(D, BLOCK_D)
    n_l = tl.cdiv(L, BLOCK_L)
    pid_d = pid % n_d
    pid_l = (pid // n_d) % n_l
    pid_b = pid // (n_d * n_l)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    t0 = pid_l * BLOCK_L
    # Steps of this tile that exist (may exceed BLOCK_L), per lane so that row masks are vectors
    # (the interpreter rejects a vector & scalar-bool mask).
    n_rows = tl.zeros_like(offs_d) + (L - t0)
    x_b = x_ptr + pid_b.to(tl.int64) * stride_xb
    s_b = state_ptr + pid_b.to(tl.int64) * stride_sb
    # 64-bit row bases; offsets within a tile stay 32-bit.
    x_row = x_b + t0.to(tl.int64) * stride_xl + offs_d * stride_xd
    o_row = out_ptr + pid_b.to(tl.int64) * stride_ob + t0.to(tl.int64) * stride_ol + offs_d * stride_od

    # Scales are read from memory so that changing them in place needs no recompilation.
    x_scale = tl.load(x_scale_ptr)
    inv_out_scale = inverse_out_scale(out_scale_ptr, offs_d, mask_d, PER_CHANNEL_OUT)
    # c<j> multiplies the input j steps back, i.e. tap k = W-1-j.
    c0 = _tap_scale(w_ptr, offs_d, mask_d, stride_wd, stride_wk, x_scale, W - 1)
    c1 = _tap_scale(w_ptr, offs_d, mask_d, stride_wd, stride_wk, x_scale, W - 2)
    c2 = _tap_scale(w_ptr, offs_d, mask_d, stride_wd, stride_wk, x_scale, W - 3)
    c3 = _tap_scale(w_ptr, offs_d, mask_d, stride_wd, stride_wk, x_scale, W - 4)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)

    # The halo: the W-1 inputs before t0 (previous tile, initial state or zeros).
    h1 = int8_to_f32(_load_step(x_b, s_b, offs_d, mask_d, t0 - 1, L, stride_xd, stride_xl, stride_sd, stride_sk,
                                W, HAS_STATE))
    h2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    h3 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if W >= 3:
        h2 = int8_to_f32(_load_step(x_b, s_b, offs_d, mask_d, t0 - 2, L, stride_xd, stride_xl, stride_sd,
                                    stride_sk, W, HAS_STATE))
    if W >= 4:
        h3 = int8_to_f32(_load_step(x_b, s_b, offs_d, mask_d, t0 - 3, L, stride_xd, stride_xl, stride_sd,
                                    stride_sk, W, HAS_STATE))

    # Software prefetch, PREFETCH (4 or 8) steps ahead: Triton emits loads and stores as ordered
    # side-effecting asm, so without it each step's load would only be issued after the previous
    # step's store and a warp would have one load in flight.
    tl.static_assert(PREFETCH == 4 or PREFETCH == 8)
    q0 = tl.load(x_row, mask=mask_d & (n_rows > 0), other=0)
    q1 = tl.load(x_row + 1 * stride_xl, mask=mask_d & (n_rows > 1), other=0)
    q2 = tl.load(x_row + 2 * stride_xl, mask=mask_d & (n_rows > 2), other=0)
    q3 = tl.load(x_row + 3 * stride_xl, mask=mask_d & (n_rows > 3), other=0)
    if PREFETCH == 8:
        q4 = tl.load(x_row + 4 * stride_xl, mask=mask_d & (n_rows > 4), other=0)
        q5 = tl.load(x_row + 5 * stride_xl, mask=mask_d & (n_rows > 5), other=0)
        q6 = tl.load(x_row + 6 * stride_xl, mask=mask_d & (n_rows > 6), other=0)
        q7 = tl.load(x_row + 7 * stride_xl, mask=mask_d & (n_rows > 7), other=0)
    for i in tl.static_range(BLOCK_L):
        cur = int8_to_f32(q0)
        q0 = q1
        q1 = q2
        q2 = q3
        if PREFETCH == 8:
            q3 = q4
            q4 = q5
            q5 = q6
            q6 = q7
            if i + 8 < BLOCK_L:
                q7 = tl.load(x_row + (i + 8) * stride_xl, mask=mask_d & (n_rows > i + 8), other=0)
        else:
            if i + 4 < BLOCK_L:
                q3 = tl.load(x_row + (i + 4) * stride_xl, mask=mask_d & (n_rows > i + 4), other=0)
        # Taps in the contract's order k = 0..W-1, i.e. oldest input first.
        acc = bias
        if W >= 4:
            acc = acc + c3 * h3
        if W >= 3:
            acc = acc + c2 * h2
        acc = acc + c1 * h1
        acc = acc + c0 * cur
        tl.store(o_row + i * stride_ol, _silu_requant(acc, inv_out_scale, FAST_MATH), mask=mask_d & (n_rows > i))
        h3 = h2
        h2 = h1
        h1 = cur

    if WRITE_FINAL:
        # The last W-1 columns of [initial_state, x]; written by the programs of the last L tile.
        if pid_l == n_l - 1:
            f_base = final_ptr + pid_b.to(tl.int64) * D * (W - 1)
            for j in tl.static_range(W - 1):
                v = _load_step(x_b, s_b, offs_d, mask_d, L - (W - 1) + j, L,
                               stride_xd, stride_xl, stride_sd, stride_sk, W, HAS_STATE)
                tl.store(f_base + offs_d * (W - 1) + j, v, mask=mask_d)


@triton.jit
def _causal_conv1d_update_silu_int8_kernel(
    x_ptr, state_ptr, x_scale_ptr, w_ptr, bias_ptr, out_scale_ptr, out_ptr,
    D,
    stride_xb, stride_xd,
    stride_sb, stride_sd, stride_sk,
    stride_wd, stride_wk,
    stride_ob, stride_od,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_MATH: tl.constexpr, PER_CHANNEL_OUT: tl.constexpr,
    BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x_new = tl.load(x_ptr + pid_b.to(tl.int64) * stride_xb + offs_d * stride_xd, mask=mask_d, other=0)
    q = conv_update_step(x_new, state_ptr + pid_b.to(tl.int64) * stride_sb, x_scale_ptr, w_ptr, bias_ptr,
                         out_scale_ptr, offs_d, mask_d, stride_sd, stride_sk, stride_wd, stride_wk,
                         W, HAS_BIAS, FAST_MATH, PER_CHANNEL_OUT)
    tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + offs_d * stride_od, q, mask=mask_d)


@triton.jit
def _tap(acc, v, w_ptr, offs_d, mask_d, k: tl.constexpr, stride_wd, stride_wk, x_scale):
    ws = tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=mask_d, other=0.0) * x_scale
    return acc + ws * int8_to_f32(v)


@triton.jit
def state_columns(s_base, x_new, mask_d, stride_sk, W: tl.constexpr):
    """Columns c0..c2 of `[state, x_new]` for one decode conv step of the channels at `s_base`
    (2 <= W <= 4; a column a narrow W lacks is x_new, in the state's dtype). All are read before
    `roll_state` writes any: a channel may be held by several threads (the GEMVs' epilogues spread
    a tile's channels over more threads), and its barrier keeps one thread's roll from reaching a
    column another has yet to read. The int8 and the float decode steps both use the pair."""
    c0 = tl.load(s_base, mask=mask_d, other=0)
    if W > 2:
        c1 = tl.load(s_base + stride_sk, mask=mask_d, other=0)
    else:
        c1 = x_new.to(c0.dtype)
    if W > 3:
        c2 = tl.load(s_base + 2 * stride_sk, mask=mask_d, other=0)
    else:
        c2 = x_new.to(c0.dtype)
    return c0, c1, c2


@triton.jit
def roll_state(s_base, c1, c2, x_new, mask_d, stride_sk, W: tl.constexpr):
    """The state rolled left in place with `x_new` appended, once every thread has read its
    columns (`state_columns`)."""
    tl.debug_barrier()
    tl.store(s_base, c1, mask=mask_d)
    if W > 2:
        tl.store(s_base + stride_sk, c2, mask=mask_d)
    if W > 3:
        tl.store(s_base + 2 * stride_sk, x_new.to(c1.dtype), mask=mask_d)


@triton.jit
def conv_update_step(x_new, state_row, x_scale_ptr, w_ptr, bias_ptr, out_scale_ptr, offs_d, mask_d,
                     stride_sd, stride_sk, stride_wd, stride_wk,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_MATH: tl.constexpr,
                     PER_CHANNEL_OUT: tl.constexpr = False):
    """One decode step of the channels `offs_d` of one sequence, given its new int8 inputs
    `x_new`: the conv over `[state, x_new]`, SiLU, requantised to int8 (returned), and the state
    (`state_row`: that sequence's `[D, W-1]`) rolled left in place with `x_new` appended. Also the
    in_proj GEMV's epilogue in decode graphs (gemv.py), so both compute the same step."""
    s_base = state_row + offs_d * stride_sd
    x_scale = tl.load(x_scale_ptr)
    inv_out_scale = inverse_out_scale(out_scale_ptr, offs_d, mask_d, PER_CHANNEL_OUT)
    if HAS_BIAS:
        acc = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        acc = tl.zeros(offs_d.shape, dtype=tl.float32)
    c0, c1, c2 = state_columns(s_base, x_new, mask_d, stride_sk, W)
    acc = _tap(acc, c0, w_ptr, offs_d, mask_d, 0, stride_wd, stride_wk, x_scale)
    acc = _tap(acc, c1, w_ptr, offs_d, mask_d, 1, stride_wd, stride_wk, x_scale)
    if W > 2:
        acc = _tap(acc, c2, w_ptr, offs_d, mask_d, 2, stride_wd, stride_wk, x_scale)
    if W > 3:
        acc = _tap(acc, x_new, w_ptr, offs_d, mask_d, 3, stride_wd, stride_wk, x_scale)
    q = _silu_requant(acc, inv_out_scale, FAST_MATH)
    roll_state(s_base, c1, c2, x_new, mask_d, stride_sk, W)
    return q


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_int8(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int8:
        raise ValueError(f"{name} must be int8, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    return t


def _check_scale(name: str, s: object, device: torch.device, channels: Optional[int] = None) -> None:
    """A per-tensor scale, or with `channels` also one of shape `[channels]` (one a channel)."""
    wanted = "a 0-dim or 1-element float32 tensor" + (f" or a float32 [{channels}] (one a channel)" if channels else "")
    if not isinstance(s, torch.Tensor):
        raise ValueError(f"{name} must be {wanted} (read by the kernel at run time), got {type(s).__name__}")
    per_channel = channels is not None and tuple(s.shape) == (channels,)
    if s.dtype != torch.float32 or (s.numel() != 1 and not per_channel):
        raise ValueError(f"{name} must be {wanted}, got {s.dtype} of shape {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device} but x_q is on {device}")


def _describe(t: object) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_params(weight: object, bias: object, D: int, device: torch.device) -> int:
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.dim() != 2:
        desc = _describe(weight)
        raise ValueError(f"weight must be a float32 [D, W] tensor, got {desc}")
    W = weight.shape[1]
    if weight.shape[0] != D:
        raise ValueError(f"weight has {weight.shape[0]} channels but x_q has D={D}")
    if not 2 <= W <= 4:
        raise ValueError(f"kernel width W must be in 2..4, got W={W}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but x_q is on {device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32 or tuple(bias.shape) != (D,):
            desc = _describe(bias)
            raise ValueError(f"bias must be None or a float32 tensor of shape ({D},), got {desc}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but x_q is on {device}")
    return W


def _check_state(name: str, s: object, B: int, D: int, W: int, device: torch.device) -> None:
    _check_int8(name, s, 3)
    if tuple(s.shape) != (B, D, W - 1):
        raise ValueError(f"{name} must have shape (B, D, W-1) = {(B, D, W - 1)}, got {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device} but x_q is on {device}")


def _validate_prefill(x_q, x_scale, weight, bias, out_scale, initial_state) -> int:
    _check_int8("x_q", x_q, 3)
    B, D, _ = x_q.shape
    _check_scale("x_scale", x_scale, x_q.device)
    _check_scale("out_scale", out_scale, x_q.device, D)
    W = _check_params(weight, bias, D, x_q.device)
    if initial_state is not None:
        _check_state("initial_state", initial_state, B, D, W, x_q.device)
    return W


def _validate_update(x_q, conv_state, x_scale, weight, bias, out_scale) -> int:
    _check_int8("x_q", x_q, 2)
    B, D = x_q.shape
    _check_scale("x_scale", x_scale, x_q.device)
    _check_scale("out_scale", out_scale, x_q.device, D)
    W = _check_params(weight, bias, D, x_q.device)
    _check_state("conv_state", conv_state, B, D, W, x_q.device)
    return W


# ---------------------------------------------------------------------------------------------
# References (pure PyTorch, except numpy.exp on CPU; see the module docstring)
# ---------------------------------------------------------------------------------------------


def _exp_f32(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        # The exact function the Triton interpreter applies for tl.exp.
        return torch.from_numpy(np.exp(np.ascontiguousarray(x.numpy())))
    return torch.exp(x)


def _silu_requant_reference(acc: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    y = acc / (1.0 + _exp_f32(-acc))
    # A per-channel scale `[D]` meets acc's channel dim, the one before the steps.
    s = y * torch.reciprocal(out_scale.reshape(-1, 1) if out_scale.numel() > 1 else out_scale.reshape(()))
    return torch.round(torch.clamp(s, -128.0, 127.0)).to(torch.int8)


def _conv_taps(cols: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor], n_out: int) -> torch.Tensor:
    """Steps 1-2 of the contract; `cols` is int8 [..., D, n_out + W - 1], returns fp32 [..., D, n_out]."""
    W = weight.shape[1]
    ws = weight * x_scale.reshape(())
    f = cols.to(torch.float32)
    shape = f.shape[:-1] + (n_out,)
    if bias is not None:
        acc = bias[:, None].expand(shape).clone()
    else:
        acc = torch.zeros(shape, dtype=torch.float32, device=cols.device)
    for k in range(W):
        acc = acc + ws[:, k, None] * f[..., k:k + n_out]
    return acc


def causal_conv1d_silu_int8_reference(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_scale: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
) -> PrefillResult:
    """PyTorch reference of `causal_conv1d_silu_int8`: same arguments, same numerics, same layouts."""
    W = _validate_prefill(x_q, x_scale, weight, bias, out_scale, initial_state)
    B, D, L = x_q.shape
    if initial_state is None:
        initial_state = torch.zeros(B, D, W - 1, dtype=torch.int8, device=x_q.device)
    cols = torch.cat([initial_state, x_q], dim=-1)
    q = _silu_requant_reference(_conv_taps(cols, x_scale, weight, bias, L), out_scale)
    out = torch.empty(B, L, D, dtype=torch.int8, device=x_q.device).transpose(1, 2)
    out.copy_(q)
    if return_final_state:
        return out, cols[..., L:].contiguous()
    return out


def causal_conv1d_update_silu_int8_reference(
    x_q: torch.Tensor,
    conv_state: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """PyTorch reference of `causal_conv1d_update_silu_int8` (also updates `conv_state` in place)."""
    _validate_update(x_q, conv_state, x_scale, weight, bias, out_scale)
    cols = torch.cat([conv_state, x_q[..., None]], dim=-1)
    q = _silu_requant_reference(_conv_taps(cols, x_scale, weight, bias, 1), out_scale)
    conv_state.copy_(cols[..., 1:])
    return q[..., 0].contiguous()


# The tuned launch parameters per autotune key. After a shape's first call, launches go straight
# to the JIT function: the autotuner's per-call work (argument dictionaries, key building) is host
# time that a B=1 prefill, a few microseconds of GPU work, cannot hide.
_PREFILL_TUNED: dict = tuned_configs("conv1d_prefill")


def _launch_prefill(key: tuple, B: int, D: int, L: int, args: tuple, flags: dict) -> None:
    launch_tuned(_PREFILL_TUNED, key, _autotune_prefill, _launch_prefill_config, B, D, L, args, flags)


def _autotune_prefill(B: int, D: int, L: int, args: tuple, flags: dict) -> dict:
    def grid(meta):
        return (B * cdiv(D, meta["BLOCK_D"]) * cdiv(L, meta["BLOCK_L"]),)

    precompile(_causal_conv1d_silu_int8_kernel.fn, args,
               ({**flags, **c.all_kwargs()} for c in _causal_conv1d_silu_int8_kernel.configs))
    _causal_conv1d_silu_int8_kernel[grid](*args, **flags)
    return dict(_causal_conv1d_silu_int8_kernel.best_config.all_kwargs())


def _launch_prefill_config(tuned: dict, B: int, D: int, L: int, args: tuple, flags: dict) -> None:
    n_programs = B * cdiv(D, tuned["BLOCK_D"]) * cdiv(L, tuned["BLOCK_L"])
    _causal_conv1d_silu_int8_kernel.fn[(n_programs,)](*args, **flags, **tuned)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def causal_conv1d_silu_int8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_scale: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
) -> PrefillResult:
    """Causal depthwise conv1d + SiLU on int8 activations, requantised to int8 (prefill).

    Args:
        x_q: int8 `[B, D, L]`, any strides (e.g. `xz.transpose(1, 2)[:, :D]`, read without a copy).
        x_scale: per-tensor input scale, 0-dim or 1-element float32 tensor on x_q's device.
        weight: float32 `[D, W]`, 2 <= W <= 4.
        bias: float32 `[D]` or None.
        out_scale: output scale, per tensor (0-dim or 1-element float32) or per channel (float32 `[D]`).
        initial_state: optional int8 `[B, D, W-1]`, the W-1 inputs preceding `x_q` (same x_scale);
            zeros when None.
        return_final_state: also return the last W-1 input columns of `[initial_state, x_q]`.

    Returns:
        int8 `[B, D, L]` whose memory is `[B, L, D]` contiguous; with `return_final_state`, a
        tuple `(out, final_state)` with `final_state` int8 `[B, D, W-1]` contiguous.

    CUDA tensors run the Triton kernel, as do CPU tensors under TRITON_INTERPRET=1; other CPU
    tensors run the reference. See the module docstring for the exact rounding contract.
    """
    W = _validate_prefill(x_q, x_scale, weight, bias, out_scale, initial_state)
    B, D, L = x_q.shape
    if not _use_triton(x_q) or B * D * L == 0:
        return causal_conv1d_silu_int8_reference(x_q, x_scale, weight, bias, out_scale,
                                                 initial_state, return_final_state)

    out = torch.empty(B, L, D, dtype=torch.int8, device=x_q.device).transpose(1, 2)
    final = torch.empty(B, D, W - 1, dtype=torch.int8, device=x_q.device) if return_final_state else out
    state = initial_state if initial_state is not None else x_q  # dummy pointer when absent
    s_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    # Tune per power-of-two bucket of L rather than per exact length: prefill lengths vary
    # per request and re-tuning for each one would dominate.
    l_bucket = next_pow2(L)
    args = (
        x_q, x_scale, weight, bias if bias is not None else weight, out_scale, state, out, final,
        D, L, l_bucket,
        *x_q.stride(),
        *weight.stride(),
        *s_strides,
        *out.stride(),
    )
    flags = dict(W=W, HAS_BIAS=bias is not None, HAS_STATE=initial_state is not None,
                 WRITE_FINAL=return_final_state, FAST_MATH=not _INTERPRET, PER_CHANNEL_OUT=out_scale.numel() > 1,
                 **prefill_launch_options(x_q.device))
    _launch_prefill((D, l_bucket, W), B, D, L, args, flags)
    if return_final_state:
        return out, final
    return out


def causal_conv1d_update_silu_int8(
    x_q: torch.Tensor,
    conv_state: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """One decode step of `causal_conv1d_silu_int8`.

    Args:
        x_q: int8 `[B, D]`, the new token (any strides).
        conv_state: int8 `[B, D, W-1]` (any strides), the previous W-1 inputs; updated in place
            (shifted left by one, `x_q` appended), so chained steps reproduce prefill exactly.
        x_scale, weight, bias, out_scale: as in `causal_conv1d_silu_int8`.

    Returns:
        int8 `[B, D]`, contiguous.
    """
    W = _validate_update(x_q, conv_state, x_scale, weight, bias, out_scale)
    B, D = x_q.shape
    if not _use_triton(x_q) or B * D == 0:
        return causal_conv1d_update_silu_int8_reference(x_q, conv_state, x_scale, weight, bias, out_scale)

    out = torch.empty(B, D, dtype=torch.int8, device=x_q.device)
    block_d = 32 if _INTERPRET else 256
    grid = (cdiv(D, block_d), B)
    _causal_conv1d_update_silu_int8_kernel[grid](
        x_q, conv_state, x_scale, weight, bias if bias is not None else weight, out_scale, out,
        D,
        *x_q.stride(),
        *conv_state.stride(),
        *weight.stride(),
        *out.stride(),
        W=W, HAS_BIAS=bias is not None, FAST_MATH=not _INTERPRET, PER_CHANNEL_OUT=out_scale.numel() > 1,
        BLOCK_D=block_d, num_warps=1 if _INTERPRET else 4, **launch_options(x_q.device),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Graph ops (torch.ops.quamba.*, see dispatch.graph_op)
# ---------------------------------------------------------------------------------------------


def _conv_params(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    # nn.Conv1d keeps [D, 1, W]; the kernels take [D, W] fp32 (a view when already fp32).
    w = weight.reshape(weight.shape[0], weight.shape[-1]).float()
    return w, None if bias is None else bias.float()


def as_out_scale(scale: torch.Tensor) -> torch.Tensor:
    """An op's output scale as the kernels take it: 0-d when one value, else `[D]` fp32."""
    return scale.float().reshape(-1) if scale.numel() > 1 else as_scalar(scale)


@graph_op("quamba::conv1d_silu_int8", mutates_args=())
def conv1d_silu_int8_op(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        out_scale: torch.Tensor) -> torch.Tensor:
    """dequantize -> causal depthwise conv1d -> SiLU -> quantize, fused (`causal_conv1d_silu_int8`).

    `x_q` int8 `[B, D, L]` (any strides), `weight` nn.Conv1d's `[D, 1, W]`, scales fp32 tensors
    (`out_scale` one value or `[D]`). Returns int8 `[B, D, L]` laid out as `[B, L, D]` in memory.
    """
    w, b = _conv_params(weight, bias)
    return causal_conv1d_silu_int8(x_q, as_scalar(x_scale), w, b, as_out_scale(out_scale))


@conv1d_silu_int8_op.register_fake
def _conv1d_silu_int8_fake(x_q, x_scale, weight, bias, out_scale):
    batch, channels, length = x_q.shape
    return x_q.new_empty((batch, length, channels)).transpose(1, 2)


@graph_op("quamba::conv1d_silu_int8_cached", mutates_args=("conv_state",))
def conv1d_silu_int8_cached_op(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], out_scale: torch.Tensor, conv_state: torch.Tensor,
                               decode: bool) -> torch.Tensor:
    """`conv1d_silu_int8` with a cache: `conv_state` int8 `[B, D, W-1]`, the last W-1 inputs.

    Prefill (`decode=False`) starts from zeros, as the uncached op does, and leaves the prompt's
    last W-1 inputs in `conv_state`; decode (`decode=True`, `x_q` `[B, D, 1]`) continues from it.
    """
    w, b = _conv_params(weight, bias)
    if decode:
        out = causal_conv1d_update_silu_int8(x_q[:, :, 0], conv_state, as_scalar(x_scale), w, b,
                                             as_out_scale(out_scale))
        return out[:, None, :].transpose(1, 2)
    out, final = causal_conv1d_silu_int8(x_q, as_scalar(x_scale), w, b, as_out_scale(out_scale),
                                         return_final_state=True)
    conv_state.copy_(final)
    return out


@conv1d_silu_int8_cached_op.register_fake
def _conv1d_silu_int8_cached_fake(x_q, x_scale, weight, bias, out_scale, conv_state, decode):
    batch, channels, length = x_q.shape
    return x_q.new_empty((batch, length, channels)).transpose(1, 2)
