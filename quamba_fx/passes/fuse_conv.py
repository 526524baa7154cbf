"""Fuse `dequantize -> conv1d -> [:, :, :L] -> SiLU -> quantize` into one int8 Triton kernel call.

Matched on the quantized graph, anchored at the requantization; the fused node keeps the block's
role, block index and module path, and counts as the block's conv1d for the topology check.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph_info import info, op_name
from ..kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.quamba.conv1d_silu_int8)
from .quantize import DEQUANTIZE, QUANTIZE, run_rules

FUSED_CONV = torch.ops.quamba.conv1d_silu_int8.default


def _single_input(node: torch.fx.Node, check) -> torch.fx.Node | None:
    source = node.args[0] if node.args else None
    if isinstance(source, torch.fx.Node) and len(source.users) == 1 and check(source):
        return source
    return None


def fuse_conv1d_silu(gm: torch.fx.GraphModule, q: torch.fx.Node) -> bool:
    """The rule: `quantize(silu(conv1d(dequantize(x_q, s_in))[:, :, :L]), s_out)` -> `conv1d_silu_int8`."""
    if not (q.op == "call_function" and q.target is QUANTIZE):
        return False
    silu = _single_input(q, lambda n: op_name(n) == "silu")
    sliced = silu and _single_input(silu, lambda n: n.target is operator.getitem)
    conv = sliced and _single_input(
        sliced, lambda n: n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv1d))
    dq = conv and _single_input(conv, lambda n: n.op == "call_function" and n.target is DEQUANTIZE)
    if dq is None:
        return False
    module = gm.get_submodule(conv.target)
    if module.groups != module.in_channels or module.padding[0] != module.kernel_size[0] - 1:
        return False  # only the depthwise causal conv of Mamba has a kernel
    x_q, in_scale, _ = dq.args
    out_scale = q.args[1]
    graph = gm.graph
    with graph.inserting_before(q):
        weight = graph.get_attr(f"{conv.target}.weight")
        bias = graph.get_attr(f"{conv.target}.bias") if module.bias is not None else None
        fused = graph.call_function(FUSED_CONV, (x_q, in_scale, weight, bias, out_scale))
    for node in (weight, bias, fused):
        if node is not None:
            node.meta["quamba"] = {**info(conv), "module": conv.target}
    q.replace_all_uses_with(fused)
    for dead in (q, silu, sliced, conv, dq):
        graph.erase_node(dead)
    return True


class FuseConv1dSiLU(PassBase):
    """Replace every block's int8 conv1d + SiLU subgraph with the fused kernel op."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        return PassResult(gm, run_rules(gm, [fuse_conv1d_silu]))


def fuse(quantized: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a quantized graph with each block's conv1d + SiLU as one fused int8 kernel call."""
    import copy

    from ..capture import annotate_shapes
    from ..pipeline import Pipeline

    gm = Pipeline([FuseConv1dSiLU()])(copy.deepcopy(quantized))
    gm.meta["quamba"]["fused"] = True
    annotate_shapes(gm, tuple(gm.meta["quamba"].get("example_shape", (1, 8))))
    return gm
