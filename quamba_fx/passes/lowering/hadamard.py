"""Lowering rules of the Hadamard kernel (kernels/hadamard.py): a rotation and the per-tensor
quantize after it become one kernel op; a rotation nothing quantizes runs on the kernel alone."""

from __future__ import annotations

import torch
import torch.fx

from ...kernels import hadamard as hadamard_kernel  # noqa: F401  (registers the kernel ops read below)
from ...quant import hadamard as _reference  # noqa: F401  (registers torch.ops.quamba.hadamard)
from ..quantize import QUANTIZE, QUANTIZE_FP8
from ..rewrite import Rule
from .match import annotate, is_call, is_scalar_attr, strip_casts

HADAMARD = torch.ops.quamba.hadamard.default
HADAMARD_QUANTIZE = torch.ops.quamba.hadamard_quantize.default
HADAMARD_QUANTIZE_FP8 = torch.ops.quamba.hadamard_quantize_fp8.default
HADAMARD_ROTATE = torch.ops.quamba.hadamard_rotate.default

KERNELS = {
    HADAMARD_QUANTIZE: "triton:hadamard_quantize",
    HADAMARD_QUANTIZE_FP8: "triton:hadamard_quantize_fp8",
    HADAMARD_ROTATE: "triton:hadamard_rotate",
}


def fuses_with_hadamard(node: torch.fx.Node) -> bool:
    """Whether `node` is a per-tensor int8 or e4m3 quantize of a rotation nothing else reads (the
    pattern `fuse_hadamard_quantize` turns into one kernel)."""
    if is_call(node, QUANTIZE):
        per_tensor = len(node.args) <= 2
    elif is_call(node, QUANTIZE_FP8):
        per_tensor = len(node.args) <= 2 and not node.kwargs and is_scalar_attr(node)
    else:
        return False
    rotation = node.args[0]
    return per_tensor and is_call(rotation, HADAMARD) and len(rotation.users) == 1


def fuse_hadamard_quantize(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """`quantize(hadamard(cast(y)), s)` -> `hadamard_quantize(y, s)` (the kernel reads y's dtype);
    `quantize_fp8(...)` of the same, per tensor (the fp8 recipe's) -> `hadamard_quantize_fp8`."""
    if not fuses_with_hadamard(node):
        return False
    rotation = node.args[0]
    source = strip_casts(rotation.args[0])
    op = HADAMARD_QUANTIZE_FP8 if is_call(node, QUANTIZE_FP8) else HADAMARD_QUANTIZE
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, (source, node.args[1]))
    node.replace_all_uses_with(annotate(new, node))
    gm.graph.erase_node(node)
    return True


def lower_hadamard(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """`hadamard(y)` that no quantize fuses with -> `hadamard_rotate(y)`: the kernel instead of the
    reference's PyTorch butterfly and dense matmul. Rules visit the rotation before its quantize,
    so one that `fuse_hadamard_quantize` will take is left to it."""
    if not is_call(node, HADAMARD) or any(fuses_with_hadamard(user) for user in node.users):
        return False
    node.target = HADAMARD_ROTATE
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules (the kernels' outputs take their input's or the quantize's dtype)."""
    return [fuse_hadamard_quantize, lower_hadamard]
