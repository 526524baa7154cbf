"""fp32 rounding primitives shared by the kernels, exact on CUDA and under the Triton interpreter.

* `fma_rn(a, b, c)`: `a * b + c` with ONE rounding (IEEE fusedMultiplyAdd, round to nearest even).
  On CUDA it is `tl.fma`, the hardware's `fma.rn.f32`. The Triton interpreter's `tl.fma` computes
  `a * b` and `+ c` as two numpy float32 operations, i.e. two roundings (seen with Triton 3.6 and
  3.8 on numpy 2.x), so under TRITON_INTERPRET=1 the same fused result is computed in float64
  instead: the product of two fp32 values is exact in float64 (24 + 24 <= 53 significant bits),
  the sum is rounded to odd (round to nearest, then, if Knuth's TwoSum says it was inexact and the
  last bit is even, one ulp towards the exact value), and the final float64 -> fp32 conversion
  rounds to nearest. Rounding to odd at 53 bits and then to nearest at 24 equals one rounding to
  nearest at 24 (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums: proved
  algorithms using rounding to odd", 2008; it needs 53 >= 24 + 2), so both sides compute the
  same bits and the interpreter tests check the GPU's arithmetic, not a stand-in for it.
  Non-finite inputs give what the plain float64 expression gives (inf or NaN, as the hardware).
* `quantize_rn(y, scale)`: `clamp(round_half_even(y / scale), -128, 127)` as int8, with `y / scale`
  the correctly rounded fp32 quotient (like `torch.ops.quamba.quantize`), from a reciprocal product
  and one `fma_rn` correction (see its comments for why no division per element), for scales in
  [2**-126, 2**120].
* `quantize_e4m3_rn(y, scale)`: the fp8 counterpart, `e4m3(clamp(y / scale, -448, 448))` (round
  to nearest even, subnormals included) like `quamba_fx.quant.fp8.quantize_fp8`, bit for bit, for
  scales in [2**-90, 2**118]. On CUDA the hardware's fp32 -> e4m3 conversion rounds the correctly
  rounded quotient; under the interpreter, whose own cast rounds differently from torch's on a
  fifth of random inputs, the rounding is done in fp32 arithmetic on the bits.
* `mul_rn(a, b)`: `a * b` rounded once and never contracted with a later add into an FMA, for
  kernels compiled with fp fusion that must reproduce a two-rounding `a * b + c` (on CUDA a
  `mul.rn.f32` in inline PTX, which the compiler cannot see through; the interpreter never fuses).
* `f32_to_bf16_rne(y)`: fp32 -> bf16 rounded to nearest even on the bits (the interpreter's own
  fp32 -> bf16 cast truncates, and its "rtne" mode rounds ties away from zero; the GPU's rounds).

* `int8_to_f32(q)`: int8 -> fp32 (exact) without the I2F conversion, which on the H100 issues at
  1/8 of the fp32 rate: the bits of 2**23 + 128 + q, minus 2**23 + 128.

And one primitive that is not exact, for kernels' FAST_MATH paths (CUDA only, no interpreter
form): `approx_f32(x, op)`, a single MUFU instruction (`ex2`, `lg2`, `rcp`) with flush-to-zero.

Only the interpreter pays for the emulation (a handful of numpy operations per element); on CUDA
the flags below are compile-time constants and the kernels keep their single `fma.rn.f32` and
`cvt.rn.satfinite.e4m3x2.f32`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dispatch import INTERPRET

__all__ = ["approx_f32", "f32_to_bf16_rne", "fma_rn", "int8_to_f32", "mul_rn", "quantize_e4m3_rn", "quantize_rn"]

# A compile-time constant: Triton accepts globals in kernels only as constexprs (and hashes their
# values into the kernel's cache key).
_EMULATE_FMA = tl.constexpr(INTERPRET)
# The interpreter's own fp32 -> e4m3 cast rounds differently from torch's on a fifth of random
# inputs, so it rounds by hand; compiled kernels use the hardware's conversion.
_EMULATE_E4M3 = tl.constexpr(INTERPRET)


@triton.jit
def _fma_round_to_odd(a, b, c):
    p = a.to(tl.float64) * b.to(tl.float64)  # exact
    c64 = c.to(tl.float64)
    s = p + c64
    p_plus_c = s
    # An inf or NaN sum is already the fused result; its TwoSum would only make NaNs (inf - inf),
    # which numpy warns about, so it runs on zeros there. (NaN compares false.)
    finite = tl.abs(s) <= 1.7976931348623157e308
    p = tl.where(finite, p, 0.0)
    c64 = tl.where(finite, c64, 0.0)
    s = tl.where(finite, s, 0.0)
    # TwoSum: err = (p + c) - s exactly (no overflow is possible: |p| <= 2**256).
    p_part = s - c64
    c_part = s - p_part
    err = (p - p_part) + (c64 - c_part)
    bits = s.to(tl.int64, bitcast=True)
    # An even last bit on an inexact sum means round-to-nearest picked the even neighbour: take the
    # other (odd) one, which lies on the exact value's side. Moving the bits by one steps one ulp
    # away from zero (+1) or towards it (-1); s != 0 here (an inexact sum never rounds to zero).
    to_odd = finite & (err != 0.0) & ((bits & 1) == 0)
    away = (err > 0.0) == (s > 0.0)
    odd = tl.where(away, bits + 1, bits - 1).to(tl.float64, bitcast=True)
    return tl.where(finite, tl.where(to_odd, odd, s), p_plus_c).to(tl.float32)


@triton.jit
def fma_rn(a, b, c):
    """fp32 `a * b + c` rounded once, to nearest even, on CUDA and under the interpreter alike."""
    if _EMULATE_FMA:
        return _fma_round_to_odd(a, b, c)
    else:
        return tl.fma(a, b, c)


@triton.jit
def approx_f32(x, op: tl.constexpr):
    """`op.approx.ftz.f32` of fp32 `x` (`op` one of "ex2", "lg2", "rcp"): one MUFU instruction
    where tl.exp / tl.log and an fp32 `/` add range and denormal fix-ups around it, or a polynomial
    (libdevice's log). Errors of an ulp or two (lg2: about 2^-22.6 absolute). CUDA only."""
    return tl.inline_asm_elementwise(op + ".approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def int8_to_f32(q):
    """int8 `q` as fp32, exactly: two integer operations and one fp32 subtraction (2**23 + 128 + q
    is an fp32 whose ulp is 1), where I2F issues at an eighth of the fp32 rate on the H100."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def mul_rn(a, b):
    """fp32 `a * b` (same shapes) rounded to nearest even, opaque to FMA contraction on CUDA."""
    if _EMULATE_FMA:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def quantize_rn(y, scale):
    """int8 `clamp(round_half_even(y / scale), -128, 127)`, `y / scale` correctly rounded in fp32."""
    # No full division per element (div.rn.f32 costs ~10 instructions plus a range check; on H100
    # it was a third of the Hadamard kernel's time): with inv = RN(1 / scale), once per program,
    # q0 = RN(y * inv) is within about an ulp of y / scale, the residual y - q0 * scale is exact in
    # one FMA, and one correction step RN(q0 + residual * inv) is the correctly rounded quotient
    # (Markstein's theorem; checked bit for bit against IEEE division on 6.7e8 random pairs on
    # H100, and in the tests). Both steps need a single rounding: `fma_rn`, not `a * b + c`.
    # Saturation happens on y, before the division, which saves clamping the quotient twice:
    # y is clamped to [lo, hi] = [-128 * scale, RN(127 * scale)] (lo is exact). A y above hi has
    # y / scale >= 127 * (1 - 2**-24) and must give 127; hi / scale lies within 127 * 2**-24 of 127
    # and rounds to 127. Likewise below lo (-128, exactly). Inside [lo, hi] nothing changes, and
    # the quotient's magnitude stays <= 128 * (1 + 2**-23), so the correction step never meets an
    # overflow (inf - inf) and the rounding below needs no clamp. Valid for scales in
    # [2**-126, 2**120], where 1 / scale and 128 * scale are finite (a calibrated int8 scale is
    # absmax / 127; fp16 activations give at most 516).
    inv = tl.math.div_rn(1.0, scale)
    lo = -128.0 * scale
    hi = 127.0 * scale
    y = tl.minimum(tl.maximum(y, lo), hi)
    q0 = y * inv
    s = fma_rn(fma_rn(-q0, scale, y), inv, q0)
    # Round half to even by adding 1.5 * 2**23: the add leaves an fp32 whose ulp is 1, so the
    # hardware's own round-to-nearest-even does the rounding and the low byte of the bits is the
    # result (bits = 0x4B400000 + round(s), round(s) in [-128, 127]).
    return (s + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


# e4m3fn: 3 mantissa bits, largest finite 448 = 1.75 * 2**8, smallest normal 2**-6, so its ulp is
# 2**(e - 3) in the binade [2**e, 2**(e + 1)) and 2**-9 below 2**-6 (subnormals).
_E4M3_MAX = tl.constexpr(448.0)
# The smallest ulp's biased fp32 exponent plus 3: max(e, this) - 3 is the ulp's exponent.
_E4M3_MIN_ULP_EXP_PLUS_3 = tl.constexpr(127 - 9 + 3)


@triton.jit
def _e4m3_bits(q):
    """|fp32 `q`|, |q| <= 464, rounded to the nearest e4m3 value (ties to even), as its 8-bit code
    (uint8) without a sign bit; NaN gives 0x7F."""
    a = tl.abs(q)
    # NaN lanes round 0 instead (their exponent would make the constant below inf).
    is_nan = a != a
    a = tl.where(is_nan, 0.0, a)
    biased = (a.to(tl.uint32, bitcast=True) >> 23).to(tl.int32)
    ulp_exp = tl.maximum(biased, _E4M3_MIN_ULP_EXP_PLUS_3) - 3
    # c = 1.5 * 2**23 * ulp: in [c, c + 16 ulp) the fp32 spacing is exactly ulp, so a + c rounds a
    # to a multiple of ulp, to nearest even (c is an even multiple of it), and the subtraction is
    # exact. a < 16 ulp always holds: a lies below the top of its own binade (or below 2**-6).
    c = (ulp_exp << 23).to(tl.float32, bitcast=True) * 12582912.0
    r = (a + c) - c
    # Encode by hand rather than cast: the interpreter's fp32 -> e4m3 cast turns -0.0 into +0.0.
    # Normal: fp32 bits >> 20 are (exponent << 3 | 3 mantissa bits), rebiased from 127 to 7
    # (120 << 3 = 960); subnormal: r is m * 2**-9, m in [0, 7].
    normal = (r.to(tl.uint32, bitcast=True) >> 20).to(tl.int32) - 960
    sub = (r * 512.0).to(tl.int32)
    code = tl.where(r >= 0.015625, normal, sub)
    return tl.where(is_nan, 0x7F, code).to(tl.uint8)


@triton.jit
def quantize_e4m3_rn(y, scale):
    """`e4m3(clamp(y / scale, -448, 448))` as `tl.float8e4nv`, `y / scale` correctly rounded in
    fp32 (so that rounding it again equals torch's `(x / s).clamp(-448, 448).to(float8_e4m3fn)`),
    then to nearest e4m3, ties to even; NaN stays NaN. Scales in [2**-90, 2**118]."""
    # The quotient as in quantize_rn (reciprocal, then one exact-residual correction): saturating
    # y first to +-RN(448 * scale) keeps it finite; the quotient is then at most 448 * (1 + 2**-23)
    # in magnitude, which rounds to 448 like the clamped value would (the next e4m3 boundary is
    # 464), and any y beyond the bound has y / scale >= 448 * (1 - 2**-24), also 448. The residual
    # y - q0 * scale is exact while it stays above fp32's underflow: for every quotient of at
    # least 2**-11 (smaller ones round to zero anyway) when scale >= 2**-90; scale <= 2**118
    # keeps 448 * scale finite.
    inv = tl.math.div_rn(1.0, scale)
    hi = _E4M3_MAX * scale
    # NaN-propagating min / max (one instruction each on sm_80+, numpy's on the interpreter): a NaN
    # y stays NaN without a compare and select per value.
    y_sat = tl.minimum(tl.maximum(y, -hi, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)
    q0 = y_sat * inv
    q = fma_rn(fma_rn(-q0, scale, y_sat), inv, q0)
    # The sign comes from y: the correction's `+0 + -0` makes every -0.0 quotient +0.0 (torch keeps
    # -0.0, and rounds tiny negatives to it). A nonzero quotient already has y's sign.
    y_sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    if _EMULATE_E4M3:
        sign = (y_sign >> 24).to(tl.uint8)
        return (_e4m3_bits(q) | sign).to(tl.float8e4nv, bitcast=True)
    else:
        # sm_89+'s cvt.rn.satfinite.e4m3x2.f32 (what Triton emits for this cast on sm_90) rounds to
        # nearest even with subnormals, as _e4m3_bits does, in one instruction per two values
        # instead of about twenty: the e4m3 Hadamard and norm kernels cost 1.3-1.7x their int8
        # twins with the emulation (docs/benchmarks.md, run 8). |q| <= 464 never saturates wrongly
        # (448 * (1 + 2**-23) rounds to 448 either way). y's sign goes onto the fp32 quotient (one
        # logic op) so that the conversion sets the code's sign itself: a sign OR'd on the byte
        # afterwards cost a shift, a mask and a byte permute per value in the Hadamard kernel's loop.
        signed = (q.to(tl.uint32, bitcast=True) | y_sign).to(tl.float32, bitcast=True)
        return signed.to(tl.float8e4nv)


@triton.jit
def f32_to_bf16_rne(y):
    """`y` (fp32) as bf16, rounded to nearest even, the same on CUDA and under the interpreter."""
    # Add 0x7FFF plus the lowest kept bit, keep the top half. A carry into the exponent is the
    # correct rounding (up to inf past bf16's max).
    b = y.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
