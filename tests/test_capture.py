"""Capture: one graph whose logits equal Hugging Face's eager Mamba, with readable, annotated nodes."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import quamba_fx
from quamba_fx.capture import ROLES
from quamba_fx.graph_info import block, is_kind, role
from quamba_fx.graph_meta import graph_meta

from .conftest import make_model, tiny_config


@st.composite
def mamba_configs(draw):
    hidden = draw(st.integers(8, 128))
    return tiny_config(
        vocab_size=draw(st.integers(16, 300)),
        hidden_size=hidden,
        state_size=draw(st.integers(1, 16)),
        conv_kernel=draw(st.integers(2, 4)),
        expand=draw(st.integers(1, 2)),
        num_hidden_layers=draw(st.integers(1, 4)),
        time_step_rank=draw(st.one_of(st.just("auto"), st.integers(1, 16))),
        use_bias=draw(st.booleans()),
        use_conv_bias=draw(st.booleans()),
        residual_in_fp32=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
    )


def assert_close_to_magnitude(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} exceeds {rel} x magnitude {scale:.3g}"


@given(config=mamba_configs(), batch=st.integers(1, 3), seq_len=st.integers(1, 64), seed=st.integers(0, 2**16))
@settings(max_examples=30)
def test_logits_equal_hf_eager(config, batch, seq_len, seed):
    model = make_model(config, seed=seed)
    gm = quamba_fx.capture(model)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        actual = gm(ids)
    assert actual.shape == (batch, seq_len, config.vocab_size)
    assert actual.dtype == torch.float32
    assert_close_to_magnitude(actual, expected)


@given(config=mamba_configs(), seq_len=st.integers(1, 32))
@settings(max_examples=8)
def test_backbone_capture_equals_hf_last_hidden_state(config, seq_len):
    model = make_model(config, head=False)
    gm = quamba_fx.capture(model)
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    with torch.no_grad():
        expected = model(ids, use_cache=False).last_hidden_state
        actual = gm(ids)
    assert_close_to_magnitude(actual, expected)
    assert gm.get_submodule("layers.0.mixer.conv1d") is model.layers[0].mixer.conv1d


def test_bfloat16_model_tracks_hf(tiny_model):
    model = make_model(tiny_config(), seed=3).to(torch.bfloat16)
    gm = quamba_fx.capture(model)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        actual = gm(ids)
    assert actual.dtype == torch.float32
    assert_close_to_magnitude(actual, expected, rel=3e-2)


@pytest.mark.parametrize("seq_len", [1, 8, 64])
def test_node_count_does_not_depend_on_sequence_length(tiny_model, seq_len):
    reference = quamba_fx.capture(tiny_model, example_shape=(1, 8))
    gm = quamba_fx.capture(tiny_model, example_shape=(2, seq_len))
    assert len(gm.graph.nodes) == len(reference.graph.nodes)
    scans = [n for n in gm.graph.nodes if is_kind(gm, n, "scan")]
    assert len(scans) == tiny_model.config.num_hidden_layers
    conv = next(n for n in gm.graph.nodes if is_kind(gm, n, "conv1d"))
    assert list(conv.meta["tensor_meta"].shape)[-1] == seq_len + tiny_model.config.conv_kernel - 1
    with torch.no_grad():
        assert gm(torch.zeros(2, seq_len, dtype=torch.long)).shape == (2, seq_len, 97)


def test_modules_keep_hugging_face_paths(tiny_model):
    gm = quamba_fx.capture(tiny_model)
    for i in range(tiny_model.config.num_hidden_layers):
        mixer = tiny_model.backbone.layers[i].mixer
        for name in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"):
            assert gm.get_submodule(f"backbone.layers.{i}.mixer.{name}") is getattr(mixer, name)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "backbone.layers.1.mixer.conv1d" in targets and "lm_head" in targets
    kinds = {type(gm.get_submodule(t)) for t in targets}
    assert nn.Linear in kinds and nn.Conv1d in kinds and nn.Embedding in kinds


def test_every_node_is_annotated(tiny_model):
    gm = quamba_fx.capture(tiny_model)
    blocks = set()
    for node in gm.graph.nodes:
        assert role(node) in ROLES, node
        if node.op == "call_module":
            assert node.meta["quamba"]["module"] == node.target
            assert "tensor_meta" in node.meta
        blocks.add(block(node))
    assert blocks == {None, 0, 1}
    conv_roles = {role(n) for n in gm.graph.nodes if is_kind(gm, n, "conv1d")}
    assert conv_roles == {"conv1d"}
    scan = next(n for n in gm.graph.nodes if is_kind(gm, n, "scan"))
    assert block(scan) == 0 and scan.meta["quamba"]["module"] == "backbone.layers.0.mixer"
    assert graph_meta(gm).num_blocks == 2
    assert graph_meta(gm).config["hidden_size"] == 32


def test_meta_device_model_captures_with_shapes_and_refuses_to_run():
    model = quamba_fx.load_model("mamba-2.8b", device="meta")
    gm = quamba_fx.capture(model)
    assert graph_meta(gm).on_meta_device
    quamba_fx.verify_topology(gm)
    x_proj = next(n for n in gm.graph.nodes if n.target == "backbone.layers.63.mixer.x_proj")
    assert list(x_proj.meta["tensor_meta"].shape) == [1, 8, 160 + 32]
    with pytest.raises(quamba_fx.MetaDeviceError, match="meta device"):
        gm(torch.zeros(1, 4, dtype=torch.long))


def test_capture_accepts_builtin_name():
    gm = quamba_fx.capture("mamba-tiny")
    assert graph_meta(gm).num_blocks == 2
