"""save_pretrained / from_pretrained: bit-identical round trips, what a save may replace, clear load
errors for every malformed or edited field. Killed and concurrent saves: test_checkpoint_faults.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import quamba_fx
from quamba_fx import CheckpointError
from quamba_fx.checkpoint import CONFIG_DIGEST_KEY, WEIGHTS_FILE
from quamba_fx.checkpoint_format import _config_digest, _sha256
from quamba_fx.errors import NonFiniteError
from quamba_fx.graph_meta import graph_meta
from quamba_fx.recipes import CONV_OUT, OUT_PROJ_IN, W8A8_TAPS, X_PROJ_OUT, QuantSpec, Recipe, make_recipe

from .conftest import make_model, tiny_config


FLOAT_HEAD_QUAMBA = dataclasses.replace(make_recipe("quamba"), head=None)


def batches(count=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 12), generator=g) for _ in range(count)]


@pytest.fixture(scope="module")
def graphs():
    model = make_model(tiny_config(hidden_size=32, conv_kernel=3))
    quantized = quamba_fx.quantize(model, batches(), recipe="quamba", progress=False)
    float_head = quamba_fx.quantize(model, batches(), recipe=FLOAT_HEAD_QUAMBA, progress=False)
    return {
        "float": quamba_fx.capture(model),
        "naive": quamba_fx.quantize(model, batches(), recipe="naive", progress=False),
        "quamba": quantized,
        "fused": quamba_fx.fuse(quantized),
        # What format 1 saved: the quamba recipe before its head was quantized.
        "quamba-format-1": float_head,
        "fused-format-1": quamba_fx.fuse(float_head),
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


def assert_same_graph(loaded, original, ids):
    """Every parameter and buffer equal in dtype, shape and bits, the same nodes, the same logits."""
    for kind, named in (("parameter", "named_parameters"), ("buffer", "named_buffers")):
        mine = dict(getattr(loaded, named)(remove_duplicate=False))
        theirs = dict(getattr(original, named)(remove_duplicate=False))
        assert mine.keys() == theirs.keys(), kind
        for name, tensor in mine.items():
            assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    assert [n.format_node() for n in loaded.graph.nodes] == [n.format_node() for n in original.graph.nodes]
    with torch.no_grad():
        assert torch.equal(loaded(ids), original(ids))


# Never registered: percentile scales on out_proj's input and x_proj's output instead of conv1d's,
# no Hadamard rotation.
CUSTOM = Recipe("clip-late", hadamard=False, specs={
    **{tap: QuantSpec() for tap in W8A8_TAPS},
    X_PROJ_OUT: QuantSpec(observer="percentile", observer_args={"percentile": 99.5, "bins": 512}),
    OUT_PROJ_IN: QuantSpec(observer="percentile", observer_args={"percentile": 99.0}),
})


@pytest.mark.parametrize("fused", [False, True])
def test_a_never_registered_recipe_reloads_bit_identically(tmp_path, fused):
    model = make_model(tiny_config(hidden_size=32, conv_kernel=3))
    quantized = quamba_fx.quantize(model, batches(), recipe=CUSTOM, progress=False)
    if fused:
        quantized = quamba_fx.fuse(quantized)
    # The custom scales really differ from what a built-in recipe would give.
    reference = quamba_fx.quantize(model, batches(), recipe="naive", progress=False)
    scale = "backbone.layers.0.mixer.out_proj.input_scale"
    assert quantized.get_buffer(scale) < reference.get_buffer(scale)
    quantized.save_pretrained(tmp_path / "custom")
    assert read_config(tmp_path / "custom")["recipe"] == CUSTOM.to_dict()
    loaded = quamba_fx.from_pretrained(tmp_path / "custom")
    assert graph_meta(loaded).recipe == "clip-late" and graph_meta(loaded).recipe_spec == CUSTOM
    assert graph_meta(loaded).fused is fused
    assert_same_graph(loaded, quantized, batches(1, seed=4)[0])
    # ... and saves again to the same config.
    loaded.save_pretrained(tmp_path / "again")
    assert read_config(tmp_path / "again")["recipe"] == CUSTOM.to_dict()


def format_1_config(config, percentile):
    """`config` (format 2) as format 1 wrote it: the recipe by name, and the percentile."""
    old = {key: value for key, value in config.items() if key != "recipe"}
    name = config["recipe"]["name"] if config["recipe"] else None
    return {**old, "format_version": 1, "recipe": name, "percentile": percentile}


@pytest.mark.parametrize("kind, percentile", [("float", None), ("naive", None), ("quamba-format-1", 99.999),
                                              ("fused-format-1", 99.999)])
def test_format_1_checkpoints_still_load_identically(graphs, tmp_path, kind, percentile):
    path = tmp_path / kind
    graphs[kind].save_pretrained(path)
    write_config(path, format_1_config(read_config(path), percentile), restamp=True)
    loaded = quamba_fx.from_pretrained(path)
    assert graph_meta(loaded).recipe_spec == (None if kind == "float" else graph_meta(graphs[kind]).recipe_spec)
    assert_same_graph(loaded, graphs[kind], batches(1, seed=4)[0])


def test_format_1_percentile_sets_the_conv1d_observer(graphs, tmp_path):
    graphs["quamba-format-1"].save_pretrained(tmp_path / "q")
    current = read_config(tmp_path / "q")
    write_config(tmp_path / "q", format_1_config(current, 99.9), restamp=True)
    recipe = graph_meta(quamba_fx.from_pretrained(tmp_path / "q")).recipe_spec
    assert recipe == dataclasses.replace(make_recipe("quamba", percentile=99.9), head=None)
    assert recipe.spec(CONV_OUT).observer_kwargs == {"percentile": 99.9, "bins": 4096}
    # Format 1 treated a null percentile as the default.
    write_config(tmp_path / "q", format_1_config(current, None), restamp=True)
    assert graph_meta(quamba_fx.from_pretrained(tmp_path / "q")).recipe_spec == FLOAT_HEAD_QUAMBA


@pytest.mark.parametrize("field, value, message", [
    ("recipe", "awq", "recipe must be null or one of naive, quamba, got 'awq'"),
    ("recipe", {"name": "quamba"}, "recipe must be null or one of naive, quamba"),
    ("percentile", 101, r"percentile must be null or a number in \(0, 100\]"),
    ("percentile", True, r"percentile must be null or a number in \(0, 100\]"),
])
def test_malformed_format_1_fields_give_one_checkpoint_error(saved, field, value, message):
    write_config(saved, {**format_1_config(read_config(saved), 99.999), field: value})
    with pytest.raises(CheckpointError, match=message) as info:
        quamba_fx.from_pretrained(saved)
    assert "config.json" in one_line(info)


@pytest.mark.parametrize("path, value, message", [
    (("taps", 2, "spec", "observer"), "minmax", r"recipe.taps\[2\].spec.observer: unknown observer 'minmax'"),
    (("taps", 0, "spec", "dtype"), "int4", r"recipe.taps\[0\].spec.dtype: must be one of int8, float8_e4m3, got 'int4'"),
    (("taps", 1, "at"), "before", r"recipe.taps\[1\].at: must be one of output, input, activation"),
    (("hadamard",), None, "recipe.hadamard: must be a boolean, got None"),
])
def test_a_malformed_recipe_in_the_config_names_the_field(saved, path, value, message):
    config = read_config(saved)
    target = config["recipe"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    write_config(saved, config, restamp=True)
    with pytest.raises(CheckpointError, match=message) as info:
        quamba_fx.from_pretrained(saved)
    assert one_line(info).startswith(str(saved / "config.json")) and "save the model again" in str(info.value)


def test_a_recipe_tap_the_graph_lacks_is_one_checkpoint_error(saved):
    config = read_config(saved)
    config["recipe"]["taps"][0]["module"] = "mixer.gate"
    write_config(saved, config, restamp=True)
    with pytest.raises(CheckpointError, match="describes a graph that cannot be rebuilt .*mixer.gate") as info:
        quamba_fx.from_pretrained(saved)
    one_line(info)


def test_a_graph_naming_a_recipe_it_does_not_carry_is_not_saved(graphs, tmp_path):
    gm = copy.deepcopy(graphs["quamba"])
    graph_meta(gm).recipe_spec = None
    with pytest.raises(CheckpointError, match="quantized with recipe 'quamba' but carries no Recipe"):
        gm.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_files_are_safetensors_and_json_only(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["format"] == "quamba-fx" and config["format_version"] == 2
    assert config["recipe"] == make_recipe("quamba").to_dict() and "percentile" not in config
    assert config["source_config"]["hidden_size"] == 32 and config["library_version"] == quamba_fx.__version__
    tensors = load_file(saved / WEIGHTS_FILE)
    assert tensors["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.int8
    assert tensors["backbone.layers.1.mixer.conv1d.output_scale"].shape == ()
    # The tied embedding reads the W8A8 head's int8 table: both tensors stored once.
    assert tensors["backbone.embeddings.weight"].dtype == torch.int8 and "lm_head.weight_scale" not in tensors
    assert config["aliases"] == {"lm_head.weight": "backbone.embeddings.weight",
                                 "lm_head.weight_scale": "backbone.embeddings.weight_scale"}


def test_save_replaces_an_old_checkpoint_and_leaves_no_temporaries(graphs, saved):
    graphs["naive"].save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["recipe"]["name"] == "naive"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_interrupted_save_leaves_nothing_behind(graphs, tmp_path, monkeypatch):
    import quamba_fx.checkpoint_format as checkpoint  # where saving lives

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
    with pytest.raises(CheckpointError, match=r"in_proj.weight has shape \[5, 32\] but .*config.json describes \[128, 32\]"):
        quamba_fx.from_pretrained(saved)


def test_wrong_scale_shape_is_rejected(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    tensors["backbone.layers.0.mixer.in_proj.weight_scale"] = tensors["backbone.layers.0.mixer.in_proj.weight_scale"][:5]
    rewrite_weights(saved, tensors)
    with pytest.raises(CheckpointError, match="do not fit the graph") as info:
        quamba_fx.from_pretrained(saved)
    assert "\n" not in str(info.value)


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


# --- what save_pretrained may replace -------------------------------------------------------


def snapshot(root):
    """Every path under `root` (hidden ones too) with the bytes of each file."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_save_refuses_a_directory_that_is_not_a_checkpoint(graphs, tmp_path):
    target = tmp_path / "thesis"
    (target / "photos").mkdir(parents=True)
    (target / "thesis.txt").write_text("four years of work")
    (target / "photos" / "lab.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="is not a quamba-fx checkpoint.*refusing to replace it") as info:
        graphs["float"].save_pretrained(target)
    one_line(info)
    assert snapshot(tmp_path) == before


def test_save_refuses_a_file(graphs, tmp_path):
    target = tmp_path / "notes"
    target.write_text("keep me")
    with pytest.raises(CheckpointError, match="exists and is not a directory") as info:
        graphs["float"].save_pretrained(target)
    one_line(info)
    assert snapshot(tmp_path) == {"notes": b"keep me"}


def test_save_refuses_a_symbolic_link(graphs, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        graphs["float"].save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "real").iterdir()) == []


