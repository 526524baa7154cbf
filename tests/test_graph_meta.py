"""The typed graph metadata: its defaults, the errors for a graph without it, and its copies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx

import quamba_fx
from quamba_fx.errors import QuambaError
from quamba_fx.graph_meta import (
    GRAPH_META_KEY,
    GraphMeta,
    MissingGraphMetaError,
    find_graph_meta,
    graph_meta,
    set_graph_meta,
)

from .conftest import make_model, tiny_config


def _bare_graph() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(torch.nn.ReLU())


def test_defaults_describe_a_graph_nobody_annotated():
    meta = GraphMeta()
    assert (meta.source, meta.num_blocks, meta.prefix, meta.hf_config, meta.dtype) == (None,) * 5
    assert (meta.recipe, meta.recipe_spec, meta.lowered, meta.state_dtype, meta.cached, meta.arch) == (None,) * 6
    assert meta.config == {} and meta.fused is False and meta.on_meta_device is False
    assert meta.tokenizer is None and meta.example_shape is None and meta.capture_seconds is None
    # Each object gets its own config dict, so writing one graph's never changes another's.
    assert GraphMeta().config is not meta.config


def test_graph_without_metadata_names_itself_in_the_error():
    gm = _bare_graph()
    assert find_graph_meta(gm) is None
    with pytest.raises(MissingGraphMetaError, match=r"graph \(ReLU\) has no quamba-fx graph metadata"):
        graph_meta(gm)
    assert issubclass(MissingGraphMetaError, QuambaError)


def test_a_leftover_dict_is_refused_not_read():
    gm = _bare_graph()
    gm.meta[GRAPH_META_KEY] = {"num_blocks": 2}
    with pytest.raises(TypeError, match="holds a dict, not a GraphMeta"):
        find_graph_meta(gm)
    with pytest.raises(TypeError, match="needs a GraphMeta"):
        set_graph_meta(gm, {"num_blocks": 2})


def test_set_then_read_back():
    gm = _bare_graph()
    meta = set_graph_meta(gm, GraphMeta(num_blocks=3, source="dynamo"))
    assert graph_meta(gm) is meta and find_graph_meta(gm) is meta


def test_replace_is_a_shallow_copy_with_changes():
    meta = GraphMeta(num_blocks=2, hf_config={"vocab_size": 97}, state_dtype="float16")
    cached = meta.replace(cached="decode")
    assert cached.cached == "decode" and meta.cached is None
    assert cached.num_blocks == 2 and cached.state_dtype == "float16"
    assert cached.hf_config is meta.hf_config


def test_capture_attaches_it_and_deepcopy_carries_it():
    gm = quamba_fx.capture(make_model(tiny_config()))
    meta = graph_meta(gm)
    assert meta.source == "MambaForCausalLM" and meta.num_blocks == 2 and meta.prefix == "backbone."
    assert meta.example_shape == [1, 8] and meta.dtype == "float32" and meta.hf_config["vocab_size"] == 97
    copied = copy.deepcopy(gm)
    assert graph_meta(copied) == meta and graph_meta(copied) is not meta
    graph_meta(copied).recipe = "naive"
    assert meta.recipe is None
