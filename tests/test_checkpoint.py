"""save_pretrained / from_pretrained: bit-identical round trips, atomic writes, clear load errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import quamba_fx
from quamba_fx import CheckpointError
from quamba_fx.checkpoint import WEIGHTS_FILE, _sha256

from .conftest import make_model, tiny_config


def batches(count=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 12), generator=g) for _ in range(count)]


@pytest.fixture(scope="module")
def graphs():
    model = make_model(tiny_config(hidden_size=32, conv_kernel=3))
    quantized = quamba_fx.quantize(model, batches(), recipe="quamba", progress=False)
    return {
        "float": quamba_fx.capture(model),
        "naive": quamba_fx.quantize(model, batches(), recipe="naive", progress=False),
        "quamba": quantized,
        "fused": quamba_fx.fuse(quantized),
    }


@pytest.fixture
def saved(graphs, tmp_path):
    path = tmp_path / "ckpt"
    graphs["quamba"].save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["float", "naive", "quamba", "fused"])
def test_round_trip_is_bit_identical(graphs, tmp_path, kind):
    graphs[kind].save_pretrained(tmp_path / kind)
    loaded = quamba_fx.from_pretrained(tmp_path / kind)
    ids = batches(1, seed=4)[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids), graphs[kind](ids))
    assert [n.format_node() for n in loaded.graph.nodes] == [n.format_node() for n in graphs[kind].graph.nodes]


def test_files_are_safetensors_and_json_only(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["format"] == "quamba-fx" and config["format_version"] == 1
    assert config["recipe"] == "quamba" and config["percentile"] == 99.999
    assert config["source_config"]["hidden_size"] == 32 and config["library_version"] == quamba_fx.__version__
    tensors = load_file(saved / WEIGHTS_FILE)
    assert tensors["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.int8
    assert tensors["backbone.layers.1.mixer.conv1d.output_scale"].shape == ()
    assert config["aliases"] == {"lm_head.weight": "backbone.embeddings.weight"}


def test_save_replaces_an_old_checkpoint_and_leaves_no_temporaries(graphs, saved):
    graphs["naive"].save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["recipe"] == "naive"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_interrupted_save_leaves_nothing_behind(graphs, tmp_path, monkeypatch):
    import quamba_fx.checkpoint as checkpoint

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_sha256", explode)
    with pytest.raises(KeyboardInterrupt):
        graphs["quamba"].save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_rejected(saved):
    weights = saved / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="does not match the SHA-256 recorded in config.json"):
        quamba_fx.from_pretrained(saved)


def test_tampered_weights_are_rejected(saved):
    weights = saved / WEIGHTS_FILE
    tensors = load_file(weights)
    tensors["backbone.layers.0.mixer.conv1d.output_scale"] *= 2
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="was modified or truncated"):
        quamba_fx.from_pretrained(saved)


def rewrite_weights(saved, tensors):
    weights = saved / WEIGHTS_FILE
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((saved / "config.json").read_text())
    config["weights_sha256"] = _sha256(weights)
    (saved / "config.json").write_text(json.dumps(config))


def test_missing_scale_is_named(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    del tensors["backbone.layers.1.mixer.x_proj.output_scale"]
    rewrite_weights(saved, tensors)
    with pytest.raises(CheckpointError, match="Missing key.*backbone.layers.1.mixer.x_proj.output_scale"):
        quamba_fx.from_pretrained(saved)


def test_wrong_shape_is_rejected(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    tensors["backbone.layers.0.mixer.in_proj.weight"] = tensors["backbone.layers.0.mixer.in_proj.weight"][:5]
    rewrite_weights(saved, tensors)
    with pytest.raises(CheckpointError, match="do not fit the graph"):
        quamba_fx.from_pretrained(saved)


def test_newer_format_and_bad_configs_are_rejected(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99, newer than this quamba-fx"):
        quamba_fx.from_pretrained(saved)
    (saved / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        quamba_fx.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="is not a quamba-fx checkpoint config"):
        quamba_fx.from_pretrained(saved)
    with pytest.raises(CheckpointError, match="is not a directory"):
        quamba_fx.from_pretrained(tmp_path / "nothing")
    os.remove(saved / "config.json")
    with pytest.raises(CheckpointError, match="has no config.json"):
        quamba_fx.from_pretrained(saved)


def test_meta_graphs_cannot_be_saved(tmp_path):
    gm = quamba_fx.capture(quamba_fx.load_model("mamba-tiny", device="meta"))
    with pytest.raises(CheckpointError, match="captured on the meta device"):
        gm.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