def test_save_fills_an_empty_directory(graphs, tmp_path):
    (tmp_path / "ckpt").mkdir()
    graphs["float"].save_pretrained(tmp_path / "ckpt")
    ids = batches(1, seed=4)[0]
    assert torch.equal(quamba_fx.from_pretrained(tmp_path / "ckpt")(ids), graphs["float"](ids))


def test_overwrite_false_refuses_an_existing_checkpoint(graphs, saved):
    before = snapshot(saved.parent)
    with pytest.raises(CheckpointError, match="already holds a quamba-fx checkpoint; pass overwrite=True") as info:
        quamba_fx.save_pretrained(graphs["naive"], saved, overwrite=False)
    one_line(info)
    assert snapshot(saved.parent) == before
    quamba_fx.save_pretrained(graphs["naive"], saved.parent / "fresh", overwrite=False)
    assert graph_meta(quamba_fx.from_pretrained(saved.parent / "fresh")).recipe == "naive"


# --- places that cannot be written ------------------------------------------------------------


@pytest.mark.parametrize("where", ["/proc/quamba-fx-ckpt", "/proc/quamba-fx-missing/a/ckpt", "FILE/ckpt"])
def test_unwritable_places_give_one_checkpoint_error(graphs, tmp_path, where):
    (tmp_path / "FILE").write_text("a file, not a directory")
    target = tmp_path / where if where.startswith("FILE") else where
    with pytest.raises(CheckpointError, match="cannot write a checkpoint to") as info:
        graphs["float"].save_pretrained(target)
    one_line(info)
    assert snapshot(tmp_path) == {"FILE": b"a file, not a directory"}


