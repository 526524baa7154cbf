"""The quamba::quantize / dequantize / int8_linear custom ops and the weight helpers."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quamba_fx.quant import (
    MAX_INT8_LINEAR_K,
    MIN_SCALE,
    QMAX,
    QMIN,
    absmax_to_scale,
    quantize_weight_per_channel,
    quantize_weight_per_tensor,
)

np = pytest.importorskip("numpy")

quantize = torch.ops.quamba.quantize
dequantize = torch.ops.quamba.dequantize
int8_linear = torch.ops.quamba.int8_linear


def _np_int8_linear(x_q, x_scale, w_q, w_scale, bias=None, out_scale=None):
    """Independent numpy re-implementation of the documented order of fp32 operations."""
    acc = x_q.numpy().astype(np.int64) @ w_q.numpy().astype(np.int64).T
    assert np.abs(acc).max(initial=0) < 2**31  # int32 semantics
    a = acc.astype(np.float32)
    s = np.float32(x_scale.numpy().reshape(())) * w_scale.numpy().astype(np.float32).reshape(-1)
    y = (a * s).astype(np.float32)
    if bias is not None:
        y = (y + bias.numpy().astype(np.float32)).astype(np.float32)
    if out_scale is None:
        return torch.from_numpy(y)
    q = np.rint(y / out_scale.numpy().astype(np.float32).reshape(-1))
    return torch.from_numpy(np.clip(q, QMIN, QMAX).astype(np.int8))


# --------------------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------------------


def test_convention_constants():
    assert (QMIN, QMAX) == (-128, 127)
    assert MAX_INT8_LINEAR_K * 128 * 128 <= 2**31 - 1 < (MAX_INT8_LINEAR_K + 1) * 128 * 128


@pytest.mark.parametrize("s", [1.0, 0.5, 0.125])
def test_rounding_ties_to_even(s):
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, -127.5, 0.49999997]) * s
    q = quantize(x, torch.tensor(s))
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 4, 0, -2, -2, 126, -128, 0]


def test_saturation():
    s = torch.tensor(0.1)
    x = torch.tensor([1e9, -1e9, float("inf"), -float("inf"), 12.749, 12.751, -12.849, -12.851, 0.0])
    assert quantize(x, s).tolist() == [127, -128, 127, -128, 127, 127, -128, -128, 0]


def test_scale_shapes_and_axis():
    x = torch.randn(3, 4, 5)
    for per_tensor in (torch.tensor(0.02), torch.tensor([0.02])):
        q = quantize(x, per_tensor)
        assert q.shape == x.shape and torch.equal(q, quantize(x, torch.tensor(0.02)))
    for axis in (0, 1, 2, -1, -2):
        c = x.shape[axis]
        scale = torch.linspace(0.01, 0.05, c)
        q = quantize(x, scale, axis)
        for i in range(c):
            xi = x.select(axis, i)
            assert torch.equal(q.select(axis, i), quantize(xi, scale[i]))
        d = dequantize(q, scale, torch.float32, axis)
        torch.testing.assert_close(d, q.float() * scale.reshape([c if d == (axis % 3) else 1 for d in range(3)]))


def test_quantize_accepts_any_float_input_and_0_dim():
    s = torch.tensor(0.5)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert quantize(torch.tensor([1.25, -3.0], dtype=dtype), s).tolist() == [2, -6]
    assert quantize(torch.tensor(1.0), s).shape == ()


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dequantize_dtypes(out_dtype):
    q = torch.tensor([[-128, -1, 0, 1, 127]], dtype=torch.int8)
    s = torch.tensor(0.037)
    d = dequantize(q, s, out_dtype)
    assert d.dtype == out_dtype
    assert torch.equal(d, (q.float() * s).to(out_dtype))
    assert dequantize(q, s).dtype == torch.float32  # default


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: quantize(torch.randn(4, 3), torch.ones(4)), "per-channel scale has 4 values"),
        (lambda: quantize(torch.randn(4, 3), torch.ones(4), 5), "axis 5 out of range"),
        (lambda: quantize(torch.randn(4), torch.ones(2, 2)), r"shape \[\], \[1\] or \[C\]"),
        (lambda: quantize(torch.randn(4), torch.ones((), dtype=torch.int32)), "floating-point"),
        (lambda: dequantize(torch.zeros(4, dtype=torch.int32), torch.tensor(1.0)), "int8"),
        (lambda: dequantize(torch.zeros(4, dtype=torch.int8), torch.tensor(1.0), torch.int32), "floating dtype"),
    ],
)
def test_invalid_arguments(call, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        call()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    log_scale=st.floats(-8, 3),
    seed=st.integers(0, 2**31 - 1),
    per_channel=st.booleans(),
)
def test_round_trip_error_at_most_half_a_step(shape, log_scale, seed, per_channel):
    g = torch.Generator().manual_seed(seed)
    if per_channel:
        scale = (10.0**log_scale * (0.5 + torch.rand(shape[-1], generator=g))).float()
    else:
        scale = torch.tensor(10.0**log_scale, dtype=torch.float32)
    # Uniform inside the representable range [-128 s, 127 s].
    x = (torch.rand(shape, generator=g) * 255.0 - 128.0) * scale
    q = quantize(x, scale)
    err = (dequantize(q, scale) - x).abs()
    assert bool((err <= scale * (0.5 + 1e-5)).all())
    # Round to nearest: no other int8 value is closer.
    assert bool(((q.float() - x / scale).abs() <= 0.5 + 1e-5).all())


# --------------------------------------------------------------------------------------------------
# int8_linear
# --------------------------------------------------------------------------------------------------


def _random_int8(shape, g):
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    k=st.integers(1, 300),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    x_log_scale=st.floats(-4, 1),
    w_log_scale=st.floats(-4, 0),
    per_channel=st.booleans(),
    with_bias=st.booleans(),
    requant=st.booleans(),
)
def test_int8_linear_is_bit_exact(lead, k, n, seed, x_log_scale, w_log_scale, per_channel, with_bias, requant):
    g = torch.Generator().manual_seed(seed)
    x_q, w_q = _random_int8((*lead, k), g), _random_int8((n, k), g)
    x_scale = torch.tensor(10.0**x_log_scale, dtype=torch.float32)
    w_scale = (10.0**w_log_scale * (0.5 + torch.rand(n if per_channel else 1, generator=g))).float()
    bias = torch.randn(n, generator=g) if with_bias else None
    acc_scale = float(x_scale) * float(w_scale.max()) * 128 * 128 * k ** 0.5
    out_scale = torch.tensor(acc_scale / 127, dtype=torch.float32) if requant else None
    got = int8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale)
    ref = _np_int8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale)
    assert got.dtype == (torch.int8 if requant else torch.float32)
    assert got.shape == (*lead, n)
    assert torch.equal(got, ref)

    # And it is the float64 formula up to fp32 rounding (at most one int8 step after requantizing).
    y64 = (x_q.double() @ w_q.double().T) * x_scale.double() * w_scale.double() + (
        bias.double() if with_bias else 0.0
    )
    if requant:
        ref64 = (y64 / out_scale.double()).round().clamp(QMIN, QMAX)
        assert bool(((got.double() - ref64).abs() <= 1).all())
    else:
        torch.testing.assert_close(got.double(), y64, rtol=1e-6, atol=1e-6 * y64.abs().max().item())


def test_int8_linear_exact_where_the_accumulator_exceeds_fp32_precision():
    # |acc| up to 4096 * 127 * 127 > 2**24: the int32 -> fp32 rounding is part of the contract.
    g = torch.Generator().manual_seed(5)
    k = 4096
    x_q = (torch.randint(0, 2, (8, k), generator=g) * 2 - 1).to(torch.int8) * 127
    w_q = (torch.randint(0, 2, (16, k), generator=g) * 2 - 1).to(torch.int8) * 127
    w_q[0] = x_q[0]  # one fully aligned output: acc = 4096 * 16129
    x_scale, w_scale = torch.tensor(0.013), torch.rand(16, generator=g) * 0.01 + 1e-3
    got = int8_linear(x_q, x_scale, w_q, w_scale, None, None, torch.float32)
    assert torch.equal(got, _np_int8_linear(x_q, x_scale, w_q, w_scale))
    out_scale = torch.tensor(50.0)
    assert torch.equal(int8_linear(x_q, x_scale, w_q, w_scale, None, out_scale),
                       _np_int8_linear(x_q, x_scale, w_q, w_scale, None, out_scale))
    extreme = torch.full((1, k), -128, dtype=torch.int8)
    assert int8_linear(extreme, torch.tensor(1.0), extreme, torch.tensor(1.0)).item() == k * 128 * 128


def test_per_channel_with_equal_scales_equals_per_tensor():
    g = torch.Generator().manual_seed(6)
    x_q, w_q = _random_int8((5, 64), g), _random_int8((24, 64), g)
    x_scale, bias = torch.tensor(0.02), torch.randn(24, generator=g)
    outs = [
        int8_linear(x_q, x_scale, w_q, ws, bias, torch.tensor(0.3))
        for ws in (torch.tensor(0.004), torch.tensor([0.004]), torch.full((24,), 0.004))
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_int8_linear_matches_float_linear_within_quantization_error():
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(96, 48)
    x = torch.randn(4, 10, 96, generator=g)
    w_q, w_scale = quantize_weight_per_channel(lin.weight)
    x_scale = absmax_to_scale(x.abs().amax())
    y = int8_linear(quantize(x, x_scale), x_scale, w_q, w_scale, lin.bias.detach(), None, torch.float16)
    assert y.dtype == torch.float16
    ref = lin(x).detach()
    assert (y.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x_q=torch.zeros(2, 8)), "x_q must be int8"),
        (dict(w_q=torch.zeros(4, 8, 1, dtype=torch.int8)), r"\[N, K\]"),
        (dict(w_q=torch.zeros(4, 9, dtype=torch.int8)), "K=8 but w_q"),
        (dict(x_scale=torch.ones(2)), "x_scale must be per-tensor"),
        (dict(w_scale=torch.ones(3)), r"w_scale must have shape .*N=4"),
        (dict(bias=torch.ones(5)), "bias must have shape"),
        (dict(out_scale=torch.ones(3)), "out_scale must have shape"),
        (dict(out_scale=torch.tensor(1.0), out_dtype=torch.float16), "requantizes to int8"),
        (dict(out_dtype=torch.int32), "floating dtype"),
    ],
)
def test_int8_linear_argument_checks(kwargs, match):
    args = dict(x_q=torch.zeros(2, 8, dtype=torch.int8), x_scale=torch.tensor(1.0),
                w_q=torch.zeros(4, 8, dtype=torch.int8), w_scale=torch.ones(4), bias=None, out_scale=None,
                out_dtype=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        int8_linear(**args)


def test_int8_linear_rejects_k_that_could_overflow_int32():
    k = MAX_INT8_LINEAR_K + 1
    with pytest.raises(ValueError, match="overflow"):
        int8_linear(torch.zeros(1, k, dtype=torch.int8), torch.tensor(1.0),
                    torch.zeros(1, k, dtype=torch.int8), torch.tensor(1.0))


# --------------------------------------------------------------------------------------------------
# Weight helpers
# --------------------------------------------------------------------------------------------------


def test_quantize_weight_per_channel():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(6, 32, generator=g) * torch.tensor([1.0, 10.0, 0.01, 3.0, 1.0, 0.0]).unsqueeze(1)
    w_q, scale = quantize_weight_per_channel(w)
    assert w_q.dtype == torch.int8 and w_q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (6,)
    torch.testing.assert_close(scale[:5], w[:5].abs().amax(dim=1) / 127)
    assert scale[5].item() == pytest.approx(MIN_SCALE) and not w_q[5].any()
    assert w_q[:5].abs().amax(dim=1).tolist() == [127] * 5  # each row uses the full range
    err = (dequantize(w_q, scale, torch.float32, 0) - w).abs()
    assert bool((err <= scale[:, None] * (0.5 + 1e-5)).all())


def test_quantize_weight_per_tensor_and_half_weights():
    w = torch.randn(8, 16, dtype=torch.float16)
    w_q, scale = quantize_weight_per_tensor(w)
    assert scale.shape == () and scale.dtype == torch.float32
    assert w_q.abs().max().item() == 127
    torch.testing.assert_close(dequantize(w_q, scale), w.float(), atol=scale.item() / 2 * 1.0001, rtol=0)


def test_weight_helpers_reject_bad_weights():
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight_per_channel(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="floating point"):
        quantize_weight_per_tensor(torch.ones(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="qmax"):
        absmax_to_scale(torch.tensor(1.0), qmax=0)


# --------------------------------------------------------------------------------------------------
# torch.library integration
# --------------------------------------------------------------------------------------------------


def _opcheck_cases():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 8, generator=g)
    q = _random_int8((3, 5, 8), g)
    w_q = _random_int8((6, 8), g)
    return [
        (quantize, (x, torch.tensor(0.05))),
        (quantize, (x, torch.rand(5, generator=g) + 0.01, 1)),
        (quantize, (x.half(), torch.tensor([0.05]))),
        (dequantize, (q, torch.tensor(0.05), torch.float16)),
        (dequantize, (q, torch.rand(8, generator=g) + 0.01, torch.bfloat16, -1)),
        (int8_linear, (q, torch.tensor(0.02), w_q, torch.rand(6, generator=g), torch.randn(6, generator=g),
                       torch.tensor(0.5))),
        (int8_linear, (q, torch.tensor(0.02), w_q, torch.tensor(0.01), None, None, torch.float16)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    # Our ops have no autograd formula and take no inputs requiring grad, so every check applies.
    torch.library.opcheck(op.default, args)


def test_fake_tensors_give_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x_q = torch.empty(2, 7, 32, dtype=torch.int8)
        w_q = torch.empty(16, 32, dtype=torch.int8)
        y = int8_linear(x_q, torch.empty(()), w_q, torch.empty(16), None, None, torch.bfloat16)
        assert y.shape == (2, 7, 16) and y.dtype == torch.bfloat16
        assert int8_linear(x_q, torch.empty(()), w_q, torch.empty(16), None, torch.empty(())).dtype == torch.int8
        assert quantize(torch.empty(4, 5, dtype=torch.float16), torch.empty(5)).dtype == torch.int8
        with pytest.raises(ValueError, match="K=32 but w_q"):
            int8_linear(x_q, torch.empty(()), torch.empty(16, 8, dtype=torch.int8), torch.empty(16))


class _QuantLinear(nn.Module):
    """Quantize -> int8_linear with the scales as buffers, as the compiled graph will hold them."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(16, 8)
        w_q, w_scale = quantize_weight_per_channel(lin.weight)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", lin.bias.detach().clone())
        self.register_buffer("x_scale", torch.tensor(0.02))
        self.register_buffer("out_scale", torch.tensor(0.01))

    def forward(self, x):
        x_q = torch.ops.quamba.quantize(x, self.x_scale)
        y_q = torch.ops.quamba.int8_linear(x_q, self.x_scale, self.w_q, self.w_scale, self.bias, self.out_scale)
        return torch.ops.quamba.dequantize(y_q, self.out_scale, torch.float16)


def test_in_place_scale_update_takes_effect_without_retracing():
    torch.manual_seed(10)
    gm = torch.fx.symbolic_trace(_QuantLinear())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [quantize, int8_linear, dequantize]
    # The scales are read from buffers at run time, not baked into the graph as constants.
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} >= {"x_scale", "out_scale", "w_scale"}
    code_before = gm.code
    x = torch.randn(4, 16)
    y0 = gm(x)

    gm.x_scale.mul_(1.5)  # only the buffer changes: same graph, same code
    y1 = gm(x)
    assert gm.code == code_before
    assert not torch.equal(y0, y1)
    x_q = quantize(x, torch.tensor(0.03))
    expected = dequantize(int8_linear(x_q, torch.tensor(0.03), gm.w_q, gm.w_scale, gm.bias, gm.out_scale),
                          gm.out_scale, torch.float16)
    assert torch.equal(y1, expected)

    gm.out_scale.fill_(0.02)
    y2 = gm(x)
    assert not torch.equal(y1, y2)
    assert torch.equal(quantize(x, gm.x_scale), quantize(x, torch.tensor(0.03)))
