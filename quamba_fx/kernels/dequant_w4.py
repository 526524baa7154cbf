"""Dequantize packed int4 weights to a float matrix on the GPU, for W4A16 problems with many rows;
and the same kernel gathering rows, for a 4-bit token embedding (`quamba::w4_embedding_gather`).

Why: at a prefill's thousands of rows a GEMM is bound by its multiply-adds, not by the weight
bytes, so 4-bit weights buy no speed there; what matters is reaching the tensor cores' full rate.
Writing the weight out once in fp16 (`codes * scale`, one pass: 2.5 bytes moved a weight) and
handing it to cuBLAS costs a few percent of the GEMM at 2048 rows, where our own mixed-input
tensor-core kernel runs 10x slower than cuBLAS (docs/benchmarks.md, session 26). Decode-sized
problems keep the GEMV and the tensor-core kernel (`gemm_w4.DEQUANT_MIN_ROWS`).

Numerics: each weight is `code * fp32(scale)` rounded once to the GEMM's dtype (exact in fp32),
then cuBLAS multiplies with fp32 accumulation: the reference (`quant/int4.w4a16_linear`) computes
the same products in fp32, so the difference is the weight's rounding to fp16 plus accumulation order.
A gathered embedding row is the same rounding of the same products: the bits of
`quant/int4.w4_embedding`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..quant.int4 import _check_embedding, w4_embedding
from .dispatch import cdiv, fp_fusion, graph_op, use_triton

__all__ = ["dequantize", "w4_embedding_gather"]

_BLOCK_N = 16
_BLOCK_BYTES = 128


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, ids_ptr, out_ptr, N, K, KB, V, stride_wn, stride_sn, stride_on,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_BYTES: tl.constexpr, GATHER: tl.constexpr):
    # Output row i is weight row i, or with GATHER weight row ids[i] (of V); an id outside [0, V)
    # gives a NaN row, the one signal a kernel can give without a sync.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    byte = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    if GATHER:
        ids = tl.load(ids_ptr + offs_n, mask=offs_n < N, other=0).to(tl.int64)
        valid = (ids >= 0) & (ids < V)
        rows = tl.where(valid, ids, 0)
    else:
        rows = offs_n.to(tl.int64)
    ok = (offs_n < N)[:, None] & (byte < KB)[None, :]
    packed = tl.load(w_ptr + rows[:, None] * stride_wn + byte[None, :], mask=ok, other=0).to(tl.int32)
    # The even column's code is the low nibble; both share a group (groups are even).
    scale = tl.load(s_ptr + rows[:, None] * stride_sn + (2 * byte // GROUP)[None, :], mask=ok, other=0)
    scale = scale.to(tl.float32)
    low = (((packed & 0xF) ^ 8) - 8).to(tl.float32) * scale
    high = ((((packed >> 4) & 0xF) ^ 8) - 8).to(tl.float32) * scale
    pair = tl.reshape(tl.join(low, high), (BLOCK_N, 2 * BLOCK_BYTES))
    if GATHER:
        pair = tl.where(valid[:, None], pair, float("nan"))
    cols = 2 * tl.program_id(1) * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
    out_ok = (offs_n < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + cols[None, :], pair.to(out_ptr.dtype.element_ty),
             mask=out_ok)


def dequantize(w_packed: Tensor, w_scale: Tensor, group_size: int, k: int, dtype: torch.dtype) -> Tensor:
    """The `[N, k]` weight in `dtype` that `w_packed` (uint8 `[N, ceil(k / 2)]`, two codes a byte)
    and `w_scale` (`[N, groups]`) stand for: `code * fp32(scale)`, rounded once. The caller
    validated the operands (`quant.int4._check_w4`) and runs where Triton does."""
    n = w_packed.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=w_packed.device)
    if out.numel() == 0:
        return out
    _launch(w_packed, w_scale, None, out, group_size)
    return out


def _launch(w_packed: Tensor, w_scale: Tensor, ids: Tensor | None, out: Tensor, group_size: int) -> None:
    """`out [R, k]` = the weight's rows, or with `ids [R]` the rows they name."""
    rows, k = out.shape
    kb = w_packed.shape[1]
    grid = (cdiv(rows, _BLOCK_N), cdiv(kb, _BLOCK_BYTES))
    _dequant_kernel[grid](w_packed, w_scale, ids if ids is not None else w_scale, out, rows, k, kb, w_packed.shape[0],
                          w_packed.stride(0), w_scale.stride(0), out.stride(0), GROUP=group_size, BLOCK_N=_BLOCK_N,
                          BLOCK_BYTES=_BLOCK_BYTES, GATHER=ids is not None, num_warps=4, **fp_fusion())


@graph_op("quamba::w4_embedding_gather")
def w4_embedding_gather(ids: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, dim: int,
                        dtype: torch.dtype) -> Tensor:
    """`quant.int4.w4_embedding` on the dequantizing kernel where Triton runs (one launch; an id
    outside the table gives a NaN row instead of an error), else the reference."""
    if not use_triton(w_packed):
        return w4_embedding(ids, w_packed, w_scale, group_size, dim, dtype)
    _check_embedding(ids, w_packed, w_scale, group_size, dim, dtype)
    out = torch.empty((ids.numel(), dim), dtype=dtype, device=w_packed.device)
    if out.numel():
        _launch(w_packed.contiguous(), w_scale.contiguous(), ids.reshape(-1).contiguous(), out, group_size)
    return out.view(*ids.shape, dim)


@w4_embedding_gather.register_fake
def _w4_embedding_gather_fake(ids, w_packed, w_scale, group_size, dim, dtype):
    _check_embedding(ids, w_packed, w_scale, group_size, dim, dtype)
    return w_packed.new_empty((*ids.shape, dim), dtype=dtype)
