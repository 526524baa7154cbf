"""Passes that turn a calibrated float graph into the W8A8 reference graph.

1. `InsertQuantDequant`: after every tapped activation, a `quantize -> dequantize` pair reading the
   tap's scale buffer. Numerically this is the fake-quantized model.
2. `SinkDequantize`: a rule table run to a fixpoint. Dequantize commutes with ops that only move
   data, so it is pushed past them: layout ops then act on int8 tensors, and every dequantize sits
   right before the compute op that consumes it (the form fusion passes match).
3. `LowerLinears`: `dequantize -> Linear [-> quantize]` becomes one `QuantizedLinear` call with int8
   weights, reading int8 activations and, where the output is requantized, writing int8; behind a
   `dequantize_fp8` (a `float8_e4m3` tap), an `Fp8Linear` with e4m3 weights instead. A recipe with
   4-bit weights (`WeightSpec(bits=4)`) gets a `W4A8Linear` there, and its Linears that no tap
   feeds become weight-only `W4A16Linear`s; with `embedding_and_head`, the LM head becomes a
   `W4A16Linear` and the token embedding a `W4Embedding` (`quantize_embedding_and_head`). A W8A8
   head (`Recipe.head`) tied to the embedding shares its int8 table with an `Int8Embedding`.

Each tap's spec dtype picks its quantize/dequantize pair (`QDQ_OPS`).
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from tqdm.auto import tqdm

from ..arch import arch_of
from ..graph_info import info, module_call, op_name
from ..quant import fp8 as _fp8_ops  # noqa: F401  (registers torch.ops.quamba.quantize_fp8 and friends)
from ..quant.fp8_linear import Fp8Linear
from ..quant.int4_linear import W4A8Linear, W4A16Linear, W4Embedding
from ..quant.linear import Int8Embedding, QuantizedLinear
from ..recipe import block_paths, head_input_node, head_path, head_scale_path, tap_node
from ..recipes.spec import PER_CHANNEL_8BIT, WeightSpec
from .rewrite import Rule, run_rules

QUANTIZE = torch.ops.quamba.quantize.default
DEQUANTIZE = torch.ops.quamba.dequantize.default
QUANTIZE_FP8 = torch.ops.quamba.quantize_fp8.default
DEQUANTIZE_FP8 = torch.ops.quamba.dequantize_fp8.default

# A recipe spec's activation dtype -> the (quantize, dequantize) ops that encode it.
QDQ_OPS = {"int8": (QUANTIZE, DEQUANTIZE), "float8_e4m3": (QUANTIZE_FP8, DEQUANTIZE_FP8)}
# The dequantize feeding a float Linear -> the quantized Linear that replaces both.
LINEAR_FOR = {DEQUANTIZE: QuantizedLinear, DEQUANTIZE_FP8: Fp8Linear}

# Ops that move data without changing values or dtype: a dequantize may move past them.
_SINKABLE = {"transpose", "permute", "view", "reshape", "contiguous", "chunk", "split", "getitem",
             "unsqueeze", "squeeze", "flatten", "select", "narrow", "t", "expand"}
_MULTI_OUTPUT = {"chunk", "split"}


def _is(node: torch.fx.Node, target) -> bool:
    return node.op == "call_function" and node.target is target


def _meta_like(new: torch.fx.Node, like: torch.fx.Node, **extra) -> torch.fx.Node:
    new.meta["quamba"] = {**info(like), **extra}
    return new


class InsertQuantDequant(PassBase):
    """Insert `quantize -> dequantize` after each tapped activation, at its calibrated scale.

    `scales` maps a buffer path (`backbone.layers.0.mixer.conv1d.output_scale`) to its scale; the
    pass registers each as an fp32 buffer on its module, so scales live in the state dict and can be
    changed in place without recompiling. A tap in `per_channel` (tap keys) takes a `[C]` buffer,
    one scale a channel along the axis its architecture names (`ArchSpec.channel_layout`): from a
    list of C scales, or one number repeated (the placeholders a checkpoint's tensors load into).
    With `head` (a recipe's `Recipe.head`), the LM head's input gets an int8 pair too, at the scale
    `scales` holds for `lm_head.input_scale` (`recipe.head_scale_key`).
    """

    def __init__(self, scales: dict[str, float | list[float]], taps, dtypes: dict[str, str] | None = None,
                 per_channel: frozenset[str] | set[str] = frozenset(), head: bool = False):
        super().__init__()
        self.scales = scales
        self.taps = taps
        # tap key (`mixer.conv1d.output_scale`) -> spec dtype; a tap not named is int8.
        self.dtypes = dtypes or {}
        self.per_channel = per_channel
        self.head = head

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        for path in block_paths(gm):
            for tap in self.taps:
                key = f"{path}.{tap.module}.{tap.scale}"
                node = tap_node(gm, path, tap)
                value, axis = self._scale(key), ()
                if tap.key in self.per_channel:
                    channel_axis, channels, _ = arch_of(gm).channel_layout(gm, path, tap)
                    if not isinstance(value, (list, tuple)):
                        value = [value] * channels
                    elif len(value) != channels:
                        raise ValueError(f"{key}: {len(value)} per-channel scales for {channels} channels")
                    axis = (channel_axis,)
                _insert_pair(gm, node, key, value, self.dtypes.get(tap.key, "int8"), axis)
        head = head_path(gm) if self.head else None
        if head is not None:
            key = head_scale_path(head)
            _insert_pair(gm, head_input_node(gm), key, self._scale(key), "int8", ())
        return PassResult(gm, True)

    def _scale(self, key: str) -> float | list[float]:
        if key not in self.scales:
            raise KeyError(f"no calibrated scale for {key}")
        return self.scales[key]


def _insert_pair(gm: torch.fx.GraphModule, node: torch.fx.Node, key: str, value: float | list[float], dtype: str,
                 axis: tuple[int, ...]) -> None:
    """`node` -> `dequantize(quantize(node, s), s)` for all of its users, `s` a new fp32 buffer at
    `key` holding `value`, the pair `dtype`'s (`QDQ_OPS`), along `axis` for a per-channel scale."""
    quantize_op, dequantize_op = QDQ_OPS[dtype]
    owner_path, _, name = key.rpartition(".")
    gm.get_submodule(owner_path).register_buffer(name, torch.tensor(value, dtype=torch.float32,
                                                                     device=_device_of(gm)))
    float_dtype = getattr(node.meta.get("tensor_meta"), "dtype", torch.float32)
    with gm.graph.inserting_after(node):
        scale = _meta_like(gm.graph.get_attr(key), node)
    with gm.graph.inserting_after(scale):
        q = _meta_like(gm.graph.call_function(quantize_op, (node, scale, *axis)), node, scale=key)
    with gm.graph.inserting_after(q):
        dq = _meta_like(gm.graph.call_function(dequantize_op, (q, scale, float_dtype, *axis)), node, scale=key)
    node.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not q)


def _device_of(gm: torch.fx.GraphModule) -> torch.device:
    return next(iter(gm.parameters())).device




def _rank(node: torch.fx.Node) -> int | None:
    """The rank of `node`'s value (the first one's for a split), from its shape metadata."""
    meta = node.meta.get("tensor_meta")
    if not hasattr(meta, "shape") and isinstance(meta, (tuple, list)) and meta:  # a split's: one a part
        meta = meta[0]
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def _channel_axis_after(node: torch.fx.Node, axis: int) -> tuple[int, list[int] | None] | None:
    """Where a per-channel dequantize's channel `axis` lies after the layout op `node`, and for a
    split along it the split's sizes (each part then takes its channels' scales); None where the
    dequantize must stay (any other op, or ranks unknown)."""
    rank = _rank(node)
    if rank is None:
        return None
    name = op_name(node)
    if name == "transpose" and len(node.args) == 3 and not node.kwargs:
        d0, d1 = (d % rank for d in node.args[1:])
        return (d1 if axis == d0 else d0 if axis == d1 else axis), None
    if name == "split":
        sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int):
            return None
        if dim % rank != axis:
            return axis, None
        if isinstance(sizes, (list, tuple)) and all(isinstance(v, int) for v in sizes):
            return axis, list(sizes)
    return None


