"""FP8 (e4m3) W8A8 GEMM with a scale epilogue, and its `quamba::fp8_gemm` op for lowered graphs.

`fp8_gemm` has the semantics of `torch.ops.quamba.fp8_linear` (the reference, `quant/fp8.py`):
e4m3 `x_q [..., K]` times e4m3 `w_q [N, K]`, accumulated in fp32, then `acc * fp32(x_scale *
w_scale[n])`, `+ bias[n]`, and either an int8 requantization at `out_scale` or a float output. Two
GPU implementations, chosen by `backend=` or the `QUAMBA_FX_FP8_GEMM` environment variable, so that
they can be measured against each other (benchmarks/gemm_fp8.py):

* `triton` (default): one Triton kernel, `tl.dot` on fp8 tiles (wgmma on Hopper), the whole
  epilogue fused. Prefill-sized problems (from 256 rows) that TMA can address run gemm_tma.py's
  persistent kernel, int8's prefill kernel with an fp32 accumulator; the rest this module's
  pointer kernel. Both also run on CPU under TRITON_INTERPRET=1.
* `scaled_mm`: `torch._scaled_mm` (cuBLASLt). A float output without bias takes the scales fused
  (tensor-wise, or x's scale per row and the weight's per column), as newer torch allows for fp16
  and fp32 outputs; otherwise (an int8 output, a bias, or a torch that refuses the fused form)
  unit scales and an fp32 result, then the epilogue in PyTorch (one more pass over `[M, N]` fp32).

Elsewhere (CPU without the interpreter, K == 0, an unsupported output dtype) the reference runs.
The fp32 accumulation order differs from the exact reference, so results match it within fp32
summation error, not bit for bit.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..quant.fp8 import _check_fp8_linear, _linear_out_dtype
from ..quant.qops import _quantize_fp32
from . import gemm_tma
from .dispatch import cdiv, graph_op, next_pow2, use_triton
from .gemm import _M_BUCKET_CAP, _TMA_MIN_M  # int8_gemm's prefill rule: the same tuning buckets
from .gemm_epilogue import OUT_MODES
from .rounding import quantize_rn

__all__ = ["BACKENDS", "fp8_gemm", "fp8_gemm_reference"]

BACKENDS = ("triton", "scaled_mm")
_BACKEND_VARIABLE = "QUAMBA_FX_FP8_GEMM"
_FLOAT_OUT = {torch.float32, torch.float16, torch.bfloat16}


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, os_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                     W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT8: tl.constexpr,
                     OUT_PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROMOTE_K: tl.constexpr):
    # Grouped tile order: GROUP_M row tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # W is [N, K] row-major, read as [BLOCK_K, BLOCK_N] tiles: K-major, as fp8 wgmma wants B.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE_K, out_dtype=tl.float32)

    # Epilogue in the reference's order: s = x_scale * w_scale[n] (one rounding), y = acc * s, + bias.
    n_ok = rn < N
    if W_PER_CHANNEL:
        s = tl.load(xs_ptr) * tl.load(ws_ptr + rn, mask=n_ok, other=1.0)
    else:
        s = tl.load(xs_ptr) * tl.load(ws_ptr) + tl.zeros((BLOCK_N,), dtype=tl.float32)
    y = acc * s[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
    out_offsets = rm[:, None] * N + rn[None, :]
    out_mask = (rm[:, None] < M) & n_ok[None, :]
    if OUT_INT8:
        if OUT_PER_CHANNEL:
            q = quantize_rn(y, tl.load(os_ptr + rn, mask=n_ok, other=1.0)[None, :])
        else:
            q = quantize_rn(y, tl.load(os_ptr))
        tl.store(out_ptr + out_offsets, q, mask=out_mask)
    else:
        tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=out_mask)


# Hopper's fp8 wgmma accumulates in fewer bits than fp32 (Triton's default on sm_90 never adds the
# partial sums into a true fp32 accumulator): at K = 2560-5120 that cost 10x cuBLAS's error
# (docs/benchmarks.md, call 5d). Every PROMOTE_K products (one BLOCK_K step) the partial sum is added
# into the fp32 accumulator, as cuBLAS does without its fast-accumulation mode. None: never.
# The pointer kernel (decode, short prompts) promotes; the persistent prefill kernel does not: on
# an H100 promotion cost 6.5% of the 2.8b 8 x 2048 prefill (193.9 against 181.9 ms) and changed
# nothing a model shows (mamba-bytes-wt2 bits/byte 1.87418 against 1.87442, fp32 1.87342; 2.8b
# logits error 0.1736 against 0.1739), because rounding the inputs to e4m3 costs far more than the
# short accumulator (docs/benchmarks.md, session 40).
_PROMOTE_K: Optional[int] = 128
_PREFILL_PROMOTE_K: Optional[int] = None


def _tiles(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by M: small M (decode) wastes no rows.
    From 8192 rows, 256-row tiles: with the promoted accumulation they were the fastest of ten
    configs on 2.8b's in_proj and out_proj at 16384 rows on an H200 (11% and 6% faster than
    128 x 128); at 2048 rows 128 x 128 won on out_proj (docs/benchmarks.md, session 23)."""
    if m <= 16:
        return 16, 64, 128, 4, 4
    if m <= 64:
        return 64, 64, 128, 4, 4
    if m < 8192:
        return 128, 128, 128, 8, 3
    return 256, 128, 128, 8, 3


