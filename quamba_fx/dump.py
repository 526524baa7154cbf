"""Graph dumps for people (text, Graphviz) and tools (JSON, schema in docs/dump-schema.md).

Every format lists the same nodes: name, op, target, role, block, module path, shape, dtype, and the
extra annotations passes leave under `node.meta["quamba"]` (quantization scales, chosen kernels).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx

from .catalog import DUMP_FORMATS
from .errors import InvalidArgumentError, MissingDependencyError
from .graph_info import block, fetch_attr, info, is_kind
from .graph_meta import GraphMeta, find_graph_meta

SCHEMA_VERSION = 1
FORMATS = DUMP_FORMATS
_CORE_KEYS = ("role", "block", "module")


def target_name(node: torch.fx.Node) -> str:
    """The node's target as text: a module path, a method name or a qualified function name."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.name().replace('::', '.')}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"torch.ops.{target._qualified_op_name.replace('::', '.')}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or str(target)
    if module in ("", "torch._VariableFunctionsClass", "torch._C._VariableFunctions"):
        module = "torch" if hasattr(torch, name) else module
    return f"{module}.{name}" if module else name


def _tensor_meta(node: torch.fx.Node) -> tuple[Any, Any]:
    """(shape, dtype) from shape propagation; lists of them for multi-output nodes; None if unknown."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None, None
    if hasattr(meta, "shape"):
        return list(meta.shape), str(meta.dtype).replace("torch.", "")
    if isinstance(meta, (list, tuple)):
        pairs = [(list(m.shape), str(m.dtype).replace("torch.", "")) for m in meta if hasattr(m, "shape")]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return None, None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor{list(value.shape)}"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _scale_inputs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, float]:
    """Current values of the scale buffers a node reads (`...conv1d.output_scale`: 0.0123)."""
    scales = {}
    for source in node.all_input_nodes:
        if source.op == "get_attr" and source.target.endswith("_scale"):
            value = fetch_attr(gm, source.target)
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
                scales[source.target] = float(value)
    return scales


def node_record(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, Any]:
    """Everything a dump says about one node, as JSON-ready values."""
    shape, dtype = _tensor_meta(node)
    annotations = {k: _jsonable(v) for k, v in info(node).items() if k not in _CORE_KEYS}
    scales = _scale_inputs(gm, node)
    if scales:
        annotations["scales"] = scales
    return {
        "name": node.name,
        "op": node.op,
        "target": target_name(node),
        "role": info(node).get("role"),
        "block": block(node),
        "module": info(node).get("module") or None,
        "shape": shape,
        "dtype": dtype,
        "is_conv1d": is_kind(gm, node, "conv1d"),
        "inputs": [n.name for n in node.all_input_nodes],
        "annotations": annotations,
    }


def _selected(gm: torch.fx.GraphModule, only_block: int | None) -> list[torch.fx.Node]:
    nodes = list(gm.graph.nodes)
    if only_block is None:
        return nodes
    num_blocks = (find_graph_meta(gm) or GraphMeta()).num_blocks
    if num_blocks is not None and not 0 <= only_block < num_blocks:
        raise InvalidArgumentError(f"block {only_block} does not exist: the graph has blocks 0..{num_blocks - 1}")
    return [n for n in nodes if block(n) == only_block]


def to_text(gm: torch.fx.GraphModule, only_block: int | None = None) -> str:
    nodes = _selected(gm, only_block)
    # A lowered graph says which kernel each node runs; other graphs keep the narrower table.
    with_kernel = any("kernel" in info(n) for n in nodes)
    rows = [("name", "op", "target", "role", "block", "shape", "dtype") + (("kernel",) if with_kernel else ())]
    for node in nodes:
        r = node_record(gm, node)
        row = (r["name"], r["op"], r["target"], r["role"] or "-", "-" if r["block"] is None else str(r["block"]),
               "-" if r["shape"] is None else str(r["shape"]), "-" if r["dtype"] is None else str(r["dtype"]))
        rows.append(row + ((info(node).get("kernel", "-"),) if with_kernel else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def to_json(gm: torch.fx.GraphModule, only_block: int | None = None) -> str:
    nodes = _selected(gm, only_block)
    names = {n.name for n in nodes}
    edges = [
        {"src": src.name, "dst": node.name, "arg": index}
        for node in nodes
        for index, src in enumerate(node.all_input_nodes)
        if src.name in names
    ]
    meta = find_graph_meta(gm) or GraphMeta()
    document = {
        "schema": "quamba-fx/graph",
        "schema_version": SCHEMA_VERSION,
        "model": {
            "source": meta.source,
            "num_blocks": meta.num_blocks,
            "example_shape": meta.example_shape,
            "config": _jsonable(meta.config),
        },
        "block": only_block,
        "nodes": [node_record(gm, n) for n in nodes],
        "edges": edges,
    }
    return json.dumps(document, indent=1) + "\n"


def _dot_id(text: str) -> str:
    """A DOT quoted string; real newlines become DOT line breaks."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def to_dot(gm: torch.fx.GraphModule, only_block: int | None = None) -> str:
    nodes = _selected(gm, only_block)
    convs = {n for n in nodes if is_kind(gm, n, "conv1d")}
    by_block: dict[int | None, list[str]] = {}
    lines = ["digraph mamba {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    for node in nodes:
        r = node_record(gm, node)
        label = "\n".join(str(x) for x in (r["name"], r["role"] or r["op"], r["shape"]) if x is not None)
        style = ', style=filled, fillcolor="#ffb347", penwidth=2' if node in convs else ""
        by_block.setdefault(r["block"], []).append(f"  {_dot_id(node.name)} [label={_dot_id(label)}{style}];")
    for b, node_lines in by_block.items():
        if b is None:
            lines.extend(node_lines)
            continue
        lines.append(f"  subgraph cluster_block{b} {{")
        lines.append(f'    label="block {b}"; style=rounded; color="#888888";')
        lines.extend("  " + line for line in node_lines)
        lines.append("  }")
    names = {n.name for n in nodes}
    for node in nodes:
        for src in node.all_input_nodes:
            if src.name not in names:
                continue
            hot = src in convs or node in convs
            attrs = ' [color="#d62728", penwidth=2.5]' if hot else ""
            lines.append(f"  {_dot_id(src.name)} -> {_dot_id(node.name)}{attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(gm: torch.fx.GraphModule, only_block: int | None = None) -> str:
    try:
        import pydot
    except ImportError as exc:
        raise MissingDependencyError(
            "SVG output needs pydot: pip install 'quamba-fx[viz]' (and Graphviz), or use --format dot"
        ) from exc
    graphs = pydot.graph_from_dot_data(to_dot(gm, only_block))
    try:
        svg = graphs[0].create_svg()
    except (FileNotFoundError, OSError, AssertionError) as exc:
        raise MissingDependencyError(
            "SVG output needs Graphviz's `dot` program on PATH (e.g. apt-get install graphviz); "
            f"or use --format dot and render it elsewhere ({exc})"
        ) from exc
    return svg.decode() if isinstance(svg, bytes) else svg


_RENDERERS = {"text": to_text, "json": to_json, "dot": to_dot, "svg": to_svg}


def dump(gm: torch.fx.GraphModule, format: str = "text", block: int | None = None) -> str:
    """Render `gm` as `text`, `json`, `dot` or `svg`; `block` keeps only that block's nodes."""
    if format not in _RENDERERS:
        raise InvalidArgumentError(f"unknown dump format {format!r}; choose one of {', '.join(FORMATS)}")
    return _RENDERERS[format](gm, block)


def write_dump(gm: torch.fx.GraphModule, path: str | Path, format: str = "text", block: int | None = None) -> Path:
    """Write `dump(gm, format, block)` to `path` atomically (a failed render leaves no partial file)."""
    path = Path(path)
    content = dump(gm, format, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