def sink_dequantize_past_layout(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """`layout(dequantize(q, s))` -> `dequantize(layout(q), s)`; for chunk/split, per getitem. A
    per-channel dequantize (`dequantize(q, s, dtype, axis)`) moves only past a transpose (its axis
    follows) and a split (split along the channel axis, each part takes a narrowed view of `s`)."""
    if node.op not in ("call_method", "call_function") or op_name(node) not in _SINKABLE:
        return False
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or not (_is(source, DEQUANTIZE) or _is(source, DEQUANTIZE_FP8)):
        return False
    if op_name(node) in _MULTI_OUTPUT and not all(_is(u, operator.getitem) for u in node.users):
        return False
    q, scale, dtype, *axis = source.args
    sizes = None
    if axis:
        after = _channel_axis_after(node, axis[0])
        if after is None:
            return False
        axis, sizes = [after[0]], after[1]
    graph = gm.graph
    with graph.inserting_after(node):
        moved = _meta_like(graph.create_node(node.op, node.target, (q, *node.args[1:]), dict(node.kwargs)), node)
    if op_name(node) in _MULTI_OUTPUT:
        for user in list(node.users):
            with graph.inserting_after(user):
                item = _meta_like(graph.call_function(operator.getitem, (moved, user.args[1])), user)
            part_scale = scale
            if sizes is not None:  # this part's channels: a view, so an in-place scale edit reaches it
                index = user.args[1]
                with graph.inserting_after(item):
                    part_scale = _meta_like(graph.call_function(torch.narrow, (scale, 0, sum(sizes[:index]),
                                                                               sizes[index])), user)
            with graph.inserting_after(part_scale if sizes is not None else item):
                dq = _meta_like(graph.call_function(source.target, (item, part_scale, dtype, *axis)), user,
                                **_scale_of(source))
            user.replace_all_uses_with(dq)
            graph.erase_node(user)
    else:
        with graph.inserting_after(moved):
            dq = _meta_like(graph.call_function(source.target, (moved, scale, dtype, *axis)), node,
                            **_scale_of(source))
        node.replace_all_uses_with(dq)
    graph.erase_node(node)
    if not source.users:
        graph.erase_node(source)
    return True


def _scale_of(node: torch.fx.Node) -> dict:
    return {"scale": info(node)["scale"]} if "scale" in info(node) else {}




def fold_cast_into_dequantize(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """`dequantize(q, s, dtype).to(other)` -> `dequantize(q, s, other)`: one rounding of the fp32
    products instead of two (none where the dtypes agree), and a quantized Linear behind the cast
    must see its dequantize (the head's `norm_f(x).to(weight.dtype)`)."""
    if not (node.op == "call_method" and node.target == "to" and len(node.args) == 2 and not node.kwargs
            and isinstance(node.args[1], torch.dtype) and node.args[1].is_floating_point):
        return False
    source = node.args[0]
    if not (isinstance(source, torch.fx.Node) and source.op == "call_function" and source.target in LINEAR_FOR):
        return False
    q, scale, _, *axis = source.args
    with gm.graph.inserting_after(node):
        folded = _meta_like(gm.graph.call_function(source.target, (q, scale, node.args[1], *axis)), node,
                            **_scale_of(source))
    node.replace_all_uses_with(folded)
    gm.graph.erase_node(node)
    if not source.users:
        gm.graph.erase_node(source)
    return True


class SinkDequantize(PassBase):
    """Push every dequantize past the layout ops after it (see `sink_dequantize_past_layout`), and
    fold the casts after it into it (`fold_cast_into_dequantize`)."""

    rules: list[Rule] = [sink_dequantize_past_layout, fold_cast_into_dequantize]

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        return PassResult(gm, run_rules(gm, self.rules))


class _WeightPlan:
    """Which Linears (full module paths) a recipe gives 4-bit weights, and the GPTQ input Hessians
    of those that have them (round-to-nearest for the rest)."""

    def __init__(self, gm: torch.fx.GraphModule, weights: WeightSpec, hessians: dict[str, torch.Tensor] | None,
                 progress: bool = False):
        self.weights = weights
        self.int4 = set(weights.int4_linears(block_paths(gm)))
        self.hessians = hessians or {}
        # GPTQ takes seconds a Linear on a large model: a bar when asked for and there is any.
        head = head_path(gm) if weights.embedding_and_head else None
        count = sum(target in self.hessians for target in (*self.int4, head))
        self.bar = tqdm(total=count, desc="GPTQ", unit="linear", disable=not (progress and count))

    def int4_linear(self, cls: type, target: str, linear: torch.nn.Linear) -> torch.nn.Module:
        module = cls.from_float(linear, self.weights.group_size, self.hessians.get(target))
        if target in self.hessians:
            self.bar.update(1)
        return module


def lower_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, plan: _WeightPlan | None = None) -> bool:
    """`dequantize(q, s_in) -> Linear [-> quantize(., s_out)]` -> `QuantizedLinear(q, s_in[, s_out])`.

    An e4m3 input (`dequantize_fp8`) gives an `Fp8Linear` instead, and a Linear the recipe gives
    4-bit weights a `W4A8Linear`; the requantization it absorbs is always the int8 one (an int8
    boundary such as conv1d's input follows the Linear).
    """
    if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), torch.nn.Linear):
        return False
    source = node.args[0]
    if not (isinstance(source, torch.fx.Node) and source.op == "call_function" and source.target in LINEAR_FOR):
        return False
    q, in_scale, _ = source.args
    linear = gm.get_submodule(node.target)
    if plan is not None and node.target in plan.int4:
        if source.target is not DEQUANTIZE:
            raise ValueError(f"{node.target}: 4-bit weights take int8 or float inputs, but its input is "
                             f"{op_name(source)}; give its input tap the int8 dtype")
        gm.set_submodule(node.target, plan.int4_linear(W4A8Linear, node.target, linear))
    else:
        gm.set_submodule(node.target, LINEAR_FOR[source.target].from_float(linear))
    requant = [u for u in node.users if _is(u, QUANTIZE)]
    graph = gm.graph
    if len(requant) == 1 and len(node.users) == 1:
        out_scale = requant[0].args[1]
        with graph.inserting_after(requant[0]):
            fused = _meta_like(graph.call_module(node.target, (q, in_scale, out_scale)), node,
                               **_scale_of(requant[0]))
        requant[0].replace_all_uses_with(fused)
        graph.erase_node(requant[0])
    else:
        with graph.inserting_after(node):
            fused = _meta_like(graph.call_module(node.target, (q, in_scale)), node)
        node.replace_all_uses_with(fused)
    graph.erase_node(node)
    if not source.users:
        graph.erase_node(source)
    return True


