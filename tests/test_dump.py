"""Dumps: text, JSON (versioned schema), DOT with blocks as clusters, SVG when Graphviz is there."""

from __future__ import annotations

import json
import shutil

import pytest

import quamba_fx
from quamba_fx import MissingDependencyError
from quamba_fx.dump import dump, write_dump


@pytest.fixture(scope="module")
def gm():
    from .conftest import make_model, tiny_config

    return quamba_fx.capture(make_model(tiny_config()))


def test_text_has_a_row_per_node_with_role_block_and_shape(gm):
    lines = dump(gm, "text").splitlines()
    assert lines[0].split() == ["name", "op", "target", "role", "block", "shape", "dtype"]
    assert len(lines) == 1 + len(gm.graph.nodes)
    conv = next(line for line in lines if line.startswith("backbone_layers_1_mixer_conv1d "))
    assert conv.split()[1:5] == ["call_module", "backbone.layers.1.mixer.conv1d", "conv1d", "1"]
    assert "[1, 64, 11]" in conv and conv.endswith("float32")
    assert any("torch.ops.quamba.selective_scan" in line for line in lines)


def test_json_follows_schema(gm):
    doc = json.loads(dump(gm, "json"))
    assert doc["schema"] == "quamba-fx/graph" and doc["schema_version"] == 1
    assert doc["model"]["num_blocks"] == 2 and doc["model"]["config"]["conv_kernel"] == 4
    names = [n["name"] for n in doc["nodes"]]
    assert names == [n.name for n in gm.graph.nodes]
    assert all(e["src"] in names and e["dst"] in names for e in doc["edges"])
    convs = [n for n in doc["nodes"] if n["is_conv1d"]]
    assert [c["block"] for c in convs] == [0, 1]
    assert convs[0]["module"] == "backbone.layers.0.mixer.conv1d" and convs[0]["shape"] == [1, 64, 11]
    keys = {"name", "op", "target", "role", "block", "module", "shape", "dtype", "is_conv1d", "inputs", "annotations"}
    assert all(set(n) == keys for n in doc["nodes"])


def test_block_filter_keeps_only_that_block(gm):
    doc = json.loads(dump(gm, "json", block=1))
    assert doc["block"] == 1 and {n["block"] for n in doc["nodes"]} == {1}
    with pytest.raises(ValueError, match=r"block 5 does not exist: the graph has blocks 0..1"):
        dump(gm, "text", block=5)


def test_dot_clusters_blocks_and_highlights_conv_edges(gm):
    dot = dump(gm, "dot")
    assert dot.startswith("digraph mamba {") and dot.rstrip().endswith("}")
    assert "subgraph cluster_block0" in dot and "subgraph cluster_block1" in dot
    assert '"backbone_layers_0_mixer_conv1d" [label=' in dot and 'fillcolor="#ffb347"' in dot
    hot = [line for line in dot.splitlines() if "->" in line and "penwidth=2.5" in line]
    assert '  "getitem" -> "backbone_layers_0_mixer_conv1d" [color="#d62728", penwidth=2.5];' in hot
    assert '  "backbone_layers_0_mixer_conv1d" -> "getitem_2" [color="#d62728", penwidth=2.5];' in hot
    assert len(hot) == 4


def test_svg_renders_or_says_what_is_missing(gm, monkeypatch):
    if shutil.which("dot"):
        assert "<svg" in dump(gm, "svg", block=0)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(MissingDependencyError, match="Graphviz's `dot` program|needs pydot"):
        dump(gm, "svg")


def test_unknown_format_and_atomic_write(gm, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown dump format 'png'"):
        dump(gm, "png")
    target = tmp_path / "graph.svg"
    monkeypatch.setenv("PATH", "")
    with pytest.raises(MissingDependencyError):
        write_dump(gm, target, "svg")
    assert list(tmp_path.iterdir()) == []
    assert write_dump(gm, tmp_path / "g.json", "json").read_text().startswith("{")
