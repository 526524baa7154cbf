"""Lowering rules of the scan kernels: Mamba-1's reference scan of int8 inputs becomes one kernel
op (kernels/scan.py), and a decode step's scan computes dt_proj itself (a prefill's too, with
FUSE_DT_PROJ_IN_PREFILL); Mamba-2's SSD scan runs on its chunked kernels (kernels/ssd.py)."""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx

from ... import ops as reference_ops  # noqa: F401  (registers torch.ops.quamba.selective_scan)
from ...errors import InvalidArgumentError
from ...graph_info import info
from ...kernels import scan as scan_kernel  # noqa: F401  (registers the kernel ops read below)
from ...kernels import ssd as ssd_kernel  # noqa: F401  (the same, for Mamba-2)
from ..quantize import DEQUANTIZE
from ..rewrite import Rule
from .gemm import W8A8_LINEAR
from .match import (annotate, channel_scale_values, is_call, per_channel_int8, per_tensor_int8, same_value,
                    transposed_projection)

SCAN = torch.ops.quamba.selective_scan.default
# Mamba-2's scan: the kernel op takes the reference op's arguments, its products' dtype and, for
# int8 inputs, their four scales (`ssd_scan_on_kernels`).
SSD_SCAN = torch.ops.quamba.ssd_scan.default
SSD_SCAN_CACHED = torch.ops.quamba.ssd_scan_cached.default
SSD_SCAN_TRITON = torch.ops.quamba.ssd_scan_triton.default
SSD_SCAN_TRITON_CACHED = torch.ops.quamba.ssd_scan_triton_cached.default
SCAN_INT8 = torch.ops.quamba.selective_scan_int8.default
SCAN_INT8_CACHED = torch.ops.quamba.selective_scan_int8_cached.default
DT_PROJ_STATE_UPDATE = torch.ops.quamba.dt_proj_state_update.default
DT_PROJ_SCAN_INT8 = torch.ops.quamba.selective_scan_int8_dt_proj.default
DT_PROJ_SCAN_INT8_CACHED = torch.ops.quamba.selective_scan_int8_dt_proj_cached.default

KERNELS = {SCAN_INT8: "triton:selective_scan_int8", SSD_SCAN_TRITON: "triton:ssd_scan",
           DT_PROJ_SCAN_INT8: "triton:selective_scan_int8_dt_proj"}

# The prefill's scan computes dt_proj's output itself (`fuse_dt_proj_into_scan`). Off: on an H100
# (session 44, docs/benchmarks.md) the fold made the 1 x 2048 scan 12% slower than the GEMM then the
# scan, and mamba-2.8b's 8 x 2048 prefill 219 ms against 201; its 5-8% more loop instructions cost
# more than the dt_proj GEMM they replace. Both were measured with prefill PDL on, since turned off.
FUSE_DT_PROJ_IN_PREFILL = False

_SCAN_ARGS = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus"]
_SCAN_DEFAULTS = [None, None, None, None, None, None, None, None, True]


def scan_args(node: torch.fx.Node) -> list:
    """The selective_scan call's arguments in signature order, defaults filled in."""
    values = list(node.args) + _SCAN_DEFAULTS[len(node.args):]
    for i, name in enumerate(_SCAN_ARGS):
        if name in node.kwargs:
            values[i] = node.kwargs[name]
    return values


