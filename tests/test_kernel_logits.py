"""The float head's op (`quamba::logits_linear`) and its lowering rule: fp32 logits from one GEMM.
The W8A8 head's own rule (its int8 GEMM writing fp32): test_w8a8_head.py."""

from __future__ import annotations

import pytest
import torch

import quamba_fx
from quamba_fx.graph_info import op_name
from quamba_fx.kernels.logits import logits_linear, logits_linear_reference
from quamba_fx.passes import lowering

from .conftest import make_model, tiny_config


@pytest.fixture(scope="module")
def tiny_quantized():
    model = make_model(tiny_config(vocab_size=64, num_hidden_layers=2))
    torch.manual_seed(1)
    # naive: a recipe whose head stays float (quamba's is W8A8).
    return quamba_fx.quantize(model, [torch.randint(0, 64, (2, 24))], recipe="naive", progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_op_is_the_head_then_an_fp32_cast(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g).to(dtype)
    w = torch.randn(40, 16, generator=g).to(dtype)
    got = logits_linear(x, w)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 40)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w).float(), rtol=0, atol=0)


def test_the_fake_promises_the_real_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(3, 7, 8).half(), torch.randn(11, 8).half()
    real = logits_linear(x, w)
    with FakeTensorMode() as mode:
        fake = torch.ops.quamba.logits_linear(mode.from_tensor(x), mode.from_tensor(w))
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output GEMM runs on CUDA only")
def test_on_cuda_the_logits_are_the_fp32_sums_not_their_fp16_rounding():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 33, 256, generator=g).cuda().half()
    w = torch.randn(1000, 256, generator=g).cuda().half()
    exact = x.double() @ w.double().t()
    got = logits_linear(x, w)
    assert got.dtype == torch.float32 and got.is_contiguous()
    # fp32 sums (cuBLAS may split K) against the fp16-rounded ones of the reference.
    assert (got.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    assert (got.double() - exact).abs().max() < (logits_linear_reference(x, w).double() - exact).abs().max()


def test_fp16_lowering_ends_in_the_op_and_keeps_the_head_module(tiny_quantized, monkeypatch):
    low = quamba_fx.lower(tiny_quantized)
    out = next(n for n in low.graph.nodes if n.op == "output").args[0]
    assert op_name(out) == "logits_linear" and out.meta["quamba"]["role"] == "lm_head"
    assert out.meta["quamba"]["kernel"] == "cublas:mm_fp32_out"
    assert not any(n.op == "call_module" and n.target == "lm_head" for n in low.graph.nodes)
    # The head module stays: HF's get_output_embeddings reads it, and the tie to the embedding.
    assert low.lm_head.weight.dtype == torch.float16 and low.lm_head.weight is low.backbone.embeddings.weight
    quamba_fx.verify_topology(low)
    # Off CUDA the op is the reference: the logits of the graph lowered without the rule, exactly.
    monkeypatch.setattr(lowering, "HEAD_RULES", [])
    without = quamba_fx.lower(tiny_quantized)
    assert any(n.op == "call_module" and n.target == "lm_head" for n in without.graph.nodes)
    # Short: the interpreter pays per kernel program, and the head does not care about the length.
    ids = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = low(ids), without(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fp32_lowering_keeps_the_linear(tiny_quantized):
    low = quamba_fx.lower(tiny_quantized, dtype=torch.float32)
    assert not any(op_name(n) == "logits_linear" for n in low.graph.nodes)
    assert any(n.op == "call_module" and n.target == "lm_head" for n in low.graph.nodes)
