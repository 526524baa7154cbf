"""Lowering rules of the GEMM kernels (kernels/gemm.py and its GEMV / few-row / TMA paths,
kernels/gemm_fp8.py): every quantized Linear becomes one GEMM op, and a decode step's in_proj
takes the conv1d step into its epilogue."""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx

from ...graph_info import info
from ...kernels import conv1d as conv1d_kernel  # noqa: F401  (registers torch.ops.quamba.conv1d_silu_int8_cached)
from ...kernels import gemm as gemm_kernel  # noqa: F401  (registers w8a8_linear and in_proj_conv_update)
from ...kernels import gemm_fp8  # noqa: F401  (registers torch.ops.quamba.fp8_gemm)
from ...quant.fp8_linear import Fp8Linear
from ...quant.linear import QuantizedLinear
from ..rewrite import Rule
from .match import annotate, get_attr, is_call

W8A8_LINEAR = torch.ops.quamba.w8a8_linear.default
FP8_GEMM = torch.ops.quamba.fp8_gemm.default
CONV_CACHED = torch.ops.quamba.conv1d_silu_int8_cached.default
IN_PROJ_CONV_UPDATE = torch.ops.quamba.in_proj_conv_update.default

KERNELS = {W8A8_LINEAR: "triton:int8_gemm", FP8_GEMM: "fp8_gemm"}


def lower_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`QuantizedLinear(x_q, s_in[, s_out])` -> `w8a8_linear(x_q, s_in, w, w_scale, bias, s_out)`;
    an `Fp8Linear` likewise -> `fp8_gemm(...)`. Without an output scale the result is `dtype`."""
    if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), (QuantizedLinear, Fp8Linear)):
        return False
    module = gm.get_submodule(node.target)
    op = FP8_GEMM if isinstance(module, Fp8Linear) else W8A8_LINEAR
    x_q, x_scale = node.args[:2]
    out_scale = node.args[2] if len(node.args) > 2 else None
    graph = gm.graph
    with graph.inserting_before(node):
        weight = get_attr(graph, f"{node.target}.weight", node)
        w_scale = get_attr(graph, f"{node.target}.weight_scale", node)
        bias = get_attr(graph, f"{node.target}.bias", node) if module.bias is not None else None
        out_dtype = None if out_scale is not None else dtype
        new = graph.call_function(op, (x_q, x_scale, weight, w_scale, bias, out_scale, out_dtype))
    node.replace_all_uses_with(annotate(new, node))
    graph.erase_node(node)
    return True


def fuse_conv_into_in_proj(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Decode only: `conv1d_silu_int8_cached(chunk(transpose(w8a8_linear(.., s)), 2, dim=1)[0], s,
    .., decode=True)`, in_proj's int8 output at the scale the conv reads -> `in_proj_conv_update`,
    whose two results replace in_proj's output and the conv's: at batch 1 the GEMV's epilogue
    runs the conv step, one launch a block fewer."""
    if not is_call(node, CONV_CACHED) or node.args[-1] is not True:
        return False
    x_half, x_scale, conv_w, conv_b, conv_scale, state, _decode = node.args
    if not (isinstance(x_half, torch.fx.Node) and x_half.target is operator.getitem and x_half.args[1] == 0):
        return False
    chunk = x_half.args[0]
    if not (chunk.op == "call_method" and chunk.target == "chunk" and chunk.args[1:] == (2,)
            and chunk.kwargs == {"dim": 1}):
        return False
    transpose = chunk.args[0]
    if not (transpose.op == "call_method" and transpose.target == "transpose" and tuple(transpose.args[1:]) == (1, 2)):
        return False
    linear = transpose.args[0]
    if not is_call(linear, W8A8_LINEAR) or linear.kwargs or len(linear.args) < 6 or linear.args[5] is not x_scale:
        return False
    if len(linear.args) > 6 and linear.args[6] is not None:
        return False
    # The conv's parameters and cache slot are read before in_proj runs: move their nodes (get_attr
    # and getitem of the cache list) up to it.
    for operand in (conv_w, conv_b, conv_scale, state):
        if isinstance(operand, torch.fx.Node) and not (
                operand.op == "get_attr"
                or (operand.op == "call_function" and all(a.op == "placeholder" for a in operand.all_input_nodes))):
            return False
    for operand in (conv_w, conv_b, conv_scale, state):
        if isinstance(operand, torch.fx.Node):
            linear.prepend(operand)
    graph = gm.graph
    with graph.inserting_before(linear):
        fused = graph.call_function(IN_PROJ_CONV_UPDATE, (*linear.args[:6], conv_w, conv_b, conv_scale, state))
        xz = graph.call_function(operator.getitem, (fused, 0))
        u = graph.call_function(operator.getitem, (fused, 1))
    fused.meta["quamba"] = {**info(linear), "kernel": "triton:in_proj_conv_update"}
    xz.meta["quamba"], u.meta["quamba"] = {**info(linear)}, {**info(node)}
    linear.replace_all_uses_with(xz)
    node.replace_all_uses_with(u)
    graph.erase_node(node)
    graph.erase_node(linear)
    if not x_half.users:
        graph.erase_node(x_half)
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules, activations between kernels in `dtype`."""
    return [functools.partial(lower_linear, dtype=dtype)]


DECODE_RULES: list[Rule] = [fuse_conv_into_in_proj]
