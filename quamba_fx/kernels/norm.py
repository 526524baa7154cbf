"""Fused residual add + RMSNorm (+ per-tensor int8 or e4m3 quantization), between Mamba blocks.

`add_rmsnorm_quantize(x, residual, weight, eps, scale)` reads a block's output `x` and the fp32
residual stream once, and writes the new residual stream and the next block's (quantized) input:

1. `r = x.float() + residual` (or `x.float()` for the first block, which has no residual): one
   exact conversion and one fp32 add, so `r` is bit-identical to the reference everywhere; it is
   returned as the new fp32 residual stream (Hugging Face's `residual_in_fp32=True`);
2. Hugging Face `MambaRMSNorm` in fp32: `n = r * rsqrt(mean(r * r, -1) + eps)`, `y = weight * n`.
   HF casts `n` back to the input dtype before multiplying by `weight`; our graphs run the norm on
   the fp32 residual stream, so there is no such cast here: `y` is `fp32(weight) * n` in fp32;
3. with `scale`: `q = clamp(round_half_even(y / scale), -128, 127)` as int8 (IEEE division, as
   `torch.ops.quamba.quantize`), the input of the next block's int8 `in_proj`; with `scale` and
   `out_dtype=torch.float8_e4m3fn` (the fp8 recipe's e4m3 `in_proj`):
   `q = e4m3(clamp(y / scale, -448, 448))` like `torch.ops.quamba.quantize_fp8` (correctly rounded
   quotient, then nearest e4m3, ties to even: `rounding.quantize_e4m3_rn`, scales in
   [2**-90, 2**118]); without a scale (the final `norm_f` before `lm_head`): `y` cast to
   `out_dtype` (default float16).

Numerics versus the reference, and the test tolerances
------------------------------------------------------
`r` is exact (one correctly rounded fp32 add on both sides), and is tested for bit equality. The
mean of squares is a sum of `H` fp32 terms in a different order (a tree in the kernel, ATen's in the
reference; on CUDA the squares may contract into FMAs and `/ H` is an approximate division) and
`rsqrt` is an approximation on the GPU (~2 ulp), so the common factor `rsqrt(mean + eps)` differs by
a few ulps; every element is then that factor times `r` times `weight` (products, no cancellation),
so each normed value has the same small *relative* error, below ~1e-6 observed (CPU interpreter
and H100). The fp32 output is tested at rtol 1e-5; an fp16 output at one fp16 ulp (rtol 2**-10),
since a few-ulp fp32 difference can move the fp16 rounding by one step. The int8 output is a
function of `y` computed identically (correctly rounded division, exact half-to-even rounding), so
it can differ only where `y / scale` lies within a few ulps of a .5 boundary: for values up to 127
a window of ~127 * 2**-21, hit by a tiny fraction of elements, so the tests allow `|diff| <= 1` on
at most 0.1% of the elements (plus one), never more than one step. The e4m3 output likewise
(bit-identical to `quantize_fp8` given the same `y`): one e4m3 step, on as few elements.

Performance design: memory-bound (x in, residual in, residual out, normed out: 11 bytes per element
for fp16 x and int8 out), one program per row. Rows up to `_MAX_BLOCK_H` elements are held in
registers (one read of each input); longer rows loop twice over blocks, the second pass re-reading
x and the residual (from L2) rather than the `r` just written, which would need a barrier between
threads that store and threads that load. Measured on H100 at 16384 rows (fp16 x): 94-100% of copy
bandwidth for H = 2560 and 5120 with int8 out, ~91% with fp16 out (benchmarks/hadamard_norm.py).

Layouts: `x` and `residual` are `[..., H]` with stride 1 along H (else copied); their leading dims may
have any strides (collapsed to at most two without copying). Outputs are new contiguous tensors.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import INTERPRET as _INTERPRET
from .dispatch import as_scalar, graph_op, next_pow2
from .dispatch import use_triton as _use_triton
from .pdl import launch_options, wait_for_previous

from ..quant.fp8 import quantize_fp8 as _quantize_fp8  # torch.ops.quamba.quantize_fp8
from ..quant.qops import quantize as _quantize  # torch.ops.quamba.quantize
from .hadamard import _lead_layout
from .rounding import quantize_e4m3_rn, quantize_rn

__all__ = ["add_rmsnorm_quantize", "add_rmsnorm_quantize_reference"]


# Longest row kept whole in registers (8192 fp32 = 32 values a thread over 8 warps); a module
# variable so the tests can force the two-pass loop on small rows.
_MAX_BLOCK_H = 8192

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _residual_sum(x_row, res_row, offs, mask, HAS_RES: tl.constexpr):
    r = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = r + tl.load(res_row + offs, mask=mask, other=0.0)
    return r


@triton.jit
def _normed_out(r, rstd, w_ptr, stride_w, offs, mask, scale_ptr, o_row, QUANT: tl.constexpr):
    # QUANT: 0 float out (o_row's dtype), 1 int8, 2 e4m3.
    w = tl.load(w_ptr + offs * stride_w, mask=mask, other=0.0).to(tl.float32)
    y = w * (r * rstd)
    if QUANT == 1:
        tl.store(o_row + offs, quantize_rn(y, tl.load(scale_ptr)), mask=mask)
    elif QUANT == 2:
        tl.store(o_row + offs, quantize_e4m3_rn(y, tl.load(scale_ptr)), mask=mask)
    else:
        tl.store(o_row + offs, y.to(o_row.dtype.element_ty), mask=mask)


@triton.jit
def _normed_row(x_row, res_row, w_ptr, stride_w, scale_ptr, o_row, ro_row, H, eps, HAS_RES: tl.constexpr,
               QUANT: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row held whole in registers (H <= BLOCK_H): the new residual row at `ro_row`, and the
    normed row at `o_row` (QUANT as in `_normed_out`). The kernel's single-pass path."""
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    r = _residual_sum(x_row, res_row, offs, mask, HAS_RES)
    tl.store(ro_row + offs, r, mask=mask)
    # Masked lanes hold 0.0 and add nothing to the sum of squares.
    rstd = tl.math.rsqrt(tl.sum(r * r, axis=0) / H + eps)
    _normed_out(r, rstd, w_ptr, stride_w, offs, mask, scale_ptr, o_row, QUANT)


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, scale_ptr, out_ptr, r_ptr,
    H, D1, stride_x0, stride_x1, stride_r0, stride_r1, stride_w, eps,
    HAS_RES: tl.constexpr, QUANT: tl.constexpr, BLOCK_H: tl.constexpr, SINGLE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0)
    i0 = (row // D1).to(tl.int64)
    i1 = (row % D1).to(tl.int64)
    x_row = x_ptr + i0 * stride_x0 + i1 * stride_x1
    res_row = res_ptr + i0 * stride_r0 + i1 * stride_r1
    # Both outputs are contiguous [rows, H].
    base = row.to(tl.int64) * H
    ro_row = r_ptr + base
    o_row = out_ptr + base
    offs = tl.arange(0, BLOCK_H)

    if SINGLE:
        _normed_row(x_row, res_row, w_ptr, stride_w, scale_ptr, o_row, ro_row, H, eps, HAS_RES, QUANT, BLOCK_H)
    else:
        # Pass 1: write r, accumulate per-lane partial sums of squares, reduce once at the end.
        ss = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            mask = start + offs < H
            r = _residual_sum(x_row + start, res_row + start, offs, mask, HAS_RES)
            tl.store(ro_row + start + offs, r, mask=mask)
            ss += r * r
        rstd = tl.math.rsqrt(tl.sum(ss, axis=0) / H + eps)
        # Pass 2: recompute r (bit-identical: the same single add) from x and the residual.
        for start in range(0, H, BLOCK_H):
            mask = start + offs < H
            r = _residual_sum(x_row + start, res_row + start, offs, mask, HAS_RES)
            _normed_out(r, rstd, w_ptr + start * stride_w, stride_w, offs, mask, scale_ptr, o_row + start, QUANT)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _describe(t: object) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(fn: str, x: object, residual: object, weight: object, eps: object, scale: object,
              out_dtype: object) -> torch.dtype:
    """Checks the arguments; returns the dtype of the normed output."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"{fn}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must be [..., H] with H >= 1, got shape {tuple(x.shape)}")
    H = x.shape[-1]
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32:
            raise ValueError(f"{fn}: residual must be None or a float32 tensor, got {_describe(residual)}")
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual has shape {tuple(residual.shape)} but x has shape {tuple(x.shape)}")
        if residual.device != x.device:
            raise ValueError(f"{fn}: residual is on {residual.device} but x is on {x.device}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _X_DTYPES or weight.dim() != 1:
        raise ValueError(f"{fn}: weight must be a 1-dim floating tensor [H], got {_describe(weight)}")
    if weight.shape[0] != H:
        raise ValueError(f"{fn}: weight has {weight.shape[0]} elements but x has H={H}")
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{fn}: eps must be a non-negative float, got {eps!r}")
    if scale is not None:
        if not isinstance(scale, torch.Tensor):
            raise ValueError(
                f"{fn}: scale must be None or a 0-dim or 1-element float32 tensor (read by the kernel at "
                f"run time), got {type(scale).__name__}"
            )
        if scale.dtype != torch.float32 or scale.numel() != 1:
            raise ValueError(
                f"{fn}: scale must be a 0-dim or 1-element float32 tensor, got {scale.dtype} of shape "
                f"{tuple(scale.shape)}"
            )
        if scale.device != x.device:
            raise ValueError(f"{fn}: scale is on {scale.device} but x is on {x.device}")
        # With a scale the result is int8 unless out_dtype asks for e4m3; any other out_dtype is
        # ignored, so that a graph can pass its op's default. Only int8 or a float dtype are
        # accepted, as a typo guard.
        if out_dtype is not None and not (
            isinstance(out_dtype, torch.dtype) and (out_dtype == torch.int8 or out_dtype.is_floating_point)
        ):
            raise ValueError(f"{fn}: out_dtype must be None, torch.int8 or a float dtype, got {out_dtype!r}")
        return _FP8 if out_dtype == _FP8 else torch.int8
    if out_dtype is None:
        return torch.float16
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(
            f"{fn}: without a scale, out_dtype must be float16, bfloat16 or float32, got {out_dtype!r}"
        )
    return out_dtype


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def add_rmsnorm_quantize_reference(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    eps: float,
    scale: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `add_rmsnorm_quantize`: same arguments, numerics (up to summation
    order, see the module docstring) and layouts."""
    dtype = _validate("add_rmsnorm_quantize_reference", x, residual, weight, eps, scale, out_dtype)
    # Always a fresh contiguous tensor, also when x is already fp32 and there is no residual.
    r = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if residual is None:
        r.copy_(x)
    else:
        torch.add(x.to(torch.float32), residual, out=r)
    variance = (r * r).mean(-1, keepdim=True)
    y = weight.to(torch.float32) * (r * torch.rsqrt(variance + eps))
    if scale is not None and dtype == _FP8:
        return _quantize_fp8(y, scale), r
    if scale is not None:
        return _quantize(y, scale), r
    return y.to(dtype).contiguous(), r


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _quant_kind(scale: Optional[torch.Tensor], dtype: torch.dtype) -> int:
    """The kernel's QUANT: 0 float out, 1 int8, 2 e4m3."""
    if scale is None:
        return 0
    return 2 if dtype == _FP8 else 1


def _num_warps(block_h: int) -> int:
    if _INTERPRET:
        return 1
    # Measured on H100 (16384 rows, fp16 x, int8 out): 8 warps was best for H = 768, 2560 and
    # 5120 (5120: 0.33 ms with 8, 0.38 with 16, 0.41 with 4); smaller rows keep >= 4 values a thread.
    return max(1, min(8, block_h // 128))


def add_rmsnorm_quantize(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    eps: float,
    scale: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm (+ int8 or e4m3 quantize), fused: returns `(normed, residual_out)`.

    Args:
        x: `[..., H]` float16, bfloat16 or float32, the block output (e.g. out_proj's). Stride 1
            along H (else copied); leading dims may have any strides.
        residual: float32 `[..., H]` (x's shape), the residual stream, or None for the first block.
        weight: the norm's weight `[H]` (float32, float16 or bfloat16), applied in fp32.
        eps: the norm's epsilon (added to the mean of squares).
        scale: per-tensor int8 (or e4m3) scale, a 0-dim or 1-element float32 tensor read at run
            time, or None for a floating output.
        out_dtype: dtype of `normed` when `scale` is None: float16 (default), bfloat16 or float32.
            With `scale`: `torch.float8_e4m3fn` for an e4m3 result, anything else gives int8.

    Returns:
        `(normed, residual_out)`, both contiguous of x's shape: `residual_out = x.float() + residual`
        (float32, exact), `normed = quantize(weight * rmsnorm(residual_out), scale)` (int8),
        `quantize_fp8(...)` of the same (e4m3), or the normed values in `out_dtype`. See the module
        docstring for the numerics.

    CUDA tensors run the Triton kernel, as do CPU tensors under TRITON_INTERPRET=1; other CPU
    tensors run `add_rmsnorm_quantize_reference`.
    """
    dtype = _validate("add_rmsnorm_quantize", x, residual, weight, eps, scale, out_dtype)
    if not _use_triton(x):
        return add_rmsnorm_quantize_reference(x, residual, weight, eps, scale, out_dtype)

    H = x.shape[-1]
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    r_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rows = x.numel() // H
    if rows == 0:
        return out, r_out
    if x.stride(-1) != 1 and H > 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1 and H > 1:
        residual = residual.contiguous()
    res = residual if residual is not None else x  # dummy pointer when absent, never read
    dims = _lead_layout(tuple(x.shape[:-1]), [x.stride()[:-1], res.stride()[:-1]])
    if len(dims) > 2:
        x = x.contiguous()
        res = res.contiguous() if residual is not None else x
        dims = _lead_layout(tuple(x.shape[:-1]), [x.stride()[:-1], res.stride()[:-1]])
    dims = [(1, 0, 0)] * (2 - len(dims)) + dims
    (_, sx0, sr0), (d1, sx1, sr1) = dims

    block_h = min(next_pow2(H), _MAX_BLOCK_H)
    _add_rmsnorm_kernel[(rows,)](
        x, res, weight, scale if scale is not None else r_out, out, r_out,
        H, d1, sx0, sx1, sr0, sr1, weight.stride(0), float(eps),
        HAS_RES=residual is not None, QUANT=_quant_kind(scale, dtype), BLOCK_H=block_h, SINGLE=block_h >= H,
        num_warps=_num_warps(block_h), **launch_options(x.device),
    )
    return out, r_out


# ---------------------------------------------------------------------------------------------
# Graph op (torch.ops.quamba.*, see dispatch.graph_op)
# ---------------------------------------------------------------------------------------------


@graph_op("quamba::add_rmsnorm_quantize", mutates_args=())
def add_rmsnorm_quantize_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                            scale: Optional[torch.Tensor], out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm (+ int8 quantize): returns `(normed, residual_out)`.

    `residual_out = x.float() + residual` (fp32, the new residual stream); `normed` is int8 at
    `scale` (e4m3 when `out_dtype` is float8_e4m3fn: the fp8 recipe), or `out_dtype` when `scale`
    is None (the final norm before lm_head).
    """
    normed, resid = add_rmsnorm_quantize(x, residual, weight, eps, None if scale is None else as_scalar(scale),
                                         out_dtype)
    return normed, resid


@add_rmsnorm_quantize_op.register_fake
def _add_rmsnorm_quantize_fake(x, residual, weight, eps, scale, out_dtype):
    if scale is None:
        dtype = out_dtype
    else:
        dtype = torch.float8_e4m3fn if out_dtype == torch.float8_e4m3fn else torch.int8
    return (torch.empty(x.shape, dtype=dtype, device=x.device),
            torch.empty(x.shape, dtype=torch.float32, device=x.device))
