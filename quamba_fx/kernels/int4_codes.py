"""Packed 4-bit weight codes -> int8 codes in registers, shared by the 4-bit GEMM kernels
(gemm_w4.py, gemm_w4_skinny.py).

A weight byte holds the codes of columns 2i (low nibble) and 2i+1 (high nibble), two's complement.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["column_codes", "nibbles", "nibbles_x16"]

# Four packed bytes ($2) -> their four low and four high codes as sign-extended int8 ($0, $1), a
# 32-bit register each: mask the nibbles, then OR 0xF0 into the bytes whose code is negative
# (bit 3 set: 0x08 * 0x1E = 0xF0, no carry between bytes). Seven instructions for eight codes,
# where per-code shifts and sign extensions took about three a code.
_NIBBLES_PTX = tl.constexpr("""{
.reg .b32 t, m;
and.b32 $0, $2, 0x0F0F0F0F;
and.b32 m, $2, 0x08080808;
mad.lo.u32 $0, m, 0x1E, $0;
shr.b32 t, $2, 4;
and.b32 $1, t, 0x0F0F0F0F;
and.b32 m, t, 0x08080808;
mad.lo.u32 $1, m, 0x1E, $1;
}""")


@triton.jit
def nibbles(packed, PTX: tl.constexpr):
    """The low and high codes of each packed byte, int8 (two's-complement nibbles sign-extended).
    PTX: the four-bytes-at-a-time block above (GPU); else plain integer ops (the interpreter)."""
    if PTX:
        return tl.inline_asm_elementwise(_NIBBLES_PTX, "=r,=r,r", [packed], dtype=(tl.int8, tl.int8), is_pure=True,
                                         pack=4)
    else:
        wide = packed.to(tl.int32)
        return (((wide & 0xF) ^ 8) - 8).to(tl.int8), (((wide >> 4) ^ 8) - 8).to(tl.int8)


@triton.jit
def column_codes(packed, PTX: tl.constexpr):
    """`packed [R, C]` bytes -> `[R, 2C]` int8 codes in column order: the low and high nibbles
    joined on a new last dim (in the thread that holds the byte) and flattened into the columns."""
    low, high = nibbles(packed, PTX)
    return tl.reshape(tl.join(low, high), (packed.shape[0], 2 * packed.shape[1]))


# Four packed bytes ($2) -> their four low and four high codes times 16, as int8 ($0, $1): each
# nibble moved to the top of its byte, where the byte's sign bit is the code's. Three instructions
# for eight codes (the shift carries a byte's high nibble into the next byte's low one, which the
# mask clears).
_NIBBLES_X16_PTX = tl.constexpr("""{
.reg .b32 t;
shl.b32 t, $2, 4;
and.b32 $0, t, 0xF0F0F0F0;
and.b32 $1, $2, 0xF0F0F0F0;
}""")


@triton.jit
def nibbles_x16(packed, PTX: tl.constexpr):
    """`nibbles(packed)` times 16: the low and high codes of each packed byte, each times 16, as
    int8 (-128 .. 112). For integer dots whose sums are scaled afterwards: a sum of these is 16
    times the codes' sum, exactly, and the 16 goes into the scale. PTX: the block above (GPU); else
    plain integer ops (the interpreter)."""
    if PTX:
        return tl.inline_asm_elementwise(_NIBBLES_X16_PTX, "=r,=r,r", [packed], dtype=(tl.int8, tl.int8),
                                         is_pure=True, pack=4)
    else:
        wide = packed.to(tl.int32)
        return ((wide << 4) & 0xF0).to(tl.int8), (wide & 0xF0).to(tl.int8)
