"""Lower the W8A8 reference graph to GPU kernels: a rule table run to a fixpoint.

Each rule matches one reference subgraph and replaces it with one kernel op, defined at the end of
its kernel's module in `quamba_fx.kernels`, recording the kernel in `node.meta["quamba"]["kernel"]`
(the dump shows it).
The rules live beside each other in `passes/lowering`, one file per kernel; this module runs them,
folds parameter expressions, casts the float leftovers, and derives the cached graphs:

| reference subgraph                                        | kernel op                      |
|-----------------------------------------------------------|--------------------------------|
| `QuantizedLinear` (int8_linear)                            | `w8a8_linear` (int8 GEMM)      |
| `Fp8Linear` (fp8_linear)                                  | `fp8_gemm` (e4m3 GEMM)         |
| `W4A16Linear` / `W4A8Linear` (4-bit weights)              | `w4a16_gemm` / `w4a8_gemm`     |
| float `conv1d -> [..., :L] -> SiLU` (by `conv_fusion`)     | `conv1d_silu` (reference)      |
| `selective_scan(dequantize(u), ..., dequantize(z))`        | `selective_scan_int8`          |
| that, its delta dt_proj's alone (FUSE_DT_PROJ_IN_PREFILL)  | `selective_scan_int8_dt_proj`  |
| `quantize(hadamard(y), s)`                                 | `hadamard_quantize`            |
| `quantize_fp8(hadamard(y), s)` (per tensor)                | `hadamard_quantize_fp8`        |
| `hadamard(y)` that no quantize above takes                 | `hadamard_rotate`              |
| `[quantize](RMSNorm(residual + out))`                      | `add_rmsnorm_quantize`         |
| `quantize_fp8(RMSNorm(residual + out))` (per tensor)       | `add_rmsnorm_quantize` (e4m3)  |
| Mamba-2's `norm(y, [dequantize](z))` (gated RMSNorm)       | `gated_rmsnorm`                |
| expressions of parameters only (`-exp(A_log.float())`)     | folded into a buffer           |
| `float(lm_head(x))`, lm_head cast to fp16 / bf16           | `logits_linear` (fp32 out)     |

The conv1d must already be fused (`passes.conv_fusion`; `quamba_fx.flows.lower` runs both). Float leftovers (embedding, lm_head) and the
activations between kernels are cast to `dtype` (fp16 by default); the residual stream stays fp32.
The scan computes in fp32; the decode cache keeps its state in `state_dtype` (recorded as
`graph_meta(gm).state_dtype`, read by `ssm_state_dtype`): by default fp16 for the fp16
lowering, as mamba_ssm does (it halves the state read and written every decode step), and fp32
otherwise (bf16's 8-bit mantissa is too coarse for a recurrent state; an fp32 lowering stays the
exact option). The result computes what the reference graph computes up to the kernels' documented
rounding differences; `cached_graph` derives the prefill and decode graphs of generation from it,
and fuses further in the decode graph (`lowering.DECODE_RULES`: in_proj with the conv step, dt_proj
with the scan step, Mamba-2's gated norm with the Hadamard quantize or rotation), where a step's
time is its launches more than its bytes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import InputError, InvalidArgumentError
from ..graph_info import fetch_attr, info, op_name
from ..graph_meta import GraphMeta, find_graph_meta, set_graph_meta
from . import lowering
from .lowering.gemm import CONV_CACHED, FP8_GEMM, IN_PROJ_CONV_UPDATE, W8A8_LINEAR, fuse_conv_into_in_proj
from .lowering.hadamard import HADAMARD, HADAMARD_QUANTIZE, HADAMARD_QUANTIZE_FP8, HADAMARD_ROTATE
from .lowering.match import annotate, is_call, is_cast
from .lowering.norm import ADD_RMSNORM
from .lowering.scan import (DT_PROJ_SCAN_INT8, DT_PROJ_SCAN_INT8_CACHED, DT_PROJ_STATE_UPDATE, SCAN, SCAN_INT8,
                            SCAN_INT8_CACHED, SSD_SCAN, SSD_SCAN_CACHED, SSD_SCAN_TRITON, SSD_SCAN_TRITON_CACHED,
                            fuse_dt_proj_into_state_update)
from .conv_fusion import FLOAT_CONV, FUSED_CONV
from .rewrite import run_rules

# Kernel op -> the kernel that runs it (each kernel's file in passes/lowering says).
KERNELS = lowering.KERNELS

__all__ = [
    "ADD_RMSNORM", "CONV_CACHED", "DT_PROJ_SCAN_INT8", "DT_PROJ_STATE_UPDATE", "FP8_GEMM", "FUSED_CONV", "HADAMARD",
    "HADAMARD_QUANTIZE", "HADAMARD_QUANTIZE_FP8", "HADAMARD_ROTATE", "IN_PROJ_CONV_UPDATE", "KERNELS", "SCAN", "SCAN_INT8",
    "SCAN_INT8_CACHED", "W8A8_LINEAR", "LowerToKernels", "cached_graph", "conv_state_dtype", "fold_parameter_expressions",
    "fuse_conv_into_in_proj", "fuse_dt_proj_into_state_update", "resolve_state_dtype", "ssm_state_dtype",
]

# Ops a parameter-only expression may consist of (folded once at lowering time).
_FOLDABLE = {"float", "to", "exp", "neg", "half", "contiguous"}


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
        changed = run_rules(gm, lowering.rules(self.dtype))
        changed |= fold_parameter_expressions(gm)
        changed |= self.cast_float_leftovers(gm)
        changed |= run_rules(gm, lowering.HEAD_RULES)
        gm.graph.eliminate_dead_code()
        _delete_unused_attributes(gm)
        # Once, for every kernel node: the rules' new nodes and the conv1d fused by an earlier pass.
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in KERNELS:
                node.meta.setdefault("quamba", {})["kernel"] = KERNELS[node.target]
        return PassResult(gm, changed)

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
        # The head: a float Linear, or the GEMM a 4-bit head (`W4A16Linear`) was lowered to.
        head = next((n for n in gm.graph.nodes if n.op in ("call_module", "call_function")
                     and info(n).get("role") == "lm_head" and n.args and isinstance(n.args[0], torch.fx.Node)), None)
        if head is not None:
            embedding = next((m for m in gm.modules() if isinstance(m, nn.Embedding)), None)
            lm_head = gm.get_submodule(head.target) if head.op == "call_module" else None
            if (isinstance(lm_head, nn.Linear) and embedding is not None and lm_head.weight.shape == embedding.weight.shape
                    and torch.equal(lm_head.weight, embedding.weight)):
                lm_head.weight = embedding.weight  # tied in the source model: keep one copy
            cast = head.args[0]
            if is_cast(cast):
                cast.args = (cast.args[0], self.dtype) if cast.target == "to" else cast.args
        return changed


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
                folded = annotate(gm.graph.get_attr(f"{owner_path}.{name}"), node)
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

FLOAT_CONV_CACHED = torch.ops.quamba.conv1d_silu_cached.default
SCAN_CACHED = torch.ops.quamba.selective_scan_cached.default

# Op -> (its cached form, the cache it reads: "conv" or "ssm").
_CACHED_FORMS = {FUSED_CONV: (CONV_CACHED, "conv"), SCAN_INT8: (SCAN_INT8_CACHED, "ssm"),
                 DT_PROJ_SCAN_INT8: (DT_PROJ_SCAN_INT8_CACHED, "ssm"),
                 SSD_SCAN: (SSD_SCAN_CACHED, "ssm"), SSD_SCAN_TRITON: (SSD_SCAN_TRITON_CACHED, "ssm"),
                 FLOAT_CONV: (FLOAT_CONV_CACHED, "conv"), SCAN: (SCAN_CACHED, "ssm")}


def conv_state_dtype(gm: torch.fx.GraphModule) -> torch.dtype:
    """The dtype of a lowered graph's conv1d cache: int8 for the fused int8 conv (it keeps the
    quantized inputs), else the dtype of the float conv's weight (the activations' dtype)."""
    for node in gm.graph.nodes:
        if is_call(node, FLOAT_CONV) or is_call(node, FLOAT_CONV_CACHED):
            return fetch_attr(gm, node.args[1].target).dtype
    return torch.int8


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
        cached = next(((op, kind) for target, (op, kind) in _CACHED_FORMS.items() if is_call(node, target)), None)
        if cached is not None:
            cached_op, kind = cached
            state = graph.call_function(operator.getitem, (conv_states if kind == "conv" else ssm_states,
                                                           info(node)["block"]))
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            env[node] = graph.call_function(cached_op, (*args, state, decode))
            kernel = KERNELS.get(node.target, "reference")
            env[node].meta["quamba"] = {**info(node), "kernel": kernel + ("_update" if decode else "")}
            state.meta["quamba"] = {**info(node)}
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    gm = torch.fx.GraphModule(lowered, graph, class_name="CachedMambaGraph")
    # A copy, not the lowered graph's object: the two graphs differ in `cached`.
    set_graph_meta(gm, (find_graph_meta(lowered) or GraphMeta()).replace(cached="decode" if decode else "prefill"))
    if decode:
        run_rules(gm, lowering.DECODE_RULES)
        _delete_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
    return gm

