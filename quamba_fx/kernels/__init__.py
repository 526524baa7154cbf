"""Triton kernels for quantized Mamba blocks, each with a pure-PyTorch reference of identical numerics.

Each kernel module ends with its `torch.library` custom ops (`torch.ops.quamba.*`, `dispatch.graph_op`)
for graphs; the functions here are the direct entry points (Triton on CUDA, or on CPU under
TRITON_INTERPRET=1).
"""

from .conv1d import (
    causal_conv1d_silu_int8,
    causal_conv1d_silu_int8_reference,
    causal_conv1d_update_silu_int8,
    causal_conv1d_update_silu_int8_reference,
)
from .dispatch import clear_tuned_configs
from .gemm import int8_gemm, int8_gemm_reference
from .hadamard import (
    hadamard_quantize,
    hadamard_quantize_fp8,
    hadamard_quantize_fp8_reference,
    hadamard_quantize_reference,
)
from .norm import add_rmsnorm_quantize, add_rmsnorm_quantize_reference
from .scan import selective_scan, selective_scan_int8_reference, selective_state_update

__all__ = [
    "add_rmsnorm_quantize",
    "add_rmsnorm_quantize_reference",
    "causal_conv1d_silu_int8",
    "causal_conv1d_silu_int8_reference",
    "causal_conv1d_update_silu_int8",
    "causal_conv1d_update_silu_int8_reference",
    "clear_tuned_configs",
    "hadamard_quantize",
    "hadamard_quantize_fp8",
    "hadamard_quantize_fp8_reference",
    "hadamard_quantize_reference",
    "int8_gemm",
    "int8_gemm_reference",
    "selective_scan",
    "selective_scan_int8_reference",
    "selective_state_update",
]
