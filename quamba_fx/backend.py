"""`torch.compile(model, backend="quamba")`: verify Mamba graphs, then compile them with Inductor.

The backend is registered twice over, so that it works without importing quamba_fx first: the
`torch_dynamo_backends` entry point in pyproject.toml (torch loads this module on first use of the
name) and `register_backend` when this module is imported (for source checkouts without the entry
point). See docs/compile.md for the user guide.

What dynamo hands a backend is not our capture graph: modules are inlined (a Linear becomes a
`linear` call, a QuantizedLinear a `quamba.int8_linear` call), parameters and buffers are graph
inputs, and our `node.meta["quamba"]` annotations are gone. `annotate` rebuilds them from what
dynamo does record (`nn_module_stack`, and the source of each input), so `verify_topology` runs on it.
Three kinds of graph arrive:

* "quamba": traced from a quamba_fx GraphModule (it holds `torch.ops.quamba.*` nodes): fully
  verified, optionally fused, compiled by Inductor;
* "hf": traced from Hugging Face's own MambaMixer (the scan decomposed into dozens of ops):
  partially verified, compiled by Inductor unchanged, with a warning that nothing was quantized;
* anything else, or a graph our analysis rejects or trips on: one warning, then the fallback.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx

from .arch import arch_named, arch_names
from .checkpoint import from_pretrained
from .errors import InvalidArgumentError, QuambaError, TopologyError
from .flows import fuse
from .graph_info import META_KEY, is_kind, op_name
from .graph_meta import GraphMeta, graph_meta, set_graph_meta
from .passes.conv_fusion import fuse_conv1d_silu
from .passes.rewrite import run_rules
from .passes.verify import TopologyChecker, verify_topology

BACKEND_NAME = "quamba"
DEFAULT_OPTIONS: dict[str, Any] = {"verify": True, "fallback": "inductor", "fuse": False, "checkpoint": None}

# Module names (the last component of a Hugging Face module path) that name a node's role.
_ROLES = {"embeddings", "norm", "in_proj", "conv1d", "x_proj", "dt_proj", "out_proj", "norm_f", "lm_head"}
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class QuambaBackendWarning(UserWarning):
    """Issued once per distinct reason when the backend falls back or compiles a graph unchanged."""


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # Dynamo recompiles a frame for every new shape or guard failure; one warning per reason is enough.
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, QuambaBackendWarning, stacklevel=2)


def reset_warnings() -> None:
    """Forget which warnings were issued (`torch._dynamo.reset()` calls this too)."""
    _warned.clear()


class _Fallback(Exception):
    """Raised by the analysis to abandon the quamba path; the message is the warning's reason."""


# ---------------------------------------------------------------------------------------------
# Reading dynamo's graph
# ---------------------------------------------------------------------------------------------


def module_path(text: str) -> str:
    """A dynamo source or `nn_module_stack` path as a Hugging Face module path.

    `getattr(L['self'].backbone.layers, '0').mixer.conv1d` and
    `L['args'][0]._modules['backbone']._modules['layers']._modules['0']._parameters['weight']`
    become `backbone.layers.0.mixer.conv1d` and `backbone.layers.0.weight`.
    """
    previous = None
    while previous != text:  # innermost first: getattr(getattr(x, '0'), '1')
        previous, text = text, re.sub(r"getattr\(([^()]*), '([^']+)'\)", r"\1.\2", text)
    text = re.sub(r"^[LG]\['[^']*'\](?:\[\d+\])?", "", text)  # the frame's local: L['self'], L['args'][0]
    text = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", text)
    text = re.sub(r"\[(\d+)\]", r".\1", text)
    return text.strip(".")


