"""Lowering rules of the gated RMSNorm kernel (kernels/gated_norm.py): Mamba-2's `mixer.norm(y, z)`
module call, with the dequantize of an int8 gate z folded in, becomes one kernel op; and in the
decode graph, where out_proj's Hadamard quantize (or, before a W4A16 out_proj, its rotation) is
all that reads it, the norm becomes that kernel's prologue (`gated_rmsnorm_hadamard_quantize`,
`gated_rmsnorm_hadamard_rotate`, kernels/hadamard.py): one launch a block fewer in a step. Long
prefills keep the two kernels, which are faster there."""

from __future__ import annotations

import functools

import torch
import torch.fx

from ...graph_info import fetch_attr
from ...kernels import gated_norm as gated_norm_kernel  # noqa: F401  (registers the kernel op read below)
from ...kernels.hadamard import packs_gated_norm
from ..rewrite import Rule
from .hadamard import HADAMARD_QUANTIZE, HADAMARD_ROTATE
from .match import annotate, get_attr, is_call, per_tensor_int8
from .norm import is_rmsnorm

GATED_RMSNORM = torch.ops.quamba.gated_rmsnorm.default
GATED_RMSNORM_HADAMARD_QUANTIZE = torch.ops.quamba.gated_rmsnorm_hadamard_quantize.default
GATED_RMSNORM_HADAMARD_ROTATE = torch.ops.quamba.gated_rmsnorm_hadamard_rotate.default

KERNELS = {GATED_RMSNORM: "triton:gated_rmsnorm",
           GATED_RMSNORM_HADAMARD_QUANTIZE: "triton:gated_rmsnorm_hadamard_quantize",
           GATED_RMSNORM_HADAMARD_ROTATE: "triton:gated_rmsnorm_hadamard_rotate"}

# Whether the decode graph fuses the norm into the Hadamard quantize or rotation: a setting that
# benchmarks/decode_settings.py can turn off to measure what the fusion gains (into the quantize:
# +2.8% at batch 1 on mamba2-2.7b W8A8, docs/benchmarks.md session 33; into the rotation of
# W4A16, the same kernel storing fp16 instead of int8: not yet timed).
FUSE_IN_DECODE = True


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


def fuse_gated_norm_into_hadamard(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """`hadamard_quantize(gated_rmsnorm(y, z, z_scale, weight, eps, dtype, group), s)`, the normed
    rows read by nothing else -> `gated_rmsnorm_hadamard_quantize(y, z, z_scale, weight, eps,
    group, dtype, s)`; `hadamard_rotate(gated_rmsnorm(...)[, out_dtype])` likewise ->
    `gated_rmsnorm_hadamard_rotate(..., dtype, out_dtype)`. Decode only, and only where that
    kernel packs the rows (`packs_gated_norm`: fp16 normed values, sizes and groups its tiles
    take); elsewhere the two kernels stay."""
    if not FUSE_IN_DECODE:
        return False
    if is_call(node, HADAMARD_QUANTIZE):
        op, last = GATED_RMSNORM_HADAMARD_QUANTIZE, node.args[1]  # the scale
    elif is_call(node, HADAMARD_ROTATE):
        op, last = GATED_RMSNORM_HADAMARD_ROTATE, node.args[1] if len(node.args) > 1 else None  # out_dtype
        if last == torch.bfloat16:  # the fused kernel stores fp16 or fp32 only
            return False
    else:
        return False
    norm = node.args[0]
    if not is_call(norm, GATED_RMSNORM) or len(norm.users) != 1:
        return False
    y, z, z_scale, weight, eps, dtype, group_size = norm.args
    width = fetch_attr(gm, weight.target).numel()
    if not packs_gated_norm(width, group_size, dtype):
        return False
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(op, (y, z, z_scale, weight, eps, group_size, dtype, last))
    node.replace_all_uses_with(annotate(fused, node))
    fused.meta["quamba"]["kernel"] = KERNELS[op]
    gm.graph.erase_node(node)
    gm.graph.erase_node(norm)
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules, the normed output in `dtype` (what out_proj's Hadamard quantize reads)."""
    return [functools.partial(fuse_gated_norm, dtype=dtype)]


# The decode graph's fusion (`kernel_lowering.cached_graph` applies it).
DECODE_RULES: list[Rule] = [fuse_gated_norm_into_hadamard]
