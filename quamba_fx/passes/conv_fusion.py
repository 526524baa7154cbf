"""Fuse `dequantize -> conv1d -> [:, :, :L] -> SiLU -> quantize` into one int8 Triton kernel call,
and a float `conv1d -> [:, :, :L] -> SiLU` (a recipe that leaves the conv1d's input unquantized,
like W4A16) into one `conv1d_silu` op, the form generation's graphs give a cache.

Matched on the quantized graph, anchored at the requantization; the fused node keeps the block's
role, block index and module path, and counts as the block's conv1d for the topology check. The
same rule rewrites Dynamo's graphs of quantized models in the torch.compile backend. `quamba_fx.flows.fuse`
runs the pass on a copy of a graph.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph_info import META_KEY, info, op_name
from ..kernels import conv1d as conv1d_kernel  # noqa: F401  (registers torch.ops.quamba.conv1d_silu_int8)
from ..kernels import conv1d_float  # noqa: F401  (registers torch.ops.quamba.conv1d_silu)
from .rewrite import run_rules

FUSED_CONV = torch.ops.quamba.conv1d_silu_int8.default
FLOAT_CONV = torch.ops.quamba.conv1d_silu.default


def _single_input(node: torch.fx.Node, check) -> torch.fx.Node | None:
    source = node.args[0] if node.args else None
    if isinstance(source, torch.fx.Node) and len(source.users) == 1 and check(source):
        return source
    return None


def _value(node: Any) -> Any:
    """The example value Dynamo records on its nodes (None on graphs made by quamba_fx.capture)."""
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else node


def _attr(gm: torch.fx.GraphModule, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), gm)


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _mamba_conv(gm: torch.fx.GraphModule, conv: torch.fx.Node) -> tuple | None:
    """`(input, weight, bias)` of a Mamba conv1d (depthwise, causal padding, stride and dilation 1),
    the only conv the kernel computes: as an `nn.Conv1d` call (a captured graph; weight and bias
    as attribute paths) or an `F.conv1d` call (a Dynamo graph; as its argument nodes). None for
    any other node."""
    if conv.op == "call_module":
        module = gm.get_submodule(conv.target)
        if not isinstance(module, nn.Conv1d) or len(conv.args) != 1 or conv.kwargs:
            return None
        shape = (module.stride, module.dilation, module.groups, _as_tuple(module.padding))
        if shape != ((1,), (1,), module.in_channels, (module.kernel_size[0] - 1,)):
            return None
        return conv.args[0], f"{conv.target}.weight", f"{conv.target}.bias" if module.bias is not None else None
    if op_name(conv) != "conv1d" or conv.kwargs:
        return None
    x, weight, bias, stride, padding, dilation, groups = (list(conv.args) + [None, (1,), (0,), (1,), 1])[:7]
    w = _value(weight)
    if not (isinstance(w, torch.Tensor) and w.dim() == 3):
        return None
    if (_as_tuple(stride), _as_tuple(dilation), groups, _as_tuple(padding)) != ((1,), (1,), w.shape[0], (w.shape[-1] - 1,)):
        return None
    return x, weight, bias


def _per_tensor(gm: torch.fx.GraphModule, boundary: torch.fx.Node) -> bool:
    """Whether a quantize / dequantize node takes one scale for the tensor, as the kernel does."""
    if boundary.kwargs or len(boundary.args) > 3 or not isinstance(boundary.args[1], torch.fx.Node):
        return False
    scale = boundary.args[1]
    value = _attr(gm, scale.target) if scale.op == "get_attr" else _value(scale)
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _per_channel_out(gm: torch.fx.GraphModule, q: torch.fx.Node) -> bool:
    """Whether a quantize of the conv's output takes one scale a channel (`quantize(y, s, 1)`, `s`
    a `[C]` buffer: Quamba2's Mamba-2 scales), which the kernel also takes."""
    if q.kwargs or len(q.args) != 3 or q.args[2] != 1 or not isinstance(q.args[1], torch.fx.Node):
        return False
    scale = q.args[1]
    return scale.op == "get_attr" and _attr(gm, scale.target).dim() == 1


