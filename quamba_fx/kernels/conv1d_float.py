"""A block's conv1d + SiLU on float activations (recipes that leave the conv's input unquantized,
like W4A16): the reference, the decode-step Triton kernel, and the graph ops `conv1d_silu` and
`conv1d_silu_cached`.

A prefill runs `_conv1d_silu_kernel`: each program a `[BLOCK_L, BLOCK_D]` tile of positions and
channels, the W taps read from the input (or, before position 0, from the history), summed in
fp32 in the reference's order, then the SiLU. As PyTorch ops (the reference: a concatenation and
W shifted multiply-adds) the W4A16 1 x 2048 prefill of mamba-2.8b spent 43 ms of its 76 ms of
kernel time in them on the H200 (docs/benchmarks.md, session 27). A decode step is a few
multiply-adds a channel, which as PyTorch ops would be several launches a block; the update
kernel does the step, the SiLU and the roll of the cached inputs in one.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .conv1d import roll_state, state_columns
from .dispatch import cdiv, fp_fusion, graph_op, use_triton

__all__ = ["MAX_UPDATE_WIDTH", "conv1d_silu", "conv1d_silu_reference", "conv1d_silu_update",
           "conv1d_silu_update_reference", "conv_silu_step"]

_BLOCK_D = 256
# The prefill kernel's tile: positions x channels (channels are contiguous in a block's input,
# which is a transposed view of in_proj's output).
_PREFILL_BLOCK_L = 32
_PREFILL_BLOCK_D = 64


def _check_conv(x: Tensor, weight: Tensor, op: str) -> None:
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"{op}: x must be [B, C, L] and weight a depthwise [C, 1, W], got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")


def _last_inputs(history: Tensor, x: Tensor, width: int) -> Tensor:
    """The last W-1 of `history [B, C, W-1]` followed by `x [B, C, L]`, in history's dtype: the
    conv's state after `x`."""
    tail = torch.cat([history, x[..., max(0, x.shape[-1] - (width - 1)):].to(history.dtype)], dim=-1)
    return tail[..., tail.shape[-1] - (width - 1):]


def conv1d_silu_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          history: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU of the depthwise causal conv of `x [B, C, L]` continuing `history [B, C, W-1]` (the
    inputs before it), in fp32; returns `(y in x's dtype, the last W-1 inputs in history's dtype)`."""
    padded = torch.cat([history.to(torch.float32), x.to(torch.float32)], dim=-1)
    taps = weight.to(torch.float32)[:, 0, :]
    width, length = taps.shape[1], x.shape[-1]
    # The W taps as shifted multiply-adds (memory-bound elementwise ops), not F.conv1d: with it, the
    # W4A16 8 x 2048 prefill of mamba-2.8b took 30.7 s on the H200, 27.5 s more than the W4A8
    # graph, which differs in the conv (the int8 kernel there) and the scan's input dtype.
    y = padded[..., :length] * taps[:, 0, None]
    for k in range(1, width):
        y = y + padded[..., k:k + length] * taps[:, k, None]
    if bias is not None:
        y = y + bias.to(torch.float32)[:, None]
    return torch.nn.functional.silu(y).to(x.dtype), _last_inputs(history, x, width)


def conv1d_silu_update_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Tensor) -> Tensor:
    """One decode step: `x [B, C]`, `state [B, C, W-1]` advanced in place; returns y `[B, C]`."""
    y, last = conv1d_silu_reference(x[..., None], weight, bias, state)
    state.copy_(last)
    return y[..., 0]


# Widths the decode step's kernels take (Mamba's is 4); wider convs run the reference.
MAX_UPDATE_WIDTH = 4


@triton.jit
def conv_silu_step(x_new, s_base, w_ptr, bias_ptr, offs_d, mask_d, stride_sk, stride_wd, stride_wk,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One decode step of the channels `offs_d` (2 <= W <= 4) given their new inputs `x_new` (in
    the conv input's dtype): the conv over `[state, x_new]` in fp32, tap by tap in the
    reference's order, then the SiLU (returned, fp32); the state (`s_base`: the channels' rows of
    one sequence's `[D, W-1]`) rolled left in place with `x_new` appended, by the int8 step's
    column helpers (conv1d.py). The update kernel below and the W4A16 GEMV's epilogue
    (gemv_w4.py) both run this step, so both give the same bits."""
    if HAS_BIAS:
        acc = tl.load(bias_ptr + offs_d, mask=mask_d, other=0).to(tl.float32)
    else:
        acc = tl.zeros(offs_d.shape, dtype=tl.float32)
    c0, c1, c2 = state_columns(s_base, x_new, mask_d, stride_sk, W)
    taps = w_ptr + offs_d * stride_wd
    acc += tl.load(taps, mask=mask_d, other=0).to(tl.float32) * c0.to(tl.float32)
    if W > 2:
        acc += tl.load(taps + stride_wk, mask=mask_d, other=0).to(tl.float32) * c1.to(tl.float32)
    if W > 3:
        acc += tl.load(taps + 2 * stride_wk, mask=mask_d, other=0).to(tl.float32) * c2.to(tl.float32)
    acc += tl.load(taps + (W - 1) * stride_wk, mask=mask_d, other=0).to(tl.float32) * x_new.to(tl.float32)
    roll_state(s_base, c1, c2, x_new, mask_d, stride_sk, W)
    return acc / (1.0 + tl.exp(-acc))