def _source_name(node: torch.fx.Node) -> str | None:
    """Where dynamo got a placeholder's value from (`L['self']._modules[...]._parameters['weight']`)."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name  # a method in older torch, a property in 2.13


def _state_name(node: torch.fx.Node) -> str | None:
    """The parameter/buffer path a placeholder reads (`backbone.layers.0.mixer.conv1d.weight`), if any."""
    source = _source_name(node) if node.op == "placeholder" else None
    if source is None or not re.search(r"_(?:parameters|buffers)\[", source):
        return None
    return module_path(source)


def _node_module(node: torch.fx.Node) -> str | None:
    # The innermost module of the model's own tree: entries dynamo found in a module's globals
    # (G[...]: transformers >= 5.25 wraps kernel functions such as causal_conv1d_fn as modules)
    # are not in it.
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if not path.startswith("G[")]
    if stack:
        return module_path(stack[-1])
    state = _state_name(node)
    return state.rpartition(".")[0] if state else None


def _block_of(path: str | None) -> int | None:
    match = _BLOCK.search(path or "")
    return int(match.group(1)) if match else None


def annotate(gm: torch.fx.GraphModule) -> int:
    """Write `node.meta["quamba"] = {"role", "block", "module"}` on dynamo's graph; return the block count.

    A node's module comes from the innermost entry of its `nn_module_stack` that is in the model's
    own tree. A node called outside any module (our fused conv op) takes the module most of its
    parameter/buffer inputs belong to, when they all belong to one block.
    """
    blocks: set[int] = set()
    for node in gm.graph.nodes:
        module = _node_module(node)
        block = _block_of(module)
        if module is None and node.op == "call_function":
            owners = Counter(_node_module(arg) for arg in node.all_input_nodes if _state_name(arg))
            if len({_block_of(owner) for owner in owners} - {None}) == 1:
                # The fused conv reads conv1d's weight, bias and scale and in_proj's scale: conv1d wins.
                module = min(owners, key=lambda owner: (-owners[owner], owner))
                block = _block_of(module)
        last = (module or "").rpartition(".")[2]
        role = "conv1d" if is_kind(gm, node, "conv1d") else (last if last in _ROLES else None)
        node.meta[META_KEY] = {"role": role, "block": block, "module": module or ""}
        if block is not None:
            blocks.add(block)
    # verify_topology checks blocks 0..n-1 when it knows n; a graph holding a slice of the model
    # (after a graph break) only has its convs' own blocks checked.
    num_blocks = len(blocks) if blocks == set(range(len(blocks))) else None
    set_graph_meta(gm, GraphMeta(num_blocks=num_blocks, source="dynamo", arch=_arch_by_scan(gm)))
    return len(blocks)


def _arch_by_scan(gm: torch.fx.GraphModule) -> str | None:
    """The architecture whose scan op the graph calls; None (read as the default) when it calls none."""
    for spec in map(arch_named, arch_names()):
        if any(_is_quamba_op(node) and op_name(node).startswith(spec.scan_op) for node in gm.graph.nodes):
            return spec.name
    return None


def _is_quamba_op(node: torch.fx.Node, name: str | None = None) -> bool:
    """Whether `node` calls `torch.ops.quamba.<name>` (any op when name is None), overload or packet."""
    target = node.target if node.op == "call_function" else None
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if not isinstance(target, torch._ops.OpOverloadPacket):
        return False
    return target._qualified_op_name == f"quamba::{name}" if name else target._qualified_op_name.startswith("quamba::")


def _quamba_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if _is_quamba_op(n)]


def graph_kind(gm: torch.fx.GraphModule) -> str:
    """"quamba" (traced from a quamba_fx graph), "hf" (from Hugging Face's MambaMixer) or "other"."""
    if _quamba_ops(gm):
        return "quamba"
    for node in gm.graph.nodes:
        for _, cls in (node.meta.get("nn_module_stack") or {}).values():
            # Mamba-1 only ("Mamba2Mixer" does not match): `_verify_hf` knows this forward's shape.
            if (cls if isinstance(cls, str) else getattr(cls, "__name__", "")).endswith("MambaMixer"):
                return "hf"
    return "other"


def _verify_hf(gm: torch.fx.GraphModule) -> None:
    """The rules that still hold on Hugging Face's own forward, whose scan is ~100 decomposed ops.

    Checked: one conv1d per block, fed by its block's in_proj through layout ops, and no conv1d feeding
    another. Not checked: rule 3 (the conv output reaches only x_proj and the scan), because "the scan"
    is no longer one node. `TopologyChecker` runs its rules one by one here.
    """
    checker = TopologyChecker(gm)
    checker.check_conv_never_feeds_conv()
    checker.check_one_conv_per_block()
    for conv in checker.convs:
        checker.check_producer(conv)
    if not checker.convs:
        checker.problems.append("no conv1d found")
    if checker.problems:
        lines = "\n".join(f"  - {p}" for p in checker.problems)
        raise TopologyError(
            f"Hugging Face Mamba graph breaks {len(checker.problems)} of the rules checked on it (a decode step "
            f"with a cache, whose conv1d reads cat(conv_state, x), does):\n{lines}")


def _value(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else node


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------


def _detach_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            with gm.graph.inserting_after(placeholders[-1]):
                detached = gm.graph.call_method("detach", (node,))
            node.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)
    gm.recompile()


def _inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: str | None) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode and mode != "default" else None
    if not _quamba_ops(gm):
        return compile_fx(gm, example_inputs, config_patches=patches)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        # Our custom ops have no autograd formula, so AOTAutograd's joint trace would fail (eager
        # cannot differentiate through them either). Detaching the inputs inside the graph makes it
        # an inference graph; its outputs then do not require grad, which the warning says.
        _warn_once(
            "quamba backend: compiled for inference: the graph's quamba ops have no autograd formula, so "
            "its outputs do not require grad. Call the model under torch.no_grad() or torch.inference_mode()."
        )
        _detach_inputs(gm, example_inputs)
    return compile_fx(gm, example_inputs, config_patches=patches)


