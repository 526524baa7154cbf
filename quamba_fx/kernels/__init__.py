"""Triton kernels for quantized Mamba blocks, each with a pure-PyTorch reference of identical numerics."""

from .conv1d import (
    causal_conv1d_silu_int8,
    causal_conv1d_silu_int8_reference,
    causal_conv1d_update_silu_int8,
    causal_conv1d_update_silu_int8_reference,
)

__all__ = [
    "causal_conv1d_silu_int8",
    "causal_conv1d_silu_int8_reference",
    "causal_conv1d_update_silu_int8",
    "causal_conv1d_update_silu_int8_reference",
]