def test_missing_parents_are_created_and_removed_again_on_failure(graphs, tmp_path, monkeypatch):
    graphs["float"].save_pretrained(tmp_path / "a" / "b" / "ckpt")
    assert (tmp_path / "a" / "b" / "ckpt" / "config.json").is_file()
    import quamba_fx.checkpoint_format as checkpoint  # where saving lives

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="cannot write a checkpoint to .*No space left on device"):
        graphs["float"].save_pretrained(tmp_path / "c" / "d" / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# --- non-finite values ---------------------------------------------------------------------


def test_non_finite_weights_are_not_saved(graphs, tmp_path):
    gm = copy.deepcopy(graphs["quamba-format-1"])  # a float embedding table
    with torch.no_grad():
        gm.get_parameter("backbone.norm_f.weight")[3] = float("nan")
        gm.get_parameter("backbone.embeddings.weight")[96, 0] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or infinite values in backbone.embeddings.weight, backbone.norm_f.weight") as info:
        gm.save_pretrained(tmp_path / "ckpt")
    one_line(info)
    assert list(tmp_path.iterdir()) == []


def test_quantize_rejects_non_finite_weights():
    model = make_model(tiny_config(hidden_size=32, conv_kernel=3))
    with torch.no_grad():
        model.backbone.norm_f.weight[0] = float("nan")
        model.backbone.embeddings.weight[96] = float("inf")  # a row calibration below never reads
    calib = [torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(NonFiniteError, match="backbone.embeddings.weight, backbone.norm_f.weight") as info:
        quamba_fx.quantize(model, calib, recipe="quamba", progress=False)
    assert isinstance(info.value, quamba_fx.QuambaError)
    one_line(info)


def test_non_finite_weights_are_not_loaded(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    tensors["backbone.norm_f.weight"][0] = float("nan")
    rewrite_weights(saved, tensors)
    with pytest.raises(CheckpointError, match="holds NaN or infinite values in backbone.norm_f.weight"):
        quamba_fx.from_pretrained(saved)


# --- integrity of config.json ------------------------------------------------------------------


def read_config(path):
    return json.loads((path / "config.json").read_text())


def write_config(path, config, restamp=False):
    """Write config.json; with `restamp`, record both hashes again as a save would (a consistent forgery)."""
    if restamp:
        weights = path / WEIGHTS_FILE
        save_file(load_file(weights), weights, metadata={"format": "pt", CONFIG_DIGEST_KEY: _config_digest(config)})
        config = {**config, "weights_sha256": _sha256(weights)}
    (path / "config.json").write_text(json.dumps(config))


def test_edited_config_is_rejected(saved):
    config = read_config(saved)
    write_config(saved, {**config, "recipe": make_recipe("naive").to_dict()})
    with pytest.raises(CheckpointError, match=r"config.json does not match the SHA-256 recorded in model.safetensors") as info:
        quamba_fx.from_pretrained(saved)
    one_line(info)


def test_reformatted_config_still_loads(graphs, saved):
    config = read_config(saved)
    (saved / "config.json").write_text(json.dumps(dict(reversed(config.items())), indent=4))
    ids = batches(1, seed=4)[0]
    assert torch.equal(quamba_fx.from_pretrained(saved)(ids), graphs["quamba"](ids))


def test_checkpoint_written_before_the_config_digest_loads(graphs, saved):
    """Format 1 as first written: weights metadata {"format": "pt"} only, no digest of the config."""
    weights = saved / WEIGHTS_FILE
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    config = read_config(saved)
    config["weights_sha256"] = _sha256(weights)
    (saved / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    ids = batches(1, seed=4)[0]
    assert torch.equal(quamba_fx.from_pretrained(saved)(ids), graphs["quamba"](ids))


# --- schema of config.json -----------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("dtype", 5, "dtype must be one of float32"),
    ("dtype", "int8", "dtype must be one of float32"),
    ("aliases", ["lm_head.weight"], "aliases must be an object"),
    ("aliases", {"lm_head.weight": 3}, "aliases must be an object"),
    ("example_shape", [100000, 100000], r"example_shape must be \[batch, seq_len\]"),
    ("example_shape", "1x8", r"example_shape must be \[batch, seq_len\]"),
    ("example_shape", [1, True], r"example_shape must be \[batch, seq_len\]"),
    ("source_config", "mamba", "source_config must be an object"),
    ("source_config", None, "source_config must be an object"),
    ("format_version", 0, "format_version must be a positive integer"),
    ("format_version", -1, "format_version must be a positive integer"),
    ("format_version", True, "format_version must be a positive integer"),
    ("format_version", "1", "format_version must be a positive integer, got '1'"),
    ("format_version", 1.0, "format_version must be a positive integer"),
    ("recipe", "awq", r"recipe must be null or an object \(a recipe as Recipe.to_dict\(\) writes it\), got 'awq'"),
    ("recipe", ["quamba"], "recipe must be null or an object"),
    ("recipe", {"name": "quamba"}, "recipe.hadamard: is missing"),
    ("fused", "yes", "fused must be a boolean"),
    ("source", "MambaLMHeadModel", "source must be one of"),
    ("weights_sha256", 12, "weights_sha256 must be 64 lowercase hex digits"),
])
def test_malformed_fields_give_one_checkpoint_error(saved, field, value, message):
    write_config(saved, {**read_config(saved), field: value})
    with pytest.raises(CheckpointError, match=message) as info:
        quamba_fx.from_pretrained(saved)
    assert "config.json" in one_line(info) and "newer" not in str(info.value)


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 10000, "num_hidden_layers is 10000 but .*model.safetensors holds layers 0, 1"),
    ("num_hidden_layers", 2**40, "num_hidden_layers is 1099511627776 but"),
    ("num_hidden_layers", 0, "source_config.num_hidden_layers must be a positive integer"),
    ("hidden_size", "32", r"source_config.hidden_size must be a positive integer|source_config is not a valid MambaConfig"),
    ("hidden_size", 64, r"has shape \[97, 32\] but .*describes \[97, 64\]"),
    ("vocab_size", 98, r"embeddings.weight has shape \[97, 32\]"),
    ("state_size", 4, r"x_proj.weight has shape \[18, 64\] but .*describes \[10, 64\]"),
    ("conv_kernel", 4, r"conv1d.weight has shape \[64, 1, 3\]"),
    ("hidden_act", "gelu", "source_config.hidden_act must be 'silu'"),
    ("use_conv_bias", "yes", "source_config.use_conv_bias must be a boolean|not a valid MambaConfig"),
])
def test_architecture_is_checked_against_the_weights_before_building(saved, field, value, message):
    """Even a config re-stamped with consistent hashes is checked against the tensors it claims."""
    config = read_config(saved)
    write_config(saved, {**config, "source_config": {**config["source_config"], field: value}}, restamp=True)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as info:
        quamba_fx.from_pretrained(saved)
    one_line(info)
    assert time.perf_counter() - started < 5


