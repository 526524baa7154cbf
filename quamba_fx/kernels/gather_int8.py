"""The token embedding of a W8A8 model whose head is tied to it (`quamba::int8_embedding_gather`):
rows of the head's int8 table, each `code * scale` with its fp32 row scale, in one launch.

Why a kernel: the reference (`quant/qops.int8_embedding`) is two gathers, a multiply and a cast,
four launches in a decode step that a float embedding does in one. Numerics: `code * scale` in
fp32 rounded once to the output dtype, the reference's bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..quant.qops import _check_int8_embedding, int8_embedding
from .dispatch import cdiv, fp_fusion, graph_op, use_triton
from .rounding import f32_to_bf16_rne

__all__ = ["int8_embedding_gather"]

_BLOCK_ROWS = 8
_BLOCK_D = 256


@triton.jit
def _gather_kernel(w_ptr, s_ptr, ids_ptr, out_ptr, R, D, V, stride_w, stride_o,
                   BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Output row i is table row ids[i]; an id outside [0, V) gives a NaN row, the one signal a
    # kernel can give without a sync.
    offs_r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ids = tl.load(ids_ptr + offs_r, mask=offs_r < R, other=0).to(tl.int64)
    valid = (ids >= 0) & (ids < V)
    rows = tl.where(valid, ids, 0)
    ok = (offs_r < R)[:, None] & (cols < D)[None, :]
    codes = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=ok, other=0).to(tl.float32)
    scale = tl.load(s_ptr + rows, mask=offs_r < R, other=0.0)
    values = tl.where(valid[:, None], codes * scale[:, None], float("nan"))
    if out_ptr.dtype.element_ty == tl.bfloat16:  # the interpreter's own cast truncates
        out = f32_to_bf16_rne(values)
    else:
        out = values.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * stride_o + cols[None, :], out, mask=ok)


@graph_op("quamba::int8_embedding_gather")
def int8_embedding_gather(ids: Tensor, w_q: Tensor, w_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`quant.qops.int8_embedding` on one kernel where Triton runs (an id outside the table gives
    a NaN row instead of an error), else the reference."""
    if not use_triton(w_q):
        return int8_embedding(ids, w_q, w_scale, dtype)
    _check_int8_embedding(ids, w_q, w_scale, dtype)
    w_q = w_q.contiguous()
    rows, dim = ids.numel(), w_q.shape[1]
    out = torch.empty((rows, dim), dtype=dtype, device=w_q.device)
    if out.numel():
        grid = (cdiv(rows, _BLOCK_ROWS), cdiv(dim, _BLOCK_D))
        _gather_kernel[grid](w_q, w_scale.contiguous(), ids.reshape(-1).contiguous(), out, rows, dim, w_q.shape[0],
                             w_q.stride(0), out.stride(0), BLOCK_ROWS=_BLOCK_ROWS, BLOCK_D=_BLOCK_D, num_warps=4,
                             **fp_fusion())
    return out.view(*ids.shape, dim)


@int8_embedding_gather.register_fake
def _int8_embedding_gather_fake(ids, w_q, w_scale, dtype):
    _check_int8_embedding(ids, w_q, w_scale, dtype)
    return w_q.new_empty((*ids.shape, w_q.shape[1]), dtype=dtype)
