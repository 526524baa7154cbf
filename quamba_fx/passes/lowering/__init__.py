"""The lowering rules, one file per kernel: what each kernel op replaces in the reference graph.

Each file (`gemm`, `gemm_w4`, `scan`, `hadamard`, `norm`, `gated_norm`, `logits`) names the ops its kernel
provides, says which kernel runs each (`KERNELS`, shown by the dumps), and gives its rewrite rules
(`passes.rewrite`): `rules(dtype)` for the lowering of a whole graph (`dtype`: the activations
between kernels), `HEAD_RULES` for the head once its weight is cast to that dtype, and
`DECODE_RULES` for the one-token decode graph (`cached_graph`). This package only adds them up;
a new kernel is its module in `kernels/` (kernel, reference and ops), a new file here and its line
below. The conv1d's rule is `passes.conv_fusion`, a pass of its own that runs before lowering and
that the torch.compile backend reuses.
"""

from __future__ import annotations

import torch

from ..conv_fusion import FLOAT_CONV, FUSED_CONV
from ..rewrite import Rule
from . import gated_norm, gemm, gemm_w4, hadamard, logits, norm, scan

__all__ = ["DECODE_RULES", "HEAD_RULES", "KERNELS", "rules"]

# Kernel op -> the kernel that runs it, as `node.meta["quamba"]["kernel"]` records it.
KERNELS = {
    **gemm.KERNELS,
    **gemm_w4.KERNELS,
    **scan.KERNELS,
    **hadamard.KERNELS,
    **norm.KERNELS,
    **gated_norm.KERNELS,
    **logits.KERNELS,
    FUSED_CONV: "triton:conv1d_silu_int8",
    FLOAT_CONV: "conv1d_silu",
}


def rules(dtype: torch.dtype) -> list[Rule]:
    """Every kernel's lowering rules, activations between kernels in `dtype`. Order matters only
    where two rules could match the same node; none do (the Hadamard file orders its own two)."""
    return (gemm.rules(dtype) + gemm_w4.rules(dtype) + scan.rules(dtype) + hadamard.rules(dtype) + norm.rules(dtype)
            + gated_norm.rules(dtype))


# The head's rule, run after the float leftovers are cast to the lowering's dtype.
HEAD_RULES: list[Rule] = logits.HEAD_RULES

# The decode graph's fusions, applied after the cached ops are in place.
DECODE_RULES: list[Rule] = scan.DECODE_RULES + gemm.DECODE_RULES + gemm_w4.DECODE_RULES + gated_norm.DECODE_RULES
