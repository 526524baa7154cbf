"""4-bit weights: packing, round-to-nearest and GPTQ quantization, and the W4A16 / W4A8 reference ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quamba_fx.quant.gptq import HessianObserver, gptq_int4
from quamba_fx.quant.int4 import (
    INT4_MAX,
    INT4_MIN,
    dequantize_weight_int4,
    group_count,
    pack_int4,
    quantize_weight_int4,
    unpack_int4,
    w4a8_linear,
    w4a16_linear,
)
from quamba_fx.quant.int4_linear import W4A8Linear, W4A16Linear

SHAPES = st.tuples(st.integers(1, 9), st.integers(1, 70))


@settings(max_examples=60)
@given(shape=SHAPES, seed=st.integers(0, 2**16))
def test_packing_round_trips_any_codes(shape, seed):
    codes = torch.randint(INT4_MIN, INT4_MAX + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (shape[0], (shape[1] + 1) // 2)
    assert torch.equal(unpack_int4(packed, shape[1]), codes)


def test_packing_puts_the_even_column_in_the_low_nibble():
    packed = pack_int4(torch.tensor([[1, -1, -8]], dtype=torch.int8))
    assert packed.tolist() == [[0xF1, 0x08]]


def test_packing_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError, match="cannot hold K=5 codes"):
        unpack_int4(torch.zeros(1, 2, dtype=torch.uint8), 5)


@settings(max_examples=60)
@given(shape=SHAPES, group=st.sampled_from([2, 4, 16, 128]), seed=st.integers(0, 2**16))
def test_round_to_nearest_is_within_half_a_step_of_every_weight(shape, group, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * torch.rand(shape[0], 1) * 3
    packed, scale = quantize_weight_int4(w, group)
    assert scale.dtype == torch.float16 and tuple(scale.shape) == (shape[0], group_count(shape[1], group))
    step = scale.float().repeat_interleave(group, dim=1)[:, : shape[1]]
    error = (dequantize_weight_int4(packed, scale, group, shape[1]) - w).abs()
    # Half a step, plus the fp16 rounding of the scale, which can move the top code by <= 7 * 2**-11.
    assert bool((error <= step * (0.5 + 7 * 2**-11) + 1e-7).all())


def test_quantizing_rejects_bad_weights():
    with pytest.raises(ValueError, match="group_size must be an even integer"):
        quantize_weight_int4(torch.randn(4, 8), 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight_int4(torch.tensor([[float("nan"), 1.0]]), 2)


def random_w4(n: int, k: int, group: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return quantize_weight_int4(torch.randn(n, k, generator=generator), group)


@settings(max_examples=40)
@given(m=st.integers(1, 5), n=st.integers(1, 9), k=st.integers(1, 40), group=st.sampled_from([2, 8, 32]),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_w4a16_linear_is_the_float_linear_of_the_dequantized_weight(m, n, k, group, bias, dtype):
    packed, scale = random_w4(n, k, group)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n) if bias else None
    y = w4a16_linear(x, packed, scale, group, b)
    w = dequantize_weight_int4(packed, scale, group, k).double()
    expected = x.double() @ w.t() + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.double(), expected, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)


@settings(max_examples=40)
@given(m=st.integers(1, 5), n=st.integers(1, 9), k=st.integers(1, 300), group=st.sampled_from([2, 8, 128]),
       requant=st.booleans())
def test_w4a8_linear_sums_exact_group_products(m, n, k, group, requant):
    packed, scale = random_w4(n, k, group)
    x_q = torch.randint(-128, 128, (2, m, k), dtype=torch.int8)
    x_scale, bias = torch.tensor(0.05), torch.randn(n)
    out_scale = torch.tensor(0.3) if requant else None
    y = w4a8_linear(x_q, x_scale, packed, scale, group, bias, out_scale)
    w = dequantize_weight_int4(packed, scale, group, k).double()
    expected = x_q.double() @ w.t() * 0.05 + bias.double()
    if requant:
        assert y.dtype == torch.int8
        assert bool(((y.double() - (expected / 0.3).round().clamp(-128, 127)).abs() <= 1).all())
    else:
        assert y.dtype == torch.float32 and y.shape == (2, m, n)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


def test_the_ops_have_fakes_that_check_shapes():
    packed, scale = random_w4(6, 20, 8)
    with torch.device("meta"):
        x = torch.empty(3, 20)
        assert torch.ops.quamba.w4a16_linear(x, packed.to("meta"), scale.to("meta"), 8).shape == (3, 6)
        out = torch.ops.quamba.w4a8_linear(torch.empty(3, 20, dtype=torch.int8), torch.empty(()), packed.to("meta"),
                                           scale.to("meta"), 8, None, torch.empty(()))
        assert out.shape == (3, 6) and out.dtype == torch.int8
    with pytest.raises(ValueError, match="the activation has K=21"):
        w4a16_linear(torch.randn(3, 21), packed, scale, 8)
    with pytest.raises(ValueError, match=r"w_scale must be floating \[N=6, groups=5\]"):
        w4a16_linear(torch.randn(3, 20), packed, scale, 4)


# --- GPTQ ----------------------------------------------------------------------------------------


def correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) / k**0.5 + 0.3 * torch.eye(k)
    return torch.randn(rows, k, generator=generator) @ mixing


def test_the_hessian_observer_accumulates_twice_the_mean_outer_product():
    x = torch.randn(3, 50, 12)
    observer = HessianObserver("lin")
    for batch in x:
        observer.observe(batch)
    flat = x.reshape(-1, 12)
    torch.testing.assert_close(observer.hessian, 2 * flat.t() @ flat / flat.shape[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lin holds NaN"):
        observer.observe(torch.full((2, 12), float("nan")))
    with pytest.raises(ValueError, match="lin got inputs of 5 features after 12"):
        observer.observe(torch.randn(2, 5))


@pytest.mark.parametrize("k, group", [(64, 16), (96, 32), (40, 8)])
def test_gptq_makes_the_layer_output_closer_than_round_to_nearest(k, group):
    x = correlated_inputs(512, k)
    w = torch.randn(24, k)
    observer = HessianObserver()
    observer.observe(x)
    gptq = dequantize_weight_int4(*gptq_int4(w, observer.hessian, group), group, k)
    rtn = dequantize_weight_int4(*quantize_weight_int4(w, group), group, k)
    error = lambda q: float(((x @ (q - w).t()) ** 2).mean())  # noqa: E731
    assert error(gptq) < 0.7 * error(rtn)  # measured: 0.44-0.57


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """A diagonal Hessian couples no columns: no error moves, every weight rounds on its own."""
    w = torch.randn(10, 48)
    hessian = torch.diag(torch.rand(48) + 0.5)
    packed, scale = gptq_int4(w, hessian, 16)
    rtn_packed, rtn_scale = quantize_weight_int4(w, 16)
    assert torch.equal(packed, rtn_packed) and torch.equal(scale, rtn_scale)


def test_gptq_zeroes_columns_whose_input_is_always_zero():
    x = correlated_inputs(256, 32)
    x[:, 5] = 0
    observer = HessianObserver()
    observer.observe(x)
    packed, scale = gptq_int4(torch.randn(8, 32), observer.hessian, 8)
    assert bool((unpack_int4(packed, 32)[:, 5] == 0).all())


def test_gptq_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match=r"the Hessian must be \[K=8, K\]"):
        gptq_int4(torch.randn(4, 8), torch.eye(6), 4)
    with pytest.raises(ValueError, match="the Hessian holds NaN"):
        gptq_int4(torch.randn(4, 8), torch.full((8, 8), float("nan")), 4)


# --- the modules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [64, 33])
def test_the_modules_compute_what_their_float_linear_does_up_to_rounding(k):
    linear = torch.nn.Linear(k, 20).requires_grad_(False)
    linear.register_buffer("output_scale", torch.tensor(0.5))
    x = torch.randn(4, k)
    w4a16 = W4A16Linear.from_float(linear, 16)
    assert torch.equal(w4a16.output_scale, torch.tensor(0.5))  # a pass's scale buffer survives the swap
    torch.testing.assert_close(w4a16(x), linear(x), rtol=0, atol=0.15 * float(linear(x).abs().max()))
    w4a8 = W4A8Linear.from_float(linear, 16)
    scale = x.abs().max() / 127
    x_q = torch.round(x / scale).to(torch.int8)
    torch.testing.assert_close(w4a8(x_q, scale), linear(x), rtol=0, atol=0.2 * float(linear(x).abs().max()))
    assert "int4 weights in groups of 16" in repr(w4a8)


def test_the_modules_check_their_buffers():
    with pytest.raises(ValueError, match=r"needs a packed uint8 \[N, 4\] weight for K=8"):
        W4A16Linear(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 1), None, 8, 8, torch.float32)
    with pytest.raises(ValueError, match=r"weight_scale must be \[N, groups\] = \[2, 2\]"):
        W4A16Linear(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), None, 8, 4, torch.float32)
