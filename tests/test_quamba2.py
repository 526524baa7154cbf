"""Quamba2's recipes on Mamba-1 and Mamba-2, mostly the 4-bit ones (`quamba2-w4a8`,
`quamba2-w4a16`): the recipe data, the quantize flow (GPTQ statistics from calibration),
save/load, lowering and generation, and accuracy on both trained byte models, `quamba2-w8a8`'s
too (the kernels: test_kernel_gemm_w4.py; Mamba-2's per-channel conv scales: test_mamba2.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import quamba_fx
from quamba_fx import textdata
from quamba_fx.calibrate import CalibrationError, calibrate
from quamba_fx.errors import CheckpointError, RecipeError
from quamba_fx.generation import QuambaForCausalLM
from quamba_fx.graph_meta import find_graph_meta
from quamba_fx.graph_info import op_name
from quamba_fx.kernels.dispatch import use_triton
from quamba_fx.commands import state_bytes
from quamba_fx.flows import float_passes
from quamba_fx.models import builtin_config, random_model
from quamba_fx.ops import selective_scan_cached_triton
from quamba_fx.passes.lowering.match import is_cast
from quamba_fx.pipeline import Pipeline
from quamba_fx.quant.int4 import dequantize_weight_int4, quantize_weight_int4
from quamba_fx.quant.int4_linear import W4A8Linear, W4A16Linear, W4Embedding
from quamba_fx.recipes import (CONV_OUT, QUAMBA, QUAMBA2_W4A8, QUAMBA2_W4A16, QUAMBA2_W8A8, Recipe, WeightSpec,
                               make_recipe)
from quamba_fx.recipes.spec import CHANNEL_ABS_MAX_INT8
from quamba_fx.runtime import Generator

from .test_checkpoint import read_config, write_config
from .test_recipes import DELETE, edited, quamba_dict

LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def logits(gm, ids):
    out = gm(ids)
    return out.logits if hasattr(out, "logits") else out


# Mamba-2's 4-bit flow is CI's slow run (its 13 tests, about 30 s on CI, kept the fast suite under
# its 10-minute budget); test_mamba2.py covers Mamba-2's own ops in the fast one.
@pytest.fixture(scope="module", params=["mamba-tiny", pytest.param("mamba2-tiny", marks=pytest.mark.slow)])
def float_graph(request):
    return quamba_fx.capture(random_model(builtin_config(request.param), seed=1))


IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


# --- the recipes as data ---------------------------------------------------------------------------


def test_the_builtin_4bit_recipes_are_what_the_docs_say():
    assert QUAMBA2_W4A8.specs == QUAMBA.specs and QUAMBA2_W4A8.hadamard
    assert QUAMBA2_W4A16.specs == () and QUAMBA2_W4A16.hadamard
    # Mamba-2's conv1d output per channel (x) and per state group (B, C): test_mamba2.py.
    assert QUAMBA2_W4A8.channel_specs == QUAMBA2_W8A8.channel_specs == ((CONV_OUT, CHANNEL_ABS_MAX_INT8),)
    assert QUAMBA2_W8A8.specs == QUAMBA.specs and QUAMBA2_W8A8.weights == QUAMBA.weights
    for recipe in (QUAMBA2_W4A8, QUAMBA2_W4A16):
        assert recipe.weights == WeightSpec(bits=4, group_size=128, method="gptq", embedding_and_head=True)
        assert make_recipe(recipe.name) is recipe
        assert Recipe.from_dict(recipe.to_dict()) == recipe
    for name in ("naive-w4a8", "naive-w4a16"):  # their baselines: rounded to nearest, no rotation
        baseline = make_recipe(name)
        assert not baseline.hadamard and baseline.weights == WeightSpec(bits=4, group_size=128, method="rtn",
                                                                        embedding_and_head=True)
    assert make_recipe("naive-w4a8").specs == make_recipe("naive").specs and make_recipe("naive-w4a16").specs == ()
    assert QUAMBA.weights == WeightSpec() and QUAMBA.to_dict()["weights"] == {
        "bits": 8, "group_size": None, "method": "rtn",
        "modules": ["mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"]}


def test_a_recipe_saved_before_weight_specs_reads_as_8_bit_per_channel():
    data = quamba_dict()
    del data["weights"]
    assert Recipe.from_dict(data) == QUAMBA


@pytest.mark.parametrize("path, value, field, message", [
    (("weights", "bits"), 3, "weights.bits", "must be 8 or 4, got 3"),
    (("weights", "bits"), True, "weights.bits", "must be 8 or 4"),
    (("weights", "group_size"), 128, "weights.group_size", "must be null for 8-bit weights"),
    (("weights", "method"), "gptq", "weights.method", "must be rtn for 8-bit weights"),
    (("weights", "method"), "awq", "weights.method", "must be one of rtn, gptq"),
    (("weights", "modules"), ["mixer.in_proj", "mixer.in_proj"], "weights.modules", "must be a list of distinct"),
    (("weights", "modules"), DELETE, "weights.modules", "is missing"),
    (("weights", "scale"), 1, "weights.scale", "is not a recipe field; expected only bits, group_size, method, modules"),
    (("weights",), [], "weights", "must be an object"),
    (("weights", "embedding_and_head"), True, "weights.embedding_and_head", "true only with 4-bit weights"),
    (("weights", "embedding_and_head"), "yes", "weights.embedding_and_head", "must be true or false"),
])
def test_malformed_weight_specs_raise_one_line_naming_the_field(path, value, field, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.from_dict(edited(path, value))
    assert info.value.field == field and "\n" not in str(info.value)


def test_a_4bit_recipe_saved_before_the_embedding_flag_keeps_its_float_embedding_and_head():
    data = QUAMBA2_W4A16.to_dict()
    assert data["weights"]["embedding_and_head"] is True
    del data["weights"]["embedding_and_head"]
    assert Recipe.from_dict(data).weights == dataclasses.replace(QUAMBA2_W4A16.weights, embedding_and_head=False)
    assert "embedding_and_head" not in QUAMBA.to_dict()["weights"]  # 8-bit recipes' dicts as they were


def test_4bit_weights_need_an_even_group_and_only_weight_only_recipes_may_have_no_taps():
    with pytest.raises(RecipeError, match="weights.group_size: must be an even integer >= 2"):
        WeightSpec(bits=4, group_size=7)
    with pytest.raises(RecipeError, match="taps: must be a non-empty list of taps"):
        Recipe("none", False, ())
    Recipe("weights-only", False, (), WeightSpec(bits=4, group_size=32))


def test_a_misspelt_weight_module_is_an_error_not_ignored(float_graph):
    recipe = dataclasses.replace(QUAMBA2_W4A16, weights=WeightSpec(bits=4, group_size=32, modules=("mixer.inproj",)))
    with pytest.raises(RecipeError, match="weights.modules: mixer.inproj: no registered architecture"):
        quamba_fx.quantize(float_graph, recipe=recipe, progress=False)


# --- the flow --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(float_graph):
    return {recipe: quamba_fx.quantize(float_graph, IDS, recipe=recipe, progress=False)
            for recipe in ("quamba2-w4a8", "quamba2-w4a16")}


@pytest.mark.parametrize("recipe, cls", [("quamba2-w4a8", W4A8Linear), ("quamba2-w4a16", W4A16Linear)])
def test_every_linear_of_every_block_gets_packed_4bit_weights(float_graph, quantized, recipe, cls):
    qm = quantized[recipe]
    block_linears = {name: m for name, m in qm.named_modules() if name.rsplit(".", 1)[-1] in LINEARS}
    assert block_linears and all(type(m) is cls for m in block_linears.values())
    for name, module in block_linears.items():
        float_weight = float_graph.get_submodule(name).weight
        assert module.weight.dtype == torch.uint8
        assert module.weight.shape == (float_weight.shape[0], (float_weight.shape[1] + 1) // 2)
        assert module.weight_scale.dtype == torch.float16
    assert quamba_fx.graph_meta.graph_meta(qm).recipe == recipe


@pytest.mark.parametrize("recipe", ["quamba2-w4a8", "quamba2-w4a16"])
def test_the_embedding_is_rounded_and_the_head_gets_gptq(float_graph, quantized, recipe):
    qm = quantized[recipe]
    embedding, head = qm.get_submodule("backbone.embeddings"), qm.get_submodule("lm_head")
    assert type(embedding) is W4Embedding and type(head) is W4A16Linear  # the head weight-only in both recipes
    table = float_graph.get_submodule("backbone.embeddings").weight
    packed, scale = quantize_weight_int4(table, 128)
    assert torch.equal(embedding.weight, packed) and torch.equal(embedding.weight_scale, scale)
    assert not torch.equal(head.weight, packed)  # GPTQ's, from the head input's calibrated Hessian
    ids = torch.tensor([[0, 5, 255], [7, 7, 1]])
    rows = dequantize_weight_int4(packed, scale, 128, table.shape[1])[ids]
    assert torch.equal(embedding(ids), rows.to(table.dtype))


def test_a_tied_pair_rounded_to_nearest_keeps_one_table(float_graph, tmp_path):
    rtn = dataclasses.replace(QUAMBA2_W4A16, weights=dataclasses.replace(QUAMBA2_W4A16.weights, method="rtn"))
    qm = quamba_fx.quantize(float_graph, recipe=rtn, progress=False)
    embedding, head = qm.get_submodule("backbone.embeddings"), qm.get_submodule("lm_head")
    # One tensor, as in the float model: the same packed codes and scales, not equal copies.
    assert embedding.weight is head.weight and embedding.weight_scale is head.weight_scale
    assert torch.equal(head.weight, quantize_weight_int4(float_graph.get_submodule("lm_head").weight, 128)[0])
    quamba_fx.save_pretrained(qm, tmp_path / "q")
    loaded = quamba_fx.from_pretrained(tmp_path / "q")
    assert loaded.get_submodule("backbone.embeddings").weight is loaded.get_submodule("lm_head").weight
    assert torch.equal(logits(loaded, IDS), logits(qm, IDS))


def test_gptq_recipes_calibrate_the_head_and_a_headless_model_needs_no_head_statistics(float_graph):
    assert "lm_head" in calibrate(float_graph, IDS, QUAMBA2_W4A16, progress=False).hessians
    backbone = quamba_fx.capture(random_model(builtin_config("mamba-tiny"), seed=1).backbone)
    qm = quamba_fx.quantize(backbone, IDS, recipe="quamba2-w4a16", progress=False)
    assert type(qm.get_submodule("embeddings")) is W4Embedding


def test_an_untied_head_gets_its_own_table_and_the_flag_off_keeps_both_float():
    untied = quamba_fx.capture(random_model(builtin_config("mamba-tiny").__class__(
        **{**builtin_config("mamba-tiny").to_dict(), "tie_word_embeddings": False}), seed=2))
    assert untied.get_submodule("lm_head").weight is not untied.get_submodule("backbone.embeddings").weight
    rtn = dataclasses.replace(QUAMBA2_W4A16, weights=dataclasses.replace(QUAMBA2_W4A16.weights, method="rtn"))
    qm = quamba_fx.quantize(untied, recipe=rtn, progress=False)
    embedding, head = qm.get_submodule("backbone.embeddings"), qm.get_submodule("lm_head")
    assert type(embedding) is W4Embedding and type(head) is W4A16Linear and embedding.weight is not head.weight
    assert torch.equal(head.weight, quantize_weight_int4(untied.get_submodule("lm_head").weight, 128)[0])  # rtn
    assert torch.equal(embedding.weight, quantize_weight_int4(untied.get_submodule("backbone.embeddings").weight, 128)[0])
    blocks_only = dataclasses.replace(rtn, weights=dataclasses.replace(rtn.weights, embedding_and_head=False))
    float_tables = quamba_fx.quantize(untied, recipe=blocks_only, progress=False)
    assert type(float_tables.get_submodule("backbone.embeddings")) is torch.nn.Embedding
    assert type(float_tables.get_submodule("lm_head")) is torch.nn.Linear
    # Each [256, 64] table: 2 bytes a value at fp16 against half a byte plus an fp16 scale per 64.
    assert state_bytes(float_tables, float_bytes=2) - state_bytes(qm, float_bytes=2) == 2 * (256 * 64 * 2 - 256 * 32 - 256 * 2)


@pytest.mark.parametrize("recipe", ["quamba2-w4a8", "quamba2-w4a16"])
def test_the_4bit_graph_stays_close_to_the_float_graph(float_graph, quantized, recipe):
    reference, out = logits(float_graph, IDS), logits(quantized[recipe], IDS)
    # Random weights are the worst case for 4 bits (no structure for groups to follow): measured 0.08-0.19.
    assert float((out - reference).norm() / reference.norm()) < 0.3


def test_gptq_is_used_and_beats_round_to_nearest_on_the_calibration_text(float_graph, quantized):
    rtn = dataclasses.replace(QUAMBA2_W4A16, weights=dataclasses.replace(QUAMBA2_W4A16.weights, method="rtn"))
    rtn_graph = quamba_fx.quantize(float_graph, recipe=rtn, progress=False)  # RTN, weights only: no data needed
    reference = logits(float_graph, IDS)
    error = {name: float((logits(gm, IDS) - reference).norm()) for name, gm in
             (("gptq", quantized["quamba2-w4a16"]), ("rtn", rtn_graph))}
    assert error["gptq"] < error["rtn"]


def test_gptq_needs_calibration_data_not_just_a_saved_calibration(float_graph, tmp_path):
    with pytest.raises(ValueError, match="quantize needs calibration_data"):
        quamba_fx.quantize(float_graph, recipe="quamba2-w4a16", progress=False)
    rotated = Pipeline(float_passes(QUAMBA2_W4A8))(copy.deepcopy(float_graph))  # the pass rotates in place
    calibration = calibrate(rotated, IDS, QUAMBA2_W4A8, progress=False)
    assert all(h.shape[0] == h.shape[1] for h in calibration.hessians.values()) and calibration.hessians
    calibration.save(tmp_path / "calibration.json")
    reloaded = type(calibration).load(tmp_path / "calibration.json")
    with pytest.raises(CalibrationError, match="quantizes weights with GPTQ, which needs the input statistics"):
        quamba_fx.quantize(float_graph, recipe="quamba2-w4a8", calibration=reloaded, progress=False)
    # The statistics it was recorded with do the job, and give the same graph as calibrating anew.
    direct = quamba_fx.quantize(float_graph, recipe="quamba2-w4a8", calibration=calibration, progress=False)
    assert torch.equal(logits(direct, IDS), logits(quamba_fx.quantize(float_graph, IDS, recipe="quamba2-w4a8",
                                                                      progress=False), IDS))


def test_nan_calibration_activations_name_the_linear(float_graph):
    broken = Pipeline(float_passes(QUAMBA2_W4A16))(copy.deepcopy(float_graph))
    with torch.no_grad():
        broken.get_submodule("backbone.embeddings").weight[3] = float("nan")
    with pytest.raises(CalibrationError, match="is not finite"):
        calibrate(broken, torch.full((1, 8), 3), QUAMBA2_W4A16, progress=False)


@pytest.mark.parametrize("recipe", ["quamba2-w4a8", "quamba2-w4a16"])
def test_save_and_load_are_bit_identical_and_4bit_checkpoints_are_small(float_graph, quantized, recipe, tmp_path):
    qm = quantized[recipe]
    quamba_fx.save_pretrained(qm, tmp_path / "q")
    quamba_fx.save_pretrained(quamba_fx.quantize(float_graph, IDS, recipe="quamba", progress=False), tmp_path / "w8")
    loaded = quamba_fx.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(loaded, IDS), logits(qm, IDS))
    assert quamba_fx.graph_meta.graph_meta(loaded).recipe_spec == qm.meta["quamba"].recipe_spec
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "q") < size(tmp_path / "w8")


def test_a_4bit_checkpoint_is_checked_against_its_packed_embedding(float_graph, tmp_path):
    # The embedding is packed, so the dtype is read off the final norm and the table's shape is
    # the packed one: a restamped config claiming another dtype or vocabulary is refused.
    rtn = dataclasses.replace(QUAMBA2_W4A16, weights=dataclasses.replace(QUAMBA2_W4A16.weights, method="rtn"))
    quamba_fx.save_pretrained(quamba_fx.quantize(float_graph, recipe=rtn, progress=False), tmp_path / "q")
    config = read_config(tmp_path / "q")
    write_config(tmp_path / "q", {**config, "dtype": "float16"}, restamp=True)
    with pytest.raises(CheckpointError, match="dtype is float16 but .* holds F32 weights"):
        quamba_fx.from_pretrained(tmp_path / "q")
    vocab, packed = config["source_config"]["vocab_size"], (config["source_config"]["hidden_size"] + 1) // 2
    write_config(tmp_path / "q", {**config, "source_config": {**config["source_config"], "vocab_size": vocab + 2}},
                 restamp=True)
    with pytest.raises(CheckpointError,
                       match=rf"embeddings.weight has shape \[{vocab}, {packed}\] but .*describes \[{vocab + 2}, {packed}\]"):
        quamba_fx.from_pretrained(tmp_path / "q")


# Both recipes run over 10 s on the oldest CI leg (W4A8 the longer): CI's slow run keeps them.
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["quamba2-w4a8", "quamba2-w4a16"])
def test_lowered_4bit_graphs_generate_what_the_reference_generates(quantized, recipe):
    qm = quantized[recipe]
    lowered = quamba_fx.lower(qm, torch.float32)
    # Each 4-bit Linear its GEMM (the head weight-only in both recipes), the embedding its gather.
    for kernel, cls in (("w4a8_gemm", W4A8Linear), ("w4a16_gemm", W4A16Linear), ("w4_embedding_gather", W4Embedding)):
        assert sum(op_name(n) == kernel for n in lowered.graph.nodes) == sum(type(m) is cls for m in qm.modules())
    assert torch.allclose(logits(lowered, IDS), logits(qm, IDS), rtol=1e-4, atol=1e-4)
    tokens = IDS[:1, :9]
    for _ in range(6):  # greedy by rerunning the whole prefix through the reference graph
        tokens = torch.cat([tokens, logits(qm, tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(Generator(lowered, batch_size=1).generate(IDS[:1, :9], max_new_tokens=6), tokens)
    hf_generated = QuambaForCausalLM(lowered).generate(IDS[:1, :9], do_sample=False, max_new_tokens=6)
    assert torch.equal(hf_generated, tokens)


def test_an_fp16_lowering_multiplies_w4a16_activations_in_fp16(quantized):
    """The rotation before out_proj returns fp16 itself (no cast kernel) and every W4A16 GEMM
    rounds its input to fp16; an fp32 lowering keeps both in fp32."""
    qm = quantized["quamba2-w4a16"]
    for dtype, act_dtype in ((torch.float16, torch.float16), (torch.float32, None)):
        lowered = quamba_fx.lower(qm, dtype)
        gemms = [n for n in lowered.graph.nodes if op_name(n) == "w4a16_gemm"]
        assert gemms and all(n.args[5] == act_dtype for n in gemms)
        rotations = [n for n in lowered.graph.nodes if op_name(n) == "hadamard_rotate"]
        assert rotations and all((n.args[1:] or (None,))[0] == act_dtype for n in rotations)
        if dtype == torch.float16:
            assert not any(is_cast(n.args[0]) for n in rotations)  # read through their casts


def mamba1_blocks(lowered: torch.nn.Module) -> int:
    """The blocks a Mamba-1-only decode fusion (dt_proj into the scan update) applies to: all of a
    Mamba-1 model's, none of a Mamba-2's, which has no dt_proj."""
    meta = find_graph_meta(lowered)
    return 0 if "Mamba2" in meta.source else meta.num_blocks


def decode_two(gen: Generator) -> list[torch.Tensor]:
    """The logits of two decode steps after a five-token prefill of IDS's first row."""
    ids = IDS[:1, :7]
    with torch.no_grad():
        gen.prefill(ids[:, :5])
        return [gen.decode(ids[:, t]) for t in (5, 6)]