def _keeps_length(sliced: torch.fx.Node, x: torch.fx.Node) -> bool:
    """Whether the slice after the conv keeps exactly its input's length (what the kernel
    computes). Known on Dynamo graphs from their example values; a captured graph's slice is the
    one capture wrote, `[..., :seq_len]`."""
    out, into = _value(sliced), _value(x)
    if not (isinstance(out, torch.Tensor) and isinstance(into, torch.Tensor)):
        return True
    return out.dim() == into.dim() and all(statically_known_true(a == b) for a, b in zip(out.shape, into.shape))


def fuse_conv1d_silu(gm: torch.fx.GraphModule, q: torch.fx.Node) -> bool:
    """The rule: `quantize(silu(conv1d(dequantize(x_q, s_in))[..., :L]), s_out)` -> `conv1d_silu_int8`,
    on graphs from quamba_fx (conv1d a module call) and on Dynamo's graphs of them (`F.conv1d`);
    `s_out` one scale, or one a channel."""
    if not (q.op == "call_function" and op_name(q) == "quantize" and (_per_tensor(gm, q) or _per_channel_out(gm, q))):
        return False
    silu = _single_input(q, lambda n: op_name(n) == "silu")
    sliced = silu and _single_input(silu, lambda n: op_name(n) == "getitem")
    conv = sliced and _single_input(sliced, lambda n: True)
    parts = conv and _mamba_conv(gm, conv)
    if not parts:
        return False
    dq, weight, bias = parts
    if not (isinstance(dq, torch.fx.Node) and op_name(dq) == "dequantize" and len(dq.users) == 1
            and _per_tensor(gm, dq) and _keeps_length(sliced, dq)):
        return False
    meta = {**info(conv), **({"module": conv.target} if conv.op == "call_module" else {})}
    graph = gm.graph
    with graph.inserting_before(q):
        if isinstance(weight, str):  # a module's: its attributes become graph nodes
            weight = graph.get_attr(weight)
            bias = graph.get_attr(bias) if bias is not None else None
            for node in (weight, bias):
                if node is not None:
                    node.meta[META_KEY] = dict(meta)
        fused = graph.call_function(FUSED_CONV, (dq.args[0], dq.args[1], weight, bias, q.args[1]))
    fused.meta[META_KEY] = dict(meta)
    q.replace_all_uses_with(fused)
    for dead in (q, silu, sliced, conv, dq):
        graph.erase_node(dead)
    return True


def fuse_float_conv1d_silu(gm: torch.fx.GraphModule, silu: torch.fx.Node) -> bool:
    """The float rule: `silu(conv1d(x)[..., :L])`, `x` not a dequantize -> `conv1d_silu(x, w, b)`.
    Only on captured graphs (conv1d a module call): Dynamo's float graphs are not lowered."""
    if not (silu.op in ("call_function", "call_method") and op_name(silu) == "silu" and len(silu.args) == 1):
        return False
    sliced = _single_input(silu, lambda n: op_name(n) == "getitem")
    conv = sliced and _single_input(sliced, lambda n: n.op == "call_module")
    parts = conv and _mamba_conv(gm, conv)
    if not parts:
        return False
    x, weight, bias = parts
    if not isinstance(x, torch.fx.Node) or op_name(x) == "dequantize" or not _keeps_length(sliced, x):
        return False
    meta = {**info(conv), "module": conv.target}
    graph = gm.graph
    with graph.inserting_before(silu):
        operands = [graph.get_attr(weight), graph.get_attr(bias) if bias is not None else None]
        for node in operands:
            if node is not None:
                node.meta[META_KEY] = dict(meta)
        fused = graph.call_function(FLOAT_CONV, (x, *operands))
    fused.meta[META_KEY] = dict(meta)
    silu.replace_all_uses_with(fused)
    for dead in (silu, sliced, conv):
        graph.erase_node(dead)
    return True


class FuseConv1dSiLU(PassBase):
    """Replace every block's conv1d + SiLU subgraph with one op: the fused int8 kernel's where
    the conv1d's input and output are quantized, the float `conv1d_silu` where neither is."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        return PassResult(gm, run_rules(gm, [fuse_conv1d_silu, fuse_float_conv1d_silu]))

