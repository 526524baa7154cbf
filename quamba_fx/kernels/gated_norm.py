"""Mamba-2's gated RMSNorm, `norm(y * silu(z))`, in one pass, reading an int8 gate with its scale.

Hugging Face's gated norm computes, over each group of `group_size` elements of the last dim:

    h = y.float() * silu(z.float());   h = h * rsqrt(mean(h * h) + eps);   out = weight * h

(`Mamba2RMSNormGated` groups `d_inner / n_groups` elements, as mamba_ssm does; transformers 5.0's
`MambaRMSNormGated` normalises the whole row: one group.)

In a Mamba-2 graph `y` is the SSD scan's fp32 output and `z` the gate half of in_proj's output;
quantized graphs dequantize z (`q.float() * scale`) first. Run as separate torch ops that is about
eight passes over `[tokens, d_inner]` fp32 tensors; here one program per row and group reads y
and the int8 gate once and writes the normed values once, in the dtype the next kernel (out_proj's
Hadamard quantize) reads. Groups up to `_MAX_BLOCK` elements stay in registers; longer ones loop
twice, re-reading y and z (from L2) for the second pass.

Numerics: the dequantize and the product are the reference's fp32 operations; the mean of squares
is summed in another order and `rsqrt` is approximate on the GPU, so each output carries the same
few-ulp relative error (as `kernels/norm.py` documents for the block norm).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InputError
from .dispatch import INTERPRET, as_scalar, fp_fusion, graph_op, next_pow2
from .dispatch import use_triton as _use_triton

__all__ = ["check_gated_rmsnorm_args", "gated_rmsnorm", "gated_rmsnorm_op", "gated_rmsnorm_reference", "gated_row"]

# Longest row held whole in registers (8192 fp32: 32 a thread over 8 warps); a module variable so
# the tests can force the two-pass loop on small rows.
_MAX_BLOCK = 8192
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def gated_row(y_row, z_row, offs, mask, z_scale, Z_INT8: tl.constexpr):
    """`y * silu(z)` in fp32 for the columns `offs` of one row (`z` int8 times `z_scale` with
    Z_INT8), zero where `mask` is off: the gate that this norm and the fused Hadamard
    (hadamard.py) both apply before they sum squares."""
    y = tl.load(y_row + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_row + offs, mask=mask, other=0).to(tl.float32)
    if Z_INT8:
        z = z * z_scale
    return y * (z / (1.0 + tl.exp(-z)))  # masked lanes: 0 * silu(0) = 0, nothing added to the squares


@triton.jit
def _gated_rmsnorm_kernel(
    y_ptr, z_ptr, z_scale_ptr, w_ptr, out_ptr, D, G, groups, stride_y, stride_z, eps,
    Z_INT8: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    row = (tl.program_id(0) // groups).to(tl.int64)
    first = (tl.program_id(0) % groups) * G  # the group's first column
    y_row = y_ptr + row * stride_y + first
    z_row = z_ptr + row * stride_z + first
    o_row = out_ptr + row * D + first
    w_ptr += first
    offs = tl.arange(0, BLOCK)
    z_scale = tl.load(z_scale_ptr).to(tl.float32) if Z_INT8 else 1.0
    if SINGLE:
        mask = offs < G
        h = gated_row(y_row, z_row, offs, mask, z_scale, Z_INT8)
        rstd = tl.math.rsqrt(tl.sum(h * h, axis=0) / G + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_row + offs, (w * (h * rstd)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, G, BLOCK):
            h = gated_row(y_row + start, z_row + start, offs, start + offs < G, z_scale, Z_INT8)
            squares += h * h
        rstd = tl.math.rsqrt(tl.sum(squares, axis=0) / G + eps)
        for start in range(0, G, BLOCK):
            mask = start + offs < G
            h = gated_row(y_row + start, z_row + start, offs, mask, z_scale, Z_INT8)
            w = tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + start + offs, (w * (h * rstd)).to(out_ptr.dtype.element_ty), mask=mask)


def gated_rmsnorm_reference(y: Tensor, z: Tensor, z_scale: Optional[Tensor], weight: Tensor, eps: float,
                            out_dtype: torch.dtype = torch.float32, group_size: Optional[int] = None) -> Tensor:
    """The computation in PyTorch, HF's order of operations: `z` dequantized first when int8."""
    gate = z.float() * z_scale.float() if z_scale is not None else z.float()
    h = y.float() * torch.nn.functional.silu(gate)
    width = h.shape[-1]
    grouped = h.unflatten(-1, (width // (group_size or width), group_size or width))
    h = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    return (weight.float() * h).to(out_dtype)


def check_gated_rmsnorm_args(y: Tensor, z: Tensor, z_scale: Optional[Tensor], weight: Tensor, out_dtype: torch.dtype,
                             group_size: Optional[int]) -> None:
    """Raise `InputError` unless `gated_rmsnorm` can take these arguments (shared with the fused
    gated norm + Hadamard quantize of kernels/hadamard.py)."""
    if y.shape != z.shape or y.dim() < 1:
        raise InputError(f"gated_rmsnorm: y and z must have one shape [..., D], got {tuple(y.shape)} and "
                         f"{tuple(z.shape)}")
    if (z.dtype == torch.int8) != (z_scale is not None):
        raise InputError(f"gated_rmsnorm: an int8 gate needs its scale and a float gate none; got z {z.dtype} "
                         f"with scale {'given' if z_scale is not None else 'None'}")
    if z_scale is not None and z_scale.numel() != 1:
        raise InputError(f"gated_rmsnorm: the gate's scale must be per tensor (one element), got {z_scale.numel()}")
    if tuple(weight.shape) != (y.shape[-1],):
        raise InputError(f"gated_rmsnorm: weight must be [{y.shape[-1]}], got {tuple(weight.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise InputError(f"gated_rmsnorm: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if group_size is not None and (group_size < 1 or y.shape[-1] % group_size):
        raise InputError(f"gated_rmsnorm: group_size {group_size} does not divide the last dim {y.shape[-1]}")


def gated_rmsnorm(y: Tensor, z: Tensor, z_scale: Optional[Tensor], weight: Tensor, eps: float,
                  out_dtype: torch.dtype = torch.float32, group_size: Optional[int] = None) -> Tensor:
    """`weight * rmsnorm(y * silu(z))`, normalised over each `group_size` elements of the last dim
    (None: the whole dim), as a new contiguous `out_dtype` tensor of y's shape. `z` is float, or
    int8 with its per-tensor `z_scale` (dequantized in the kernel).
    Any row strides; the last dim must be contiguous (else copied). CUDA tensors, and CPU ones
    under TRITON_INTERPRET=1, run the Triton kernel; others `gated_rmsnorm_reference`. Raises
    `InputError` on inconsistent arguments."""
    check_gated_rmsnorm_args(y, z, z_scale, weight, out_dtype, group_size)
    if not _use_triton(y) or y.numel() == 0:
        return gated_rmsnorm_reference(y, z, z_scale, weight, eps, out_dtype, group_size)
    width = y.shape[-1]
    group = group_size or width
    y2, z2 = (t.reshape(-1, width) if t.stride(-1) == 1 else t.contiguous().reshape(-1, width) for t in (y, z))
    out = torch.empty(y.shape, dtype=out_dtype, device=y.device)
    block = min(next_pow2(group), _MAX_BLOCK)
    _gated_rmsnorm_kernel[(y2.shape[0] * (width // group),)](
        y2, z2, z_scale if z_scale is not None else y2, weight.contiguous(), out, width, group, width // group,
        y2.stride(0), z2.stride(0), float(eps), Z_INT8=z_scale is not None, BLOCK=block, SINGLE=block >= group,
        num_warps=1 if INTERPRET else max(1, min(8, block // 128)), **fp_fusion(),
    )
    return out


@graph_op("quamba::gated_rmsnorm")
def gated_rmsnorm_op(y: Tensor, z: Tensor, z_scale: Optional[Tensor], weight: Tensor, eps: float,
                     out_dtype: torch.dtype, group_size: Optional[int]) -> Tensor:
    """`gated_rmsnorm` as a graph node: Mamba-2's `mixer.norm(y, z)`, z int8 at `z_scale` or float."""
    return gated_rmsnorm(y, z, None if z_scale is None else as_scalar(z_scale), weight, eps, out_dtype, group_size)


@gated_rmsnorm_op.register_fake
def _gated_rmsnorm_fake(y, z, z_scale, weight, eps, out_dtype, group_size):
    return torch.empty(y.shape, dtype=out_dtype, device=y.device)