def fp8_gemm_reference(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                       out_scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The reference of `fp8_gemm`: `torch.ops.quamba.fp8_linear` with the same arguments."""
    return torch.ops.quamba.fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)


def _backend(backend: Optional[str]) -> str:
    chosen = backend if backend is not None else os.environ.get(_BACKEND_VARIABLE, "triton")
    if chosen not in BACKENDS:
        source = "backend" if backend is not None else f"${_BACKEND_VARIABLE}"
        raise ValueError(f"fp8_gemm: {source} is {chosen!r}; choose one of {', '.join(BACKENDS)}")
    return chosen


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


# Whether this torch's `_scaled_mm` took fused scales with a given output dtype, by (device type,
# dtype, row-wise): an older one refuses row-wise scaling with other outputs than bf16, once.
_FUSED_SCALES_WORK: dict = {}


def _scaled_mm_fused(x2: Tensor, xs: Tensor, w: Tensor, ws: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """`acc * x_scale * w_scale[n]` in `dtype` from cuBLASLt's own epilogue, or None where refused."""
    row_wise = ws.numel() > 1
    key = (x2.device.type, dtype, row_wise)
    if _FUSED_SCALES_WORK.get(key) is False:
        return None
    if row_wise:
        scale_a, scale_b = xs.reshape(1, 1).expand(x2.shape[0], 1).contiguous(), ws.reshape(1, -1)
    else:
        scale_a, scale_b = xs.reshape(()), ws.reshape(())
    try:
        y = torch._scaled_mm(x2, w.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=dtype)
    except RuntimeError:
        _FUSED_SCALES_WORK[key] = False
        return None
    _FUSED_SCALES_WORK[key] = True
    return y


def _scaled_mm(x2: Tensor, xs: Tensor, w: Tensor, ws: Tensor, b: Optional[Tensor], os_: Optional[Tensor],
               dtype: torch.dtype) -> Tensor:
    if os_ is None and b is None:
        fused = _scaled_mm_fused(x2, xs, w, ws, dtype)
        if fused is not None:
            return fused
    one = torch.ones((), dtype=torch.float32, device=x2.device)
    # cuBLASLt wants mat2 column-major: w.t() of a row-major [N, K] weight is exactly that.
    a = torch._scaled_mm(x2, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    y = a * (xs.reshape(()) * ws)
    if b is not None:
        y = y + b
    if os_ is not None:
        return _quantize_fp32(y, os_)
    return y.to(dtype)


def fp8_gemm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
             out_scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
             backend: Optional[str] = None) -> Tensor:
    """FP8 W8A8 linear layer: `x_q @ w_q.T` in fp32, scaled, biased, optionally requantized to int8.

    Arguments and results are those of `torch.ops.quamba.fp8_linear` (ValueError on bad ones), plus:
    every tensor must be on `x_q`'s device, and `backend` (`triton` or `scaled_mm`; default
    `$QUAMBA_FX_FP8_GEMM`, else `triton`) picks the implementation where a kernel runs. Returns a
    new contiguous `[..., N]` tensor.
    """
    for name, t in (("x_q", x_q), ("x_scale", x_scale), ("w_q", w_q), ("w_scale", w_scale), ("bias", bias),
                    ("out_scale", out_scale)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"fp8_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
    n, k = _check_fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale)
    dtype = _linear_out_dtype(out_scale, out_dtype)
    for name, t in (("x_scale", x_scale), ("w_q", w_q), ("w_scale", w_scale), ("bias", bias), ("out_scale", out_scale)):
        if t is not None and t.device != x_q.device:
            raise ValueError(f"fp8_gemm: {name} is on {t.device} but x_q is on {x_q.device}")
    chosen = _backend(backend)
    if k == 0 or (dtype not in _FLOAT_OUT and dtype != torch.int8) or not use_triton(x_q):
        return fp8_gemm_reference(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)
    lead = x_q.shape[:-1]
    m = math.prod(lead)
    out = torch.empty((*lead, n), dtype=dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    x2 = x_q.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    w = w_q if w_q.stride(1) == 1 else w_q.contiguous()
    xs, ws = _f32(x_scale), _f32(w_scale)
    b = _f32(bias) if bias is not None else None
    os_ = _f32(out_scale) if out_scale is not None else None
    if chosen == "scaled_mm":
        out.view(m, n).copy_(_scaled_mm(x2, xs, w.contiguous(), ws, b, os_, dtype))
        return out
    out2 = out.view(m, n)
    if m >= _TMA_MIN_M and gemm_tma.supported(x2, w, out2):
        flags = dict(W_PER_CHANNEL=ws.numel() > 1, HAS_BIAS=b is not None, OUT_MODE=OUT_MODES[dtype],
                     OUT_PER_CHANNEL=os_ is not None and os_.numel() > 1, **gemm_tma.fp8_flags(_PREFILL_PROMOTE_K))
        # Unused pointers get a valid placeholder (x_scale): the kernel never reads them.
        tensors = (x2, w, xs, ws, b if b is not None else xs, os_ if os_ is not None else xs, out2)
        gemm_tma.launch(tensors, m, n, k, min(next_pow2(m), _M_BUCKET_CAP), flags)
        return out
    block_m, block_n, block_k, warps, stages = _tiles(m)
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        x2, w, xs, ws, b if b is not None else xs, os_ if os_ is not None else xs, out, m, n, k,
        x2.stride(0), w.stride(0),
        W_PER_CHANNEL=ws.numel() > 1, HAS_BIAS=b is not None, OUT_INT8=os_ is not None,
        OUT_PER_CHANNEL=os_ is not None and os_.numel() > 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        PROMOTE_K=None if _PROMOTE_K is None else min(_PROMOTE_K, block_k), num_warps=warps, num_stages=stages,
        # Keeps `acc * s + bias` two roundings, as the reference computes it.
        enable_fp_fusion=False,
    )
    return out


@graph_op("quamba::fp8_gemm", mutates_args=())
def fp8_gemm_op(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                out_scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """`fp8_gemm` as a graph op (the backend comes from `$QUAMBA_FX_FP8_GEMM`)."""
    return fp8_gemm(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)


@fp8_gemm_op.register_fake
def _fp8_gemm_fake(x_q, x_scale, w_q, w_scale, bias=None, out_scale=None, out_dtype=None):
    return torch.ops.quamba.fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)