def _fallback(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict, mode: str | None) -> Callable:
    if options["fallback"] == "eager":
        return gm.forward
    return _inductor(gm, example_inputs, mode)


def _check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(options or {}) - set(DEFAULT_OPTIONS))
    if unknown:
        raise InvalidArgumentError(
            f"quamba backend: unknown option(s) {unknown}; supported: {sorted(DEFAULT_OPTIONS)}. To quantize, "
            "run quamba_fx.quantize first and compile its result (or save_pretrained it and pass checkpoint=DIR)."
        )
    merged = {**DEFAULT_OPTIONS, **(options or {})}
    if merged["fallback"] not in ("inductor", "eager"):
        raise InvalidArgumentError(f"quamba backend: fallback must be 'inductor' or 'eager', got {merged['fallback']!r}")
    return merged


def _checkpoint_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict) -> torch.fx.GraphModule:
    """A graph with `gm`'s inputs and outputs that runs the checkpoint's graph instead (docs/compile.md)."""
    path = Path(options["checkpoint"])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    data = [i for i, n in enumerate(placeholders)
            if _state_name(n) is None and isinstance(example_inputs[i], torch.Tensor)]
    outputs = gm.graph.output_node().args[0]
    if len(data) != 1 or example_inputs[data[0]].dim() != 2 or example_inputs[data[0]].is_floating_point():
        raise _Fallback("checkpoint: the compiled graph does not take exactly one token-id tensor [B, L]")
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == 1 and isinstance(_value(outputs[0]), torch.Tensor)):
        raise _Fallback("checkpoint: the compiled graph does not return logits alone (for Hugging Face "
                        "models pass use_cache=False)")
    ids = example_inputs[data[0]]
    try:
        loaded = from_pretrained(path, device=ids.device)
    except QuambaError as exc:
        raise _Fallback(f"checkpoint {path}: {exc}") from exc
    # Same architecture: every parameter/buffer the graph reads exists in the checkpoint with the
    # same shape (a quantized Linear keeps its [N, K] weight shape), and the block counts agree.
    saved = {name: tuple(t.shape) for name, t in loaded.state_dict().items()}
    wrong = [
        f"{name} {tuple(example_inputs[i].shape)} vs {saved.get(name, 'missing')}"
        for i, n in enumerate(placeholders) if (name := _state_name(n))
        if saved.get(name) != tuple(example_inputs[i].shape)
    ]
    loaded_meta = graph_meta(loaded)
    blocks, saved_blocks = annotate(gm), loaded_meta.num_blocks
    if blocks != saved_blocks:
        wrong.insert(0, f"{blocks} blocks vs {saved_blocks}")
    if wrong:
        raise _Fallback(f"checkpoint {path} does not match the compiled model's architecture: {'; '.join(wrong[:4])}")
    # The replacement is an FX graph with the compiled graph's inputs that calls the checkpoint's
    # graph on the token ids: Inductor then traces it with dynamo's own fake inputs (symbolic shapes
    # and guards included), as it would the graph it replaces.
    if options["verify"]:
        verify_topology(loaded)
    if options["fuse"] and loaded_meta.recipe and not loaded_meta.fused:
        loaded = fuse(loaded)
    loaded.requires_grad_(False)  # a private copy: keeps AOTAutograd on its inference path
    root = torch.nn.Module()
    root.checkpoint = loaded
    graph = torch.fx.Graph()
    inputs = [graph.placeholder(n.name) for n in placeholders]
    logits = graph.call_method("to", (graph.call_module("checkpoint", (inputs[data[0]],)), _value(outputs[0]).dtype))
    graph.output((logits,))
    return torch.fx.GraphModule(root, graph)


