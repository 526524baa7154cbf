"""save_pretrained / from_pretrained: bit-identical round trips, what a save may replace, clear load
errors for every malformed or edited field. Killed and concurrent saves: test_checkpoint_faults.py."""

from __future__ import annotations

import copy
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
from quamba_fx.checkpoint import CONFIG_DIGEST_KEY, WEIGHTS_FILE, _config_digest, _sha256
from quamba_fx.errors import NonFiniteError

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
    assert quamba_fx.from_pretrained(saved.parent / "fresh").meta["quamba"]["recipe"] == "naive"


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
    import quamba_fx.checkpoint as checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="cannot write a checkpoint to .*No space left on device"):
        graphs["float"].save_pretrained(tmp_path / "c" / "d" / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# --- non-finite values ---------------------------------------------------------------------


def test_non_finite_weights_are_not_saved(graphs, tmp_path):
    gm = copy.deepcopy(graphs["quamba"])
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
    write_config(saved, {**config, "recipe": "naive"})
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
    ("recipe", "awq", "recipe must be null or one of naive, quamba"),
    ("percentile", 101, r"percentile must be null or a number in \(0, 100\]"),
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
TOP_FIELDS = ["format", "format_version", "library_version", "recipe", "percentile", "fused", "source", "dtype",
              "example_shape", "aliases", "weights_sha256", "source_config"]
SOURCE_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "state_size", "num_hidden_layers", "expand",
                 "conv_kernel", "time_step_rank", "use_bias", "use_conv_bias", "residual_in_fp32",
                 "layer_norm_epsilon", "tie_word_embeddings", "hidden_act", "initializer_range", "time_step_scale",
                 "time_step_init_scheme", "rescale_prenorm_residual", "dtype", "model_type", "pad_token_id"]
DELETE = object()
MUTATIONS = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(TOP_FIELDS), st.one_of(st.just(DELETE), JSON_VALUES)),
    st.tuples(st.just("source_config"), st.sampled_from(SOURCE_FIELDS), st.one_of(st.just(DELETE), JSON_VALUES)),
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
    section = config if where == "top" else config["source_config"]
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
