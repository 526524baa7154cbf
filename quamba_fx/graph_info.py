"""Read what capture recorded on nodes, and classify ops by what they do to data.

The op classes are what the topology check walks through: layout ops move or view data, elementwise
ops compute per element, quantization boundaries change only the encoding. Every op and module that
quamba-fx's own passes and kernels put into a graph is declared here, so what the check accepts does
not depend on which modules happen to have been imported; `register_op` and `register_module` are
for ops defined outside the package.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from .quant.fp8_linear import Fp8Linear
from .quant.int4_linear import W4A8Linear, W4A16Linear
from .quant.linear import QuantizedLinear

# The key of capture's annotations in `node.meta` (the graph's facts are a `graph_meta.GraphMeta`).
META_KEY = "quamba"

LAYOUT_OPS: set[str] = {
    "transpose", "permute", "view", "reshape", "contiguous", "chunk", "split", "split_with_sizes",
    "getitem", "slice", "select", "narrow", "unsqueeze", "squeeze", "flatten", "unflatten", "expand",
    "t", "to", "float", "half", "bfloat16", "type_as", "clone", "_to_copy", "alias", "unbind",
}
ELEMENTWISE_OPS: set[str] = {
    "silu", "sigmoid", "relu", "gelu", "softplus", "exp", "neg", "abs", "add", "sub", "mul", "div",
    "truediv", "iadd", "imul", "pow", "rsqrt", "sqrt", "tanh", "clamp", "round",
}
# The `torch.ops.quamba` ops below are defined in quant/qops.py and quant/fp8.py (the int8 and
# e4m3 references the quantize pass inserts) and in the kernel modules of kernels/ (conv1d, gemm,
# gemm_fp8, scan, hadamard, norm: the kernel ops fusion and lowering insert). No module adds to
# these sets on import (tests/test_verify.py checks it).
# Ops that only change a tensor's encoding.
QUANT_BOUNDARY_OPS: set[str] = {"quantize", "dequantize", "quantize_fp8", "dequantize_fp8", "hadamard_quantize",
                                "hadamard_quantize_fp8"}
# Ops that compute a depthwise causal conv1d or a Linear, besides nn.Conv1d / nn.Linear modules.
CONV1D_OPS: set[str] = {
    "conv1d", "convolution", "conv1d_silu_int8", "conv1d_silu_int8_cached", "conv1d_silu", "conv1d_silu_cached",
    # a decode step's in_proj with the conv1d step after it (passes/lowering/gemm.py, gemm_w4.py)
    "in_proj_conv_update", "w4a16_in_proj_conv_update",
}
# int8_linear / fp8_linear / w4a*_linear: Dynamo inlines the quantized Linears' forward, so the
# torch.compile backend sees the op.
LINEAR_OPS: set[str] = {"linear", "int8_linear", "w8a8_linear", "fp8_linear", "fp8_gemm", "w4a16_linear", "w4a8_linear",
                         "w4a16_gemm", "w4a8_gemm", "logits_linear"}
SCAN_OPS: set[str] = {
    "selective_scan", "selective_scan_cached", "selective_scan_int8", "selective_scan_int8_cached", "ssd_scan",
    "ssd_scan_cached", "ssd_scan_triton", "ssd_scan_triton_cached",
    # the scan with dt_proj folded in: a decode step's, a prefill's (passes/lowering/scan.py, gemm_w4.py)
    "dt_proj_state_update", "w4a16_dt_proj_state_update", "selective_scan_int8_dt_proj",
    "selective_scan_int8_dt_proj_cached",
}

_KINDS = {
    "layout": LAYOUT_OPS, "elementwise": ELEMENTWISE_OPS, "quant_boundary": QUANT_BOUNDARY_OPS,
    "conv1d": CONV1D_OPS, "linear": LINEAR_OPS, "scan": SCAN_OPS,
}


def register_op(kind: str, name: str) -> None:
    """Declare that ops named `name` (see `op_name`) belong to `kind` for the topology check.

    For ops defined outside quamba-fx; the package's own ops are in the sets above.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown op kind {kind!r}; expected one of {sorted(_KINDS)}")
    _KINDS[kind].add(name)


def op_name(node: torch.fx.Node) -> str:
    """A short name for what a node computes: `transpose`, `silu`, `selective_scan`, `getitem`..."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op != "call_function":
        return node.op
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


# Module classes that compute a kind, besides nn.Conv1d / nn.Linear (e.g. a quantized Linear).
_MODULE_KINDS: dict[str, tuple[type, ...]] = {
    "conv1d": (nn.Conv1d,), "linear": (nn.Linear, QuantizedLinear, Fp8Linear, W4A8Linear, W4A16Linear),
}


def register_module(kind: str, cls: type) -> None:
    """Declare that `call_module` nodes of `cls` compute `kind` (`conv1d` or `linear`).

    For module classes defined outside quamba-fx; the package's own are in `_MODULE_KINDS`.
    """
    if kind not in _MODULE_KINDS:
        raise ValueError(f"modules can be registered as {sorted(_MODULE_KINDS)}, not {kind!r}")
    _MODULE_KINDS[kind] += (cls,)


def node_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def is_kind(gm: torch.fx.GraphModule, node: torch.fx.Node, kind: str) -> bool:
    """Whether `node` is of `kind` (layout, elementwise, quant_boundary, conv1d, linear, scan)."""
    module = node_module(gm, node)
    if module is not None:
        return isinstance(module, _MODULE_KINDS.get(kind, ()))
    return node.op in ("call_function", "call_method") and op_name(node) in _KINDS[kind]


def fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    """What a `get_attr` node with this target reads (`backbone.layers.0.mixer.A_log`); None if absent."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def info(node: torch.fx.Node) -> dict[str, Any]:
    """The capture annotation of a node: `{"role", "block", "module"}` (empty when absent)."""
    return node.meta.get(META_KEY, {})


def role(node: torch.fx.Node) -> str | None:
    return info(node).get("role")


def block(node: torch.fx.Node) -> int | None:
    return info(node).get("block")


def module_call(gm: torch.fx.GraphModule, role_name: str, kind: type | None = None) -> torch.fx.Node | None:
    """The graph's first call of a module labelled `role_name` at capture (`arch.tracing.stage`:
    "lm_head", "embedding", ...), with `kind` only a module of exactly that type; None if none."""
    return next((n for n in gm.graph.nodes if n.op == "call_module" and role(n) == role_name
                 and (kind is None or type(gm.get_submodule(n.target)) is kind)), None)


def describe(node: torch.fx.Node) -> str:
    """`name` plus whatever is known of it: `backbone_layers_0_mixer_conv1d [backbone.layers.0.mixer.conv1d, block 0]`."""
    details = []
    if info(node).get("module"):
        details.append(info(node)["module"])
    elif node.op in ("call_function", "call_method"):
        details.append(op_name(node))
    if block(node) is not None:
        details.append(f"block {block(node)}")
    return f"{node.name} [{', '.join(details)}]" if details else node.name