def quantize_weights_only(gm: torch.fx.GraphModule, node: torch.fx.Node, plan: _WeightPlan) -> bool:
    """`Linear(x)` with float `x`, on a module the recipe gives 4-bit weights -> `W4A16Linear(x)`."""
    if node.op != "call_module" or node.target not in plan.int4 or type(gm.get_submodule(node.target)) is not torch.nn.Linear:
        return False
    source = node.args[0]
    if isinstance(source, torch.fx.Node) and source.op == "call_function" and source.target in LINEAR_FOR:
        return False  # lower_linear's: the input is quantized
    gm.set_submodule(node.target, plan.int4_linear(W4A16Linear, node.target, gm.get_submodule(node.target)))
    return True


def quantize_embedding_and_head(gm: torch.fx.GraphModule, plan: _WeightPlan, embedding_node: torch.fx.Node | None,
                                head_node: torch.fx.Node | None, tied: bool) -> bool:
    """The float token embedding -> `W4Embedding` and the float LM head -> weight-only
    `W4A16Linear` (its input is no tap's), in `plan`'s groups: the head with GPTQ where the plan
    has its Hessian, the embedding rounded to nearest. A head tied to the embedding (one tensor in
    the source model) and rounded to nearest is the embedding's table, so the two keep one packed
    tensor; a GPTQ head gets a table of its own. Measured on mamba-bytes-wt2 (quamba2-w4a16,
    docs/benchmarks.md, session 54), bits per byte against fp32: one rounded table +0.43%, one
    GPTQ table read by both +0.34%, a GPTQ head beside a rounded embedding +0.31% (and on a random
    mamba-tiny the shared GPTQ table was worse than rounding: GPTQ spends the rows' own accuracy
    on the head's outputs, which lookups do not share). `embedding_node` and `head_node` are the
    float modules' calls (`graph_info.module_call`), `tied` whether they hold one tensor."""
    embedding = gm.get_submodule(embedding_node.target) if embedding_node is not None else None
    head = gm.get_submodule(head_node.target) if head_node is not None else None
    if head is not None:
        quantized_head = plan.int4_linear(W4A16Linear, head_node.target, head)
        gm.set_submodule(head_node.target, quantized_head)
        if tied and head_node.target not in plan.hessians:
            gm.set_submodule(embedding_node.target, W4Embedding.sharing(quantized_head))
            return True
    if embedding is not None:
        gm.set_submodule(embedding_node.target, W4Embedding.from_float(embedding, plan.weights.group_size))
    return embedding is not None or head is not None


