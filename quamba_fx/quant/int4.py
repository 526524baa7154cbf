"""4-bit weights (Quamba2's W4A8 and W4A16): the packing, round-to-nearest quantization, and the
reference Linear ops.

Conventions, shared by every kernel that reads these weights:

* A weight `[N, K]` is cut along K into groups of `group_size` columns (the last group may be
  shorter); each `(row, group)` has its own scale, `scale[n, g] = fp16(max(absmax / 7, MIN_SCALE_INT4))`,
  stored as fp16 `[N, ceil(K / group_size)]`. Codes are symmetric, `q = clamp(round_half_even(w /
  fp32(scale)), -8, 7)`, so `-8` is only reached by values that the rounding of a grouped update
  (GPTQ) pushes past `-7 * scale`.
* Two codes share a byte, `byte = (q[2i] & 0xF) | (q[2i+1] & 0xF) << 4` (two's-complement nibbles,
  the even column in the low nibble): a `uint8 [N, ceil(K / 2)]` buffer, a zero nibble padding an
  odd K. K itself is read off the activation's last dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .qops import _check_int8, _linear_epilogue, _linear_out_dtype, _scale_view, checked_token_ids

__all__ = [
    "INT4_MAX", "INT4_MIN", "MIN_SCALE_INT4", "dequantize_weight_int4", "group_count", "int4_scales",
    "pack_int4", "packed_columns", "quantize_int4_codes", "quantize_weight_int4", "unpack_int4", "w4_embedding",
    "w4a16_linear", "w4a8_linear",
]

INT4_MIN = -8
INT4_MAX = 7
# The smallest normal fp16: a smaller scale would lose precision when stored (or be flushed to 0).
MIN_SCALE_INT4 = 2.0 ** -14


def group_count(k: int, group_size: int) -> int:
    """How many scale groups a row of `k` columns has (the last one may be partial)."""
    return math.ceil(k / group_size)


def packed_columns(k: int) -> int:
    """Bytes a packed row of `k` codes takes (two a byte, a zero nibble padding an odd `k`)."""
    return (k + 1) // 2


def pack_int4(q: Tensor) -> Tensor:
    """int8 codes in [-8, 7], `[N, K]` -> `uint8 [N, ceil(K / 2)]`, two codes a byte (even column low)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4 needs int8 [N, K] codes, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(f"pack_int4: codes must lie in [{INT4_MIN}, {INT4_MAX}]")
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nibbles = q.to(torch.int16) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """`pack_int4`'s inverse: `uint8 [N, ceil(k / 2)]` -> int8 codes `[N, k]`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 needs uint8 [N, K/2] packed codes, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_columns(k):
        raise ValueError(f"unpack_int4: {packed.shape[1]} bytes a row cannot hold K={k} codes (needs {packed_columns(k)})")
    wide = packed.to(torch.int16)
    low, high = wide & 0xF, wide >> 4
    codes = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :k]
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


def _grouped(t: Tensor, group_size: int) -> Tensor:
    """`[N, K]` -> `[N, G, group_size]`, the last group zero-padded."""
    n, k = t.shape
    pad = group_count(k, group_size) * group_size - k
    return torch.nn.functional.pad(t, (0, pad)).reshape(n, -1, group_size)


def int4_scales(absmax: Tensor) -> Tensor:
    """fp16 scales `max(absmax / 7, MIN_SCALE_INT4)` of each group's largest magnitude."""
    return (absmax.to(torch.float32) / INT4_MAX).clamp_min(MIN_SCALE_INT4).to(torch.float16)


def quantize_int4_codes(w: Tensor, scale: Tensor) -> Tensor:
    """Round `w` (any shape) to int4 codes at `scale` (broadcastable, fp16 or fp32): int8 in [-8, 7]."""
    return torch.round(w.to(torch.float32) / scale.to(torch.float32)).clamp_(INT4_MIN, INT4_MAX).to(torch.int8)


