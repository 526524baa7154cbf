"""The rewrite engine of every pass and lowering: a rule looks at one node and, if its pattern
matches there, rewrites the graph in place and says so; `run_rules` sweeps the graph until no
rule fires.

A rule is a plain function `(gm, node) -> bool`: its pattern is the chain of checks it makes on
`node` and its inputs (read top to bottom), its replacement the graph edits after them. Rule lists
are plain lists, combined with `+`.
"""

from __future__ import annotations

from typing import Callable

import torch.fx

__all__ = ["Rule", "run_rules"]

Rule = Callable[[torch.fx.GraphModule, torch.fx.Node], bool]


def run_rules(gm: torch.fx.GraphModule, rules: list[Rule]) -> bool:
    """Apply `rules` to every node until none fires; True when anything changed."""
    changed_any, changed = False, True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node._erased:  # removed by a rule earlier in this sweep
                continue
            for rule in rules:
                if rule(gm, node):
                    changed = changed_any = True
                    break
    return changed_any