class LowerLinears(PassBase):
    """Replace every float Linear fed by a dequantize with a quantized Linear (`QuantizedLinear`,
    `Fp8Linear` or `W4A8Linear`), and every other Linear that `weights` gives 4-bit weights with a
    `W4A16Linear`, and with `weights.embedding_and_head` the embedding and head as well
    (`quantize_embedding_and_head`). `hessians` maps a Linear's module path to its GPTQ input
    Hessian; 4-bit Linears without one are rounded to nearest. `progress` shows a bar over the GPTQ
    Linears."""

    def __init__(self, weights: WeightSpec = PER_CHANNEL_8BIT, hessians: dict[str, torch.Tensor] | None = None,
                 progress: bool = False):
        super().__init__()
        self.weights = weights
        self.hessians = hessians
        self.progress = progress

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        plan = _WeightPlan(gm, self.weights, self.hessians, self.progress)
        rules = [functools.partial(lower_linear, plan=plan), functools.partial(quantize_weights_only, plan=plan)]
        embedding_node = module_call(gm, "embedding", torch.nn.Embedding)
        head_node = module_call(gm, "lm_head", torch.nn.Linear)
        # Read before the rules swap the head out: whether the float model holds one tensor for both.
        tied = (embedding_node is not None and head_node is not None and
                gm.get_submodule(embedding_node.target).weight is gm.get_submodule(head_node.target).weight)
        try:
            changed = run_rules(gm, rules)
            if self.weights.embedding_and_head:
                changed |= quantize_embedding_and_head(gm, plan, embedding_node, head_node, tied)
        finally:
            plan.bar.close()
        if tied and type(head := gm.get_submodule(head_node.target)) is QuantizedLinear:
            # A W8A8 head (`Recipe.head`) tied to the embedding: one int8 table for both, as the
            # float model had one tensor, rather than an int8 copy beside the float table.
            gm.set_submodule(embedding_node.target, Int8Embedding.sharing(head))
        return PassResult(gm, changed)
