"""The topology check: every block is Linear(producer) -> conv1d -> Linear(consumer) (Mamba-1) or
Linear(producer) -> conv1d -> scan (Mamba-2), once.

The roles come from the graph's architecture spec (`quamba_fx.arch`; for Mamba-1, in_proj and
x_proj; for Mamba-2, in_proj and the SSD scan). Rules (see docs/quamba-dataflow in shared docs), each checked on the whole graph at once so
one error lists every violation; the spec's `topology.rules` names the ones that apply:

1. `one_conv_per_block`: every block has exactly one conv1d;
2. `producer`: a conv1d is fed by a Linear (the producer role) through layout and
   quantization-boundary ops only;
3. `consumers`: a conv1d's output reaches only Linears (the consumer role) and the selective scan,
   through SiLU, layout and quantization-boundary ops only, and reaches at least one Linear;
4. `conv_never_feeds_conv`: no conv1d reaches another conv1d through elementwise, layout and
   boundary ops only;
5. `feeds_scan` (Mamba-2, instead of 3): a conv1d's output reaches only its own block's scan,
   through SiLU, layout and quantization-boundary ops only, and reaches it.
"""

from __future__ import annotations

from typing import Iterator

import networkx as nx
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..arch import ArchSpec, arch_of
from ..errors import TopologyError
from ..graph_info import block, describe, is_kind, op_name, role
from ..graph_meta import GraphMeta, find_graph_meta


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    # all_input_nodes also lists shape operands (the `size` in `x[..., :size]`); data comes first.
    return [n for n in node.all_input_nodes if n.op != "call_method" or n.target != "size"]


def _path(nodes: list[torch.fx.Node]) -> str:
    return " -> ".join(n.name for n in nodes)


def node_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The use-def graph of `gm` as a networkx DiGraph over fx Nodes (edge producer -> consumer)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(gm.graph.nodes)
    for node in gm.graph.nodes:
        for producer in node.all_input_nodes:
            graph.add_edge(producer, node)
    return graph


