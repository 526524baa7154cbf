"""float8 e4m3 quantization ops: the CPU reference (and oracle) of the `fp8` recipe.

Conventions (the fp8 counterpart of `qops`):

* Symmetric e4m3 (`torch.float8_e4m3fn`: 1 sign, 4 exponent, 3 mantissa bits, bias 7, no
  infinities, largest finite value 448), no zero point: `q = e4m3(x.float() / scale)`, the
  quotient an IEEE fp32 true division. Scales are `absmax / 448`.
* `e4m3` rounds to nearest, ties to even, and SATURATES: anything beyond +-448 (+-inf included)
  becomes +-448. The plain cast does not do this the same way on every torch we support: torch
  2.11 turns values above 464 (and +-inf) into NaN, torch 2.14 saturates them. Clamping to
  +-448 first gives the same codes on both, and is what a static per-tensor scale needs (a
  calibrated scale is exceeded by rare outliers, which must clip, not poison the GEMM with NaN).
  NaN stays NaN (e4m3fn has a NaN code); NaN inputs are not checked, to keep the ops sync-free.
* Scales are fp32 tensors read at run time (shape `[]`/`[1]` per tensor, `[C]` per channel).

Ops: `torch.ops.quamba.quantize_fp8`, `.dequantize_fp8`, `.fp8_linear`, each with a fake.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .qops import (_check_linear_args, _linear_epilogue, _linear_fake, _linear_out_dtype, _scale_view,
                   absmax_to_scale)

__all__ = [
    "E4M3_MAX",
    "FP8_DTYPE",
    "dequantize_fp8",
    "fp8_linear",
    "quantize_fp8",
    "quantize_weight_per_channel_fp8",
    "to_e4m3",
]

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite e4m3fn value: 1.75 * 2**8 (code 0x7E; 0x7F is NaN).
E4M3_MAX = 448.0


def to_e4m3(x32: Tensor) -> Tensor:
    """fp32 `x32` rounded to e4m3 (nearest, ties to even), saturating at +-448; NaN stays NaN."""
    # clamp keeps NaN (propagates it), so the cast sees only finite values in range or NaN.
    return x32.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def _check_fp8(t: Tensor, what: str) -> None:
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"{what} must be float8_e4m3fn, got {t.dtype}")


def _check_fp8_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                      bias: Optional[Tensor], out_scale: Optional[Tensor]) -> tuple[int, int]:
    return _check_linear_args("fp8_linear", _check_fp8, x_q, x_scale, w_q, w_scale, bias, out_scale)


@torch.library.custom_op("quamba::quantize_fp8", mutates_args=())
def quantize_fp8(x: Tensor, scale: Tensor, axis: int = -1) -> Tensor:
    """Symmetric e4m3 quantization: `to_e4m3(x.float() / scale)` (saturating, ties to even).

    `scale` is fp32, shape `[]`/`[1]` (per tensor) or `[C]` (per channel along `axis`). Returns a
    contiguous float8_e4m3fn tensor of `x`'s shape.
    """
    return to_e4m3(x.to(torch.float32) / _scale_view(scale, x, axis, "quantize_fp8")).contiguous()


@quantize_fp8.register_fake
def _quantize_fp8_fake(x: Tensor, scale: Tensor, axis: int = -1) -> Tensor:
    _scale_view(scale, x, axis, "quantize_fp8")
    return torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)


@torch.library.custom_op("quamba::dequantize_fp8", mutates_args=())
def dequantize_fp8(q: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.float32, axis: int = -1) -> Tensor:
    """Inverse of `quantize_fp8`: `(q.float() * scale).to(out_dtype)` (e4m3 -> fp32 is exact)."""
    _check_fp8(q, "dequantize_fp8: q")
    if not out_dtype.is_floating_point:
        raise ValueError(f"dequantize_fp8: out_dtype must be a floating dtype, got {out_dtype}")
    return (q.to(torch.float32) * _scale_view(scale, q, axis, "dequantize_fp8")).to(out_dtype).contiguous()


@dequantize_fp8.register_fake
def _dequantize_fp8_fake(q: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.float32, axis: int = -1) -> Tensor:
    _check_fp8(q, "dequantize_fp8: q")
    _scale_view(scale, q, axis, "dequantize_fp8")
    if not out_dtype.is_floating_point:
        raise ValueError(f"dequantize_fp8: out_dtype must be a floating dtype, got {out_dtype}")
    return torch.empty(q.shape, dtype=out_dtype, device=q.device)


@torch.library.custom_op("quamba::fp8_linear", mutates_args=())
def fp8_linear(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    out_scale: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """FP8 W8A8 Linear reference: e4m3 `x_q [..., K]` times e4m3 `w_q [N, K]` (nn.Linear layout).

    Same scales, epilogue order and output rules as `int8_linear`, with these numerics:

    1. `acc[..., n] = sum_k x_q[..., k] * w_q[n, k]`, exact: every e4m3 value is a multiple of
       2**-9 below 2**9, so each product is a multiple of 2**-18 below 2**18, and any sum of up to
       2**16 of them fits float64's 53 bits without rounding, whatever the order.
    2. `a = fp32(acc)`; `s = fp32(x_scale * w_scale[n])`; `y = a * s`, then `y + fp32(bias[n])`.
    3. With `out_scale`: int8 `clamp(round_half_even(y / out_scale), -128, 127)` (the next int8
       boundary, e.g. in_proj feeding conv1d); else `y.to(out_dtype)` (default fp32).

    A GPU kernel accumulates in fp32 in its own order, so it matches within fp32 summation error,
    not bit for bit.
    """
    _check_fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale)
    if w_q.shape[1] > 2**16:
        raise ValueError(f"fp8_linear: K={w_q.shape[1]} is above 65536, where the reference stops being exact")
    dtype = _linear_out_dtype(out_scale, out_dtype)
    acc = torch.matmul(x_q.to(torch.float64), w_q.to(torch.float64).t())
    return _linear_epilogue("fp8_linear", acc, x_scale, w_scale, bias, out_scale, dtype)


@fp8_linear.register_fake
def _fp8_linear_fake(x_q, x_scale, w_q, w_scale, bias=None, out_scale=None, out_dtype=None):
    n, _ = _check_fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale)
    return _linear_fake(x_q, n, out_scale, out_dtype)


def quantize_weight_per_channel_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Abs-max symmetric per-output-channel e4m3 quantization of a weight `[N, K]`.

    Returns `(w_q float8_e4m3fn [N, K], scale fp32 [N])`, `scale[n] = max(max|w[n]| / 448, MIN_SCALE)`.
    Raises `ValueError` for a non-float, empty or non-finite weight.
    """
    if not w.is_floating_point() or w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"quantize_weight_per_channel_fp8: weight must be a non-empty float [N, K], got "
                         f"{w.dtype} {tuple(w.shape)}")
    w32 = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise ValueError("quantize_weight_per_channel_fp8: weight contains NaN or Inf")
    scale = absmax_to_scale(w32.abs().amax(dim=1), qmax=E4M3_MAX)
    return quantize_fp8(w32, scale, 0), scale
