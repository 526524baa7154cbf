"""The Triton kernels as `torch.library` custom ops, so a graph holds each as one traceable node.

Each op runs its Triton kernel on CUDA (and on CPU under TRITON_INTERPRET=1), else the kernel
module's PyTorch reference, so a lowered graph also runs, slowly, on a plain CPU. Every fake
implementation promises the exact layout the real one returns: compilers trust the fake's strides.

The `*_cached` ops carry a decode cache: `decode=False` runs a whole prompt and writes the final
state into the cache tensor; `decode=True` runs one token from the cached state and advances it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .conv1d import causal_conv1d_silu_int8, causal_conv1d_update_silu_int8
from .dispatch import graph_op
from .gemm import ConvStep, int8_gemm, int8_gemm_conv_step
from .hadamard import hadamard_quantize as _hadamard_quantize
from .hadamard import hadamard_quantize_fp8 as _hadamard_quantize_fp8
from .hadamard import hadamard_transform_triton as _hadamard_transform_triton
from .norm import add_rmsnorm_quantize as _add_rmsnorm_quantize
from .scan import selective_scan as _selective_scan
from .scan import DeltaProjection, selective_state_update


def _conv_params(weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    # nn.Conv1d keeps [D, 1, W]; the kernels take [D, W] fp32 (a view when already fp32).
    w = weight.reshape(weight.shape[0], weight.shape[-1]).float()
    return w, None if bias is None else bias.float()


def _scalar(scale: Tensor) -> Tensor:
    return scale.float().reshape(())


# --- conv1d ---------------------------------------------------------------------------------


@graph_op("quamba::conv1d_silu_int8", mutates_args=())
def conv1d_silu_int8(x_q: Tensor, x_scale: Tensor, weight: Tensor, bias: Optional[Tensor],
                     out_scale: Tensor) -> Tensor:
    """dequantize -> causal depthwise conv1d -> SiLU -> quantize, fused (see `kernels/conv1d.py`).

    `x_q` int8 `[B, D, L]` (any strides), `weight` nn.Conv1d's `[D, 1, W]`, scales fp32 tensors.
    Returns int8 `[B, D, L]` laid out as `[B, L, D]` in memory.
    """
    w, b = _conv_params(weight, bias)
    return causal_conv1d_silu_int8(x_q, _scalar(x_scale), w, b, _scalar(out_scale))


@conv1d_silu_int8.register_fake
def _conv1d_silu_int8_fake(x_q, x_scale, weight, bias, out_scale):
    batch, channels, length = x_q.shape
    return x_q.new_empty((batch, length, channels)).transpose(1, 2)


@graph_op("quamba::conv1d_silu_int8_cached", mutates_args=("conv_state",))
def conv1d_silu_int8_cached(x_q: Tensor, x_scale: Tensor, weight: Tensor, bias: Optional[Tensor],
                            out_scale: Tensor, conv_state: Tensor, decode: bool) -> Tensor:
    """`conv1d_silu_int8` with a cache: `conv_state` int8 `[B, D, W-1]`, the last W-1 inputs.

    Prefill (`decode=False`) starts from zeros, as the uncached op does, and leaves the prompt's
    last W-1 inputs in `conv_state`; decode (`decode=True`, `x_q` `[B, D, 1]`) continues from it.
    """
    w, b = _conv_params(weight, bias)
    if decode:
        out = causal_conv1d_update_silu_int8(x_q[:, :, 0], conv_state, _scalar(x_scale), w, b, _scalar(out_scale))
        return out[:, None, :].transpose(1, 2)
    out, final = causal_conv1d_silu_int8(x_q, _scalar(x_scale), w, b, _scalar(out_scale), return_final_state=True)
    conv_state.copy_(final)
    return out


@conv1d_silu_int8_cached.register_fake
def _conv1d_silu_int8_cached_fake(x_q, x_scale, weight, bias, out_scale, conv_state, decode):
    batch, channels, length = x_q.shape
    return x_q.new_empty((batch, length, channels)).transpose(1, 2)


# --- W8A8 Linear --------------------------------------------------------------------------------


@graph_op("quamba::w8a8_linear", mutates_args=())
def w8a8_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                out_scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The int8 GEMM kernel with its scale epilogue; numerics of `torch.ops.quamba.int8_linear`."""
    return int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x_q, x_scale, w_q, w_scale, bias=None, out_scale=None, out_dtype=None):
    return torch.ops.quamba.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale, out_dtype)