def fuse_scan(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`selective_scan` whose u, delta, B, C, z are dequantized int8 -> `selective_scan_int8`,
    its output in `dtype`."""
    if not is_call(node, SCAN):
        return False
    u, delta, A, B, C, D, z, delta_bias, softplus = scan_args(node)
    if not all(is_call(t, DEQUANTIZE) for t in (u, delta, B, C, z)):
        return False
    (u_q, su), (dt_q, sdt), (b_q, sb), (c_q, sc), (z_q, sz) = (t.args[:2] for t in (u, delta, B, C, z))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            SCAN_INT8, (u_q, su, dt_q, sdt, A, b_q, sb, c_q, sc, D, z_q, sz, delta_bias, softplus, dtype))
    node.replace_all_uses_with(annotate(new, node))
    gm.graph.erase_node(node)
    # The dequantizes no one reads any more: gone now, so that the next rules see the codes'
    # real users (`fuse_dt_proj_into_scan` asks that dt_proj feed the scan alone).
    for dead in {u, delta, B, C, z}:
        if not dead.users:
            gm.graph.erase_node(dead)
    return True


def _is_unflatten(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target == "unflatten"


def _int8_code(node: object) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None] | None:
    """(int8 code, scale, the unflatten after the dequantize or None) of a per-tensor or
    per-channel `[unflatten](dequantize(q, scale))` to fp32: x, B and C are unflattened after it,
    dt is not."""
    unflatten = node if _is_unflatten(node) else None
    dequantized = node if unflatten is None else unflatten.args[0]
    code = per_tensor_int8(dequantized) or per_channel_int8(dequantized)
    return None if code is None else (*code, unflatten)


def _group_scale(graph: torch.fx.Graph, name: str, scale: torch.fx.Node,
                 unflatten: torch.fx.Node | None) -> torch.fx.Node:
    """B's or C's scale as the kernels take it: as is when one value, else one a state group (the
    first of each group's channels, a strided view). Quamba2's recipes give a group's channels
    one scale (`arch.mamba2.channel_layout`); channels of one group with different scales cannot
    be read from a group's sums, and are refused."""
    values = channel_scale_values(scale)
    if values is None or values.numel() == 1:
        return scale
    state = unflatten.args[-1][-1] if unflatten is not None and unflatten.args else None
    if not isinstance(state, int) or values.numel() % state:
        raise InvalidArgumentError(
            f"ssd_scan: {name}'s per-channel scale ({values.numel()} values) is not one per state group")
    groups = values.reshape(-1, state)
    if not bool((groups == groups[:, :1]).all()):
        raise InvalidArgumentError(
            f"ssd_scan: {name}'s scales differ within a state group ({scale.name}); the scan kernels take one scale "
            "a group (it factors out of C B^T): give a group's channels one scale")
    return graph.call_function(operator.getitem, (scale, slice(None, None, state)))


def ssd_scan_on_kernels(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`ssd_scan` -> `ssd_scan_triton`, the same call on the chunked kernels, their matrix
    products and y in `dtype` (the lowering's: an fp16 model's scan would read its inputs in fp16
    and write y in fp16, as mamba_ssm's does; the gated norm after it reads any float). When
    x, dt, B and C are all per-tensor dequantized int8, the kernels read the int8 codes and their
    scales instead, and the dequantizes (fp32 tensors the size of x) go."""
    if not is_call(node, SSD_SCAN) or node.kwargs:
        return False
    x, dt, A, B, C, *rest = node.args
    codes = [_int8_code(t) for t in (x, dt, B, C)]
    inputs, scales = [x, dt, B, C], [None] * 4
    graph = gm.graph
    with graph.inserting_before(node):
        if all(code is not None for code in codes):
            inputs = [q if unflatten is None else annotate(
                          graph.call_method("unflatten", (q, *unflatten.args[1:]), dict(unflatten.kwargs)), unflatten)
                      for q, _, unflatten in codes]
            scales = [scale for _, scale, _ in codes]
            scales[2:] = [_group_scale(graph, name, scale, unflatten)
                          for name, (_, scale, unflatten) in zip("BC", codes[2:])]
        new = graph.call_function(SSD_SCAN_TRITON, (inputs[0], inputs[1], A, inputs[2], inputs[3], *rest, dtype,
                                                    *scales, dtype))
    node.replace_all_uses_with(annotate(new, node))
    graph.erase_node(node)
    for dead in (x, dt, B, C):  # the unflattens and dequantizes no one reads any more
        while (_is_unflatten(dead) or is_call(dead, DEQUANTIZE)) and not dead.users:
            below = dead.args[0]
            graph.erase_node(dead)
            dead = below
    return True


def _dt_proj_into(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, target, kernel: str) -> bool:
    """`node`, a scan called with `args` = `(u, su, transpose(w8a8_linear(x, xs, w, ws, b, s)), s,
    *rest)`, dt_proj's int8 output feeding nothing else -> `target(u, su, x, xs, w, ws, b, s, *rest)`."""
    u, su, delta, delta_scale, *rest = args
    linear = transposed_projection(delta, W8A8_LINEAR)
    if linear is None or len(linear.args) < 6:
        return False
    x, xs, w, ws, bias, out_scale = linear.args[:6]
    if not same_value(out_scale, delta_scale):  # an int8 delta, the scale the scan reads it with
        return False
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(target, (u, su, x, xs, w, ws, bias, delta_scale, *rest))
    fused.meta["quamba"] = {**info(node), "kernel": kernel}
    node.replace_all_uses_with(fused)
    for dead in (node, delta, linear):
        gm.graph.erase_node(dead)
    return True


def fuse_dt_proj_into_state_update(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Decode only: `selective_scan_int8_cached(u, .., transpose(w8a8_linear(x, xs, w, ws, b, s)), s,
    .., decode=True)`, dt_proj's int8 output feeding nothing else -> `dt_proj_state_update(u, ..,
    x, xs, w, ws, b, s, ..)`: the scan kernel computes delta itself, one launch a block fewer."""
    if not is_call(node, SCAN_INT8_CACHED) or node.args[-1] is not True:
        return False
    # Without the decode flag: dt_proj_state_update runs decode steps only.
    return _dt_proj_into(gm, node, node.args[:-1], DT_PROJ_STATE_UPDATE, "triton:dt_proj_state_update")


def fuse_dt_proj_into_scan(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Prefill, with FUSE_DT_PROJ_IN_PREFILL: `selective_scan_int8(u, .., transpose(w8a8_linear(x,
    xs, w, ws, b, s)), s, ..)`, dt_proj's int8 output feeding nothing else ->
    `selective_scan_int8_dt_proj(u, .., x, xs, w, ws, b, s, ..)`: the scan kernel computes delta
    itself, one launch a block fewer. Its cached form runs the decode step the same way."""
    if not (FUSE_DT_PROJ_IN_PREFILL and is_call(node, SCAN_INT8)):
        return False
    return _dt_proj_into(gm, node, node.args, DT_PROJ_SCAN_INT8, KERNELS[DT_PROJ_SCAN_INT8])


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules, the scan's output in `dtype`."""
    return [functools.partial(fuse_scan, dtype=dtype), functools.partial(ssd_scan_on_kernels, dtype=dtype),
            fuse_dt_proj_into_scan]


DECODE_RULES: list[Rule] = [fuse_dt_proj_into_state_update]
