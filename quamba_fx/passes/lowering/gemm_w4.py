"""Lowering rules of the 4-bit-weight GEMM kernels (kernels/gemm_w4.py): every `W4A16Linear` and
`W4A8Linear` becomes one GEMM op reading its packed weight and group scales, and a 4-bit token
embedding (`W4Embedding`) one gather (kernels/dequant_w4.py); a decode step's W4A16 in_proj takes
the float conv1d step into its epilogue, and (where turned on) its scan update computes dt_proj
itself."""

from __future__ import annotations

import functools

import torch
import torch.fx

from ...kernels import conv1d_float  # noqa: F401  (registers torch.ops.quamba.conv1d_silu_cached)
from ... import ops  # noqa: F401  (registers torch.ops.quamba.selective_scan_cached)
from ...graph_info import info
from ...kernels import dequant_w4  # noqa: F401  (registers w4_embedding_gather)
from ...kernels import gemm_w4  # noqa: F401  (registers w4a16_gemm, w4a8_gemm, w4a16_in_proj_conv_update)
from ...kernels import scan  # noqa: F401  (registers w4a16_dt_proj_state_update)
from ...quant.int4_linear import W4A8Linear, W4A16Linear, W4Embedding
from ..rewrite import Rule
from .gemm import conv_input_projection, hoist_conv_operands, replace_in_proj_and_conv
from .match import annotate, get_attr, is_call, transposed_projection

W4A16_GEMM = torch.ops.quamba.w4a16_gemm.default
W4A8_GEMM = torch.ops.quamba.w4a8_gemm.default
W4_EMBEDDING_GATHER = torch.ops.quamba.w4_embedding_gather.default
FLOAT_CONV_CACHED = torch.ops.quamba.conv1d_silu_cached.default
W4A16_IN_PROJ_CONV_UPDATE = torch.ops.quamba.w4a16_in_proj_conv_update.default
SCAN_CACHED = torch.ops.quamba.selective_scan_cached.default
W4A16_DT_PROJ_STATE_UPDATE = torch.ops.quamba.w4a16_dt_proj_state_update.default

# Whether the decode graph folds the conv step into in_proj's GEMV: a setting that
# benchmarks/decode_settings.py can turn off to measure what the fusion gains.
FUSE_CONV_IN_DECODE = True
# Whether the decode graph folds dt_proj into the scan update (`fuse_dt_proj_into_state_update`):
# mamba-2.8b W4A16 batch-1 decode 559 -> 601 tokens/s (session 37). A setting, as above.
FUSE_DT_PROJ_IN_DECODE = True

KERNELS = {W4A16_GEMM: "triton:w4a16_gemm", W4A8_GEMM: "triton:w4a8_gemm",
           W4_EMBEDDING_GATHER: "triton:w4_embedding_gather"}


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


def lower_int4_embedding(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """`W4Embedding(ids)` -> `w4_embedding_gather(ids, w, w_scale, group, dim, dtype)`: the rows in
    the lowering's dtype, as a float embedding gives them once it is cast to it."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(module, W4Embedding):
        return False
    graph = gm.graph
    with graph.inserting_before(node):
        weight = get_attr(graph, f"{node.target}.weight", node)
        w_scale = get_attr(graph, f"{node.target}.weight_scale", node)
        new = graph.call_function(W4_EMBEDDING_GATHER, (node.args[0], weight, w_scale, module.group_size,
                                                        module.embedding_dim, dtype))
    node.replace_all_uses_with(annotate(new, node))
    graph.erase_node(node)
    return True


def rules(dtype: torch.dtype) -> list[Rule]:
    """The lowering rules, activations between kernels in `dtype`."""
    return [functools.partial(lower_int4_linear, dtype=dtype), functools.partial(lower_int4_embedding, dtype=dtype)]


def fuse_conv_into_w4a16_in_proj(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Decode only: `conv1d_silu_cached(chunk(transpose(w4a16_gemm(..)), 2, dim=1)[0], .., decode=True)`
    (Mamba-1's x half), or of `transpose(split(w4a16_gemm(..), sizes, dim=-1)[i], 1, 2)` (Mamba-2's
    xBC, from column `sum(sizes[:i])`) -> `w4a16_in_proj_conv_update`, whose two results replace
    in_proj's output and the conv's: at batch 1 the GEMV's epilogue runs the conv step, one launch
    a block fewer (as lowering/gemm.py's `fuse_conv_into_in_proj` for W8A8)."""
    if not FUSE_CONV_IN_DECODE or not is_call(node, FLOAT_CONV_CACHED) or node.args[-1] is not True:
        return False
    conv_input, conv_w, conv_b, state, _decode = node.args
    linear, start = conv_input_projection(conv_input) or (None, 0)
    if not is_call(linear, W4A16_GEMM) or linear.kwargs or len(linear.args) != 6:
        return False
    if not hoist_conv_operands(linear, (conv_w, conv_b, state)):
        return False
    replace_in_proj_and_conv(gm, linear, node, W4A16_IN_PROJ_CONV_UPDATE,
                             (*linear.args, conv_w, conv_b, state, *((start,) if start else ())),
                             "triton:w4a16_in_proj_conv_update")
    return True


def fuse_dt_proj_into_state_update(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Decode only: `selective_scan_cached(u, transpose(w4a16_gemm(x, w, ws, group, b, act), 1, 2),
    A, B, C, D, z, delta_bias, softplus, state, decode=True)`, dt_proj's output feeding nothing else
    -> `w4a16_dt_proj_state_update(u, x, w, ws, group, b, act, A, B, C, D, z, delta_bias, softplus,
    state)`: the scan kernel computes delta itself, one launch a block fewer."""
    if not (FUSE_DT_PROJ_IN_DECODE and is_call(node, SCAN_CACHED) and len(node.args) == 11 and not node.kwargs
            and node.args[-1] is True):
        return False
    u, delta, A, B, C, D, z, delta_bias, softplus, state, _decode = node.args
    gemm = transposed_projection(delta, W4A16_GEMM)
    if gemm is None or len(gemm.args) != 6:
        return False
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(W4A16_DT_PROJ_STATE_UPDATE,
                                       (u, *gemm.args, A, B, C, D, z, delta_bias, softplus, state))
    fused.meta["quamba"] = {**info(node), "kernel": "triton:w4a16_dt_proj_state_update"}
    node.replace_all_uses_with(fused)
    for dead in (node, delta, gemm):
        gm.graph.erase_node(dead)
    return True


DECODE_RULES: list[Rule] = [fuse_conv_into_w4a16_in_proj, fuse_dt_proj_into_state_update]