@graph_op("quamba::in_proj_conv_update", mutates_args=("conv_state",))
def in_proj_conv_update(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                        out_scale: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], conv_out_scale: Tensor,
                        conv_state: Tensor) -> tuple[Tensor, Tensor]:
    """A decode step's in_proj and conv1d: `xz = w8a8_linear(x_q, .., out_scale)` (int8) and
    `conv1d_silu_int8_cached(xz.transpose(1, 2)[:, :D], out_scale, conv_weight, conv_bias,
    conv_out_scale, conv_state, decode=True)`, D = conv_state.shape[1]; returns `(xz, u)`, u
    `[B, D, 1]` laid out `[B, 1, D]`. At batch 1 on the GPU one GEMV launch computes both
    (`kernels.gemm.int8_gemm_conv_step`).
    """
    w, b = _conv_params(conv_weight, conv_bias)
    xz, u = int8_gemm_conv_step(x_q, x_scale, w_q, w_scale, bias, out_scale,
                                ConvStep(conv_state, w, b, _scalar(conv_out_scale)))
    return xz, u[:, None, :].transpose(1, 2)


@in_proj_conv_update.register_fake
def _in_proj_conv_update_fake(x_q, x_scale, w_q, w_scale, bias, out_scale, conv_weight, conv_bias, conv_out_scale,
                              conv_state):
    xz = torch.ops.quamba.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale, None)
    batch, channels = conv_state.shape[:2]
    return xz, x_q.new_empty((batch, 1, channels)).transpose(1, 2)


# --- selective scan -------------------------------------------------------------------------------


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    # The scan kernels take A, D and delta_bias in fp32 (a no-op for the folded fp32 buffers).
    return None if t is None else t.float()


def _scan_int8(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
               delta_bias, delta_softplus, out_dtype, **extra):
    A, D, delta_bias = _f32(A), _f32(D), _f32(delta_bias)
    return _selective_scan(u_q, delta_q, A, B_q, C_q, D, z_q, delta_bias, delta_softplus,
                           u_scale=u_scale, delta_scale=delta_scale, B_scale=B_scale, C_scale=C_scale,
                           z_scale=z_scale, out_dtype=out_dtype, **extra)


@graph_op("quamba::selective_scan_int8", mutates_args=())
def selective_scan_int8(u_q: Tensor, u_scale: Tensor, delta_q: Tensor, delta_scale: Tensor, A: Tensor,
                        B_q: Tensor, B_scale: Tensor, C_q: Tensor, C_scale: Tensor, D: Optional[Tensor],
                        z_q: Optional[Tensor], z_scale: Optional[Tensor], delta_bias: Optional[Tensor],
                        delta_softplus: bool, out_dtype: torch.dtype) -> Tensor:
    """The selective scan on int8 inputs dequantized in registers (`kernels/scan.py`).

    Layouts as `torch.ops.quamba.selective_scan`; the result is `[B, D, L]` laid out `[B, L, D]`.
    """
    return _scan_int8(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
                      delta_bias, delta_softplus, out_dtype)


@selective_scan_int8.register_fake
def _selective_scan_int8_fake(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q,
                              z_scale, delta_bias, delta_softplus, out_dtype):
    batch, channels, length = u_q.shape
    return u_q.new_empty((batch, length, channels), dtype=out_dtype).transpose(1, 2)


@graph_op("quamba::selective_scan_int8_cached", mutates_args=("ssm_state",))
def selective_scan_int8_cached(u_q: Tensor, u_scale: Tensor, delta_q: Tensor, delta_scale: Tensor, A: Tensor,
                               B_q: Tensor, B_scale: Tensor, C_q: Tensor, C_scale: Tensor, D: Optional[Tensor],
                               z_q: Optional[Tensor], z_scale: Optional[Tensor], delta_bias: Optional[Tensor],
                               delta_softplus: bool, out_dtype: torch.dtype, ssm_state: Tensor,
                               decode: bool) -> Tensor:
    """`selective_scan_int8` with a cache: `ssm_state` float16, bfloat16 or float32 `[B, D, N]`.

    Prefill starts from a zero state and leaves the final one in `ssm_state`; decode (L = 1)
    advances `ssm_state` by one step. The scan computes in fp32 either way; the state is stored
    rounded to nearest even in `ssm_state`'s dtype.
    """
    if decode:
        y = selective_state_update(
            ssm_state, u_q[:, :, 0], delta_q[:, :, 0], _f32(A), B_q[:, :, 0], C_q[:, :, 0], _f32(D),
            None if z_q is None else z_q[:, :, 0], _f32(delta_bias), delta_softplus,
            u_scale=u_scale, delta_scale=delta_scale, B_scale=B_scale, C_scale=C_scale, z_scale=z_scale,
            out_dtype=out_dtype)
        return y[:, None, :].transpose(1, 2)
    y, final = _scan_int8(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
                          delta_bias, delta_softplus, out_dtype, return_final_state=True,
                          state_dtype=ssm_state.dtype)
    ssm_state.copy_(final)
    return y


@selective_scan_int8_cached.register_fake
def _selective_scan_int8_cached_fake(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale, D, z_q,
                                     z_scale, delta_bias, delta_softplus, out_dtype, ssm_state, decode):
    batch, channels, length = u_q.shape
    return u_q.new_empty((batch, length, channels), dtype=out_dtype).transpose(1, 2)


