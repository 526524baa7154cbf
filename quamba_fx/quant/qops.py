"""Explicit int8 quantization ops: the CPU reference (and oracle) of the W8A8 recipe.

Conventions, used by every op and helper here:

* Symmetric int8, zero point 0: `q = clamp(round(x / scale), QMIN, QMAX)` with `QMIN = -128`,
  `QMAX = 127` (the full int8 range, as Quamba's reference kernels use). Scales are computed as
  `absmax / 127`, so `-128` is only reached by values clipped below `-127 * scale`.
* `round` is round-half-to-even (`torch.round`, CUDA `__float2int_rn`, `rint`), applied to the
  IEEE fp32 quotient `x.float() / scale` (a true division, not a multiplication by `1 / scale`; a
  Triton kernel that must match bit for bit uses `div_rn`). +-inf saturate to QMAX / QMIN. NaN
  inputs give unspecified values (they are not checked, to keep the ops sync-free).
* Scales are fp32 tensors, never Python floats, so a graph reads them at run time: updating a
  scale buffer in place changes the next call without re-tracing. Shape `[]` or `[1]` means per
  tensor; shape `[C]` means per channel along `axis` (default: the last dim). Scales must be
  positive; `absmax_to_scale` floors them at `MIN_SCALE`.

The ops live in the `quamba` namespace (`torch.ops.quamba.quantize`, `.dequantize`,
`.int8_linear`), each with a fake implementation so that FX shape propagation, dynamo and export
see one node with the right shape and dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "MAX_INT8_LINEAR_K",
    "MIN_SCALE",
    "QMAX",
    "QMIN",
    "absmax_to_scale",
    "dequantize",
    "int8_linear",
    "quantize",
    "quantize_weight_per_channel",
    "quantize_weight_per_tensor",
]

QMIN = -128
QMAX = 127
# Smallest scale handed out, so an all-zero tensor still gets a usable (positive, finite) scale.
MIN_SCALE = 1e-8
# Largest reduction length whose int32 accumulator cannot overflow: K * 128 * 128 <= 2**31 - 1.
MAX_INT8_LINEAR_K = (2**31 - 1) // (128 * 128)


# ---------------------------------------------------------------------------------------------
# Shape checks (shared by real and fake implementations, so tracing fails as early as running)
# ---------------------------------------------------------------------------------------------


def _scale_view(scale: Tensor, x: Tensor, axis: int, what: str) -> Tensor:
    """`scale` as fp32, shaped to broadcast against `x` along `axis` (or as a 0-dim tensor)."""
    if not scale.is_floating_point():
        raise ValueError(f"{what}: scale must be a floating-point tensor, got {scale.dtype}")
    if scale.dim() > 1:
        raise ValueError(f"{what}: scale must have shape [], [1] or [C], got {tuple(scale.shape)}")
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(())
    if x.dim() == 0:
        raise ValueError(f"{what}: a per-channel scale of {s.numel()} values needs a tensor with a channel dim")
    ax = axis if axis >= 0 else axis + x.dim()
    if not 0 <= ax < x.dim():
        raise ValueError(f"{what}: axis {axis} out of range for a tensor of {x.dim()} dims")
    if x.shape[ax] != s.numel():
        raise ValueError(
            f"{what}: per-channel scale has {s.numel()} values but dim {axis} of the tensor "
            f"(shape {tuple(x.shape)}) has size {x.shape[ax]}"
        )
    shape = [1] * x.dim()
    shape[ax] = s.numel()
    return s.reshape(shape)


def _check_int8(t: Tensor, what: str) -> None:
    if t.dtype != torch.int8:
        raise ValueError(f"{what} must be int8, got {t.dtype}")


def _linear_out_dtype(out_scale: Optional[Tensor], out_dtype: Optional[torch.dtype]) -> torch.dtype:
    if out_scale is not None:
        if out_dtype not in (None, torch.int8):
            raise ValueError(f"int8_linear: out_scale requantizes to int8, but out_dtype={out_dtype} was asked for")
        return torch.int8
    if out_dtype is None:
        return torch.float32
    if not out_dtype.is_floating_point:
        raise ValueError(f"int8_linear: out_dtype must be a floating dtype without out_scale, got {out_dtype}")
    return out_dtype


def _check_linear_args(op: str, check_operand, x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                       bias: Optional[Tensor], out_scale: Optional[Tensor],
                       max_k: Optional[int] = None) -> tuple[int, int]:
    """The argument rules every W8A8 Linear reference shares (`op` names it in messages):
    `check_operand(t, what)` checks the operands' dtype; `max_k` bounds K where the accumulator
    could overflow. Returns `(N, K)`."""
    check_operand(x_q, f"{op}: x_q")
    check_operand(w_q, f"{op}: w_q")
    if w_q.dim() != 2:
        raise ValueError(f"{op}: w_q must be [N, K] (nn.Linear layout), got shape {tuple(w_q.shape)}")
    if x_q.dim() < 1:
        raise ValueError(f"{op}: x_q must have at least one dim [..., K]")
    n, k = w_q.shape
    if x_q.shape[-1] != k:
        raise ValueError(f"{op}: x_q has K={x_q.shape[-1]} but w_q {tuple(w_q.shape)} has K={k}")
    if max_k is not None and k > max_k:
        raise ValueError(f"{op}: K={k} could overflow an int32 accumulator (max {max_k})")
    if x_scale.numel() != 1 or x_scale.dim() > 1:
        raise ValueError(f"{op}: x_scale must be per-tensor (shape [] or [1]), got {tuple(x_scale.shape)}")
    if w_scale.dim() > 1 or w_scale.numel() not in (1, n):
        raise ValueError(f"{op}: w_scale must have shape [], [1] or [N={n}], got {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape [N={n}], got {tuple(bias.shape)}")
    if out_scale is not None and (out_scale.dim() > 1 or out_scale.numel() not in (1, n)):
        raise ValueError(f"{op}: out_scale must have shape [], [1] or [N={n}], got {tuple(out_scale.shape)}")
    for name, t in (("x_scale", x_scale), ("w_scale", w_scale), ("bias", bias), ("out_scale", out_scale)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return n, k


def _check_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                  bias: Optional[Tensor], out_scale: Optional[Tensor]) -> tuple[int, int]:
    return _check_linear_args("int8_linear", _check_int8, x_q, x_scale, w_q, w_scale, bias, out_scale,
                              max_k=MAX_INT8_LINEAR_K)


def _linear_epilogue(op: str, acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                     out_scale: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Steps 2-5 of `int8_linear` on an exact accumulator `acc` (any float dtype)."""
    a = acc.to(torch.float32)
    s = x_scale.to(torch.float32).reshape(()) * _scale_view(w_scale, a, -1, f"{op}: w_scale")
    y = a * s
    if bias is not None:
        y = y + bias.to(torch.float32)
    if out_scale is not None:
        return _quantize_fp32(y, _scale_view(out_scale, y, -1, f"{op}: out_scale"))
    return y.to(dtype)


