"""The GEMM epilogues: W8A8's shared by gemm.py, gemm_tma.py, gemm_skinny.py and gemv.py (int32
accumulator tile -> dequantize -> bias -> requantize / cast, in the order gemm.py's numerical
contract fixes), and the 4-bit weights' shared by gemm_w4.py and gemm_w4_skinny.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import f32_to_bf16_rne, quantize_rn

__all__ = ["OUT_MODES", "epilogue", "requant_int8", "store_tile", "store_w4_tile"]

# out_dtype -> the kernels' OUT_MODE. Other dtypes (fp64, fp8) have no kernel epilogue.
OUT_INT8, OUT_BF16, OUT_CAST = 0, 1, 2
OUT_MODES = {torch.int8: OUT_INT8, torch.bfloat16: OUT_BF16, torch.float16: OUT_CAST, torch.float32: OUT_CAST}


@triton.jit
def requant_int8(y, out_scale):
    """`round_half_even(clamp(y / out_scale, -128, 127))` with the IEEE quotient, for any finite
    out_scale (a scalar or a `[1, BN]` row)."""
    # `div_rn` costs ~10 instructions a value plus a range check, most of the epilogue and so most
    # of a short-K GEMM's time; `quantize_rn` (reciprocal product + one exact FMA correction) gives
    # the same bits in ~5, provided its residual is exact, which needs a scale far from fp32's
    # limits. So both sides are first multiplied by p = 2**(127 - exponent(out_scale)), clamped to
    # 2**+-126: the scale lands in [1, 2) (or [2**-23, 4) at the extremes), the quotient is
    # unchanged, and y * p is exact or, where it over- or underflows, the quotient saturates or
    # rounds to 0 either way. One multiply a value, no branch (an if/else around a division
    # fallback made the 128x256 tiles spill).
    e = (out_scale.to(tl.int32, bitcast=True) >> 23) & 0xFF
    shift = tl.minimum(tl.maximum(127 - e, -126), 126)
    p = ((shift + 127) << 23).to(tl.float32, bitcast=True)
    return quantize_rn(y * p, out_scale * p)


@triton.jit
def epilogue(acc, cols, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, OUT_TY: tl.constexpr,
             W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
             OUT_PER_CHANNEL: tl.constexpr):
    """`acc [BM, BN]` int32 -> the output tile in OUT_TY. `cols` are in-range column indices (the
    callers wrap columns past N onto valid ones and never store those), so the loads need no mask.
    Scales are read here, not passed as floats, so in-place updates take effect."""
    a32 = acc.to(tl.float32)
    x_scale = tl.load(x_scale_ptr)
    if W_PER_CHANNEL:
        s = x_scale * tl.load(w_scale_ptr + cols)
        y = a32 * s[None, :]
    else:
        s = x_scale * tl.load(w_scale_ptr)
        y = a32 * s
    if HAS_BIAS:
        # `y` is its own statement above, and the kernels are compiled without fp fusion: the
        # multiply rounds before the add, as in the reference.
        y = y + tl.load(bias_ptr + cols)[None, :]
    if OUT_MODE == 0:
        if OUT_PER_CHANNEL:
            out = requant_int8(y, tl.load(out_scale_ptr + cols)[None, :])
        else:
            out = requant_int8(y, tl.load(out_scale_ptr))
    elif OUT_MODE == 1:
        out = f32_to_bf16_rne(y)
    else:
        out = y.to(OUT_TY)
    return out


@triton.jit
def store_tile(acc, offs_m, offs_n, cols, M, N, stride_om, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
               out_ptr, W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
               OUT_PER_CHANNEL: tl.constexpr):
    """The epilogue of `acc` (rows `offs_m`, columns `offs_n`; `cols` the in-range columns) stored
    into the `[M, N]` output with row stride `stride_om`, masked to the output's edges."""
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out = epilogue(acc, cols, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr.dtype.element_ty,
                   W_PER_CHANNEL, HAS_BIAS, OUT_MODE, OUT_PER_CHANNEL)
    tl.store(out_ptrs, out, mask=mask)


@triton.jit
def store_w4_tile(acc, offs_m, offs_n, cols, M, N, stride_om, x_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                  A8: tl.constexpr, HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr):
    """A 4-bit-weight GEMM's `acc [BM, BN]` (fp32, the group-scaled sums) -> `* x_scale` (A8: int8
    activations) `(+ bias)` -> int8 at out_scale or the output's dtype, stored into `[M, N]` with
    row stride `stride_om`, masked to its edges (`cols`: the in-range columns, as in `epilogue`)."""
    y = acc
    if A8:
        y = y * tl.load(x_scale_ptr)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols)[None, :]
    if REQUANT:
        out = requant_int8(y, tl.load(out_scale_ptr))
    else:
        out = y.to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
