"""Rotate each out_proj's input by a Hadamard matrix and fold the inverse rotation into its weight.

Which Linear that is comes from the graph's architecture spec (`ArchSpec.rotated`; Mamba-1: out_proj).

The float result is unchanged (`W H^T H y = W y`), but `H y` spreads the outlier channels of the
scan output over all channels, so a single per-tensor int8 scale fits it (Quamba, section 4).
Run on the float graph before calibration, so the recorded statistics are those of `H y`.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..arch import arch_of
from ..graph_info import info, role
from ..quant.hadamard import fold_hadamard_into_linear_weight


def _folded_copy(linear: nn.Linear) -> nn.Linear:
    # A new module, never an in-place edit: the float model shares its modules with the graph.
    folded = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(fold_hadamard_into_linear_weight(linear.weight.detach()))
        if linear.bias is not None:
            folded.bias.copy_(linear.bias)
    return folded


class RotateOutProjInput(PassBase):
    """`out_proj(y)` becomes `out_proj'(hadamard(y))` with `out_proj'.weight = W @ H^T` (for the
    Linear of the spec's `rotated` role)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        rotated_role = arch_of(gm).rotated
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or role(node) != rotated_role:
                continue
            linear = gm.get_submodule(node.target)
            if not isinstance(linear, nn.Linear):
                continue
            with gm.graph.inserting_before(node):
                rotated = gm.graph.call_function(torch.ops.quamba.hadamard.default, (node.args[0],))
            rotated.meta["quamba"] = {**info(node), "module": node.target}
            node.replace_input_with(node.args[0], rotated)
            gm.set_submodule(node.target, _folded_copy(linear))
            modified = True
        return PassResult(gm, modified)