def _linear_fake(x_q: Tensor, n: int, out_scale: Optional[Tensor], out_dtype: Optional[torch.dtype]) -> Tensor:
    return torch.empty((*x_q.shape[:-1], n), dtype=_linear_out_dtype(out_scale, out_dtype), device=x_q.device)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def _quantize_fp32(x32: Tensor, s: Tensor) -> Tensor:
    # torch.round is round-half-to-even; the clamp also maps +-inf to the int8 limits.
    return torch.round(x32 / s).clamp_(QMIN, QMAX).to(torch.int8)


@torch.library.custom_op("quamba::quantize", mutates_args=())
def quantize(x: Tensor, scale: Tensor, axis: int = -1) -> Tensor:
    """Symmetric int8 quantization: `clamp(round_half_even(x.float() / scale), -128, 127)`.

    `scale` is fp32, shape `[]`/`[1]` (per tensor) or `[C]` (per channel along `axis`). The division
    is IEEE fp32 (`x` is first converted to fp32 exactly). Returns an int8 tensor of `x`'s shape.
    """
    # Contiguous whatever x's layout, as the fake promises: compilers trust the fake's strides.
    return _quantize_fp32(x.to(torch.float32), _scale_view(scale, x, axis, "quantize")).contiguous()


@quantize.register_fake
def _quantize_fake(x: Tensor, scale: Tensor, axis: int = -1) -> Tensor:
    _scale_view(scale, x, axis, "quantize")
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


