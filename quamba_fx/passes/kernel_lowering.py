"""Lower the W8A8 reference graph to GPU kernels: a rule table run to a fixpoint.

Each rule matches one reference subgraph and replaces it with one kernel op from
`quamba_fx.kernels.ops`, recording the kernel in `node.meta["quamba"]["kernel"]` (the dump shows it):

| reference subgraph                                        | kernel op                      |
|-----------------------------------------------------------|--------------------------------|
| `QuantizedLinear` (int8_linear)                            | `w8a8_linear` (int8 GEMM)      |
| `Fp8Linear` (fp8_linear)                                  | `fp8_gemm` (e4m3 GEMM)         |
| `selective_scan(dequantize(u), ..., dequantize(z))`        | `selective_scan_int8`          |
| `quantize(hadamard(y), s)`                                 | `hadamard_quantize`            |
| `quantize_fp8(hadamard(y), s)` (per tensor)                | `hadamard_quantize_fp8`        |
| `hadamard(y)` that no quantize above takes                 | `hadamard_rotate`              |
| `[quantize](RMSNorm(residual + out))`                      | `add_rmsnorm_quantize`         |
| `quantize_fp8(RMSNorm(residual + out))` (per tensor)       | `add_rmsnorm_quantize` (e4m3)  |
| expressions of parameters only (`-exp(A_log.float())`)     | folded into a buffer           |

The conv1d must already be fused (`passes.conv_fusion`; `quamba_fx.flows.lower` runs both). Float leftovers (embedding, lm_head) and the
activations between kernels are cast to `dtype` (fp16 by default); the residual stream stays fp32.
The scan computes in fp32; the decode cache keeps its state in `state_dtype` (recorded as
`graph_meta(gm).state_dtype`, read by `ssm_state_dtype`): by default fp16 for the fp16
lowering, as mamba_ssm does (it halves the state read and written every decode step), and fp32
otherwise (bf16's 8-bit mantissa is too coarse for a recurrent state; an fp32 lowering stays the
exact option). The result computes what the reference graph computes up to the kernels' documented
rounding differences; `cached_graph` derives the prefill and decode graphs of generation from it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import ops as reference_ops  # noqa: F401  (registers torch.ops.quamba.selective_scan, read below)
from ..errors import InputError, InvalidArgumentError
from ..graph_info import fetch_attr, info, op_name
from ..graph_meta import GraphMeta, find_graph_meta, set_graph_meta
from ..kernels import gemm_fp8  # noqa: F401  (registers torch.ops.quamba.fp8_gemm)
from ..kernels import ops as kernel_ops  # noqa: F401  (registers the kernel ops)
from ..quant.fp8 import FP8_DTYPE
from ..quant.fp8_linear import Fp8Linear
from ..quant.linear import QuantizedLinear
from .quantize import DEQUANTIZE, QUANTIZE, QUANTIZE_FP8
from .rewrite import run_rules

W8A8_LINEAR = torch.ops.quamba.w8a8_linear.default
FP8_GEMM = torch.ops.quamba.fp8_gemm.default
SCAN = torch.ops.quamba.selective_scan.default
SCAN_INT8 = torch.ops.quamba.selective_scan_int8.default
HADAMARD = torch.ops.quamba.hadamard.default
HADAMARD_QUANTIZE = torch.ops.quamba.hadamard_quantize.default
HADAMARD_QUANTIZE_FP8 = torch.ops.quamba.hadamard_quantize_fp8.default
HADAMARD_ROTATE = torch.ops.quamba.hadamard_rotate.default
ADD_RMSNORM = torch.ops.quamba.add_rmsnorm_quantize.default
FUSED_CONV = torch.ops.quamba.conv1d_silu_int8.default

KERNELS = {
    W8A8_LINEAR: "triton:int8_gemm",
    FP8_GEMM: "fp8_gemm",
    SCAN_INT8: "triton:selective_scan_int8",
    HADAMARD_QUANTIZE: "triton:hadamard_quantize",
    HADAMARD_QUANTIZE_FP8: "triton:hadamard_quantize_fp8",
    HADAMARD_ROTATE: "triton:hadamard_rotate",
    ADD_RMSNORM: "triton:add_rmsnorm_quantize",
    FUSED_CONV: "triton:conv1d_silu_int8",
}

# Ops a parameter-only expression may consist of (folded once at lowering time).
_FOLDABLE = {"float", "to", "exp", "neg", "half", "contiguous"}


def _is(node: Any, target) -> bool:
    """Whether `node` calls `target`; an op overload also matches a call of its packet (capture
    writes `torch.ops.quamba.selective_scan(...)`, passes write `.default`)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    packet = getattr(target, "overloadpacket", None)
    return node.target is target or (packet is not None and node.target is packet)


