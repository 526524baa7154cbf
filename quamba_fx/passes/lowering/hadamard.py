"""Lowering rules of the Hadamard kernel (kernels/hadamard.py): a rotation and the per-tensor
quantize after it become one kernel op; a rotation nothing quantizes runs on the kernel alone; in
the decode graph, the rotation can move into out_proj's batch-1 GEMV."""

from __future__ import annotations

import functools

import torch
import torch.fx

from ...graph_info import info
from ...kernels import gemm as gemm_kernel  # noqa: F401  (registers hadamard_w8a8_linear)
from ...kernels import gemm_w4 as gemm_w4_kernel  # noqa: F401  (registers hadamard_w4a16_gemm)
from ...kernels import hadamard as hadamard_kernel  # noqa: F401  (registers the kernel ops read below)
from ...quant import hadamard as _reference  # noqa: F401  (registers torch.ops.quamba.hadamard)
from ...quant.int4_linear import W4A16Linear
from ..quantize import QUANTIZE, QUANTIZE_FP8
from ..rewrite import Rule
from .gemm import W8A8_LINEAR
from .gemm_w4 import W4A16_GEMM
from .match import annotate, is_call, is_scalar_attr, same_value, strip_casts

HADAMARD = torch.ops.quamba.hadamard.default
HADAMARD_QUANTIZE = torch.ops.quamba.hadamard_quantize.default
HADAMARD_QUANTIZE_FP8 = torch.ops.quamba.hadamard_quantize_fp8.default
HADAMARD_ROTATE = torch.ops.quamba.hadamard_rotate.default
HADAMARD_W8A8_LINEAR = torch.ops.quamba.hadamard_w8a8_linear.default
HADAMARD_W4A16_GEMM = torch.ops.quamba.hadamard_w4a16_gemm.default

# The decode graph's rotation (+ quantize) before out_proj runs inside out_proj's GEMV at batch 1,
# W8A8's and W4A16's (`fuse_hadamard_into_out_proj`). Off until a GPU has timed it, for the reason
# FUSE_NORM_IN_DECODE is (lowering/gemm.py); `benchmarks/device_run.sh prologue-ab` times both. A
# setting, for benchmarks/decode_settings.py.
FUSE_HADAMARD_IN_OUT_PROJ = False

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


def fuse_hadamard_into_out_proj(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Decode only, with FUSE_HADAMARD_IN_OUT_PROJ: `w8a8_linear(hadamard_quantize(y, s), s, ..)`
    -> `hadamard_w8a8_linear(y, s, ..)`, and `w4a16_gemm(hadamard_rotate(y, dt), ..)` ->
    `hadamard_w4a16_gemm(y, dt, ..)`, the rotation feeding nothing else: at batch 1 the GEMV
    rotates its own input, one launch a block fewer."""
    if not FUSE_HADAMARD_IN_OUT_PROJ or node.kwargs:
        return False
    rotation = node.args[0] if node.args else None
    if is_call(node, W8A8_LINEAR) and is_call(rotation, HADAMARD_QUANTIZE) and same_value(rotation.args[1],
                                                                                          node.args[1]):
        op, args = HADAMARD_W8A8_LINEAR, (rotation.args[0], *node.args[1:])
    elif is_call(node, W4A16_GEMM) and is_call(rotation, HADAMARD_ROTATE) and len(rotation.args) == 2:
        op, args = HADAMARD_W4A16_GEMM, (*rotation.args, *node.args[1:])
    else:
        return False
    if len(rotation.users) != 1 or rotation.kwargs:
        return False
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(op, args)
    fused.meta["quamba"] = {**info(node), "kernel": f"triton:{op._schema.name.split('::')[1]}"}
    node.replace_all_uses_with(fused)
    gm.graph.erase_node(node)
    gm.graph.erase_node(rotation)
    return True


DECODE_RULES: list[Rule] = [fuse_hadamard_into_out_proj]
