"""Dequantize packed int4 weights to a float matrix on the GPU, for W4A16 problems with many rows.

Why: at a prefill's thousands of rows a GEMM is bound by its multiply-adds, not by the weight
bytes, so 4-bit weights buy no speed there; what matters is reaching the tensor cores' full rate.
Writing the weight out once in fp16 (`codes * scale`, one pass: 2.5 bytes moved a weight) and
handing it to cuBLAS costs a few percent of the GEMM at 2048 rows, where our own mixed-input
tensor-core kernel runs 10x slower than cuBLAS (docs/benchmarks.md, session 26). Decode-sized
problems keep the GEMV and the tensor-core kernel (`gemm_w4.DEQUANT_MIN_ROWS`).

Numerics: each weight is `code * fp32(scale)` rounded once to the GEMM's dtype (exact in fp32),
then cuBLAS multiplies with fp32 accumulation: the reference (`quant/int4.w4a16_linear`) computes
the same products in fp32, so the difference is the weight's rounding to fp16 plus accumulation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import cdiv, fp_fusion

__all__ = ["dequantize"]

_BLOCK_N = 16
_BLOCK_BYTES = 128


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, KB, stride_wn, stride_sn, stride_on,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    byte = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    ok = (offs_n < N)[:, None] & (byte < KB)[None, :]
    packed = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + byte[None, :], mask=ok, other=0).to(tl.int32)
    # The even column's code is the low nibble; both share a group (groups are even).
    scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + (2 * byte // GROUP)[None, :], mask=ok, other=0)
    scale = scale.to(tl.float32)
    low = (((packed & 0xF) ^ 8) - 8).to(tl.float32) * scale
    high = ((((packed >> 4) & 0xF) ^ 8) - 8).to(tl.float32) * scale
    pair = tl.reshape(tl.join(low, high), (BLOCK_N, 2 * BLOCK_BYTES)).to(out_ptr.dtype.element_ty)
    cols = 2 * tl.program_id(1) * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
    out_ok = (offs_n < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + cols[None, :], pair, mask=out_ok)


def dequantize(w_packed: Tensor, w_scale: Tensor, group_size: int, k: int, dtype: torch.dtype) -> Tensor:
    """The `[N, k]` weight in `dtype` that `w_packed` (uint8 `[N, ceil(k / 2)]`, two codes a byte)
    and `w_scale` (`[N, groups]`) stand for: `code * fp32(scale)`, rounded once. The caller
    validated the operands (`quant.int4._check_w4`) and runs where Triton does."""
    n = w_packed.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=w_packed.device)
    if out.numel() == 0:
        return out
    kb = w_packed.shape[1]
    grid = (cdiv(n, _BLOCK_N), cdiv(kb, _BLOCK_BYTES))
    _dequant_kernel[grid](w_packed, w_scale, out, n, k, kb, w_packed.stride(0), w_scale.stride(0), out.stride(0),
                          GROUP=group_size, BLOCK_N=_BLOCK_N, BLOCK_BYTES=_BLOCK_BYTES, num_warps=4, **fp_fusion())
    return out
