"""The W8A8 language-model head (`Recipe.head`, on in `quamba` and `quamba2-w8a8`): calibration of
its input, the quantized graph, the tied embedding that shares its int8 table, save/load, and the
lowering that fuses the final norm with the head's quantize and has the int8 GEMM write fp32
logits (the gather kernel: test_kernel_gather_int8.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import quamba_fx
from quamba_fx.calibrate import CalibrationError, calibrate
from quamba_fx.graph_info import op_name
from quamba_fx.graph_meta import graph_meta
from quamba_fx.passes.lowering.match import is_cast
from quamba_fx.quant.linear import Int8Embedding, QuantizedLinear
from quamba_fx.quant.qops import quantize_weight_per_channel
from quamba_fx.recipes import QUAMBA, QUAMBA2_W8A8, Recipe, make_recipe
from quamba_fx.runtime import Generator

from .conftest import make_model, tiny_config

IDS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))


def logits(gm, ids):
    out = gm(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def float_graph():
    return quamba_fx.capture(make_model(tiny_config(), seed=4))


@pytest.fixture(scope="module")
def quantized(float_graph):
    return quamba_fx.quantize(float_graph, IDS, recipe="quamba", progress=False)


def final_norm_output(float_graph, ids) -> torch.Tensor:
    seen = []
    hook = float_graph.get_submodule("backbone.norm_f").register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        float_graph(ids)
    finally:
        hook.remove()
    return seen[0]


def test_the_w8a8_recipes_quantize_the_head_and_the_others_keep_it():
    assert QUAMBA.head is not None and QUAMBA2_W8A8.head == QUAMBA.head
    assert QUAMBA.head.observer == "abs_max" and QUAMBA.head.granularity == "per_tensor"
    assert all(make_recipe(name).head is None for name in ("naive", "fp8", "quamba2-w4a8", "quamba2-w4a16"))


def test_the_head_reads_the_final_norm_at_its_calibrated_abs_max(float_graph, quantized):
    head = quantized.get_submodule("lm_head")
    assert type(head) is QuantizedLinear
    weight, scale = quantize_weight_per_channel(float_graph.get_submodule("lm_head").weight)
    assert torch.equal(head.weight, weight) and torch.equal(head.weight_scale, scale)
    expected = final_norm_output(float_graph, IDS).abs().max() / 127
    assert torch.allclose(head.input_scale, expected, rtol=1e-6)
    # The quantize reads the norm itself, not the capture's cast after it: the lowering fuses the two.
    quantize_node = next(n for n in quantized.graph.nodes if op_name(n) == "quantize"
                         and n.args[1].target == "lm_head.input_scale")
    assert quantize_node.args[0].target == "backbone.norm_f"
    assert type(float_graph.get_submodule("lm_head")) is torch.nn.Linear  # the float graph keeps its own


def test_the_tied_embedding_reads_the_heads_int8_table(float_graph, quantized):
    embedding, head = quantized.get_submodule("backbone.embeddings"), quantized.get_submodule("lm_head")
    assert type(embedding) is Int8Embedding
    assert embedding.weight is head.weight and embedding.weight_scale is head.weight_scale
    ids = torch.tensor([[0, 5, 96], [7, 7, 1]])
    rows = head.weight[ids].float() * head.weight_scale[ids][..., None]
    assert torch.equal(embedding(ids), rows)
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 97\), got \[0, 97\]"):
        embedding(torch.tensor([[0, 97]]))


def test_an_untied_embedding_stays_float():
    untied = quamba_fx.capture(make_model(tiny_config(tie_word_embeddings=False), seed=4))
    qm = quamba_fx.quantize(untied, IDS, recipe="quamba", progress=False)
    assert type(qm.get_submodule("lm_head")) is QuantizedLinear
    assert type(qm.get_submodule("backbone.embeddings")) is torch.nn.Embedding


def test_the_quantized_head_stays_close_to_the_float_one(float_graph, quantized):
    without = dataclasses.replace(QUAMBA, name="quamba", head=None)
    reference = quamba_fx.quantize(float_graph, IDS, recipe=without, progress=False)
    assert type(reference.get_submodule("lm_head")) is torch.nn.Linear
    ours, theirs = logits(quantized, IDS), logits(reference, IDS)
    assert not torch.equal(ours, theirs)
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_a_calibration_without_the_head_statistic_is_refused(float_graph):
    calibration = calibrate(float_graph, IDS, "quamba", progress=False)
    assert "lm_head.input_scale" in calibration.observers
    del calibration.observers["lm_head.input_scale"]
    with pytest.raises(CalibrationError, match="no observer for lm_head.input_scale, which recipe 'quamba' quantizes"):
        quamba_fx.quantize(float_graph, recipe="quamba", calibration=calibration, progress=False)


def test_a_headless_graph_quantizes_without_a_head_statistic():
    backbone = quamba_fx.capture(make_model(tiny_config(), seed=4, head=False))
    calibration = calibrate(backbone, IDS, "quamba", progress=False)
    assert not any(key.endswith("input_scale") and "layers" not in key for key in calibration.observers)
    quamba_fx.quantize(backbone, recipe="quamba", calibration=calibration, progress=False)


def test_a_recipe_saved_before_head_specs_keeps_a_float_head():
    data = QUAMBA.to_dict()
    assert data["head"] == QUAMBA.head.to_dict()
    del data["head"]
    assert Recipe.from_dict(data).head is None
    assert "head" not in dataclasses.replace(QUAMBA, head=None).to_dict()


def test_save_and_load_keep_the_int8_head_bit_for_bit(quantized, tmp_path):
    quamba_fx.save_pretrained(quantized, tmp_path / "q")
    loaded = quamba_fx.from_pretrained(tmp_path / "q")
    assert type(loaded.get_submodule("lm_head")) is QuantizedLinear
    assert graph_meta(loaded).recipe_spec == QUAMBA
    assert torch.equal(logits(loaded, IDS), logits(quantized, IDS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_lowering_fuses_the_final_norm_and_the_head_writes_fp32(quantized, dtype):
    lowered = quamba_fx.lower(quantized, dtype)
    head = next(n for n in lowered.graph.nodes if op_name(n) == "w8a8_linear" and n.args[2].target == "lm_head.weight")
    norm = head.args[0].args[0]
    assert op_name(norm) == "add_rmsnorm_quantize" and norm.args[2].target == "backbone.norm_f.weight"
    if dtype == torch.float16:  # no fp16 logits written and read back by a cast kernel
        assert head.args[6] == torch.float32 and not any(is_cast(user) for user in head.users)
    else:
        assert torch.allclose(logits(lowered, IDS), logits(quantized, IDS), rtol=1e-4, atol=1e-4)


def test_a_lowered_w8a8_head_generates_what_the_reference_generates(quantized):
    lowered = quamba_fx.lower(quantized, torch.float32)
    tokens = IDS[:1, :6]
    for _ in range(5):  # greedy by rerunning the whole prefix through the reference graph
        tokens = torch.cat([tokens, logits(quantized, tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(Generator(lowered, batch_size=1).generate(IDS[:1, :6], max_new_tokens=5), tokens)
