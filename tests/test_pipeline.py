"""Pipelines run passes in order, check the graph after each, dump it, and blame the failing pass."""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import quamba_fx
from quamba_fx import PassError, Pipeline


class ContiguousAfterInProj(PassBase):
    """Insert `.contiguous()` after every in_proj: a layout op, so topology still holds."""

    def call(self, gm):
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target.endswith("in_proj"):
                with gm.graph.inserting_after(node):
                    copy = gm.graph.call_method("contiguous", (node,))
                copy.meta["quamba"] = dict(node.meta["quamba"])
                node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
        return PassResult(gm, True)


def count_nodes(gm):
    return PassResult(gm, False)


def double_conv_input(gm):
    """Breaks the graph: an elementwise op between in_proj and conv1d."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.endswith("conv1d"):
            with gm.graph.inserting_before(node):
                doubled = gm.graph.call_function(operator.mul, (node.args[0], 2.0))
            node.replace_input_with(node.args[0], doubled)
    return PassResult(gm, True)


def test_pipeline_runs_passes_in_order_and_keeps_results(tiny_model, tmp_path):
    gm = quamba_fx.capture(tiny_model)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        before = gm(ids)
    pipeline = Pipeline([ContiguousAfterInProj(), count_nodes], dump_dir=tmp_path, dump_formats=("text", "json"))
    out = pipeline(gm)
    assert [(r.name, r.modified) for r in pipeline.history] == [("ContiguousAfterInProj", True), ("count_nodes", False)]
    assert sum(1 for n in out.graph.nodes if n.target == "contiguous") == 2
    assert "contiguous()" in out.code
    with torch.no_grad():
        torch.testing.assert_close(out(ids), before)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_input.json", "00_input.txt", "01_ContiguousAfterInProj.json",
                     "01_ContiguousAfterInProj.txt", "02_count_nodes.json", "02_count_nodes.txt"]
    assert "contiguous" in (tmp_path / "01_ContiguousAfterInProj.txt").read_text()
    assert "contiguous" not in (tmp_path / "00_input.txt").read_text()


def test_failing_check_names_the_pass_and_those_before(tiny_model):
    gm = quamba_fx.capture(tiny_model)
    with pytest.raises(PassError) as err:
        Pipeline([count_nodes, double_conv_input, ContiguousAfterInProj()])(gm)
    assert err.value.pass_name == "double_conv_input"
    assert err.value.passes_before == ["count_nodes"]
    message = str(err.value)
    assert "pass 2 'double_conv_input' failed (TopologyError)" in message
    assert "is fed by mul" in message and "passes run before it: count_nodes" in message
    assert isinstance(err.value.__cause__, quamba_fx.TopologyError)


def test_pass_returning_the_wrong_type_is_reported(tiny_model):
    gm = quamba_fx.capture(tiny_model)
    with pytest.raises(PassError, match="pass 1 'identity' failed .*a pass must return a PassResult"):
        Pipeline([_named("identity", lambda g: g)])(gm)


def test_checks_can_be_replaced(tiny_model):
    gm = quamba_fx.capture(tiny_model)
    seen = []
    Pipeline([double_conv_input], checks=[lambda g: seen.append(len(g.graph.nodes))])(gm)
    assert seen == [len(gm.graph.nodes)]


def _named(name, fn):
    fn.__name__ = name
    return fn