@graph_op("quamba::dt_proj_state_update", mutates_args=("ssm_state",))
def dt_proj_state_update(u_q: Tensor, u_scale: Tensor, dt_x_q: Tensor, dt_x_scale: Tensor, dt_weight: Tensor,
                         dt_weight_scale: Tensor, dt_bias: Optional[Tensor], delta_scale: Tensor, A: Tensor,
                         B_q: Tensor, B_scale: Tensor, C_q: Tensor, C_scale: Tensor, D: Optional[Tensor],
                         z_q: Optional[Tensor], z_scale: Optional[Tensor], delta_bias: Optional[Tensor],
                         delta_softplus: bool, out_dtype: torch.dtype, ssm_state: Tensor) -> Tensor:
    """One decode step of `selective_scan_int8_cached` whose delta is dt_proj's int8 output
    `w8a8_linear(dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale)`, computed
    inside the scan kernel (`kernels.scan.DeltaProjection`): the same delta, one launch fewer.

    u_q, z_q: `[B, D, 1]`; dt_x_q: `[B, 1, R]`; B_q, C_q: `[B, N, 1]`; returns y `[B, D, 1]` laid
    out `[B, 1, D]`, and advances `ssm_state` `[B, D, N]`.
    """
    proj = DeltaProjection(dt_x_q[:, 0], _scalar(dt_x_scale), dt_weight, dt_weight_scale.float().reshape(-1),
                           _f32(dt_bias), _scalar(delta_scale))
    y = selective_state_update(
        ssm_state, u_q[:, :, 0], None, _f32(A), B_q[:, :, 0], C_q[:, :, 0], _f32(D),
        None if z_q is None else z_q[:, :, 0], _f32(delta_bias), delta_softplus,
        u_scale=u_scale, B_scale=B_scale, C_scale=C_scale, z_scale=z_scale, out_dtype=out_dtype, delta_proj=proj)
    return y[:, None, :].transpose(1, 2)


@dt_proj_state_update.register_fake
def _dt_proj_state_update_fake(u_q, u_scale, dt_x_q, dt_x_scale, dt_weight, dt_weight_scale, dt_bias, delta_scale,
                               A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale, delta_bias, delta_softplus,
                               out_dtype, ssm_state):
    batch, channels, length = u_q.shape
    return u_q.new_empty((batch, length, channels), dtype=out_dtype).transpose(1, 2)


# --- Hadamard and norm ----------------------------------------------------------------------------


@graph_op("quamba::hadamard_quantize", mutates_args=())
def hadamard_quantize(x: Tensor, scale: Tensor) -> Tensor:
    """`quantize(hadamard(x.float()), scale)` in one kernel; int8 of x's shape, contiguous."""
    return _hadamard_quantize(x, _scalar(scale))


@hadamard_quantize.register_fake
def _hadamard_quantize_fake(x, scale):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


@graph_op("quamba::hadamard_quantize_fp8", mutates_args=())
def hadamard_quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """`quantize_fp8(hadamard(x.float()), scale)` in one kernel; float8_e4m3fn of x's shape, contiguous.

    The fp8 recipe's rotation before out_proj.
    """
    return _hadamard_quantize_fp8(x, _scalar(scale))


@hadamard_quantize_fp8.register_fake
def _hadamard_quantize_fp8_fake(x, scale):
    return torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)


@graph_op("quamba::hadamard_rotate", mutates_args=())
def hadamard_rotate(x: Tensor) -> Tensor:
    """`quamba::hadamard` on the Hadamard kernel: rotated in fp32, returned in x's dtype, contiguous.

    For a rotation no quantize fuses with (e.g. one whose output has several users).
    """
    return _hadamard_transform_triton(x).to(x.dtype)


@hadamard_rotate.register_fake
def _hadamard_rotate_fake(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@graph_op("quamba::add_rmsnorm_quantize", mutates_args=())
def add_rmsnorm_quantize(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                         scale: Optional[Tensor], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Residual add + RMSNorm (+ int8 quantize): returns `(normed, residual_out)`.

    `residual_out = x.float() + residual` (fp32, the new residual stream); `normed` is int8 at
    `scale` (e4m3 when `out_dtype` is float8_e4m3fn: the fp8 recipe), or `out_dtype` when `scale`
    is None (the final norm before lm_head).
    """
    normed, resid = _add_rmsnorm_quantize(x, residual, weight, eps, None if scale is None else _scalar(scale),
                                          out_dtype)
    return normed, resid


@add_rmsnorm_quantize.register_fake
def _add_rmsnorm_quantize_fake(x, residual, weight, eps, scale, out_dtype):
    if scale is None:
        dtype = out_dtype
    else:
        dtype = torch.float8_e4m3fn if out_dtype == torch.float8_e4m3fn else torch.int8
    return (torch.empty(x.shape, dtype=dtype, device=x.device),
            torch.empty(x.shape, dtype=torch.float32, device=x.device))