def decode_ops(gen: Generator) -> list[str]:
    return [op_name(n) for n in gen.decode_graph.graph.nodes if n.op == "call_function"]


# Over 10 s on the oldest CI leg (2 cores, Triton 3.6's interpreter): CI's slow run keeps it.
@pytest.mark.slow
def test_a_w4a16_decode_step_runs_in_proj_and_the_conv_as_one_op(quantized, monkeypatch):
    """The decode graph folds the float conv step into in_proj's W4A16 GEMV (lowering/gemm_w4.py):
    Mamba-1's conv reads the x half of in_proj's output, Mamba-2's the xBC split after z. The
    logits are those of the two separate ops, bit for bit."""
    from quamba_fx.passes.lowering import gemm_w4

    lowered = quamba_fx.lower(quantized["quamba2-w4a16"])
    blocks = find_graph_meta(lowered).num_blocks
    fused = Generator(lowered, batch_size=1)
    assert decode_ops(fused).count("w4a16_in_proj_conv_update") == blocks
    assert "conv1d_silu_cached" not in decode_ops(fused)
    monkeypatch.setattr(gemm_w4, "FUSE_CONV_IN_DECODE", False)
    separate = Generator(lowered, batch_size=1)
    assert "w4a16_in_proj_conv_update" not in decode_ops(separate)
    assert all(torch.equal(a, b) for a, b in zip(decode_two(fused), decode_two(separate)))