@triton.jit
def _conv1d_silu_update_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr, D,
                               stride_xb, stride_xd, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk,
                               stride_ob, stride_od,
                               W: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    x_new = tl.load(x_ptr + pid_b * stride_xb + offs_d * stride_xd, mask=mask, other=0)
    y = conv_silu_step(x_new, state_ptr + pid_b * stride_sb + offs_d * stride_sd, w_ptr, bias_ptr, offs_d, mask,
                       stride_sk, stride_wd, stride_wk, W, HAS_BIAS)
    tl.store(out_ptr + pid_b * stride_ob + offs_d * stride_od, y.to(out_ptr.dtype.element_ty), mask=mask)


def conv1d_silu_update(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Tensor) -> Tensor:
    """`conv1d_silu_update_reference` on the Triton kernel where it runs (`dispatch.use_triton`,
    2 <= W <= MAX_UPDATE_WIDTH); `x [B, C]` float, `weight [C, 1, W]`, `state [B, C, W-1]` in x's
    dtype or another float."""
    batch, channels = x.shape
    width = weight.shape[-1]
    if not use_triton(x) or not 2 <= width <= MAX_UPDATE_WIDTH or batch == 0:
        return conv1d_silu_update_reference(x, weight, bias, state)
    w = weight.reshape(channels, width)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _conv1d_silu_update_kernel[(cdiv(channels, _BLOCK_D), batch)](
        x, state, w, bias if bias is not None else w, out, channels,
        x.stride(0), x.stride(1), state.stride(0), state.stride(1), state.stride(2), w.stride(0), w.stride(1),
        out.stride(0), out.stride(1), W=width, HAS_BIAS=bias is not None, BLOCK_D=_BLOCK_D, **fp_fusion(),
    )
    return out


@triton.jit
def _conv1d_silu_kernel(x_ptr, hist_ptr, w_ptr, bias_ptr, out_ptr, D, L,
                        stride_xb, stride_xd, stride_xl, stride_hb, stride_hd, stride_hk, stride_wd, stride_wk,
                        stride_ob, stride_od, stride_ol,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    d_ok = offs_d < D
    x_rows = x_ptr + b * stride_xb + offs_d[None, :] * stride_xd
    h_rows = hist_ptr + b * stride_hb + offs_d[None, :] * stride_hd
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    # Tap k meets position l - (W - 1) + k: the input from position 0 on, the history before it
    # (its column W - 1 + position). Summed tap by tap, then the bias: the reference's order.
    for k in tl.static_range(W):
        pos = offs_l - (W - 1) + k
        from_x = tl.load(x_rows + pos[:, None] * stride_xl, mask=((pos >= 0) & (pos < L))[:, None] & d_ok[None, :],
                         other=0).to(tl.float32)
        from_h = tl.load(h_rows + (pos + (W - 1))[:, None] * stride_hk, mask=(pos < 0)[:, None] & d_ok[None, :],
                         other=0).to(tl.float32)
        tap = tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=d_ok, other=0).to(tl.float32)
        acc += (from_x + from_h) * tap[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=d_ok, other=0).to(tl.float32)[None, :]
    y = acc / (1.0 + tl.exp(-acc))
    out = out_ptr + b * stride_ob + offs_d[None, :] * stride_od + offs_l[:, None] * stride_ol
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(offs_l < L)[:, None] & d_ok[None, :])


def conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], history: Tensor) -> tuple[Tensor, Tensor]:
    """`conv1d_silu_reference` on the Triton kernel where it runs (`dispatch.use_triton`): `y`
    contiguous in x's dtype, and the last W-1 inputs (history's dtype) from PyTorch (a few columns)."""
    _check_conv(x, weight, "conv1d_silu")
    batch, channels, length = x.shape
    width = weight.shape[-1]
    if not use_triton(x) or x.numel() == 0:
        return conv1d_silu_reference(x, weight, bias, history)
    w = weight.reshape(channels, width)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = (cdiv(length, _PREFILL_BLOCK_L), cdiv(channels, _PREFILL_BLOCK_D), batch)
    _conv1d_silu_kernel[grid](
        x, history, w, bias if bias is not None else w, out, channels, length,
        x.stride(0), x.stride(1), x.stride(2), history.stride(0), history.stride(1), history.stride(2),
        w.stride(0), w.stride(1), out.stride(0), out.stride(1), out.stride(2),
        W=width, HAS_BIAS=bias is not None, BLOCK_L=_PREFILL_BLOCK_L, BLOCK_D=_PREFILL_BLOCK_D, **fp_fusion(),
    )
    return out, _last_inputs(history, x, width)


# ---------------------------------------------------------------------------------------------
# Graph ops (torch.ops.quamba.*, see dispatch.graph_op)
# ---------------------------------------------------------------------------------------------


@graph_op("quamba::conv1d_silu")
def conv1d_silu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`silu(conv1d(x, weight, bias, padding=W-1, groups=C)[..., :L])`, a Mamba block's causal
    depthwise conv and its activation, on float `x [B, C, L]`; computed in fp32, returned in `x`'s dtype."""
    _check_conv(x, weight, "conv1d_silu")
    history = x.new_zeros(x.shape[0], x.shape[1], weight.shape[-1] - 1)
    return conv1d_silu(x, weight, bias, history)[0].contiguous()


@conv1d_silu_op.register_fake
def _conv1d_silu_fake(x, weight, bias):
    _check_conv(x, weight, "conv1d_silu")
    return x.new_empty(x.shape)


@graph_op("quamba::conv1d_silu_cached", mutates_args=("conv_state",))
def conv1d_silu_cached_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Tensor,
                          decode: bool) -> Tensor:
    """`conv1d_silu` with a cache, `conv_state` `[B, C, W-1]`: the last W-1 inputs.

    Prefill (`decode=False`) starts from zeros and leaves the last W-1 inputs (zero-padded when
    L < W-1) in `conv_state`; decode (`decode=True`) continues from them and advances them, a
    one-token step on the update kernel.
    """
    _check_conv(x, weight, "conv1d_silu_cached")
    if decode and x.shape[-1] == 1:
        return conv1d_silu_update(x[..., 0], weight, bias, conv_state)[..., None]
    history = conv_state if decode else torch.zeros_like(conv_state)
    y, last = conv1d_silu(x, weight, bias, history)
    conv_state.copy_(last)
    return y.contiguous()


@conv1d_silu_cached_op.register_fake
def _conv1d_silu_cached_fake(x, weight, bias, conv_state, decode):
    _check_conv(x, weight, "conv1d_silu_cached")
    return x.new_empty(x.shape)