def test_restamped_dtype_must_match_the_weights(saved):
    write_config(saved, {**read_config(saved), "dtype": "float16"}, restamp=True)
    with pytest.raises(CheckpointError, match="dtype is float16 but .* holds F32 weights"):
        quamba_fx.from_pretrained(saved)


def test_example_shapes_are_propagated_with_fake_tensors_only(graphs):
    gm = copy.deepcopy(graphs["float"])
    # 2**51 token ids: a real tensor of that shape cannot be allocated anywhere.
    quamba_fx.annotate_shapes(gm, (2**31, 2**20))
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(output.meta["tensor_meta"].shape) == (2**31, 2**20, 97)


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 3), st.integers(), st.floats(),
    st.sampled_from(["", "1", "naive", "quamba", "float16", "bfloat16", "MambaModel", "silu", "torch.float32",
                     10000, 100000, 2**40, [1, 8], [100000, 100000], [2, 3], {"lm_head.weight": "x"}, {}]),
    st.text(max_size=6), st.lists(st.integers(-1, 2**21), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
TOP_FIELDS = ["format", "format_version", "library_version", "recipe", "fused", "source", "dtype",
              "example_shape", "aliases", "weights_sha256", "source_config"]
SOURCE_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "state_size", "num_hidden_layers", "expand",
                 "conv_kernel", "time_step_rank", "use_bias", "use_conv_bias", "residual_in_fp32",
                 "layer_norm_epsilon", "tie_word_embeddings", "hidden_act", "initializer_range", "time_step_scale",
                 "time_step_init_scheme", "rescale_prenorm_residual", "dtype", "model_type", "pad_token_id"]
