"""Lowering rules of the Hadamard kernel (kernels/hadamard.py): a rotation and the per-tensor
quantize after it become one kernel op; a rotation nothing quantizes runs on the kernel alone."""

from __future__ import annotations

import functools

import torch
import torch.fx

from ...kernels import hadamard as hadamard_kernel  # noqa: F401  (registers the kernel ops read below)
from ...quant import hadamard as _reference  # noqa: F401  (registers torch.ops.quamba.hadamard)
from ...quant.int4_linear import W4A16Linear
from ..quantize import QUANTIZE, QUANTIZE_FP8
from ..rewrite import Rule
from .gemm_w4 import W4A16_GEMM
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


def _multiplies_in(user: torch.fx.Node, dtype: torch.dtype) -> bool:
    """Whether `user` is a 4-bit-weight Linear that multiplies its input in `dtype` whatever dtype
    it is handed (a `W4A16Linear` not lowered yet, which the gemm_w4 rule lowers that way, or its
    `w4a16_gemm`)."""
    if user.op == "call_module":
        gm = user.graph.owning_module
        return gm is not None and isinstance(gm.get_submodule(user.target), W4A16Linear)
    act_dtype = user.args[5] if len(user.args) > 5 else user.kwargs.get("act_dtype")
    return is_call(user, W4A16_GEMM) and act_dtype == dtype


def lower_hadamard(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`hadamard(y)` that no quantize fuses with -> `hadamard_rotate(y)`: the kernel instead of the
    reference's PyTorch butterfly and dense matmul. Rules visit the rotation before its quantize,
    so one that `fuse_hadamard_quantize` will take is left to it.

    A rotation read only by W4A16 Linears of an fp16 or bf16 lowering (which round their input to
    that dtype) reads `y` through its casts and returns `dtype` itself: no cast kernel before it,
    and half the bytes for the GEMM to read."""
    if not is_call(node, HADAMARD) or any(fuses_with_hadamard(user) for user in node.users):
        return False
    node.target = HADAMARD_ROTATE
    if dtype != torch.float32 and node.users and all(_multiplies_in(user, dtype) for user in node.users):
        node.args = (strip_casts(node.args[0]), dtype)
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules (the kernels' outputs take their input's or the quantize's dtype, or
    `dtype` before a W4A16 Linear)."""
    return [fuse_hadamard_quantize, functools.partial(lower_hadamard, dtype=dtype)]
