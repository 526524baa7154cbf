"""The conv1d fusion pass: one fused node per block, same logits, topology still verified."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import quamba_fx
from quamba_fx.graph_info import is_kind, op_name

from .conftest import make_model, tiny_config


@pytest.fixture(scope="module")
def graphs():
    model = make_model(tiny_config(vocab_size=64, hidden_size=24, num_hidden_layers=2, conv_kernel=3))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 64, (2, 12), generator=g) for _ in range(2)]
    quantized = quamba_fx.quantize(model, calib, recipe="quamba", progress=False)
    return quantized, quamba_fx.fuse(quantized)


def test_each_block_has_one_fused_conv_and_no_float_conv(graphs):
    _, fused = graphs
    convs = [n for n in fused.graph.nodes if is_kind(fused, n, "conv1d")]
    assert [str(n.target) for n in convs] == ["quamba.conv1d_silu_int8.default"] * 2
    assert [n.meta["quamba"]["block"] for n in convs] == [0, 1]
    assert not any(n.op == "call_module" and "conv1d" in n.target for n in fused.graph.nodes)
    assert not any(op_name(n) == "silu" for n in fused.graph.nodes)
    assert convs[0].meta["tensor_meta"].dtype == torch.int8
    quamba_fx.verify_topology(fused)


def test_fused_graph_matches_unfused_logits(graphs):
    quantized, fused = graphs
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = quantized(ids), fused(ids)
    # The kernel folds the input scale into the taps and multiplies by 1/out_scale, so an int8 value
    # at a rounding boundary may move by one step; the logits stay within a small fraction.
    assert (actual - expected).abs().max() <= 0.02 * expected.abs().max()


def test_fused_node_reads_the_live_conv_scale(graphs):
    _, fused = graphs
    fused = copy.deepcopy(fused)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = fused(ids)
        fused.get_submodule("backbone.layers.0.mixer.conv1d").output_scale *= 4
        after = fused(ids)
    assert not torch.equal(before, after)


def test_dump_shows_fused_node_with_its_scales(graphs):
    _, fused = graphs
    doc = json.loads(quamba_fx.dump(fused, "json", block=1))
    (conv,) = [n for n in doc["nodes"] if n["is_conv1d"]]
    assert conv["target"] == "torch.ops.quamba.conv1d_silu_int8"
    assert conv["module"] == "backbone.layers.1.mixer.conv1d" and conv["dtype"] == "int8"
    assert set(conv["annotations"]["scales"]) == {"backbone.layers.1.mixer.in_proj.output_scale",
                                                  "backbone.layers.1.mixer.conv1d.output_scale"}
    assert all(v > 0 for v in conv["annotations"]["scales"].values())
