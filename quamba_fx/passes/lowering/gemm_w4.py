"""Lowering rules of the 4-bit-weight GEMM kernels (kernels/gemm_w4.py): every `W4A16Linear` and
`W4A8Linear` becomes one GEMM op reading its packed weight and group scales."""

from __future__ import annotations

import functools

import torch
import torch.fx

from ...kernels import gemm_w4  # noqa: F401  (registers torch.ops.quamba.w4a16_gemm and w4a8_gemm)
from ...quant.int4_linear import W4A8Linear, W4A16Linear
from ..rewrite import Rule
from .match import annotate, get_attr

W4A16_GEMM = torch.ops.quamba.w4a16_gemm.default
W4A8_GEMM = torch.ops.quamba.w4a8_gemm.default

KERNELS = {W4A16_GEMM: "triton:w4a16_gemm", W4A8_GEMM: "triton:w4a8_gemm"}


def lower_int4_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`W4A16Linear(x)` -> `w4a16_gemm(x, w, w_scale, group, bias, act_dtype)` (`dtype`, or None
    for an fp32 lowering); `W4A8Linear(x_q, s_in[, s_out])`
    -> `w4a8_gemm(x_q, s_in, w, w_scale, group, bias, s_out, out_dtype)`, the result `dtype`
    without an output scale."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(module, (W4A16Linear, W4A8Linear)):
        return False
    graph = gm.graph
    with graph.inserting_before(node):
        weight = get_attr(graph, f"{node.target}.weight", node)
        w_scale = get_attr(graph, f"{node.target}.weight_scale", node)
        bias = get_attr(graph, f"{node.target}.bias", node) if module.bias is not None else None
        if isinstance(module, W4A16Linear):
            # In an fp16 or bf16 lowering the activations are multiplied in that dtype (the "A16"),
            # even where the graph hands an fp32 value (the rotation before out_proj).
            act_dtype = None if dtype == torch.float32 else dtype
            new = graph.call_function(W4A16_GEMM, (node.args[0], weight, w_scale, module.group_size, bias, act_dtype))
        else:
            x_q, x_scale = node.args[:2]
            out_scale = node.args[2] if len(node.args) > 2 else None
            out_dtype = None if out_scale is not None else dtype
            new = graph.call_function(W4A8_GEMM, (x_q, x_scale, weight, w_scale, module.group_size, bias, out_scale,
                                                  out_dtype))
    node.replace_all_uses_with(annotate(new, node))
    graph.erase_node(node)
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules, activations between kernels in `dtype`."""
    return [functools.partial(lower_int4_linear, dtype=dtype)]
