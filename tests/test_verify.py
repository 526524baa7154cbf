"""Topology verification: real graphs pass; each kind of malformed graph is rejected by name and path."""

from __future__ import annotations

import operator

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

import quamba_fx
from quamba_fx import TopologyError, VerifyTopology, verify_topology
from quamba_fx.graph_info import is_kind

from .conftest import make_model, tiny_config


@pytest.fixture
def gm(tiny_model):
    return quamba_fx.capture(tiny_model)


def find(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


def conv_node(gm, i):
    return find(gm, f"backbone.layers.{i}.mixer.conv1d")


def silu_after(conv):
    node = conv
    while node.target is not torch.nn.functional.silu:
        (node,) = node.users
    return node


def add_conv(gm, name, source, block):
    """Insert a new depthwise Conv1d module applied to `source`, annotated as part of `block`."""
    channels = gm.get_submodule(f"backbone.layers.{block}.mixer.conv1d").in_channels
    gm.add_submodule(name, nn.Conv1d(channels, channels, 4, groups=channels, padding=3))
    with gm.graph.inserting_after(source):
        node = gm.graph.call_module(name, (source,))
    node.meta["quamba"] = {"role": "conv1d", "block": block, "module": name}
    return node


@given(
    hidden=st.integers(8, 96), layers=st.integers(1, 4), kernel=st.integers(2, 4), expand=st.integers(1, 2),
    head=st.booleans(),
)
@settings(max_examples=15)
def test_every_captured_config_is_accepted(hidden, layers, kernel, expand, head):
    config = tiny_config(hidden_size=hidden, num_hidden_layers=layers, conv_kernel=kernel, expand=expand)
    verify_topology(quamba_fx.capture(make_model(config, head=head), propagate_shapes=False))


@pytest.mark.parametrize("name", ["mamba-130m", "mamba-2.8b"])
def test_builtin_architectures_are_accepted(name):
    verify_topology(quamba_fx.capture(quamba_fx.load_model(name, device="meta")))


def test_conv_feeding_conv_is_rejected_with_path(gm):
    first = conv_node(gm, 0)
    silu = silu_after(first)
    extra = add_conv(gm, "extra_conv", silu, block=0)
    silu.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    with pytest.raises(TopologyError) as err:
        verify_topology(gm)
    message = str(err.value)
    assert "conv1d backbone_layers_0_mixer_conv1d [backbone.layers.0.mixer.conv1d, block 0] feeds conv1d extra_conv" in message
    assert "backbone_layers_0_mixer_conv1d -> getitem_2 -> silu -> extra_conv" in message
    assert "block 0 has 2 conv1d" in message


def test_conv_of_one_block_feeding_the_next_blocks_conv_is_rejected(gm):
    first, second = conv_node(gm, 0), conv_node(gm, 1)
    second.replace_input_with(second.args[0], silu_after(first))
    with pytest.raises(TopologyError) as err:
        verify_topology(gm)
    message = str(err.value)
    assert "feeds conv1d backbone_layers_1_mixer_conv1d [backbone.layers.1.mixer.conv1d, block 1]" in message
    assert "-> silu -> backbone_layers_1_mixer_conv1d" in message
    assert "is fed by silu" in message


def test_two_convs_in_one_block_are_rejected(gm):
    z = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
             and n.args[1] == 1 and n.meta["quamba"]["role"] == "in_proj")
    extra = add_conv(gm, "z_conv", z, block=0)
    z.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    with pytest.raises(TopologyError) as err:
        verify_topology(gm)
    message = str(err.value)
    assert "block 0 has 2 conv1d (expected exactly 1): z_conv [z_conv, block 0], " \
           "backbone_layers_0_mixer_conv1d [backbone.layers.0.mixer.conv1d, block 0]" in message
    assert "conv1d z_conv [z_conv, block 0] reaches no Linear (x_proj)" in message


def test_conv_fed_by_a_non_linear_is_rejected(gm):
    conv = conv_node(gm, 1)
    source = conv.args[0]
    with gm.graph.inserting_before(conv):
        scaled = gm.graph.call_function(operator.mul, (source, 2.0))
    scaled.meta["quamba"] = {"role": "conv1d", "block": 1, "module": ""}
    conv.replace_input_with(source, scaled)
    with pytest.raises(TopologyError) as err:
        verify_topology(gm)
    message = str(err.value)
    assert "conv1d backbone_layers_1_mixer_conv1d [backbone.layers.1.mixer.conv1d, block 1] is fed by mul" in message
    assert "which is not a Linear" in message
    assert "mul -> backbone_layers_1_mixer_conv1d" in message