def _is_cast(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in ("to", "float")


def _is_fp32_cast(node: torch.fx.Node) -> bool:
    return _is_cast(node) and (node.target == "float" or torch.float32 in node.args[1:])


def _fuses_with_hadamard(node: torch.fx.Node) -> bool:
    """Whether `node` is a per-tensor int8 or e4m3 quantize of a rotation nothing else reads (the
    pattern `fuse_hadamard_quantize` turns into one kernel)."""
    if _is(node, QUANTIZE):
        per_tensor = len(node.args) <= 2
    elif _is(node, QUANTIZE_FP8):
        per_tensor = len(node.args) <= 2 and not node.kwargs and _is_scalar_attr(node)
    else:
        return False
    rotation = node.args[0]
    return per_tensor and _is(rotation, HADAMARD) and len(rotation.users) == 1


def _is_scalar_attr(node: torch.fx.Node) -> bool:
    # quantize_fp8 has no separate per-tensor form: a per-channel scale differs only in its shape,
    # so only a scale known to hold one value (a get_attr, as the recipes insert) may fuse.
    scale = node.args[1]
    if not (isinstance(scale, torch.fx.Node) and scale.op == "get_attr"):
        return False
    gm = scale.graph.owning_module
    return gm is not None and fetch_attr(gm, scale.target).numel() == 1


def _fusable_norm_quantize(norm: torch.fx.Node) -> torch.fx.Node | None:
    """The norm's only user when it is a per-tensor int8 or e4m3 quantize the kernel can take."""
    users = list(norm.users)
    if len(users) != 1 or len(users[0].args) != 2 or users[0].kwargs:
        return None
    user = users[0]
    if _is(user, QUANTIZE) or (_is(user, QUANTIZE_FP8) and _is_scalar_attr(user)):
        return user
    return None


def _strip_casts(node: torch.fx.Node) -> torch.fx.Node:
    while _is_cast(node):
        node = node.args[0]
    return node


def _annotate(new: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    new.meta["quamba"] = {**info(like)}
    return new


def _get_attr(graph: torch.fx.Graph, target: str, like: torch.fx.Node) -> torch.fx.Node:
    return _annotate(graph.get_attr(target), like)


def _is_rmsnorm(module: nn.Module) -> bool:
    return hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor)


# The dtypes a decode cache may keep the scan state in, by the name the graph's metadata records.
STATE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# The activation dtypes a lowering may run between kernels: what the kernels' float outputs take.
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_state_dtype(dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    """The scan state's dtype for a lowering to `dtype`: `state_dtype`, or by default fp16 for the
    fp16 lowering and fp32 for any other. Raises InvalidArgumentError for any other dtype, and for
    a `dtype` the kernels cannot produce between them."""
    if dtype not in ACTIVATION_DTYPES:
        raise InvalidArgumentError(
            f"dtype (the activations between kernels) must be torch.float16, torch.bfloat16 or torch.float32, "
            f"got {dtype!r}")
    if state_dtype is None:
        return torch.float16 if dtype == torch.float16 else torch.float32
    if state_dtype not in STATE_DTYPES.values():
        raise InvalidArgumentError(
            f"state_dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {state_dtype!r}")
    return state_dtype


def ssm_state_dtype(gm: torch.fx.GraphModule) -> torch.dtype:
    """The dtype a lowered graph's decode cache keeps the scan state in (fp32 for graphs lowered
    before the choice was recorded)."""
    recorded = (find_graph_meta(gm) or GraphMeta()).state_dtype
    name = "float32" if recorded is None else recorded
    if name not in STATE_DTYPES:
        raise InputError(f"the graph's state_dtype (graph_meta(gm).state_dtype) is {name!r}, not one of "
                         f"{', '.join(STATE_DTYPES)}: lower the quantized graph again")
    return STATE_DTYPES[name]


class LowerToKernels(PassBase):
    """Replace the reference ops of a fused W8A8 graph with Triton kernel ops (see module docs).

    `dtype` is the activations' dtype between kernels; `state_dtype` the decode cache's scan
    state (None: fp16 for an fp16 lowering, else fp32), recorded in `graph_meta(gm).state_dtype`.
    """

    def __init__(self, dtype: torch.dtype = torch.float16, state_dtype: torch.dtype | None = None):
        super().__init__()
        self.dtype = dtype
        self.state_dtype = resolve_state_dtype(dtype, state_dtype)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        meta = find_graph_meta(gm) or set_graph_meta(gm, GraphMeta())
        meta.state_dtype = _dtype_name(self.state_dtype)
        rules = [self.lower_linear, self.fuse_scan, self.fuse_hadamard_quantize, self.lower_hadamard, self.fuse_norm]
        changed = run_rules(gm, rules)
        changed |= fold_parameter_expressions(gm)
        changed |= self.cast_float_leftovers(gm)
        gm.graph.eliminate_dead_code()
        _delete_unused_attributes(gm)
        # Once, for every kernel node: the rules' new nodes and the conv1d fused by an earlier pass.
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in KERNELS:
                node.meta.setdefault("quamba", {})["kernel"] = KERNELS[node.target]
        return PassResult(gm, changed)

    # --- rules: each returns True when it rewrote the graph at `node` ---------------------------

    def lower_linear(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
        """`QuantizedLinear(x_q, s_in[, s_out])` -> `w8a8_linear(x_q, s_in, w, w_scale, bias, s_out)`;
        an `Fp8Linear` likewise -> `fp8_gemm(...)`."""
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), (QuantizedLinear, Fp8Linear)):
            return False
        op = FP8_GEMM if isinstance(gm.get_submodule(node.target), Fp8Linear) else W8A8_LINEAR
        module = gm.get_submodule(node.target)
        x_q, x_scale = node.args[:2]
        out_scale = node.args[2] if len(node.args) > 2 else None
        graph = gm.graph
        with graph.inserting_before(node):
            weight = _get_attr(graph, f"{node.target}.weight", node)
            w_scale = _get_attr(graph, f"{node.target}.weight_scale", node)
            bias = _get_attr(graph, f"{node.target}.bias", node) if module.bias is not None else None
            out_dtype = None if out_scale is not None else self.dtype
            new = graph.call_function(op, (x_q, x_scale, weight, w_scale, bias, out_scale, out_dtype))
        node.replace_all_uses_with(_annotate(new, node))
        graph.erase_node(node)
        return True

    def fuse_scan(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
        """`selective_scan` whose u, delta, B, C, z are dequantized int8 -> `selective_scan_int8`."""
        if not _is(node, SCAN):
            return False
        u, delta, A, B, C, D, z, delta_bias, softplus = _scan_args(node)
        if not all(_is(t, DEQUANTIZE) for t in (u, delta, B, C, z)):
            return False
        (u_q, su), (dt_q, sdt), (b_q, sb), (c_q, sc), (z_q, sz) = (t.args[:2] for t in (u, delta, B, C, z))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                SCAN_INT8, (u_q, su, dt_q, sdt, A, b_q, sb, c_q, sc, D, z_q, sz, delta_bias, softplus, self.dtype))
        node.replace_all_uses_with(_annotate(new, node))
        gm.graph.erase_node(node)
        return True

    def fuse_hadamard_quantize(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
        """`quantize(hadamard(cast(y)), s)` -> `hadamard_quantize(y, s)` (the kernel reads y's dtype);
        `quantize_fp8(...)` of the same, per tensor (the fp8 recipe's) -> `hadamard_quantize_fp8`."""
        if not _fuses_with_hadamard(node):
            return False
        rotation = node.args[0]
        source = _strip_casts(rotation.args[0])
        op = HADAMARD_QUANTIZE_FP8 if _is(node, QUANTIZE_FP8) else HADAMARD_QUANTIZE
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(op, (source, node.args[1]))
        node.replace_all_uses_with(_annotate(new, node))
        gm.graph.erase_node(node)
        return True

    def lower_hadamard(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
        """`hadamard(y)` that no quantize fuses with -> `hadamard_rotate(y)`: the kernel instead of the
        reference's PyTorch butterfly and dense matmul. Rules visit the rotation before its quantize,
        so one that `fuse_hadamard_quantize` will take is left to it."""
        if not _is(node, HADAMARD) or any(_fuses_with_hadamard(user) for user in node.users):
            return False
        node.target = HADAMARD_ROTATE
        return True

    def fuse_norm(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
        """`[quantize](RMSNorm(cast(residual + out)))` -> `add_rmsnorm_quantize(out, residual, ...)`;
        a per-tensor `quantize_fp8` (the fp8 recipe's in_proj input) -> the same op with
        `out_dtype=float8_e4m3fn`.

        The kernel also returns the new residual stream `float(residual + out)`, which replaces the
        add (and fp32 casts of it) for every later user: the next block's residual add reads it.
        """
        if node.op != "call_module" or not _is_rmsnorm(gm.get_submodule(node.target)):
            return False
        module = gm.get_submodule(node.target)
        stream = _strip_casts(node.args[0])
        if _is(stream, operator.add) and info(stream).get("role") == "residual":
            x, residual = stream.args[1], stream.args[0]
        else:
            x, residual = stream, None
        quantize = _fusable_norm_quantize(node)
        # With a scale, out_dtype picks e4m3 or int8 (the kernel ignores any other value).
        out_dtype = FP8_DTYPE if quantize is not None and _is(quantize, QUANTIZE_FP8) else self.dtype
        graph = gm.graph
        with graph.inserting_before(node):
            weight = _get_attr(graph, f"{node.target}.weight", node)
            # The scale's get_attr sits after the norm (where the quantize was inserted): read it anew.
            scale = _get_attr(graph, quantize.args[1].target, node) if quantize is not None else None
            fused = _annotate(
                graph.call_function(ADD_RMSNORM, (x, residual, weight, float(module.variance_epsilon), scale,
                                                  out_dtype)),
                node)
            normed = _annotate(graph.call_function(operator.getitem, (fused, 0)), node)
            stream_out = _annotate(graph.call_function(operator.getitem, (fused, 1)), node)
        order = {n: i for i, n in enumerate(graph.nodes)}
        later = lambda user: order.get(user, -1) > order[stream_out]  # noqa: E731
        for alias in [stream, *[u for u in stream.users if _is_fp32_cast(u)]]:
            alias.replace_all_uses_with(stream_out, delete_user_cb=later)
        (quantize or node).replace_all_uses_with(normed)
        if quantize is not None:
            graph.erase_node(quantize)
        graph.erase_node(node)
        return True

    # --- whole-graph steps ---------------------------------------------------------------------

    def cast_float_leftovers(self, gm: torch.fx.GraphModule) -> bool:
        """Embedding and lm_head weights to `dtype` (ties kept); the cast before lm_head follows."""
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if not isinstance(module, (nn.Embedding, nn.Linear)) or module.weight.dtype == self.dtype:
                continue
            module.to(self.dtype)
            changed = True
        head = next((n for n in gm.graph.nodes if n.op == "call_module" and info(n).get("role") == "lm_head"), None)
        if head is not None:
            embedding = next(m for m in gm.modules() if isinstance(m, nn.Embedding))
            lm_head = gm.get_submodule(head.target)
            if lm_head.weight.shape == embedding.weight.shape and torch.equal(lm_head.weight, embedding.weight):
                lm_head.weight = embedding.weight  # tied in the source model: keep one copy
            cast = head.args[0]
            if _is_cast(cast):
                cast.args = (cast.args[0], self.dtype) if cast.target == "to" else cast.args
        return changed


def _scan_args(node: torch.fx.Node) -> list:
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus"]
    defaults = [None, None, None, None, None, None, None, None, True]
    values = list(node.args) + defaults[len(node.args):]
    for i, name in enumerate(names):
        if name in node.kwargs:
            values[i] = node.kwargs[name]
    return values


def _evaluate(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    if node.op == "get_attr":
        return fetch_attr(gm, node.target)
    args = torch.fx.node.map_arg(node.args, lambda n: _evaluate(gm, n))
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: _evaluate(gm, n))
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def fold_parameter_expressions(gm: torch.fx.GraphModule) -> bool:
    """Evaluate expressions of parameters only (`-exp(A_log.float())`, `D.float()`) once.

    Each maximal such expression becomes a buffer next to the parameter it reads (`A_log` ->
    `A_log_folded_<node>`), read by one get_attr: at batch-1 decode every kernel launch counts. A
    lowered graph is for running; change parameters on the reference graph and lower again.
    """
    constant: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif (node.op in ("call_method", "call_function") and op_name(node) in _FOLDABLE
              and node.all_input_nodes and all(n in constant for n in node.all_input_nodes)):
            constant.add(node)
    changed = False
    with torch.no_grad():
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" or node not in constant or all(u in constant for u in node.users):
                continue
            source = next(n for n in node.all_input_nodes)
            while source.op != "get_attr":
                source = source.all_input_nodes[0]
            owner_path, _, param = source.target.rpartition(".")
            name = f"{param}_folded_{node.name}"
            gm.get_submodule(owner_path).register_buffer(name, _evaluate(gm, node).detach().clone())
            with gm.graph.inserting_before(node):
                folded = _annotate(gm.graph.get_attr(f"{owner_path}.{name}"), node)
            node.replace_all_uses_with(folded)
            changed = True
    return changed


def _delete_unused_attributes(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)


# ---------------------------------------------------------------------------------------------
# Cached graphs for generation
# ---------------------------------------------------------------------------------------------

CONV_CACHED = torch.ops.quamba.conv1d_silu_int8_cached.default
SCAN_INT8_CACHED = torch.ops.quamba.selective_scan_int8_cached.default
DT_PROJ_STATE_UPDATE = torch.ops.quamba.dt_proj_state_update.default


def fuse_dt_proj_into_state_update(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Decode only: `selective_scan_int8_cached(u, .., transpose(w8a8_linear(x, xs, w, ws, b, s)), s,
    .., decode=True)`, dt_proj's int8 output feeding nothing else -> `dt_proj_state_update(u, ..,
    x, xs, w, ws, b, s, ..)`: the scan kernel computes delta itself, one launch a block fewer."""
    if not _is(node, SCAN_INT8_CACHED) or node.args[-1] is not True:
        return False
    u, su, delta, delta_scale, *rest, state, _decode = node.args
    if not (isinstance(delta, torch.fx.Node) and delta.op == "call_method" and delta.target == "transpose"
            and tuple(delta.args[1:]) == (1, 2) and len(delta.users) == 1):
        return False
    linear = delta.args[0]
    if not _is(linear, W8A8_LINEAR) or len(linear.users) != 1 or linear.kwargs or len(linear.args) < 6:
        return False
    x, xs, w, ws, bias, out_scale = linear.args[:6]
    if out_scale is not delta_scale:  # an int8 delta, the scale the scan reads it with
        return False
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(DT_PROJ_STATE_UPDATE, (u, su, x, xs, w, ws, bias, delta_scale, *rest, state))
    fused.meta["quamba"] = {**info(node), "kernel": "triton:dt_proj_state_update"}
    node.replace_all_uses_with(fused)
    for dead in (node, delta, linear):
        gm.graph.erase_node(dead)
    return True


IN_PROJ_CONV_UPDATE = torch.ops.quamba.in_proj_conv_update.default


def fuse_conv_into_in_proj(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Decode only: `conv1d_silu_int8_cached(chunk(transpose(w8a8_linear(.., s)), 2, dim=1)[0], s,
    .., decode=True)`, in_proj's int8 output at the scale the conv reads -> `in_proj_conv_update`,
    whose two results replace in_proj's output and the conv's: at batch 1 the GEMV's epilogue
    runs the conv step, one launch a block fewer."""
    if not _is(node, CONV_CACHED) or node.args[-1] is not True:
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
    if not _is(linear, W8A8_LINEAR) or linear.kwargs or len(linear.args) < 6 or linear.args[5] is not x_scale:
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


def cached_graph(lowered: torch.fx.GraphModule, decode: bool) -> torch.fx.GraphModule:
    """The prefill (`decode=False`) or one-token decode graph of a lowered graph.

    The result is called as `gm(input_ids, conv_states, ssm_states)` with one cache tensor per block
    in each list (see `quamba_fx.runtime.MambaCache`); the conv1d and scan nodes become their
    `*_cached` ops, which read and write those tensors in place. In the decode graph dt_proj then
    moves into the scan's kernel (`fuse_dt_proj_into_state_update`) and the conv step into
    in_proj's (`fuse_conv_into_in_proj`). Shares modules with `lowered`.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    conv_states = ssm_states = None
    for node in lowered.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
            if conv_states is None:
                conv_states = graph.placeholder("conv_states")
                ssm_states = graph.placeholder("ssm_states")
            continue
        if _is(node, FUSED_CONV) or _is(node, SCAN_INT8):
            cached_op, states = (CONV_CACHED, conv_states) if _is(node, FUSED_CONV) else (SCAN_INT8_CACHED, ssm_states)
            state = graph.call_function(operator.getitem, (states, info(node)["block"]))
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            env[node] = graph.call_function(cached_op, (*args, state, decode))
            env[node].meta["quamba"] = {**info(node), "kernel": KERNELS[node.target] + ("_update" if decode else "")}
            state.meta["quamba"] = {**info(node)}
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    gm = torch.fx.GraphModule(lowered, graph, class_name="CachedMambaGraph")
    # A copy, not the lowered graph's object: the two graphs differ in `cached`.
    set_graph_meta(gm, (find_graph_meta(lowered) or GraphMeta()).replace(cached="decode" if decode else "prefill"))
    if decode:
        run_rules(gm, [fuse_dt_proj_into_state_update, fuse_conv_into_in_proj])
        _delete_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
    return gm