@pytest.mark.slow  # its own property test is in the fast suite
def test_w4a8_decode_steps_on_the_skinny_kernel_give_the_other_kernels_logits(quantized, monkeypatch):
    """A W4A8 decode step's GEMMs run gemm_w4_skinny.py's kernel (gemm_w4.W4A8_SKINNY_MAX_M); the
    logits are the other kernel's up to the order of the group sums."""
    from quamba_fx.kernels import gemm_w4, gemm_w4_skinny

    lowered = quamba_fx.lower(quantized["quamba2-w4a8"])
    launched = []
    real_launch = gemm_w4_skinny.launch
    monkeypatch.setattr(gemm_w4_skinny, "launch", lambda *a, **kw: launched.append(1) or real_launch(*a, **kw))
    got = decode_two(Generator(lowered, batch_size=1))
    assert launched
    launched.clear()
    monkeypatch.setattr(gemm_w4, "W4A8_SKINNY_MAX_M", 0)
    expected = decode_two(Generator(lowered, batch_size=1))
    assert not launched
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.slow  # builds four graphs; the fold's kernel has its property test in the fast suite
def test_a_w4a16_decode_step_folds_dt_proj_into_the_scan_update(quantized, monkeypatch):
    """With the rule on (lowering/gemm_w4.py, the default), Mamba-1's decode graph has no dt_proj
    GEMM: the scan update computes delta; the logits are the separate ops' up to the order of
    dt_proj's sums. Mamba-2 has no dt_proj."""
    from quamba_fx.passes.lowering import gemm_w4

    lowered = quamba_fx.lower(quantized["quamba2-w4a16"])
    blocks = mamba1_blocks(lowered)
    fused = Generator(lowered, batch_size=1)
    monkeypatch.setattr(gemm_w4, "FUSE_DT_PROJ_IN_DECODE", False)
    separate = Generator(lowered, batch_size=1)
    assert decode_ops(fused).count("w4a16_dt_proj_state_update") == blocks
    assert decode_ops(fused).count("w4a16_gemm") == decode_ops(separate).count("w4a16_gemm") - blocks
    for a, b in zip(decode_two(fused), decode_two(separate)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


# --- accuracy on the trained byte models (benchmarks/accuracy.py measures with more text) ----------


def windows(split: str, count: int, seq_len: int = 256) -> torch.Tensor:
    return textdata.chunk_sequences(textdata.load_bytes(textdata.find_wikitext(split)), seq_len, num_sequences=count)




@pytest.mark.slow
@pytest.mark.parametrize("model", ["mamba-bytes-wt2", "mamba2-bytes-wt2"])
def test_quamba2_recipes_meet_their_accuracy_targets_and_beat_naive_rounding(model):
    gm = quamba_fx.capture(quamba_fx.load_model(model))
    calib, held_out = windows("valid", 16), windows("test", 16)

    def measure(recipe):
        qm = quamba_fx.quantize(gm, calib.split(8), recipe=recipe, progress=False)
        return quamba_fx.evaluate(qm, held_out, gm, batch_size=8, progress=False)

    for recipe, bound in (("quamba2-w4a16", 0.02), ("quamba2-w4a8", 0.03)):
        ours, naive = measure(recipe), measure(recipe.replace("quamba2", "naive"))
        assert ours.bits_per_byte / ours.reference_bits_per_byte - 1 < bound, recipe
        assert ours.kl_divergence < naive.kl_divergence, recipe
    w8a8 = measure("quamba2-w8a8")
    assert w8a8.bits_per_byte / w8a8.reference_bits_per_byte - 1 < 0.01
    if model == "mamba2-bytes-wt2":  # the conv1d output's scales per channel: closer than quamba's one
        assert w8a8.kl_divergence < measure("quamba").kl_divergence


# --- the float conv1d and scan with a cache (what W4A16's generation graphs call) ------------------


@pytest.mark.parametrize("length, split", [(9, 4), (3, 1), (2, 2)])
def test_float_conv_and_scan_continue_from_their_cache_exactly(length, split):
    g = torch.Generator().manual_seed(length)
    b, c, n, width = 2, 6, 4, 4
    x = torch.randn(b, c, length, generator=g)
    weight, bias = torch.randn(c, 1, width, generator=g), torch.randn(c, generator=g)
    whole = torch.ops.quamba.conv1d_silu(x, weight, bias)
    expected = torch.nn.functional.silu(torch.nn.functional.conv1d(x, weight, bias, padding=width - 1, groups=c)[..., :length])
    torch.testing.assert_close(whole, expected)
    state = torch.full((b, c, width - 1), 7.0)  # prefill must ignore what the cache held
    first = torch.ops.quamba.conv1d_silu_cached(x[..., :split], weight, bias, state, False)
    steps = [torch.ops.quamba.conv1d_silu_cached(x[..., t:t + 1], weight, bias, state, True) for t in range(split, length)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=-1), whole, rtol=1e-6, atol=1e-6)

    u, delta, z = (torch.randn(b, c, length, generator=g) for _ in range(3))
    A, B, C = -torch.rand(c, n, generator=g), torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    D, delta_bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    whole = torch.ops.quamba.selective_scan(u, delta, A, B, C, D, z, delta_bias, True)

    def in_steps(scan_cached):
        """A prefill of the first `split` steps, then one decode call a step; (y, final state)."""
        ssm = torch.full((b, c, n), 3.0)  # prefill must ignore what the cache held
        steps = [slice(0, split)] + [slice(t, t + 1) for t in range(split, length)]
        parts = [scan_cached(u[..., s], delta[..., s], A, B[..., s], C[..., s], D, z[..., s], delta_bias, True, ssm,
                             s.start > 0) for s in steps]
        return torch.cat(parts, dim=-1), ssm

    y, ssm = in_steps(torch.ops.quamba.selective_scan_cached)
    torch.testing.assert_close(y, whole, rtol=1e-5, atol=1e-5)
    if use_triton(u):  # what CUDA runs: the Triton scan in float mode and its state-update kernel
        y_triton, ssm_triton = in_steps(selective_scan_cached_triton)
        torch.testing.assert_close(y_triton, whole, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ssm_triton, ssm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_float_conv_update_kernel_matches_its_reference(width, dtype):
    from quamba_fx.kernels.conv1d_float import conv1d_silu_update, conv1d_silu_update_reference

    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, 300, generator=g).to(dtype)
    weight, bias = torch.randn(300, 1, width, generator=g), torch.randn(300, generator=g)
    state = torch.randn(3, 300, width - 1, generator=g).to(dtype)
    expected_state = state.clone()
    expected = conv1d_silu_update_reference(x, weight, bias, expected_state)
    got = conv1d_silu_update(x, weight, bias, state)
    assert got.dtype == dtype and torch.equal(state, expected_state)
    torch.testing.assert_close(got, expected, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("width, length", [(4, 70), (2, 1), (3, 2), (4, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_float_conv_prefill_kernel_matches_its_reference(width, length, dtype):
    """Including lengths shorter than the history and a transposed (channels-contiguous) input,
    the layout a block hands it."""
    from quamba_fx.kernels.conv1d_float import conv1d_silu, conv1d_silu_reference

    g = torch.Generator().manual_seed(width * 100 + length)
    x = torch.randn(2, length, 100, generator=g).to(dtype).transpose(1, 2)
    weight, bias = torch.randn(100, 1, width, generator=g), torch.randn(100, generator=g)
    history = torch.randn(2, 100, width - 1, generator=g).to(dtype)
    for b in (bias, None):
        y_ref, last_ref = conv1d_silu_reference(x, weight, b, history)
        y, last = conv1d_silu(x, weight, b, history)
        assert y.dtype == dtype and y.is_contiguous() and torch.equal(last, last_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)