def test_conv_output_reaching_a_non_linear_consumer_is_rejected(gm):
    silu = silu_after(conv_node(gm, 0))
    with gm.graph.inserting_after(silu):
        stray = gm.graph.call_function(torch.tanh, (silu,))
    stray.meta["quamba"] = {"role": "conv1d", "block": 0, "module": ""}
    with pytest.raises(TopologyError) as err:
        verify_topology(gm)
    message = str(err.value)
    assert "reaches tanh [tanh, block 0], which is neither a Linear (x_proj) nor the selective scan" in message
    assert "backbone_layers_0_mixer_conv1d -> getitem_2 -> silu -> tanh" in message


def test_block_without_conv_is_rejected(gm):
    conv = conv_node(gm, 1)
    (sliced,) = conv.users
    sliced.replace_input_with(conv, conv.args[0])
    gm.graph.erase_node(conv)
    with pytest.raises(TopologyError, match=r"block 1 has 0 conv1d \(expected exactly 1\): none"):
        verify_topology(gm)


def test_conv_fed_by_another_blocks_linear_is_rejected(gm):
    conv0 = conv_node(gm, 0)
    in_proj1 = find(gm, "backbone.layers.1.mixer.in_proj")
    chain = conv0.args[0]
    # Rewire only the transpose at the start of block 0's layout chain to block 1's in_proj.
    while chain.args[0].op != "call_module":
        chain = chain.args[0]
    chain.replace_input_with(chain.args[0], in_proj1)
    with pytest.raises(TopologyError, match="not by its own block's in_proj"):
        verify_topology(gm)


def test_error_is_a_quamba_error_and_pass_wraps_check(gm):
    assert VerifyTopology()(gm) == PassResult(gm, False)
    assert issubclass(TopologyError, quamba_fx.QuambaError)
    conv = conv_node(gm, 0)
    conv.meta["quamba"] = {}
    with pytest.raises(TopologyError, match="belongs to no block"):
        VerifyTopology()(gm)


def test_conv_classification_covers_modules_and_functions(gm):
    convs = [n for n in gm.graph.nodes if is_kind(gm, n, "conv1d")]
    assert [n.target for n in convs] == ["backbone.layers.0.mixer.conv1d", "backbone.layers.1.mixer.conv1d"]
    linears = [n for n in gm.graph.nodes if is_kind(gm, n, "linear")]
    assert len(linears) == 2 * 4 + 1


def test_what_verification_accepts_does_not_depend_on_what_was_imported():
    """The op and module kinds are what graph_info declares: importing the rest of the package (the
    passes, kernels, backend) adds none, so a check run before or after those imports agrees."""
    import importlib.util

    import quamba_fx.graph_info as live

    quamba_fx.fuse  # noqa: B018  (the first public name imports every module of the package)
    spec = importlib.util.spec_from_file_location("quamba_fx._fresh_graph_info", live.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # graph_info as declared, before anything could register into it
    assert {kind: sorted(ops) for kind, ops in live._KINDS.items()} == {
        kind: sorted(ops) for kind, ops in fresh._KINDS.items()
    }
    assert live._MODULE_KINDS == fresh._MODULE_KINDS
    for kind, op in [("quant_boundary", "quantize"), ("linear", "int8_linear"), ("scan", "selective_scan_int8")]:
        assert op in fresh._KINDS[kind]


def test_the_checked_roles_and_rules_come_from_the_graphs_architecture_spec(gm):
    """The checker names no block roles itself: a spec whose producer is dt_proj rejects the real
    graph, whose conv1d is fed by in_proj; a spec without the producer rule does not look."""
    from dataclasses import replace

    from quamba_fx.arch import MAMBA1, arch_of
    from quamba_fx.passes.verify import TopologyChecker

    assert arch_of(gm) is MAMBA1 and TopologyChecker(gm).run() == []
    wrong_producer = replace(MAMBA1, topology=replace(MAMBA1.topology, producer="dt_proj"))
    problems = TopologyChecker(gm, arch=wrong_producer).run()
    assert len(problems) == 2 and all("not by its own block's dt_proj" in p for p in problems)
    rules = tuple(r for r in MAMBA1.topology.rules if r != "producer")
    unchecked = replace(wrong_producer, topology=replace(wrong_producer.topology, rules=rules))
    assert TopologyChecker(gm, arch=unchecked).run() == []
    unknown = replace(MAMBA1, topology=replace(MAMBA1.topology, rules=("nonsense",)))
    with pytest.raises(TopologyError, match="unknown topology rule"):
        TopologyChecker(gm, arch=unknown).run()
