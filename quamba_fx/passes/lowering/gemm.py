"""Lowering rules of the GEMM kernels (kernels/gemm.py and its GEMV / few-row / TMA paths,
kernels/gemm_fp8.py): every quantized Linear becomes one GEMM op, and a decode step's in_proj
takes the conv1d step into its epilogue; and of the gather that reads a tied W8A8 head's table
as the embedding (kernels/gather_int8.py)."""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx

from ...graph_info import info
from ...kernels import conv1d as conv1d_kernel  # noqa: F401  (registers torch.ops.quamba.conv1d_silu_int8_cached)
from ...kernels import gemm as gemm_kernel  # noqa: F401  (registers w8a8_linear and in_proj_conv_update)
from ...kernels import gather_int8  # noqa: F401  (registers torch.ops.quamba.int8_embedding_gather)
from ...kernels import gemm_fp8  # noqa: F401  (registers torch.ops.quamba.fp8_gemm)
from ...quant.fp8_linear import Fp8Linear
from ...quant.linear import Int8Embedding, QuantizedLinear
from ..rewrite import Rule
from .match import annotate, get_attr, is_call

W8A8_LINEAR = torch.ops.quamba.w8a8_linear.default
FP8_GEMM = torch.ops.quamba.fp8_gemm.default
CONV_CACHED = torch.ops.quamba.conv1d_silu_int8_cached.default
IN_PROJ_CONV_UPDATE = torch.ops.quamba.in_proj_conv_update.default
INT8_EMBEDDING_GATHER = torch.ops.quamba.int8_embedding_gather.default

KERNELS = {W8A8_LINEAR: "triton:int8_gemm", FP8_GEMM: "fp8_gemm", INT8_EMBEDDING_GATHER: "triton:int8_embedding_gather"}


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


def lower_int8_embedding(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`Int8Embedding(ids)` (the table of a tied W8A8 head) -> `int8_embedding_gather(ids, w,
    w_scale, dtype)`: the rows in the lowering's dtype, as a float embedding gives them once cast."""
    if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Int8Embedding):
        return False
    graph = gm.graph
    with graph.inserting_before(node):
        weight = get_attr(graph, f"{node.target}.weight", node)
        w_scale = get_attr(graph, f"{node.target}.weight_scale", node)
        new = graph.call_function(INT8_EMBEDDING_GATHER, (node.args[0], weight, w_scale, dtype))
    node.replace_all_uses_with(annotate(new, node))
    graph.erase_node(node)
    return True


def projection_under_x_half(x_half: object) -> torch.fx.Node | None:
    """The Linear's node when `x_half` is `chunk(transpose(linear, 1, 2), 2, dim=1)[0]`: the x half
    of a block's in_proj output, as the conv1d reads it; else None."""
    if not (isinstance(x_half, torch.fx.Node) and x_half.target is operator.getitem and x_half.args[1] == 0):
        return None
    chunk = x_half.args[0]
    if not (chunk.op == "call_method" and chunk.target == "chunk" and chunk.args[1:] == (2,)
            and chunk.kwargs == {"dim": 1}):
        return None
    transpose = chunk.args[0]
    if not (transpose.op == "call_method" and transpose.target == "transpose" and tuple(transpose.args[1:]) == (1, 2)):
        return None
    return transpose.args[0]


def projection_under_split(x: object) -> tuple[torch.fx.Node, int] | None:
    """`(the Linear's node, the first column)` when `x` is `transpose(split(linear, sizes, dim=-1)[i],
    1, 2)`: Mamba-2's xBC columns of in_proj's output, as its conv1d reads them; else None."""
    if not (isinstance(x, torch.fx.Node) and x.op == "call_method" and x.target == "transpose"
            and tuple(x.args[1:]) == (1, 2)):
        return None
    item = x.args[0]
    if not (item.op == "call_function" and item.target is operator.getitem and isinstance(item.args[1], int)):
        return None
    split = item.args[0]
    if not (split.op == "call_function" and split.target in (torch.split, torch.functional.split)
            and len(split.args) == 2 and split.kwargs == {"dim": -1} and isinstance(split.args[1], (list, tuple))
            and all(isinstance(size, int) for size in split.args[1])):
        return None
    return split.args[0], sum(split.args[1][:item.args[1]])