DELETE = object()
SPEC_FIELDS = ["dtype", "qmin", "qmax", "granularity", "observer", "observer_args"]
MUTATIONS = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(TOP_FIELDS), st.one_of(st.just(DELETE), JSON_VALUES)),
    st.tuples(st.just("source_config"), st.sampled_from(SOURCE_FIELDS), st.one_of(st.just(DELETE), JSON_VALUES)),
    st.tuples(st.just("recipe"), st.sampled_from(["name", "hadamard", "taps"]), st.one_of(st.just(DELETE), JSON_VALUES)),
    # The conv1d tap's spec (the percentile one): st.sampled_from covers "abs_max", int and float edits.
    st.tuples(st.just("conv1d_spec"), st.sampled_from(SPEC_FIELDS),
              st.one_of(st.just(DELETE), JSON_VALUES, st.sampled_from(["abs_max", "percentile", -128, 127, 99.0]))),
)


@pytest.fixture(scope="module")
def pristine(graphs, tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "ckpt"
    graphs["quamba"].save_pretrained(path)
    return path


def mutated_copy(pristine, directory, mutation, restamp):
    where, field, value = mutation
    path = Path(directory) / "ckpt"
    shutil.copytree(pristine, path)
    config = read_config(path)
    section = {"top": config, "source_config": config["source_config"], "recipe": config["recipe"],
               "conv1d_spec": config["recipe"]["taps"][W8A8_TAPS.index(CONV_OUT)]["spec"]}[where]
    if value is DELETE:
        section.pop(field, None)
    else:
        section[field] = value
    write_config(path, config, restamp=restamp)
    return path


@settings(max_examples=60)
@given(mutation=MUTATIONS)
def test_any_config_edit_loads_identically_or_raises_one_checkpoint_error(graphs, pristine, mutation):
    ids = batches(1, seed=4)[0]
    with tempfile.TemporaryDirectory() as directory:
        path = mutated_copy(pristine, directory, mutation, restamp=False)
        try:
            loaded = quamba_fx.from_pretrained(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return
    assert torch.equal(loaded(ids), graphs["quamba"](ids))


@pytest.mark.slow
@settings(max_examples=60)
@given(mutation=MUTATIONS)
def test_any_restamped_config_edit_loads_or_raises_one_checkpoint_error(pristine, mutation):
    """With both hashes forged to match, the schema and architecture checks alone stand guard."""
    with tempfile.TemporaryDirectory() as directory:
        path = mutated_copy(pristine, directory, mutation, restamp=True)
        try:
            quamba_fx.from_pretrained(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)


def test_the_skeleton_shares_the_parameters_the_checkpoint_stored_once():
    # transformers 5.0 builds a model on the meta device untied; the W8A8 head and the embedding
    # get one int8 table only where their float weights are one tensor, so the skeleton is tied
    # from the checkpoint's aliases, whatever the version does.
    from quamba_fx.checkpoint import _tie_as_saved

    model = make_model(tiny_config(hidden_size=32, conv_kernel=3))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert model.lm_head.weight is not model.backbone.embeddings.weight
    _tie_as_saved(model, {"lm_head.weight": "backbone.embeddings.weight",
                          "lm_head.weight_scale": "backbone.embeddings.weight_scale"})  # not a float parameter: skipped
    assert model.lm_head.weight is model.backbone.embeddings.weight
