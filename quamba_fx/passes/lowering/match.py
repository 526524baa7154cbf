"""Node tests and small graph edits the lowering rules share (one file per kernel beside this one)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ...graph_info import fetch_attr, info
from ..quantize import DEQUANTIZE

__all__ = ["annotate", "channel_scale_values", "get_attr", "is_call", "is_cast", "is_fp32_cast", "is_scalar_attr",
           "per_channel_int8", "same_value", "strip_casts"]


def is_call(node: Any, target) -> bool:
    """Whether `node` calls `target`; an op overload also matches a call of its packet (capture
    writes `torch.ops.quamba.selective_scan(...)`, passes write `.default`)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    packet = getattr(target, "overloadpacket", None)
    return node.target is target or (packet is not None and node.target is packet)


def is_cast(node: Any) -> bool:
    """A `.to(...)` or `.float()` method call."""
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in ("to", "float")


def is_fp32_cast(node: torch.fx.Node) -> bool:
    return is_cast(node) and (node.target == "float" or torch.float32 in node.args[1:])


def strip_casts(node: torch.fx.Node) -> torch.fx.Node:
    """The value under any chain of casts: the kernels read their input's dtype themselves."""
    while is_cast(node):
        node = node.args[0]
    return node


def is_scalar_attr(node: torch.fx.Node) -> bool:
    """Whether the quantize `node`'s scale (its second argument) is a get_attr holding one value.

    quantize_fp8 has no separate per-tensor form: a per-channel scale differs only in its shape, so
    only a scale known to hold one value (a get_attr, as the recipes insert) may fuse."""
    scale = node.args[1]
    if not (isinstance(scale, torch.fx.Node) and scale.op == "get_attr"):
        return False
    gm = scale.graph.owning_module
    return gm is not None and fetch_attr(gm, scale.target).numel() == 1


def per_tensor_int8(node: object) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(q, scale) when `node` is `dequantize(q, scale)` to fp32 with a one-value scale: an int8
    tensor a kernel can read with its scale instead of the fp32 copy."""
    if not is_call(node, DEQUANTIZE) or node.kwargs or not is_scalar_attr(node):
        return None
    if len(node.args) > 2 and node.args[2] != torch.float32:  # (q, scale[, out_dtype[, axis]])
        return None
    return node.args[0], node.args[1]


def channel_scale_values(scale: Any) -> torch.Tensor | None:
    """The values a per-channel scale node reads now: a get_attr buffer, or a `torch.narrow` of
    one (how a split part takes its channels' scales, quantize.SinkDequantize); else None."""
    narrowed = isinstance(scale, torch.fx.Node) and scale.op == "call_function" and scale.target is torch.narrow
    attr = scale.args[0] if narrowed else scale
    gm = attr.graph.owning_module if isinstance(attr, torch.fx.Node) else None
    if gm is None or attr.op != "get_attr" or (narrowed and scale.kwargs):
        return None
    values = fetch_attr(gm, attr.target)
    return values.narrow(*scale.args[1:]) if narrowed else values


def per_channel_int8(node: object) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(q, scale) when `node` is `dequantize(q, scale, fp32, axis)` along the last of three dims
    with a scale of one value a channel: an int8 `[B, L, C]` a kernel can read with its scales."""
    if not is_call(node, DEQUANTIZE) or node.kwargs or len(node.args) != 4 or node.args[2] != torch.float32:
        return None
    if node.args[3] not in (2, -1) or channel_scale_values(node.args[1]) is None:
        return None
    return node.args[0], node.args[1]


def same_value(a: object, b: object) -> bool:
    """One node, or two reads of one attribute (the lowering's rules read a scale afresh; the
    duplicates merge only after them)."""
    return a is b or (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.op == b.op == "get_attr"
                      and a.target == b.target)


def transposed_projection(node: Any, target) -> torch.fx.Node | None:
    """The `target` call (no kwargs) whose output `node` is through `.transpose(1, 2)`, when the
    transpose and the call feed nothing else: a dt_proj a decode rule can fold into the scan."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target == "transpose"
            and tuple(node.args[1:]) == (1, 2) and len(node.users) == 1):
        return None
    projection = node.args[0]
    if not is_call(projection, target) or len(projection.users) != 1 or projection.kwargs:
        return None
    return projection


def annotate(new: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    """`new` with a copy of `like`'s quamba annotations (block, role): what dumps and passes read."""
    new.meta["quamba"] = {**info(like)}
    return new


def get_attr(graph: torch.fx.Graph, target: str, like: torch.fx.Node) -> torch.fx.Node:
    return annotate(graph.get_attr(target), like)