def _check_weight_groups(w: Tensor, group_size: int, what: str) -> None:
    if not w.is_floating_point() or w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{what}: weight must be a non-empty floating [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    if type(group_size) is not int or group_size < 2 or group_size % 2:
        raise ValueError(f"{what}: group_size must be an even integer >= 2, got {group_size!r}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: weight contains NaN or Inf")


def quantize_weight_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest 4-bit quantization of a Linear weight `[N, K]`, one scale per `group_size`
    columns of a row. Returns `(packed uint8 [N, ceil(K/2)], scale fp16 [N, ceil(K/group_size)])`."""
    _check_weight_groups(w, group_size, "quantize_weight_int4")
    w32 = w.detach().to(torch.float32)
    scale = int4_scales(_grouped(w32, group_size).abs().amax(dim=-1))
    codes = quantize_int4_codes(_grouped(w32, group_size), scale.unsqueeze(-1))
    return pack_int4(codes.reshape(w.shape[0], -1)[:, : w.shape[1]]), scale


def dequantize_weight_int4(packed: Tensor, scale: Tensor, group_size: int, k: int) -> Tensor:
    """The fp32 weight `[N, k]` that packed codes and their group scales stand for: `q * fp32(scale)`."""
    codes = unpack_int4(packed, k).to(torch.float32)
    _check_scales(scale, packed.shape[0], k, group_size, "dequantize_weight_int4")
    per_column = scale.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]
    return codes * per_column


def _check_scales(scale: Tensor, n: int, k: int, group_size: int, op: str) -> None:
    groups = group_count(k, group_size)
    if not scale.is_floating_point() or tuple(scale.shape) != (n, groups):
        raise ValueError(f"{op}: w_scale must be floating [N={n}, groups={groups}] for K={k} in groups of "
                         f"{group_size}, got {scale.dtype} {tuple(scale.shape)}")


def _check_w4(op: str, x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor]) -> tuple[int, int]:
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(f"{op}: w_packed must be uint8 [N, ceil(K/2)], got {w_packed.dtype} {tuple(w_packed.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: the activation must have at least one dim [..., K]")
    n, k = w_packed.shape[0], x.shape[-1]
    if w_packed.shape[1] != packed_columns(k):
        raise ValueError(f"{op}: the activation has K={k}, but w_packed {tuple(w_packed.shape)} holds "
                         f"{2 * w_packed.shape[1]} codes a row")
    if group_size < 2 or group_size % 2:
        raise ValueError(f"{op}: group_size must be an even integer >= 2, got {group_size}")
    _check_scales(w_scale, n, k, group_size, op)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape [N={n}], got {tuple(bias.shape)}")
    return n, k


@torch.library.custom_op("quamba::w4a16_linear", mutates_args=())
def w4a16_linear(x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only 4-bit Linear reference: float `x [..., K]` times the dequantized weight.

    `w = unpack(w_packed) * fp32(w_scale)` per group, then `y = x.float() @ w.T (+ bias)` in fp32,
    returned in `x`'s dtype. Kernels compute the same sum in another order (fp16 tensor-core products,
    fp32 accumulation), so they match it to accumulation rounding, not bit for bit.
    """
    _check_w4("w4a16_linear", x, w_packed, w_scale, group_size, bias)
    w = dequantize_weight_int4(w_packed, w_scale, group_size, x.shape[-1])
    y = torch.matmul(x.to(torch.float32), w.t())
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


@w4a16_linear.register_fake
def _w4a16_linear_fake(x, w_packed, w_scale, group_size, bias=None):
    n, _ = _check_w4("w4a16_linear", x, w_packed, w_scale, group_size, bias)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("quamba::w4a8_linear", mutates_args=())
def w4a8_linear(x_q: Tensor, x_scale: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int,
                bias: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """W4A8 Linear reference: int8 `x_q [..., K]` (per-tensor `x_scale`) times 4-bit grouped weights.

    1. Per group g, `acc_g = sum_{k in g} x_q[k] * q[n, k]`, exact (at most 128 * 8 * group_size in
       magnitude; computed in float64, exact for any group a weight can have).
    2. `a = sum_g fp32(acc_g) * fp32(w_scale[n, g])` in fp32.
    3. `y = a * x_scale (+ bias)`; then as `int8_linear`'s epilogue: int8 at `out_scale` when given,
       else `out_dtype` (default fp32).
    Kernels sum the groups in another order: they match to fp32 rounding, not bit for bit.
    """
    _check_int8(x_q, "w4a8_linear: x_q")
    n, k = _check_w4("w4a8_linear", x_q, w_packed, w_scale, group_size, bias)
    _scale_view(x_scale, x_q, -1, "w4a8_linear: x_scale")
    dtype = _linear_out_dtype(out_scale, out_dtype)
    codes = unpack_int4(w_packed, k).to(torch.float64)
    lead = x_q.shape[:-1]
    x_groups = _grouped(x_q.reshape(-1, k).to(torch.float64), group_size)  # [M, G, g]
    w_groups = _grouped(codes, group_size)  # [N, G, g]
    acc = torch.einsum("mgk,ngk->mng", x_groups, w_groups).to(torch.float32)
    a = (acc * w_scale.to(torch.float32)).sum(dim=-1).reshape(*lead, n)
    ones = torch.ones((), dtype=torch.float32, device=a.device)
    return _linear_epilogue("w4a8_linear", a, x_scale, ones, bias, out_scale, dtype)


@w4a8_linear.register_fake
def _w4a8_linear_fake(x_q, x_scale, w_packed, w_scale, group_size, bias=None, out_scale=None, out_dtype=None):
    _check_int8(x_q, "w4a8_linear: x_q")
    n, _ = _check_w4("w4a8_linear", x_q, w_packed, w_scale, group_size, bias)
    return x_q.new_empty((*x_q.shape[:-1], n), dtype=_linear_out_dtype(out_scale, out_dtype))


def _check_embedding(ids: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, dim: int, dtype: torch.dtype) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"w4_embedding: ids must be int64 or int32, got {ids.dtype}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or w_packed.shape[1] != packed_columns(dim):
        raise ValueError(f"w4_embedding: w_packed must be uint8 [V, {packed_columns(dim)}] for dim {dim}, "
                         f"got {w_packed.dtype} {tuple(w_packed.shape)}")
    if group_size < 2 or group_size % 2:
        raise ValueError(f"w4_embedding: group_size must be an even integer >= 2, got {group_size}")
    _check_scales(w_scale, w_packed.shape[0], dim, group_size, "w4_embedding")
    if not dtype.is_floating_point:
        raise ValueError(f"w4_embedding: dtype must be floating, got {dtype}")


@torch.library.custom_op("quamba::w4_embedding", mutates_args=())
def w4_embedding(ids: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, dim: int,
                 dtype: torch.dtype) -> Tensor:
    """Embedding lookup in a 4-bit table (`[V, dim]` packed as a Linear weight): row `ids[...]`
    dequantized, `code * fp32(scale)` rounded once to `dtype`; `[*ids.shape, dim]`. An id outside
    [0, V) raises here; kernels, which cannot raise without a sync, write NaN rows for it."""
    _check_embedding(ids, w_packed, w_scale, group_size, dim, dtype)
    flat = checked_token_ids("w4_embedding", ids, w_packed.shape[0])
    rows = dequantize_weight_int4(w_packed.index_select(0, flat), w_scale.index_select(0, flat), group_size, dim)
    return rows.to(dtype).reshape(*ids.shape, dim)


@w4_embedding.register_fake
def _w4_embedding_fake(ids, w_packed, w_scale, group_size, dim, dtype):
    _check_embedding(ids, w_packed, w_scale, group_size, dim, dtype)
    return w_packed.new_empty((*ids.shape, dim), dtype=dtype)