def _plan(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict) -> torch.fx.GraphModule:
    """Analyse (and for `fuse`, rewrite) dynamo's graph; return the graph Inductor should compile.

    Raises `_Fallback` or `TopologyError` for a graph the quamba path cannot take.
    """
    if options["checkpoint"]:
        return _checkpoint_graph(gm, example_inputs, options)
    kind = graph_kind(gm)
    if kind == "other":
        raise _Fallback("quamba backend: not a Mamba graph (no quamba op and no Hugging Face MambaMixer in it)")
    annotate(gm)
    if kind == "hf":
        if options["verify"]:
            _verify_hf(gm)
        _warn_once(
            "quamba backend: compiling Hugging Face's own Mamba forward with Inductor, unchanged and not "
            "quantized" + (" (checked: one conv1d per block, fed by its in_proj)" if options["verify"] else "")
            + ". To quantize or fuse, compile quamba_fx.capture(model) or quamba_fx.quantize(...) instead."
        )
        return gm
    if options["verify"]:
        verify_topology(gm)
    if options["fuse"]:
        if not any(_is_quamba_op(n, "quantize") for n in gm.graph.nodes):
            _warn_once("quamba backend: fuse=True ignored: the graph is not quantized (nothing to fuse); "
                       "compile quamba_fx.quantize(...) to fuse its int8 conv1d + SiLU")
        elif run_rules(gm, [fuse_conv1d_silu]):
            gm.graph.lint()
            gm.recompile()
            if options["verify"]:
                verify_topology(gm)
    return gm


def quamba_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """The `torch.compile` backend "quamba" (see docs/compile.md).

    `torch.compile(m, backend="quamba", options={...}, mode=...)` calls this with dynamo's graph, its
    example inputs and `options=` / `mode=` as keyword arguments (torch passes each only when set).
    Options: `verify` (bool, default True), `fallback` ("inductor" or "eager"), `fuse` (bool: fuse
    each int8 conv1d + SiLU of a quantized graph into one kernel), `checkpoint` (a save_pretrained
    directory whose graph runs instead, if its architecture matches). Unknown options raise
    InvalidArgumentError (a ValueError).
    """
    options = _check_options(options)
    try:
        target = _plan(gm, example_inputs, options)
    except _Fallback as exc:
        _warn_once(f"{exc}; falling back to {options['fallback']}")
        return _fallback(gm, example_inputs, options, mode)
    except TopologyError as exc:
        _warn_once(f"quamba backend: {exc}\nfalling back to {options['fallback']}")
        return _fallback(gm, example_inputs, options, mode)
    except Exception as exc:  # a bug in our analysis must never be what breaks a user's torch.compile
        _warn_once(f"quamba backend: analysis failed ({type(exc).__name__}: {exc}); "
                   f"falling back to {options['fallback']}")
        return _fallback(gm, example_inputs, options, mode)
    return _inductor(target, example_inputs, mode)


# torch._dynamo.reset() calls a backend's `reset`: it starts over as a fresh process would.
quamba_backend.reset = reset_warnings  # type: ignore[attr-defined]


def _register() -> None:
    """Register "quamba" unless torch already knows it (from the entry point, or an earlier import).

    With the package installed, torch lists the entry point and loads this module itself; registering
    here as well would make its own `register_backend` call fail as a duplicate.
    """
    import torch._dynamo

    if BACKEND_NAME not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(quamba_backend, name=BACKEND_NAME)


_register()
