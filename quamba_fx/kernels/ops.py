"""The fused kernels as `torch.library` custom ops, so a graph holds each as one traceable node."""

from __future__ import annotations

from typing import Optional

import torch

from ..graph_info import register_op
from .conv1d import causal_conv1d_silu_int8


@torch.library.custom_op("quamba::conv1d_silu_int8", mutates_args=())
def conv1d_silu_int8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """dequantize -> causal depthwise conv1d -> SiLU -> quantize, fused (see `kernels/conv1d.py`).

    `x_q` int8 `[B, D, L]` (any strides), `weight` nn.Conv1d's `[D, 1, W]`, scales fp32 tensors.
    Returns int8 `[B, D, L]` laid out as `[B, L, D]` in memory. Runs the Triton kernel on CUDA (and
    on CPU under TRITON_INTERPRET=1), else the PyTorch reference.
    """
    w = weight.reshape(weight.shape[0], weight.shape[-1]).float()
    b = None if bias is None else bias.float()
    return causal_conv1d_silu_int8(x_q, x_scale.float().reshape(()), w, b, out_scale.float().reshape(()))


@conv1d_silu_int8.register_fake
def _conv1d_silu_int8_fake(x_q, x_scale, weight, bias, out_scale):
    batch, channels, length = x_q.shape
    return x_q.new_empty((batch, length, channels)).transpose(1, 2)


register_op("conv1d", "conv1d_silu_int8")