class TopologyChecker:
    """The rules of this module, each a method that appends messages to `problems`; `run` applies
    all of them. Callers that can only check some rules (the torch.compile backend on dynamo's
    graphs of HF models) call the methods one by one. `arch` defaults to the graph's own spec."""

    def __init__(self, gm: torch.fx.GraphModule, arch: ArchSpec | None = None):
        self.gm = gm
        self.arch = arch if arch is not None else arch_of(gm)
        self.producer = self.arch.topology.producer
        self.consumer = self.arch.topology.consumer
        self.graph = node_graph(gm)
        self.convs = [n for n in gm.graph.nodes if is_kind(gm, n, "conv1d")]
        self.problems: list[str] = []

    def kind(self, node: torch.fx.Node, *kinds: str) -> bool:
        return any(is_kind(self.gm, node, k) for k in kinds)

    def run(self) -> list[str]:
        rules = self.arch.topology.rules
        whole_graph = {"conv_never_feeds_conv": self.check_conv_never_feeds_conv,
                       "one_conv_per_block": self.check_one_conv_per_block}
        per_conv = {"producer": self.check_producer, "consumers": self.check_consumers,
                    "feeds_scan": self.check_feeds_scan}
        unknown = [rule for rule in rules if rule not in whole_graph and rule not in per_conv]
        if unknown:
            raise TopologyError(f"architecture {self.arch.name!r} names unknown topology rule(s) {unknown}; "
                                f"known: {sorted({**whole_graph, **per_conv})}")
        for rule in rules:
            if rule in whole_graph:
                whole_graph[rule]()
        for conv in self.convs:
            for rule in rules:
                if rule in per_conv:
                    per_conv[rule](conv)
        return self.problems

    def check_conv_never_feeds_conv(self) -> None:
        passable = [n for n in self.graph if self.kind(n, "layout", "elementwise", "quant_boundary")]
        # Walks start at a conv's users and stop at the next conv: a path through a third conv is
        # that conv's own violation, reported from there.
        stops = nx.DiGraph(self.graph.subgraph(passable + self.convs))
        stops.remove_edges_from([(c, user) for c in self.convs for user in list(stops.successors(c))])
        for conv in self.convs:
            for user in conv.users:
                if user not in stops:
                    continue
                for reached, path in nx.single_source_shortest_path(stops, user).items():
                    if reached in self.convs:
                        self.problems.append(
                            f"conv1d {describe(conv)} feeds conv1d {describe(reached)} through elementwise/"
                            f"layout ops only: {_path([conv] + path)}"
                        )

    def check_one_conv_per_block(self) -> None:
        num_blocks = (find_graph_meta(self.gm) or GraphMeta()).num_blocks
        per_block: dict[int | None, list[torch.fx.Node]] = {}
        for conv in self.convs:
            per_block.setdefault(block(conv), []).append(conv)
        for conv in per_block.pop(None, []):
            self.problems.append(f"conv1d {describe(conv)} belongs to no block (missing block annotation)")
        expected = range(num_blocks) if num_blocks is not None else sorted(per_block)
        for b in expected:
            found = per_block.get(b, [])
            if len(found) != 1:
                names = ", ".join(describe(c) for c in found) or "none"
                self.problems.append(f"block {b} has {len(found)} conv1d (expected exactly 1): {names}")

    def check_producer(self, conv: torch.fx.Node) -> None:
        chain = [conv]
        node = _tensor_inputs(conv)[0]
        while self.kind(node, "layout", "quant_boundary") and _tensor_inputs(node):
            chain.append(node)
            node = _tensor_inputs(node)[0]
        chain.append(node)
        path = _path(list(reversed(chain)))
        if not self.kind(node, "linear"):
            self.problems.append(
                f"conv1d {describe(conv)} is fed by {describe(node)}, which is not a Linear "
                f"(only layout/quantization ops may stand between {self.producer} and conv1d): {path}"
            )
        elif role(node) not in (None, self.producer) or block(node) != block(conv):
            self.problems.append(
                f"conv1d {describe(conv)} is fed by Linear {describe(node)} (role {role(node)!r}), "
                f"not by its own block's {self.producer}: {path}"
            )

    def reached(self, conv: torch.fx.Node) -> Iterator[tuple[torch.fx.Node, list[torch.fx.Node]]]:
        """The first nodes `conv`'s output reaches past SiLU, layout and boundary ops, each with
        the path to it."""
        stack: list[tuple[torch.fx.Node, list[torch.fx.Node]]] = [(conv, [conv])]
        while stack:
            node, path = stack.pop()
            for user in node.users:
                walk = path + [user]
                if self.kind(user, "layout", "quant_boundary") or op_name(user) == "silu":
                    stack.append((user, walk))
                else:
                    yield user, walk

    def check_consumers(self, conv: torch.fx.Node) -> None:
        linears = 0
        for user, walk in self.reached(conv):
            if self.kind(user, "linear"):
                linears += 1
                if role(user) not in (None, self.consumer) or block(user) != block(conv):
                    self.problems.append(
                        f"conv1d {describe(conv)} feeds Linear {describe(user)} (role {role(user)!r}), "
                        f"not its own block's {self.consumer}: {_path(walk)}"
                    )
            elif not self.kind(user, "scan", "conv1d"):
                # A conv1d consumer is reported by check_conv_never_feeds_conv.
                self.problems.append(
                    f"conv1d {describe(conv)} reaches {describe(user)}, which is neither a Linear ({self.consumer}) "
                    f"nor the selective scan: {_path(walk)}"
                )
        if linears == 0:
            self.problems.append(f"conv1d {describe(conv)} reaches no Linear ({self.consumer})")

    def check_feeds_scan(self, conv: torch.fx.Node) -> None:
        scans = 0
        for user, walk in self.reached(conv):
            if self.kind(user, "scan"):
                scans += 1
                if block(user) != block(conv):
                    self.problems.append(f"conv1d {describe(conv)} feeds the scan {describe(user)} of another "
                                         f"block: {_path(walk)}")
            elif not self.kind(user, "conv1d"):
                # A conv1d consumer is reported by check_conv_never_feeds_conv.
                self.problems.append(f"conv1d {describe(conv)} reaches {describe(user)}, which is not the "
                                     f"{self.arch.title} scan: {_path(walk)}")
        if scans == 0:
            self.problems.append(f"conv1d {describe(conv)} reaches no scan")


def verify_topology(gm: torch.fx.GraphModule) -> None:
    """Raise `TopologyError` listing every violation of the block invariants of `gm`'s architecture.

    Each message names the offending nodes (fx name, module path, block) and the path between them.
    Returns None when the graph is well formed.
    """
    checker = TopologyChecker(gm)
    problems = checker.run()
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise TopologyError(f"the graph breaks {len(problems)} {checker.arch.display_name} topology rule(s):\n{lines}")


class VerifyTopology(PassBase):
    """`verify_topology` as a pass: changes nothing, raises `TopologyError` on a malformed graph."""

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        verify_topology(graph_module)
        return PassResult(graph_module, False)