@torch.library.custom_op("quamba::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.float32, axis: int = -1) -> Tensor:
    """Inverse of `quantize`: `(q.float() * scale).to(out_dtype)`, one fp32 multiply then one cast.

    `q` must be int8; `scale` as for `quantize`; `out_dtype` a floating dtype.
    """
    _check_int8(q, "dequantize: q")
    s = _scale_view(scale, q, axis, "dequantize")
    if not out_dtype.is_floating_point:
        raise ValueError(f"dequantize: out_dtype must be a floating dtype, got {out_dtype}")
    return (q.to(torch.float32) * s).to(out_dtype).contiguous()


@dequantize.register_fake
def _dequantize_fake(q: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.float32, axis: int = -1) -> Tensor:
    _check_int8(q, "dequantize: q")
    _scale_view(scale, q, axis, "dequantize")
    if not out_dtype.is_floating_point:
        raise ValueError(f"dequantize: out_dtype must be a floating dtype, got {out_dtype}")
    return torch.empty(q.shape, dtype=out_dtype, device=q.device)


@torch.library.custom_op("quamba::int8_linear", mutates_args=())
def int8_linear(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    out_scale: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """W8A8 Linear reference: int8 `x_q [..., K]` times int8 `w_q [N, K]` (nn.Linear layout).

    `x_scale` is per tensor; `w_scale` per output channel `[N]` or per tensor; `bias` is `[N]` or
    None. The result is computed in exactly this order (each step one IEEE fp32 rounding at most):

    1. `acc[..., n] = sum_k int(x_q[..., k]) * int(w_q[n, k])`, exact, with int32 semantics. It is
       computed as a float64 matmul of the integer values: every product is at most 2**14 in
       magnitude and every partial sum at most K * 2**14 <= 2**31 (K <= MAX_INT8_LINEAR_K), far
       below 2**53, so float64 holds every intermediate exactly whatever the summation order.
    2. `a = fp32(acc)` (round to nearest even, like a GPU's int32 -> fp32 conversion).
    3. `s = fp32(x_scale * w_scale[n])` (one fp32 multiply of the two fp32 scales).
    4. `y = a * s` (fp32 multiply), then `y = y + fp32(bias[n])` (fp32 add) when bias is given.
       No fused multiply-add: a kernel must round after the multiply to match.
    5. With `out_scale` (a tensor, per tensor or `[N]`): return `quantize(y, out_scale)`, i.e.
       `clamp(round_half_even(y / out_scale), -128, 127)` as int8; `out_dtype` must then be None or
       int8. Without it: return `y.to(out_dtype)` (default fp32).
    """
    _check_linear(x_q, x_scale, w_q, w_scale, bias, out_scale)
    dtype = _linear_out_dtype(out_scale, out_dtype)
    acc = torch.matmul(x_q.to(torch.float64), w_q.to(torch.float64).t())
    return _linear_epilogue("int8_linear", acc, x_scale, w_scale, bias, out_scale, dtype)


@int8_linear.register_fake
def _int8_linear_fake(x_q, x_scale, w_q, w_scale, bias=None, out_scale=None, out_dtype=None):
    n, _ = _check_linear(x_q, x_scale, w_q, w_scale, bias, out_scale)
    return _linear_fake(x_q, n, out_scale, out_dtype)


# ---------------------------------------------------------------------------------------------
# Plain-Python helpers
# ---------------------------------------------------------------------------------------------


def checked_token_ids(op: str, ids: Tensor, rows: int) -> Tensor:
    """`ids` flattened, once every id is known to name one of a table's `rows` rows: an id outside
    [0, rows) raises `IndexError` (the references can; the kernels write NaN rows instead)."""
    flat = ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
        raise IndexError(f"{op}: token ids must lie in [0, {rows}), got [{int(flat.min())}, {int(flat.max())}]")
    return flat


def _check_int8_embedding(ids: Tensor, w_q: Tensor, w_scale: Tensor, dtype: torch.dtype) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"int8_embedding: ids must be int64 or int32, got {ids.dtype}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"int8_embedding: the table must be int8 [V, D], got {w_q.dtype} {tuple(w_q.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (w_q.shape[0],):
        raise ValueError(f"int8_embedding: the scales must be fp32 [{w_q.shape[0]}] (one a row), got "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"int8_embedding: dtype must be floating, got {dtype}")


@torch.library.custom_op("quamba::int8_embedding", mutates_args=())
def int8_embedding(ids: Tensor, w_q: Tensor, w_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Embedding lookup in an int8 table with one fp32 scale a row (the weight of a W8A8 head, which
    a tied embedding shares): row `ids[...]` as `code * scale` in fp32, rounded once to `dtype`;
    `[*ids.shape, D]`. An id outside [0, V) raises `IndexError`."""
    _check_int8_embedding(ids, w_q, w_scale, dtype)
    flat = checked_token_ids("int8_embedding", ids, w_q.shape[0])
    rows = w_q.index_select(0, flat).to(torch.float32) * w_scale.index_select(0, flat)[:, None]
    return rows.to(dtype).reshape(*ids.shape, w_q.shape[1])


@int8_embedding.register_fake
def _int8_embedding_fake(ids, w_q, w_scale, dtype):
    _check_int8_embedding(ids, w_q, w_scale, dtype)
    return w_q.new_empty((*ids.shape, w_q.shape[1]), dtype=dtype)


def absmax_to_scale(absmax: Tensor, qmax: int = QMAX) -> Tensor:
    """fp32 scale(s) `max(absmax / qmax, MIN_SCALE)` (fp32 division), elementwise."""
    if qmax <= 0:
        raise ValueError(f"qmax must be positive, got {qmax}")
    return (absmax.to(torch.float32) / qmax).clamp_min(MIN_SCALE)


def _check_weight(w: Tensor, what: str) -> None:
    if not w.is_floating_point():
        raise ValueError(f"{what}: weight must be floating point, got {w.dtype}")
    if w.dim() < 1 or w.numel() == 0:
        raise ValueError(f"{what}: weight must be a non-empty tensor, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: weight contains NaN or Inf")


def quantize_weight_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Abs-max symmetric per-output-channel quantization of a weight `[N, ...]` (e.g. nn.Linear's `[N, K]`).

    Returns `(w_q int8 of w's shape, scale fp32 [N])` with `scale[n] = max(max|w[n]| / 127, MIN_SCALE)`
    and `w_q = quantize(w, scale, axis=0)`.
    """
    _check_weight(w, "quantize_weight_per_channel")
    absmax = w.detach().to(torch.float32).abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = absmax_to_scale(absmax)
    return quantize(w.detach(), scale, 0), scale


def quantize_weight_per_tensor(w: Tensor) -> tuple[Tensor, Tensor]:
    """Abs-max symmetric per-tensor quantization: `(w_q int8, scale fp32 0-dim)`, scale = max|w| / 127."""
    _check_weight(w, "quantize_weight_per_tensor")
    scale = absmax_to_scale(w.detach().to(torch.float32).abs().amax())
    return quantize(w.detach(), scale), scale