def conv_input_projection(conv_input: object) -> tuple[torch.fx.Node, int] | None:
    """`(in_proj's node, the first column the conv reads)` for a decode conv's input: Mamba-1's x
    half (`projection_under_x_half`, from 0) or Mamba-2's xBC (`projection_under_split`); else None."""
    linear = projection_under_x_half(conv_input)
    return (linear, 0) if linear is not None else projection_under_split(conv_input)


def hoist_conv_operands(linear: torch.fx.Node, operands: tuple) -> bool:
    """Move the conv's parameters and cache slot (get_attr nodes and getitems of the cache list) up
    to `linear`, where the fused op will read them; False, moving nothing, if one is computed."""
    for operand in operands:
        if isinstance(operand, torch.fx.Node) and not (
                operand.op == "get_attr"
                or (operand.op == "call_function" and all(a.op == "placeholder" for a in operand.all_input_nodes))):
            return False
    for operand in operands:
        if isinstance(operand, torch.fx.Node):
            linear.prepend(operand)
    return True


def replace_in_proj_and_conv(gm: torch.fx.GraphModule, linear: torch.fx.Node, conv: torch.fx.Node, op, args: tuple,
                             kernel: str) -> None:
    """Put `op(*args)` (results: in_proj's output, the conv's) where `linear` was, and erase
    `linear` and `conv`, and the conv input's view of in_proj's output (a getitem, or Mamba-2's
    transpose of one) as far as nothing else reads it."""
    x_half = conv.args[0]
    graph = gm.graph
    with graph.inserting_before(linear):
        fused = graph.call_function(op, args)
        xz = graph.call_function(operator.getitem, (fused, 0))
        u = graph.call_function(operator.getitem, (fused, 1))
    fused.meta["quamba"] = {**info(linear), "kernel": kernel}
    xz.meta["quamba"], u.meta["quamba"] = {**info(linear)}, {**info(conv)}
    linear.replace_all_uses_with(xz)
    conv.replace_all_uses_with(u)
    graph.erase_node(conv)
    graph.erase_node(linear)
    while isinstance(x_half, torch.fx.Node) and not x_half.users and x_half.op != "placeholder":
        source = x_half.args[0]
        graph.erase_node(x_half)
        x_half = source


def fuse_conv_into_in_proj(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Decode only: `conv1d_silu_int8_cached(chunk(transpose(w8a8_linear(.., s)), 2, dim=1)[0], s,
    .., decode=True)` (or Mamba-2's xBC split of it, `conv_input_projection`), in_proj's int8
    output at the scale the conv reads -> `in_proj_conv_update`, whose two results replace
    in_proj's output and the conv's: at batch 1 the GEMV's epilogue runs the conv step, one
    launch a block fewer."""
    if not is_call(node, CONV_CACHED) or node.args[-1] is not True:
        return False
    conv_input, x_scale, conv_w, conv_b, conv_scale, state, _decode = node.args
    linear, start = conv_input_projection(conv_input) or (None, 0)
    if not is_call(linear, W8A8_LINEAR) or linear.kwargs or len(linear.args) < 6 or linear.args[5] is not x_scale:
        return False
    if len(linear.args) > 6 and linear.args[6] is not None:
        return False
    if not hoist_conv_operands(linear, (conv_w, conv_b, conv_scale, state)):
        return False
    replace_in_proj_and_conv(gm, linear, node, IN_PROJ_CONV_UPDATE,
                             (*linear.args[:6], conv_w, conv_b, conv_scale, state, *((start,) if start else ())),
                             "triton:in_proj_conv_update")
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules, activations between kernels in `dtype`."""
    return [functools.partial(lower_linear, dtype=dtype), functools.partial(lower_int8_embedding, dtype=dtype)]


DECODE_RULES: list[Rule] = [fuse_conv_into_in_proj]
