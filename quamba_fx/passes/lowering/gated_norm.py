"""Lowering rule of the gated RMSNorm kernel (kernels/gated_norm.py): Mamba-2's `mixer.norm(y, z)`
module call, with the dequantize of an int8 gate z folded in, becomes one kernel op."""

from __future__ import annotations

import functools

import torch
import torch.fx

from ...kernels import gated_norm as gated_norm_kernel  # noqa: F401  (registers the kernel op read below)
from ..rewrite import Rule
from .match import annotate, get_attr, per_tensor_int8
from .norm import is_rmsnorm

GATED_RMSNORM = torch.ops.quamba.gated_rmsnorm.default

KERNELS = {GATED_RMSNORM: "triton:gated_rmsnorm"}


def fuse_gated_norm(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`norm(y, [dequantize](z))` (an RMSNorm module called with a gate) -> `gated_rmsnorm(y, z_q,
    z_scale, weight, eps, dtype, group_size)`; a float gate is read as it is (scale None). The
    module's `group_size` (newer transformers' `Mamba2RMSNormGated`) is kept; without one (5.0's
    `MambaRMSNormGated`) the whole row is one group."""
    if node.op != "call_module" or len(node.args) != 2 or node.kwargs:
        return False
    module = gm.get_submodule(node.target)
    if not is_rmsnorm(module):
        return False
    y, gate = node.args
    int8 = per_tensor_int8(gate)
    z, z_scale = int8 if int8 is not None else (gate, None)
    with gm.graph.inserting_before(node):
        weight = get_attr(gm.graph, f"{node.target}.weight", node)
        fused = gm.graph.call_function(
            GATED_RMSNORM, (y, z, z_scale, weight, float(module.variance_epsilon), dtype,
                            getattr(module, "group_size", None)))
    node.replace_all_uses_with(annotate(fused, node))
    gm.graph.erase_node(node)
    if int8 is not None and not gate.users:
        gm.graph.erase_node(gate)
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rule, the normed output in `dtype` (what out_proj's Hadamard quantize reads)."""
    return [functools.partial(fuse_gated_norm, dtype=dtype)]
