"""Lowering rule of the add + RMSNorm (+ quantize) kernel (kernels/norm.py): a block's residual
add, its RMSNorm and the per-tensor quantize of in_proj's input become one kernel op."""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx
from torch import nn

from ...graph_info import info
from ...kernels import norm as norm_kernel  # noqa: F401  (registers the kernel ops read below)
from ...quant.fp8 import FP8_DTYPE
from ..quantize import QUANTIZE, QUANTIZE_FP8
from ..rewrite import Rule
from .match import annotate, get_attr, is_call, is_fp32_cast, is_scalar_attr, strip_casts

ADD_RMSNORM = torch.ops.quamba.add_rmsnorm_quantize.default

KERNELS = {ADD_RMSNORM: "triton:add_rmsnorm_quantize"}


def is_rmsnorm(module: nn.Module) -> bool:
    return hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor)


def fusable_norm_quantize(norm: torch.fx.Node) -> torch.fx.Node | None:
    """The norm's only user when it is a per-tensor int8 or e4m3 quantize the kernel can take."""
    users = list(norm.users)
    if len(users) != 1 or len(users[0].args) != 2 or users[0].kwargs:
        return None
    user = users[0]
    if is_call(user, QUANTIZE) or (is_call(user, QUANTIZE_FP8) and is_scalar_attr(user)):
        return user
    return None


def fuse_norm(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`[quantize](RMSNorm(cast(residual + out)))` -> `add_rmsnorm_quantize(out, residual, ...)`;
    a per-tensor `quantize_fp8` (the fp8 recipe's in_proj input) -> the same op with
    `out_dtype=float8_e4m3fn`; without a quantize the normed output is `dtype`.

    The kernel also returns the new residual stream `float(residual + out)`, which replaces the
    add (and fp32 casts of it) for every later user: the next block's residual add reads it.
    """
    if node.op != "call_module" or not is_rmsnorm(gm.get_submodule(node.target)):
        return False
    if len(node.args) != 1 or node.kwargs:
        return False  # a gated RMSNorm (Mamba-2's norm(y * silu(z))): not this kernel's computation
    module = gm.get_submodule(node.target)
    stream = strip_casts(node.args[0])
    if is_call(stream, operator.add) and info(stream).get("role") == "residual":
        x, residual = stream.args[1], stream.args[0]
    else:
        x, residual = stream, None
    quantize = fusable_norm_quantize(node)
    # With a scale, out_dtype picks e4m3 or int8 (the kernel ignores any other value).
    out_dtype = FP8_DTYPE if quantize is not None and is_call(quantize, QUANTIZE_FP8) else dtype
    graph = gm.graph
    with graph.inserting_before(node):
        weight = get_attr(graph, f"{node.target}.weight", node)
        # The scale's get_attr sits after the norm (where the quantize was inserted): read it anew.
        scale = get_attr(graph, quantize.args[1].target, node) if quantize is not None else None
        fused = annotate(
            graph.call_function(ADD_RMSNORM, (x, residual, weight, float(module.variance_epsilon), scale,
                                              out_dtype)),
            node)
        normed = annotate(graph.call_function(operator.getitem, (fused, 0)), node)
        stream_out = annotate(graph.call_function(operator.getitem, (fused, 1)), node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    later = lambda user: order.get(user, -1) > order[stream_out]  # noqa: E731
    for alias in [stream, *[u for u in stream.users if is_fp32_cast(u)]]:
        alias.replace_all_uses_with(stream_out, delete_user_cb=later)
    (quantize or node).replace_all_uses_with(normed)
    if quantize is not None:
        graph.erase_node(quantize)
    graph.erase_node(node)
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules, an unquantized normed output in `dtype`."""
    return [functools.partial(fuse_norm, dtype=dtype)]
